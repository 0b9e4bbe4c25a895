"""The VGG-16 classifier head (512 -> 4096 -> 4096 -> 10) vs its T-MLP, and the head's share of VGG-16's time.

The whole head is one Taylor block, F: R^512 -> R^10, so even dense Jacobians are only 10 x 512 per centre: this
is the one scale at which the "two orders of magnitude" claim for T-MLP can hold. Weights are random (no trained
CIFAR VGG-16 here yet): latencies are valid, output errors are reported but say nothing about a trained head.

    python bench/head.py [--out bench/results/head]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import torch

from tmlp.calibration import kmeans
from tmlp.taylor import TaylorMLP, block_derivatives
from tmlp.export import export_onnx, quantize_int8_dynamic
from tmlp.models import create_model
from tmlp.runtime import run


def latency(path: str, shape: tuple[int, ...], runs: int, warmup: int = 10) -> dict:
    session = run.make_session(path, "cpu", 1)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    return run.percentiles(run.time_batches(session, session.get_inputs()[0].name, batches, warmup, runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/head")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    vgg = create_model("vgg16", {"num_classes": 10, "hidden": 4096}).eval()
    head = vgg.classifier
    with torch.no_grad():  # the head's real input distribution for this (random) network: pooled conv features
        images = torch.randn(2560, 3, 32, 32)
        feats = torch.cat([torch.flatten(vgg.pool(vgg.features(x)), 1) for x in images.split(256)])
    calib, test = feats[:2048], feats[2048:]
    with torch.no_grad():
        ref = head(test)
    tmp = tempfile.mkdtemp(prefix="tmlp-head-")
    paths = {"fp32 head": os.path.join(tmp, "head.onnx"), "int8 head": os.path.join(tmp, "head.int8.onnx")}
    export_onnx(head, calib[:2], paths["fp32 head"], {})
    quantize_int8_dynamic(paths["fp32 head"], paths["int8 head"])
    errors = {"fp32 head": 0.0}
    import onnxruntime as ort

    s8 = ort.InferenceSession(paths["int8 head"], providers=["CPUExecutionProvider"])
    y8 = torch.from_numpy(s8.run(None, {s8.get_inputs()[0].name: test.numpy()})[0])
    errors["int8 head"] = float((y8 - ref).norm() / ref.norm())
    for k in (10, 100, 1000):
        centres = kmeans(calib, k, seed=0, n_init=1)
        taylor = TaylorMLP(centres, block_derivatives(head, centres, 1), 1).eval()
        name = f"T-MLP dense order 1, k={k}"
        paths[name] = os.path.join(tmp, f"taylor-{k}.onnx")
        export_onnx(taylor, calib[:2], paths[name], {})
        with torch.no_grad():
            errors[name] = float((taylor(test) - ref).norm() / ref.norm())
    rows = []
    for n in (1, 8, 128):
        base = None
        for name, path in paths.items():
            lat = latency(path, (n, 512), args.runs)
            base = base or lat["p50"]
            rows.append({"variant": name, "N": n, "p50_ms": lat["p50"], "p90_ms": lat["p90"],
                         "speedup_vs_fp32": base / lat["p50"], "file_mb": run.model_bytes(path) / 1e6,
                         "rel_err": errors[name]})
    whole = os.path.join(tmp, "vgg16.onnx")
    export_onnx(vgg, images[:2], whole, {})
    vgg_lat = latency(whole, (1, 3, 32, 32), 100)
    head_lat = next(r for r in rows if r["variant"] == "fp32 head" and r["N"] == 1)["p50_ms"]
    share = {"vgg16_p50_ms": vgg_lat["p50"], "head_p50_ms": head_lat, "head_share": head_lat / vgg_lat["p50"],
             "head_macs": 512 * 4096 + 4096 * 4096 + 4096 * 10,
             "conv_macs": int(sum(m.in_channels * m.out_channels * 9 * s * s for m, s in _conv_sizes(vgg)))}
    os.makedirs(args.out, exist_ok=True)
    machine = run.machine_info()
    with open(os.path.join(args.out, "head.json"), "w") as f:
        json.dump({"rows": rows, "share": share, "machine": machine}, f, indent=2)
    lines = [f"VGG-16 classifier head (512 -> 4096 -> 4096 -> 10, random weights), onnxruntime {machine['onnxruntime']}"
             f" CPU, 1 thread, {machine['cpu']}; p50 of {args.runs} runs.", "",
             "| N | variant | p50 ms | p90 ms | vs fp32 head | file MB | rel. error (random weights) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['N']} | {r['variant']} | {r['p50_ms']:.4f} | {r['p90_ms']:.4f} | {r['speedup_vs_fp32']:.1f}x | "
              f"{r['file_mb']:.2f} | {r['rel_err']:.4f} |" for r in rows]
    lines += ["", f"Whole VGG-16 (32x32, batch 1): p50 {share['vgg16_p50_ms']:.3f} ms; the fp32 head alone "
              f"{share['head_p50_ms']:.4f} ms = {100 * share['head_share']:.1f}% of it (multiply-adds: head "
              f"{share['head_macs'] / 1e6:.1f} M, convolutions {share['conv_macs'] / 1e6:.0f} M). Replacing the head "
              "can save at most that share of VGG-16's time, whatever its own speed-up."]
    with open(os.path.join(args.out, "head.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _conv_sizes(vgg):
    """(conv, output side) pairs of the CIFAR VGG at 32x32."""
    side, out = 32, []
    for m in vgg.features:
        if isinstance(m, torch.nn.MaxPool2d):
            side //= 2
        elif isinstance(m, torch.nn.Conv2d):
            out.append((m, side))
    return out


if __name__ == "__main__":
    main()
