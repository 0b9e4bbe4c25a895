"""A Taylor block that keeps the most nonlinear hidden units exact: how much of each block's error do they carry?

Each DeiT-Small MLP is ``F(x) = W2 GELU(W1 x + b1) + b2`` with 1,536 hidden units. A unit whose pre-activation stays
on one side of GELU's bend inside a cell is linear there, and a first-order cell serves it well; a unit whose
pre-activation crosses the bend inside cells is what the piecewise-linear block cannot follow. This study keeps the
``m`` units with the largest such error exact, ``E(x) = W2[:, E] GELU(W1[E] x + b1[E])`` (2·m·d multiply-adds per
token: m = 64 is 4.2% of the MLP), and serves the rest, ``F(x) − E(x)``, with the default block (k centres, shared
basis rank r, least-squares fit). Score of unit j: ``‖W2[:, j]‖² · Σ_cells Σ_tokens (GELU(a_j) − ℓ_cj(a_j))²``, where
ℓ_cj is the least-squares line of GELU(a_j) on a_j in cell c (a_j = W1[j] x + b1[j]) — what a per-cell affine map
would leave of that unit alone.

Relative output error ‖ŷ − y‖/‖y‖ on 5,000 held-out tokens of 1,000 validation images, per block and m; cells,
basis and fit from 20,000 tokens of 2,000 training images, as in ``bench/fit_error.py`` (whose ``lstsq`` column is
m = 0).

    python bench/exact_units.py [--checkpoint bench/deit_small_cifar10_fp16.pt] [--m 0,32,64,128,256]
                                [--out bench/results/exact-units]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from torch import nn

from tmlp.calibration import collect_inputs, partition_kmeans, shared_block
from tmlp.data import to_tensor
from tmlp.io import write_json, write_text
from tmlp.stages import load_model_and_data
from tmlp.surgery import select_blocks
from tmlp.taylor import CellSums, SharedTaylorMLP, TaylorConfig, accumulate_, nearest_centre, solve_cells
from tmlp.taylor.exact import ExactUnits, HybridTaylorMLP, WithoutUnits, unit_scores


def fit_hybrid(mlp: nn.Module, calib: torch.Tensor, y: torch.Tensor, sample: torch.Tensor, centres: torch.Tensor,
               units: torch.Tensor, config: TaylorConfig) -> nn.Module:
    """The exact ``units`` plus the default block (shared basis, least squares on every ``calib`` row, ridge 1e-2)
    fitted to F − E; ``y`` = F(calib). No units: the default block alone."""
    exact = ExactUnits(mlp, units)
    rest = WithoutUnits(mlp, exact).eval()
    with torch.no_grad():
        y_rest = y - torch.cat([exact(calib[s:s + 8192]) for s in range(0, len(calib), 8192)])
    taylor = shared_block(rest, sample, centres, config)
    sums = CellSums.for_block(taylor, 1)
    accumulate_(sums, calib, y_rest, centres, taylor.u, taylor.v, 1)
    fitted, _ = solve_cells(sums, taylor, 1e-2)
    block = SharedTaylorMLP(centres, fitted, 1)
    return HybridTaylorMLP(block, exact) if len(units) else block


@torch.no_grad()
def prepare_block(mlp: nn.Module, calib: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    """What every m shares for one block: the K-means sample [20000, d] and centres [k, d] (seed 0, cells in all
    input directions), the unit scores [hidden] and F(calib) [n, d_out]."""
    sample = calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(0))[:20000]]
    centres = partition_kmeans(sample, k, 0, 1, None)
    scores = unit_scores(mlp, calib, nearest_centre(calib, centres, None), k)
    y = torch.cat([mlp(calib[s:s + 8192]) for s in range(0, len(calib), 8192)])
    return sample, centres, scores, y


def rel_err(pred: torch.Tensor, ref: torch.Tensor) -> float:
    return float((pred - ref).norm() / ref.norm())


def export_pair(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """``model`` to ``path`` (fp32) and ``path`` with .int8.onnx (onnxruntime dynamic int8, as tmlp bench's)."""
    from tmlp.export import export_onnx, quantize_int8_dynamic

    os.makedirs(os.path.dirname(path), exist_ok=True)
    export_onnx(model, example, path, {})
    quantize_int8_dynamic(path, path.replace(".onnx", ".int8.onnx"))


def whole_model(args, loaded, fqns: list[str], calib_all: dict, config: TaylorConfig, ms: list[int]) -> None:
    """For each m: the model with every block in ``fqns`` a hybrid, measured (bf16 forward, as the fine-tuning checks
    of tmlp export) on the choose and report halves of the validation images, then fine-tuned whole."""
    import copy
    from tmlp.distill import kl_to_teacher
    from tmlp.finetune import Recipe, finetune_
    from tmlp.train import autocast, batches

    teacher, spec = loaded.model.eval(), loaded.spec
    val = loaded.data.val
    n = min(5000, len(val))
    splits = {"choose": val.subset(0, n // 2), "report": val.subset(n // 2, n)}
    labels = {s: torch.from_numpy(np.asarray(sp.y)).long() for s, sp in splits.items()}

    @torch.no_grad()
    def logits(model: nn.Module, split, precision: str) -> torch.Tensor:
        model.eval()
        with autocast(torch.device("cpu"), precision):
            return torch.cat([model(x).float() for x, _ in batches(split, spec, 256)])

    target = {s: logits(teacher, sp, "fp32") for s, sp in splits.items()}

    def measure(model: nn.Module) -> dict[str, float]:
        row = {}
        for s, split in splits.items():
            out = logits(model, split, "bf16")
            row[f"{s}_accuracy"] = float((out.argmax(1) == labels[s]).float().mean())
            row[f"{s}_kl"] = float(kl_to_teacher(out, target[s]))
        return row

    example = next(iter(batches(splits["choose"], spec, 1)))[0]
    if args.onnx:
        export_pair(teacher, example, os.path.join(args.onnx, "original.onnx"))
    original = {s: float((target[s].argmax(1) == labels[s]).float().mean()) for s in splits}
    print(f"original: choose {100 * original['choose']:.2f}%, report {100 * original['report']:.2f}%", flush=True)
    block_m = {f"blocks.{i}.mlp": int(n) for i, n in (p.split("=") for p in filter(None, args.block_m.split(",")))}
    results = {"checkpoint": args.checkpoint, "blocks": fqns, "k": args.k, "rank": args.rank, "original": original,
               "finetune_images": args.finetune_images, "every": args.every, "lr_taylor": args.lr_taylor,
               "lr_model": args.lr_model, "block_m": block_m, "runs": []}
    tag = "-" + args.block_m.replace("=", "x").replace(",", "_") if block_m else ""
    prepared = {fqn: prepare_block(teacher.get_submodule(fqn), calib_all[fqn], args.k) for fqn in fqns}
    for m in ms:
        t0 = time.time()
        student = copy.deepcopy(teacher)
        for fqn in fqns:
            sample, centres, scores, y = prepared[fqn]
            units = torch.argsort(scores, descending=True)[:block_m.get(fqn, m)]
            student.set_submodule(fqn, fit_hybrid(teacher.get_submodule(fqn), calib_all[fqn], y, sample, centres,
                                                  units, config))
        if args.onnx:
            export_pair(student, example, os.path.join(args.onnx, f"m{m}{tag}.onnx"))
        run = {"m": m, "fit_s": round(time.time() - t0, 1), "rows": [{"images": 0, **measure(student)}]}
        print(json.dumps({"m": m, **run["rows"][-1]}), flush=True)

        class Track:
            every = 64

            def __init__(self) -> None:
                self.next_measure = args.every

            def __call__(self, seen: int) -> bool:
                if seen >= self.next_measure or seen >= args.finetune_images:
                    self.next_measure += args.every
                    run["rows"].append({"images": seen, **measure(student)})
                    print(json.dumps({"m": m, **run["rows"][-1]}), flush=True)
                return False

        if args.finetune_images > 0:
            train, n_batches = loaded.labelled_batches("train", args.finetune_images, 64)
            recipe = Recipe(lr_taylor=args.lr_taylor, lr_model=args.lr_model)
            finetune_(student, teacher, train, n_batches, epochs=1, recipe=recipe, check=Track(),
                      precision="bf16", progress=False)
        checks = run["rows"][1:]
        if checks:
            run["report_mean_after_training"] = float(np.mean([r["report_accuracy"] for r in checks]))
            run["choose_mean_after_training"] = float(np.mean([r["choose_accuracy"] for r in checks]))
        run["seconds"] = round(time.time() - t0, 1)
        results["runs"].append(run)
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "whole.json"), results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="bench/deit_small_cifar10_fp16.pt")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--m", default="0,32,64,128,256", help="comma-separated numbers of exact hidden units")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--blocks", default="", help="comma-separated block indices (default: all)")
    parser.add_argument("--whole", action="store_true",
                        help="replace the blocks in the model (default: blocks 1-11) and measure accuracy and KL on "
                             "both validation halves, before and while fine-tuning (tmlp.finetune, default recipe)")
    parser.add_argument("--finetune-images", type=int, default=10240)
    parser.add_argument("--every", type=int, default=2560, help="training images between two measurements")
    parser.add_argument("--block-m", default="",
                        help="comma-separated INDEX=M: these blocks take M exact units in every run of --whole "
                             "(e.g. 9=128,10=128,11=256), the others --m")
    parser.add_argument("--lr-taylor", type=float, default=1e-3, help="fine-tuning rate of the per-centre tensors")
    parser.add_argument("--lr-model", type=float, default=2e-5, help="fine-tuning rate of every other weight")
    parser.add_argument("--onnx", default="", help="also export the original (fp32 and dynamic int8) and each m's "
                                                    "model before fine-tuning to this folder, for bench/interleaved.py")
    parser.add_argument("--out", default="bench/results/exact-units")
    args = parser.parse_args()
    torch.manual_seed(0)
    ms = [int(m) for m in args.m.split(",")]
    loaded = load_model_and_data("deit_small", args.checkpoint, progress=False)
    model, data, spec = loaded.model.eval(), loaded.data, loaded.spec
    fqns = select_blocks(model)
    if args.blocks:
        fqns = [fqns[int(i)] for i in args.blocks.split(",")]

    def tokens(split, n_images, limit):
        x = to_tensor(split.images(np.arange(min(n_images, len(split)))), spec)
        return collect_inputs(model, fqns, iter(x.split(128)), (len(x) + 127) // 128, limit, progress=False)

    calib_all, test_all = tokens(data.train, args.train_images, 10 ** 7), tokens(data.val, 1000, 5000)
    config = TaylorConfig(k=args.k, basis="shared", rank=args.rank)
    if args.whole:
        return whole_model(args, loaded, fqns, calib_all, config, ms)
    rows = []
    for fqn in fqns:
        t0 = time.time()
        mlp = model.get_submodule(fqn)
        calib, test = calib_all[fqn], test_all[fqn]
        sample, centres, scores, y = prepare_block(mlp, calib, args.k)
        order = torch.argsort(scores, descending=True)
        with torch.no_grad():
            ref = mlp(test)
        row = {"block": fqn, "train_tokens": len(calib),
               "score_share": {str(m): float(scores[order[:m]].sum() / scores.sum()) for m in ms}}
        for m in ms:
            hybrid = fit_hybrid(mlp, calib, y, sample, centres, order[:m], config)
            with torch.no_grad():
                row[f"m{m}"] = rel_err(hybrid(test), ref)
        rows.append(row)
        print(f"{fqn}: " + ", ".join(f"m={m} {row[f'm{m}']:.4f} ({row['score_share'][str(m)]:.0%} of score)"
                                      for m in ms) + f" ({time.time() - t0:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "exact_units.json"), {"checkpoint": args.checkpoint, "k": args.k,
                                                             "rank": args.rank, "m": ms, "rows": rows,
                                                             "date": time.strftime("%Y-%m-%d")})
    lines = [f"Held-out relative output error per block, {args.checkpoint}, k={args.k}, shared basis r={args.rank}, "
             f"least-squares fit, with m hidden units exact; {args.train_images} training images, 5,000 validation "
             "tokens.", "", "| block | " + " | ".join(f"m = {m}" for m in ms) + " |", "| --- |" + " --- |" * len(ms)]
    lines += ["| " + r["block"] + " | " + " | ".join(f"{r[f'm{m}']:.4f}" for m in ms) + " |" for r in rows]
    lines.append("| mean | " + " | ".join(f"{np.mean([r[f'm{m}'] for r in rows]):.4f}" for m in ms) + " |")
    write_text(os.path.join(args.out, "exact_units.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
