"""Static vs dynamic int8 on a run's original and T-MLP models: which static QDQ layout is fast on this CPU.

onnxruntime's ``quantize_static`` by default puts QuantizeLinear/DequantizeLinear pairs around every op type it
knows (Add, Mul, Reshape, Transpose, Concat, Squeeze, ... besides MatMul/Gemm); dynamic quantization touches only the
MatMul/Gemm weights. This study builds, for ``original.onnx`` and ``tmlp.onnx`` of one run folder (Taylor blocks
float in every T-MLP variant):

- ``dynamic``: onnxruntime dynamic int8 of the MatMul/Gemm weights (what ``tmlp bench`` builds);
- ``static all ops``: static QDQ of every op type onnxruntime quantizes (``tmlp export --quantize static`` before);
- ``static MatMul/Gemm``: static QDQ of MatMul and Gemm only (both weight and activation-by-activation MatMuls);
- ``static weights``: static QDQ of the MatMul/Gemm nodes with a constant weight only;
- ``static weights, float out``: the same with their outputs left float (``MatMulConstBOnly``,
  ``OpTypesToExcludeOutputQuantization``), so onnxruntime fuses each into one MatMulIntegerToFloat (bias included)
  instead of QuantizeLinear -> QLinearMatMul -> DequantizeLinear -> Add.

Activation ranges: MinMax on the run's first 256 training images (the export's ``--quant-images``), computed once.
Accuracy on the run's val.npz (report split) in onnxruntime; latency interleaved in one process (1 thread, batch 1,
``--rounds`` rounds of ``--runs``), so the ratios hold on a noisy machine.

    python bench/static_int8.py --run runs/cifar-default [--out bench/results/static-int8]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tmlp.io import write_json, write_text  # noqa: E402
from tmlp.runtime import run  # noqa: E402

LAYOUTS = ("dynamic", "static all ops", "static MatMul/Gemm", "static weights", "static weights, float out")


def build(run_dir: str, work: str) -> dict[tuple[str, str], str]:
    """{(model, layout): path} for model in original/tmlp, every layout of LAYOUTS."""
    import onnx

    from tmlp.export.quantize import nodes_in_scopes, quantize_int8_dynamic
    from tmlp.export.static_quant import quantize_int8_static, weight_layers
    from tmlp.quantization import calibration_images
    from tmlp import ExportSpec
    from tmlp.stages import load

    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    spec = ExportSpec.from_dict(manifest["spec"])
    images = None
    paths = {}
    os.makedirs(work, exist_ok=True)
    for stem, scopes in (("original", None), ("tmlp", manifest["layers"])):
        src = os.path.join(run_dir, f"{stem}.onnx")
        model = onnx.load(src, load_external_data=False)
        skip = set(nodes_in_scopes(model, scopes)) if scopes else set()
        weights = [n for n in weight_layers(model) if n not in skip]
        cache = os.path.join(work, f"ranges-{stem}.json")
        out = {layout: os.path.join(work, f"{stem}.{layout.replace(', ', '-').replace(' ', '-').replace('/', '-')}.onnx")
               for layout in LAYOUTS}
        if not all(os.path.isfile(p) for p in out.values()):
            if images is None:
                images = calibration_images(load(spec, print, False), spec.quantize.images)
            quantize_int8_dynamic(src, out["dynamic"], op_types=["MatMul", "Gemm"], exclude_scopes=scopes)
            quantize_int8_static(src, out["static all ops"], images, "minmax", exclude_scopes=scopes, cache=cache,
                                 layout="all")
            quantize_int8_static(src, out["static MatMul/Gemm"], None, "minmax", exclude_scopes=scopes,
                                 op_types=["MatMul", "Gemm"], cache=cache, layout="all")
            quantize_int8_static(src, out["static weights"], None, "minmax", only=weights, cache=cache, layout="all")
            quantize_int8_static(src, out["static weights, float out"], None, "minmax", exclude_scopes=scopes,
                                 cache=cache, layout="matmul")  # the default for graphs without convolutions
        paths.update({(stem, layout): p for layout, p in out.items()})
    return paths


def op_counts(path: str) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(path, load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a folder written by tmlp export")
    parser.add_argument("--out", default="bench/results/static-int8")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    paths = build(args.run, os.path.join(args.run, "static-study"))
    models = {("original", "fp32"): os.path.join(args.run, "original.onnx"),
              ("tmlp", "fp32"): os.path.join(args.run, "tmlp.onnx"), **paths}
    images, labels = run.load_images(os.path.join(args.run, "val.npz"))
    spec = json.loads(run.read_metadata(models["original", "fp32"])[run.PREPROCESSING_KEY])
    x = run.preprocess(images, spec)
    sessions = {k: run.make_session(p, "cpu", 1) for k, p in models.items()}
    accuracy = {}
    for key, s in sessions.items():
        accuracy[key] = run.evaluate(s, s.get_inputs()[0].name, x, labels)
        print(f"{key[0]} {key[1]}: {100 * accuracy[key]:.2f}% on {len(labels)} report-split images", flush=True)
    batches = [x[i:i + 1] for i in range(4)]
    rounds: dict[tuple[str, str], list[dict[str, float]]] = {k: [] for k in models}
    keys = list(models)
    for r in range(args.rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            s = sessions[key]
            rounds[key].append(run.percentiles(run.time_batches(s, s.get_inputs()[0].name, batches, args.warmup,
                                                                args.runs)))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k[0]} {k[1]} {rounds[k][-1]['p50']:.2f}"
                                                          for k in keys), flush=True)
    rows = []
    for key in keys:
        counts = op_counts(models[key])
        rows.append({"model": key[0], "layout": key[1], "onnx": os.path.relpath(models[key], args.run),
                     "accuracy": 100 * accuracy[key],
                     "p50_ms": float(np.median([t["p50"] for t in rounds[key]])),
                     "p90_ms": float(np.median([t["p90"] for t in rounds[key]])),
                     "file_mb": run.model_bytes(models[key]) / 2**20,
                     "quantize_linear": counts.get("QuantizeLinear", 0) + counts.get("DynamicQuantizeLinear", 0),
                     "dequantize_linear": counts.get("DequantizeLinear", 0)})
    for row in rows:
        fp32 = next(r for r in rows if r["model"] == row["model"] and r["layout"] == "fp32")
        dyn = next(r for r in rows if r["model"] == row["model"] and r["layout"] == "dynamic")
        row["speedup_vs_fp32"] = fp32["p50_ms"] / row["p50_ms"]
        row["speedup_vs_dynamic"] = dyn["p50_ms"] / row["p50_ms"]
    machine = run.machine_info()
    lines = [f"`{args.run}`: onnxruntime {machine['onnxruntime']} CPU, {machine['cpu']}, 1 thread, batch 1; "
             f"latency interleaved in one process ({args.rounds} rounds x {args.runs} runs, median of the rounds' "
             f"p50); accuracy on val.npz ({len(labels)} report-split images); static ranges MinMax on 256 "
             "training images; Taylor blocks float in every T-MLP variant.", "",
             "| model | int8 layout | accuracy | p50 ms | p90 ms | vs fp32 | vs dynamic | (Dynamic)QuantizeLinear | "
             "DequantizeLinear | file MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layout']} | {r['accuracy']:.2f}% | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} "
                     f"| {r['speedup_vs_fp32']:.2f}x | {r['speedup_vs_dynamic']:.2f}x | {r['quantize_linear']} | "
                     f"{r['dequantize_linear']} | {r['file_mb']:.1f} |")
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "static_int8.json"),
               {"run": args.run, "machine": machine, "args": vars(args), "rows": rows,
                "date": time.strftime("%Y-%m-%d")})
    write_text(os.path.join(args.out, "static_int8.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
