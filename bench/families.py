"""T-MLP on the edge models people deploy: each timm family end to end at its native input size, random weights.

    python bench/families.py [--models deit_small_patch16_224,swin_tiny_patch4_window7_224,...] [--repeats 3]
    python bench/families.py --models convnext_atto,efficientformer_l1 --rank 8     # a smaller basis

For each model (timm, random weights: latency does not depend on them) it exports original.onnx and tmlp.onnx with
every MLP block the type filter finds replaced (k=100, shared basis r=32, order 1, calibrated on 64 random images),
then measures, in fresh processes with onnxruntime on 1 thread at batch 1 (``tmlp bench``): fp32, onnxruntime's
dynamic int8 (MatMul/Gemm weights: convolutions stay fp32), T-MLP and T-MLP + int8. The model's MLP share of time
is measured too: the same model with every MLP block replaced by a block that costs nothing (x * 0), timed
interleaved with the original — its speed-up is that model's ceiling for T-MLP. Accuracy of random weights means
nothing and is not reported. Results: bench/results/families-224/{families.json,families.md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import numpy as np
import torch
from torch import nn

import tmlp
from tmlp.blocks import block_table
from tmlp.measure import measure_in_subprocess, run_bench
from tmlp.models import create_model, input_size, load_checkpoint, save_checkpoint
from tmlp.surgery import replace_module

MODELS = ("deit_small_patch16_224", "swin_tiny_patch4_window7_224", "convnext_atto", "mobilevit_s",
          "efficientformer_l1")


class FreeBlock(nn.Module):
    """An MLP block that costs nothing: x * 0 (the block's output shape when d_out = d_in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.0


def export_run(name: str, folder: str, k: int, rank: int) -> tuple[str, list[str]]:
    """Export random-weight ``name`` and its T-MLP into ``folder/name``; returns (run folder, replaced blocks)."""
    torch.manual_seed(0)
    model = create_model(name, {}).eval()
    chans, h, w = input_size(name, {})
    rng = np.random.default_rng(0)
    data = os.path.join(folder, f"random{h}.npz")
    if not os.path.isfile(data):
        np.savez(data, x=rng.integers(0, 256, (80, h, w, chans), dtype=np.uint8), y=rng.integers(0, 1000, 80))
    ckpt = os.path.join(folder, f"{name}_random.pt")
    save_checkpoint(ckpt, model, name, {}, {"dataset": f"npz:{data}"})
    out = os.path.join(folder, name)
    result = tmlp.run_export(tmlp.ExportSpec(
        name, source=tmlp.SourceSpec(checkpoint=ckpt, calib_images=64, eval_images=16),
        calibration=tmlp.TaylorConfig(k=k, rank=rank), plan=tmlp.PlanSpec(max_acc_drop=None), out_dir=out))
    os.unlink(os.path.join(out, "val.npz"))  # random labels: time only
    return out, result.summary["layers"]


def free_mlp_model(run_dir: str, name: str, fqns: list[str], folder: str) -> tuple[str, dict]:
    """The original with every block in ``fqns`` replaced by FreeBlock, exported; returns (path, MAC shares)."""
    model, _ = load_checkpoint(os.path.join(folder, f"{name}_random.pt"))
    chans, h, w = input_size(name, {})
    infos, total = block_table(model, torch.zeros(1, chans, h, w), fqns)
    for fqn in fqns:
        replace_module(model, fqn, FreeBlock())
    path = os.path.join(run_dir, "free_mlp.onnx")
    tmlp.export_onnx(model, torch.zeros(1, chans, h, w), path, {"tmlp.variant": "MLP blocks replaced by x * 0"})
    return path, {"model_macs": total, "mlp_macs": sum(i.macs for i in infos), "input": [chans, h, w]}


def mlp_share_of_time(original: str, free: str, repeats: int, runs: int) -> dict:
    """Original and MLP-free model timed interleaved, fresh processes; medians of the p50 latencies (ms)."""
    times: dict[str, list[float]] = {"original": [], "free": []}
    for _ in range(repeats):
        for key, path in (("original", original), ("free", free)):
            m = measure_in_subprocess(path, None, "cpu", 1, 10, runs, 1, accuracy=False)
            times[key].append(m["latency_ms"]["p50"])
    orig, free_ms = statistics.median(times["original"]), statistics.median(times["free"])
    return {"original_p50_ms": orig, "free_mlp_p50_ms": free_ms, "mlp_share_of_time": 1 - free_ms / orig,
            "ceiling_speedup": orig / free_ms, "repeats": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", default="bench/results/families-224")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="tmlp-families-")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "families.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    for name in args.models.split(","):
        run_dir, fqns = export_run(name, folder, args.k, args.rank)
        free, macs = free_mlp_model(run_dir, name, fqns, folder)
        share = mlp_share_of_time(os.path.join(run_dir, "original.onnx"), free, args.repeats, args.runs)
        bench = run_bench(run_dir, batch=1, repeats=args.repeats, runs=args.runs)
        rows = {r["variant"]: r for r in bench["rows"]}
        key = name if (args.k, args.rank) == (100, 32) else f"{name} (k={args.k}, r={args.rank})"
        results[key] = {"blocks": len(fqns), **macs, **share, "machine": bench["machine"],
                         "taylor": f"k={args.k}, shared basis r={args.rank}, order 1",
                         "variants": {v: {"p50_ms": r["latency_ms"]["p50"], "p90_ms": r["latency_ms"]["p90"],
                                          "speedup_vs_fp32": r["speedup_vs_fp32"], "file_mb": r["file_bytes"] / 1e6}
                                      for v, r in rows.items()}}
        print(key, json.dumps(results[key], indent=1)[:600], flush=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    write_table(results, os.path.join(args.out, "families.md"))


def write_table(results: dict, path: str) -> None:
    lines = ["| model (random weights) | input | MLP blocks | MLP share of MACs | MLP share of time | ceiling | "
             "fp32 p50 | int8 | T-MLP | T-MLP + int8 | T-MLP + int8 vs int8 |", "|" + "---|" * 11]
    for name, r in results.items():
        v = r["variants"]
        fp32, int8 = v["fp32 original"], v["int8 original (ORT dynamic)"]
        t, ti = v["T-MLP"], v["T-MLP + int8 (rest of the model)"]
        lines.append(f"| {name} | {r['input'][1]}x{r['input'][2]} | {r['blocks']} | "
                     f"{100 * r['mlp_macs'] / r['model_macs']:.0f}% | {100 * r['mlp_share_of_time']:.0f}% | "
                     f"{r['ceiling_speedup']:.2f}x | {fp32['p50_ms']:.1f} ms | {int8['speedup_vs_fp32']:.2f}x | "
                     f"{t['speedup_vs_fp32']:.2f}x | {ti['speedup_vs_fp32']:.2f}x | "
                     f"{int8['p50_ms'] / ti['p50_ms']:.2f}x |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
