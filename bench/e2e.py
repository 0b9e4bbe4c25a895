"""Whole models end to end: fp32 original, int8 original, T-MLP and T-MLP + int8, at batch 1 and 8.

    python bench/e2e.py --run runs/deit_small-digits [--run runs/cifar10 ...]   # exported runs, with accuracy
    python bench/e2e.py --synthetic-224                                         # DeiT-Small at 224x224, latency

``--synthetic-224`` builds DeiT-Small (timm deit_small_patch16_224, random weights: latency does not depend on
them), calibrates all 12 MLPs on random images (k=100, shared basis r=32, order 1) and times it; its accuracy means
nothing and is not reported. Each configuration is measured by ``tmlp bench`` (fresh processes, median of repeats).
Results: bench/results/e2e/e2e.json and e2e.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

from tmlp.measure import run_bench


def synthetic_224(folder: str, k: int, rank: int) -> str:
    """Export a random-weight DeiT-Small at 224x224 with its T-MLP into ``folder``; returns the run folder."""
    from tmlp.models import create_model, save_checkpoint
    import tmlp

    rng = np.random.default_rng(0)
    data = os.path.join(folder, "random224.npz")
    np.savez(data, x=rng.integers(0, 256, (80, 224, 224, 3), dtype=np.uint8), y=rng.integers(0, 1000, 80))
    torch.manual_seed(0)
    config = {"img_size": 224, "patch_size": 16, "in_chans": 3, "num_classes": 1000}
    ckpt = os.path.join(folder, "deit_small_224_random.pt")
    save_checkpoint(ckpt, create_model("deit_small", config), "deit_small", config, {"dataset": f"npz:{data}"})
    out = os.path.join(folder, "deit_small-224")
    tmlp.run_export(tmlp.ExportSpec("deit_small", source=tmlp.SourceSpec(checkpoint=ckpt, calib_images=64, eval_images=16),
                                    calibration=tmlp.TaylorConfig(k=k, rank=rank),
                                    plan=tmlp.PlanSpec(max_acc_drop=None), out_dir=out))
    os.unlink(os.path.join(out, "val.npz"))  # random labels: time only
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], help="a run folder written by tmlp export")
    parser.add_argument("--synthetic-224", action="store_true")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", default="bench/results/e2e")
    args = parser.parse_args()
    runs = list(args.run)
    tmp = tempfile.mkdtemp(prefix="tmlp-e2e-")
    if args.synthetic_224:
        runs.append(synthetic_224(tmp, 100, 32))
    if not runs:
        sys.exit("nothing to measure: pass --run DIR and/or --synthetic-224")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "e2e.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    for run_dir in runs:
        for batch in (int(b) for b in args.batches.split(",")):
            r = run_bench(run_dir, batch=batch, repeats=args.repeats, runs=args.runs)
            name = "deit_small-224 (random weights)" if run_dir.startswith(tmp) else os.path.basename(run_dir)
            results[f"{name} batch {batch}"] = {k: v for k, v in r.items() if k != "run"}
            print(r["markdown"], flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    lines = ["# End to end", "", "Each block: `tmlp bench` on one exported model (fresh processes, median of the "
             "repeats), onnxruntime CPU, 1 thread.", ""]
    for key in sorted(results):
        lines += [f"## {key}", "", results[key]["markdown"], ""]
    with open(os.path.join(args.out, "e2e.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
