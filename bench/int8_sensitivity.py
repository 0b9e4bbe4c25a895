"""Static int8 of an exported T-MLP model: calibration methods, the per-layer sensitivity report, mixed precision.

    python bench/int8_sensitivity.py --run runs/cifar-default --out bench/results/int8-sensitivity

On the run's tmlp.onnx (Taylor blocks float, as `tmlp export --quantize static` leaves them) and original.onnx:
1. static int8 with each activation calibration (MinMax, Entropy, Percentile on ``--calib-images`` training images),
   accuracy on the choose and the report split;
2. the sensitivity report of the T-MLP model: every weight layer quantized alone, the Jensen–Shannon divergence of
   the class probabilities from the float model's on 256 choose-split images (export/static_quant.layer_sensitivity);
3. mixed precision (export/static_quant.mixed_precision) under budgets against the float T-MLP model on the choose
   split: the fewest most sensitive layers kept float, then its report-split accuracy;
4. latency of the float, dynamic int8, plain static and mixed-precision T-MLP files, interleaved in one process
   (onnxruntime, 1 thread, batch 1).
Choices (the budgets' layer counts) are made on the choose split only; the report split is measured last.
Results: int8_sensitivity.json and int8_sensitivity.md in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from tmlp.budget import ort_accuracy
from tmlp.export import quantize_int8_dynamic
from tmlp.export.static_quant import CALIBRATION_METHODS, layer_sensitivity, mixed_precision, quantize_int8_static
from tmlp.quantization import calibration_images
from tmlp.runtime import run
from tmlp import ExportSpec
from tmlp.stages import load


def interleaved_p50(paths: dict[str, str], shape: tuple[int, ...], rounds: int = 15, runs: int = 20
                    ) -> dict[str, dict[str, float]]:
    """p50/p90 (ms) of each file at batch 1, 1 thread, interleaved in rounds so that a slow spell falls on all."""
    sessions = {name: run.make_session(path, "cpu", 1) for name, path in paths.items()}
    x = [np.random.default_rng(i).standard_normal((1, *shape)).astype(np.float32) for i in range(4)]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        run.time_batches(session, session.get_inputs()[0].name, x, 10, 0)
    for _ in range(rounds):
        for name, session in sessions.items():
            times[name] += run.time_batches(session, session.get_inputs()[0].name, x, 2, runs)
    return {name: run.percentiles(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a folder written by tmlp export")
    parser.add_argument("--out", default="bench/results/int8-sensitivity")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--method", default="minmax", choices=CALIBRATION_METHODS,
                        help="the calibration the sensitivity report and mixed precision use")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.2],
                        help="points the mixed-precision file may lose against the float T-MLP on the choose split")
    args = parser.parse_args()

    manifest = json.load(open(os.path.join(args.run, "manifest.json")))
    spec = ExportSpec.from_dict(manifest["spec"])
    loaded = load(spec, print, progress=False)
    splits = loaded.val_splits(spec.source)
    calib = calibration_images(loaded, args.calib_images)
    scopes = list(manifest["layers"])
    files = {"original": os.path.join(args.run, "original.onnx"), "tmlp": os.path.join(args.run, "tmlp.onnx")}
    acc = lambda path, split: 100 * ort_accuracy(path, split, loaded.spec)  # noqa: E731
    work = tempfile.mkdtemp(prefix="tmlp-int8-sens-")
    result: dict = {"run": args.run, "model": manifest.get("model"), "blocks_replaced": len(scopes),
                    "calib_images": len(calib), "choose_images": len(splits.choose),
                    "report_images": len(splits.report), "float": {}, "methods": {}, "machine": run.machine_info()}
    for name, path in files.items():
        result["float"][name] = {"choose": acc(path, splits.choose), "report": acc(path, splits.report)}
        print(name, "float", result["float"][name], flush=True)
    caches = {}
    for method in CALIBRATION_METHODS:
        result["methods"][method] = {}
        for name, path in files.items():
            dst = os.path.join(work, f"{name}.{method}.onnx")
            caches[name, method] = os.path.join(work, f"ranges-{name}-{method}.json")
            quantize_int8_static(path, dst, calib, method, exclude_scopes=scopes if name == "tmlp" else None,
                                 cache=caches[name, method])
            result["methods"][method][name] = {"choose": acc(dst, splits.choose), "report": acc(dst, splits.report)}
            print(name, method, result["methods"][method][name], flush=True)

    probe = run.preprocess(splits.choose.images(np.arange(min(256, len(splits.choose)))), loaded.spec)
    ranking = layer_sensitivity(files["tmlp"], calib, probe, args.method, caches["tmlp", args.method], work, scopes,
                                progress=True)
    result["sensitivity"] = [{"node": s.node, "module": s.module, "op_type": s.op_type, "js": s.js} for s in ranking]
    float_choose = result["float"]["tmlp"]["choose"]
    result["mixed"] = []
    latency_files = {"T-MLP float": files["tmlp"], f"T-MLP static int8 ({args.method})":
                     os.path.join(work, f"tmlp.{args.method}.onnx")}
    dynamic = os.path.join(work, "tmlp.dynamic.onnx")
    quantize_int8_dynamic(files["tmlp"], dynamic, exclude_scopes=scopes)
    latency_files["T-MLP dynamic int8"] = dynamic
    for budget in args.budgets:
        dst = os.path.join(work, f"tmlp.mixed-{budget:g}.onnx")
        kept = mixed_precision(files["tmlp"], dst, ranking,
                               lambda p: float_choose - acc(p, splits.choose) <= budget + 1e-9, args.method,
                               caches["tmlp", args.method], scopes)
        row = {"budget_points": budget, "layers_kept_float": kept, "choose": acc(dst, splits.choose),
               "report": acc(dst, splits.report)}
        result["mixed"].append(row)
        latency_files[f"T-MLP mixed, budget {budget:g} ({len(kept)} float)"] = dst
        print("mixed", row, flush=True)
    shape = tuple(run.make_session(files["tmlp"], "cpu", 1).get_inputs()[0].shape[1:])
    result["latency"] = interleaved_p50(latency_files, shape)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "int8_sensitivity.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "int8_sensitivity.md"), "w") as f:
        f.write(report(result, args.method) + "\n")
    print(report(result, args.method))


def report(r: dict, method: str) -> str:
    """The markdown tables of a result."""
    fl = r["float"]
    lines = [f"{r['model']}, {r['blocks_replaced']} Taylor blocks (float); static int8 calibrated on "
             f"{r['calib_images']} training images; accuracy in onnxruntime on the choose ({r['choose_images']}) and "
             f"report ({r['report_images']}) splits; {r['machine'].get('cpu', '')}.", "",
             "| model | int8 | choose | report |", "| --- | --- | --- | --- |"]
    for name in ("original", "tmlp"):
        lines.append(f"| {name} | float | {fl[name]['choose']:.2f}% | {fl[name]['report']:.2f}% |")
        for calibration, per in r["methods"].items():
            lines.append(f"| {name} | static, {calibration} | {per[name]['choose']:.2f}% | "
                         f"{per[name]['report']:.2f}% |")
    lines += ["", f"Most sensitive weight layers of the T-MLP model ({method}; Jensen–Shannon divergence, nats):", "",
              "| rank | module | node | op | JS |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {i + 1} | `{s['module']}` | `{s['node']}` | {s['op_type']} | {s['js']:.2e} |"
              for i, s in enumerate(r["sensitivity"][:10])]
    lines += ["", "| mixed precision: budget vs float T-MLP (choose) | layers kept float | choose | report |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {m['budget_points']:g} points | {len(m['layers_kept_float'])} | {m['choose']:.2f}% | "
              f"{m['report']:.2f}% |" for m in r["mixed"]]
    base = r["latency"]["T-MLP float"]["p50"]
    lines += ["", "| file (batch 1, 1 thread, interleaved) | p50 ms | p90 ms | vs float T-MLP |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {t['p50']:.3f} | {t['p90']:.3f} | {base / t['p50']:.2f}x |" for name, t in r["latency"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
