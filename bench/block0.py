"""How much of the CIFAR model's T-MLP accuracy loss is ``blocks.0.mlp``, and does more capacity there win it back?

All 12 MLPs of the CIFAR-10 DeiT-Small replaced (k=100, shared basis r=32, ``--fit lstsq``), then block 0 either kept
original or given more centres / rank (``tmlp export --block-k 0=K``); PyTorch accuracy on the 5,000 validation
images, before distillation. Calibrations come from (and go to) tmlp's cache, as in ``tmlp export``.

    python bench/block0.py [--checkpoint bench/deit_small_cifar10_fp16.pt] [--out bench/results/block0]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace

import torch

from tmlp.calibration import calibrate
from tmlp.stages import load_model_and_data, tensor_batches
from tmlp.surgery import select_blocks, taylorize_
from tmlp.taylor import TaylorConfig
from tmlp.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="bench/deit_small_cifar10_fp16.pt")
    parser.add_argument("--out", default="bench/results/block0")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model_and_data("deit_small", args.checkpoint, progress=False)
    model, data, spec = loaded.model.eval(), loaded.data, loaded.spec
    fqns = select_blocks(model)
    batches, n_batches = tensor_batches(data, spec, "train", 5000)
    key = loaded.calibration_key(5000)
    base = TaylorConfig(k=100, basis="shared", rank=32, fit="lstsq")
    calibration = calibrate(model, fqns, batches, n_batches, base, key=key, progress=False, log=print)

    def accuracy(cals, configs) -> float:
        tmlp_model = copy.deepcopy(model)
        taylorize_(tmlp_model, configs, layers=list(cals), calibration=cals)
        return 100 * evaluate(tmlp_model, data.val, spec, torch.device("cpu"), limit=5000)

    rows = [{"variant": "original model", "accuracy": 100 * evaluate(model, data.val, spec, torch.device("cpu"),
                                                                      limit=5000)},
            {"variant": "all 12 at k=100 r=32", "accuracy": accuracy(calibration, base)},
            {"variant": "blocks.0.mlp kept original, 11 replaced",
             "accuracy": accuracy({f: c for f, c in calibration.items() if f != fqns[0]}, base)}]
    for k, rank in ((400, 32), (400, 64)):
        t0 = time.time()
        config = replace(base, k=k, rank=rank)
        block0 = calibrate(model, fqns[:1], batches, n_batches, config, key=key, progress=False, log=print)
        rows.append({"variant": f"blocks.0.mlp at k={k} r={rank}, 11 at k=100 r=32",
                     "accuracy": accuracy({**calibration, **block0}, {fqns[0]: config, "_default": base}),
                     "seconds": round(time.time() - t0, 1)})
    for row in rows:
        print(f"{row['variant']}: {row['accuracy']:.2f}%", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "block0.json"), "w") as f:
        json.dump({"checkpoint": args.checkpoint, "rows": rows, "date": time.strftime("%Y-%m-%d")}, f, indent=2)
    lines = [f"PyTorch accuracy on 5,000 validation images before distillation, {args.checkpoint}, all MLPs "
             "replaced (--fit lstsq) except where said.", "", "| variant | accuracy |", "| --- | --- |"]
    lines += [f"| {r['variant']} | {r['accuracy']:.2f}% |" for r in rows]
    with open(os.path.join(args.out, "block0.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
