"""Taylor tensors vs least-squares fitted ones (``--fit lstsq``), block by block, on real activations.

For every MLP of a trained DeiT-Small: K-means (k centres) and the shared basis (rank r, ``data``) from 20,000
tokens sampled uniformly from 2,000 training images; per-centre tensors either the Taylor ones (derivatives at the
centres) or least-squares fitted to the block's outputs on all of those images' tokens (tmlp.taylor.fit, ridge 1e-2). The
relative output error ‖y_T − y‖/‖y‖ is measured on 5,000 held-out tokens of 1,000 validation images. ``floor`` is
the best any first-order model on the same cells can do: a full affine map per cell, least squares on the same
tokens (d_in + 1 unknowns per output and cell, ridge 1e-2), i.e. what no basis, rank or fitting of the deployable
form can beat at that k. ``--partitions input,hidden`` repeats all of it with the cells of each partition
(tmlp.taylor.partition: ``hidden`` clusters the first layer's pre-activations), so the floor of each is measured too;
``hidden:16`` finds the cells in the 16 leading principal directions of that partition (``--partition-rank 16``).

    python bench/fit_error.py [--checkpoint bench/deit_small_cifar10_fp16.pt] [--k 100] [--rank 32]
                        [--partitions input,hidden,hidden:16] [--out bench/results/fit]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from tmlp.calibration import collect_inputs, partition_kmeans, shared_block
from tmlp.data import to_tensor
from tmlp.taylor import (
    CellSums, SharedTaylorMLP, TaylorConfig, accumulate_, nearest_centre, partition_projection, solve_cells,
)
from tmlp.stages import load_model_and_data
from tmlp.surgery import select_blocks


def rel_err(pred: torch.Tensor, ref: torch.Tensor) -> float:
    return float((pred - ref).norm() / ref.norm())


def affine_floor(calib: torch.Tensor, y: torch.Tensor, test: torch.Tensor, ref: torch.Tensor, centres: torch.Tensor,
                 projection: torch.Tensor | None, ridge: float = 1e-2) -> float:
    """Held-out relative error of a full affine least-squares map per cell (scale-relative ridge)."""
    c, ct = nearest_centre(calib, centres, projection), nearest_centre(test, centres, projection)
    pred = torch.zeros_like(ref)
    for i in range(len(centres)):
        m, mt = c == i, ct == i
        if not mt.any():
            continue
        x = torch.cat([calib[m], torch.ones(int(m.sum()), 1)], 1).double()
        gram = x.T @ x
        lam = ridge * float(torch.diagonal(gram).sum()) / gram.shape[0]
        w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), x.T @ y[m].double())
        pred[mt] = (torch.cat([test[mt], torch.ones(int(mt.sum()), 1)], 1).double() @ w).float()
    return rel_err(pred, ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="bench/deit_small_cifar10_fp16.pt")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--partitions", default="input", help="comma-separated, from tmlp.taylor.partition.PARTITIONS, each optionally :q (--partition-rank q)")
    parser.add_argument("--out", default="bench/results/fit")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model_and_data("deit_small", args.checkpoint, progress=False)
    model, data, spec = loaded.model.eval(), loaded.data, loaded.spec
    fqns = select_blocks(model)

    def tokens(split, n_images, limit):
        x = to_tensor(split.images(np.arange(min(n_images, len(split)))), spec)
        return collect_inputs(model, fqns, iter(x.split(128)), (len(x) + 127) // 128, limit, progress=False)

    calib_all, test_all = tokens(data.train, args.train_images, 10 ** 7), tokens(data.val, 1000, 5000)
    partitions = args.partitions.split(",")
    cols = [f"{m}_{p}" for p in partitions for m in ("taylor", "lstsq", "floor")]
    rows = []
    for fqn in fqns:
        t0 = time.time()
        block = model.get_submodule(fqn)
        calib = calib_all[fqn]
        sample = calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(0))[:20000]]
        with torch.no_grad():
            y = torch.cat([block(calib[s:s + 8192]) for s in range(0, len(calib), 8192)])
            ref = block(test_all[fqn])
        row = {"block": fqn, "train_tokens": len(calib)}
        for part in partitions:
            name, _, q = part.partition(":")
            proj = partition_projection(block, name, sample, int(q) if q else None)
            centres = partition_kmeans(sample, args.k, 0, 1, proj)
            taylor = shared_block(block, sample, centres, TaylorConfig(k=args.k, basis="shared", rank=args.rank),
                                  projection=proj)
            sums = CellSums.for_block(taylor, 1)
            accumulate_(sums, calib, y, centres, taylor.u, taylor.v, 1, projection=proj)
            fitted, _ = solve_cells(sums, taylor, 1e-2)
            with torch.no_grad():
                row[f"taylor_{part}"] = rel_err(SharedTaylorMLP(centres, taylor, 1, proj)(test_all[fqn]), ref)
                row[f"lstsq_{part}"] = rel_err(SharedTaylorMLP(centres, fitted, 1, proj)(test_all[fqn]), ref)
                row[f"floor_{part}"] = affine_floor(calib, y, test_all[fqn], ref, centres, proj)
        rows.append(row)
        print(f"{fqn}: " + ", ".join(f"{c} {row[c]:.4f}" for c in cols) + f" ({time.time() - t0:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fit.json"), "w") as f:
        json.dump({"checkpoint": args.checkpoint, "k": args.k, "rank": args.rank, "partitions": partitions,
                   "rows": rows, "date": time.strftime("%Y-%m-%d")}, f, indent=2)
    names = {"taylor": "Taylor", "lstsq": "least squares (`--fit lstsq`)", "floor": "floor: full affine per cell"}
    lines = [f"Held-out relative output error per block, {args.checkpoint}, k={args.k}, shared basis r={args.rank} "
             f"(data), order 1; fit on {args.train_images} training images' tokens, error on 5000 validation tokens.",
             "", "| block | " + " | ".join(f"{names[c.split('_')[0]]}, {c.split('_')[1]} partition" for c in cols)
             + " |", "| --- |" + " --- |" * len(cols)]
    lines += ["| " + r["block"] + " | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |" for r in rows]
    lines.append("| mean | " + " | ".join(f"{np.mean([r[c] for r in rows]):.4f}" for c in cols) + " |")
    with open(os.path.join(args.out, "fit.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
