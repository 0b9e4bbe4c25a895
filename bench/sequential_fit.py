"""Does fitting each Taylor block on the inputs it will see (not the original's) close the error that compounds?

    python bench/sequential_fit.py --run runs/pre-ft --checkpoint bench/deit_small_cifar10_fp16.pt \
        --dataset npz:../shared/data/cifar10-jpeg --target compensate --out runs/seq-fit

Calibration fits every block's per-centre tensors by least squares on the *original* model's block inputs and
outputs. In the T-MLP model block j sees inputs already moved by the Taylor blocks before it, and the errors add up:
on the CIFAR-10 DeiT-Small the 11 blocks together lose far more (logit KL 0.066) than the sum of each alone.
This refits the blocks in order, block j on the inputs x~ the T-MLP model (blocks before j already refitted) gives
it, with the same centres, cells and bases, and one of two targets:

- ``refit``: the original MLP at those inputs, F(x~) (fit the function where it is evaluated);
- ``compensate``: what makes the residual stream after the block equal the original model's,
  h_orig - (h~ - T(x~)) (the block also cancels the error that reached it; GPTQ-style error feedback).

``--run`` is an export made with ``--distill-epochs 0`` (its tmlp.pt: the calibrated model before any training).
It measures the model before and after (top-1 and KL to the original on both validation splits: first half
choose, second half report) and writes the refitted model to ``--out``/tmlp.pt (and the original's cached
validation logits), so ``bench/finetune_selection.py --run OUT`` can fine-tune it. Results: ``--out``/sequential.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch
from torch import nn


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the block of interest has run."""


def capture(model: nn.Module, paths: dict[str, str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``x`` until every module in ``paths`` ({name: module path}) has run; returns each one's
    input (``name``.in) and output (``name``.out), the last dimension kept (rows [N, d])."""
    got: dict[str, torch.Tensor] = {}
    last = list(paths)[-1]

    def hook(name: str):
        def on_forward(module, args, output):
            got[name + ".in"] = args[0].detach().reshape(-1, args[0].shape[-1])
            got[name + ".out"] = output.detach().reshape(-1, output.shape[-1])
            if name == last:
                raise _Stop
        return on_forward
    handles = [model.get_submodule(p).register_forward_hook(hook(n)) for n, p in paths.items()]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def derivatives_of(block) -> "SharedDerivatives":
    """The order-1 shared-basis tensors a SharedTaylorMLP was built from: value F(C) = offset + U S Vᵀ C."""
    from tmlp.taylor import SharedDerivatives

    centres_v = block.centres @ block.v
    value = block.offset + torch.einsum("krs,ks->kr", block.s, centres_v) @ block.ut
    return SharedDerivatives(value=value, u=block.ut.T.contiguous(), v=block.v, s=block.s)


@torch.no_grad()
def refit_block_(student: nn.Module, teacher: nn.Module, path: str, batches, target: str, ridge: float) -> int:
    """Refit the Taylor block at ``path`` of ``student`` in place on one pass over ``batches()``; returns the
    cells that kept their previous tensors (too few tokens)."""
    from tmlp.taylor import CellSums, solve_cells

    block = student.get_submodule(path)
    if getattr(block, "order", None) != 1 or not hasattr(block, "s"):
        raise SystemExit(f"{path}: only order-1 shared-basis blocks are refitted here")
    parent = path.rsplit(".", 1)[0]  # the transformer block: h = r + mlp(norm2(r)) (no layer scale in DeiT)
    before = derivatives_of(block)
    sums = CellSums.for_block(before, 1)
    u64 = before.u.double()
    for x, _ in batches():
        ours = capture(student, {"mlp": path, "block": parent}, x)
        if target == "refit":
            goal = teacher.get_submodule(path)(ours["mlp.in"])
        else:
            theirs = capture(teacher, {"block": parent}, x)
            goal = theirs["block.out"] - (ours["block.out"] - ours["mlp.out"])
        xs = ours["mlp.in"]
        c = block.assign(xs)
        f = ((xs - block.centres[c]) @ block.v).double()
        y = goal.double()
        sums.n.index_add_(0, c, torch.ones(len(c), dtype=torch.float64))
        sums.f.index_add_(0, c, f)
        sums.y.index_add_(0, c, y)
        sums.ff.index_add_(0, c, f[:, :, None] * f[:, None, :])
        sums.uyf.index_add_(0, c, (y @ u64)[:, :, None] * f[:, None, :])
    fitted, kept = solve_cells(sums, before, ridge)
    centres_v = block.centres @ block.v
    block.s.copy_(fitted.s)
    block.offset.copy_(fitted.value - torch.einsum("krs,ks->kr", fitted.s, centres_v) @ block.ut)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="export folder made with --distill-epochs 0")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--target", choices=["refit", "compensate"], default="compensate")
    parser.add_argument("--images", type=int, default=5000, help="training images per block's pass")
    parser.add_argument("--ridge", type=float, default=1e-2, help="ridge towards the block's current tensors")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from tmlp.distill import kl_to_teacher
    from tmlp.io import write_json
    from tmlp.stages import load_model_and_data, load_tmlp_model
    from tmlp.train import batches as split_batches

    loaded = load_model_and_data("deit_small", args.checkpoint, dataset=args.dataset, progress=False)
    teacher = loaded.model.eval()
    student, layers = load_tmlp_model(args.run)
    val = loaded.data.val
    n = min(5000, len(val))
    splits = {"choose": val.subset(0, n // 2), "report": val.subset(n // 2, n)}
    labels = {s: torch.from_numpy(np.asarray(split.y)).long() for s, split in splits.items()}
    cached = os.path.join(args.run, "original_val_logits.pt")

    @torch.no_grad()
    def logits(model: nn.Module, split) -> torch.Tensor:
        return torch.cat([model.eval()(x).float() for x, _ in split_batches(split, loaded.spec, 256)])

    target = torch.load(cached) if os.path.isfile(cached) else {s: logits(teacher, sp) for s, sp in splits.items()}

    def measure(model: nn.Module) -> dict[str, float]:
        row = {}
        for s, split in splits.items():
            out = logits(model, split)
            row[f"{s}_accuracy"] = float((out.argmax(1) == labels[s]).float().mean())
            row[f"{s}_kl"] = float(kl_to_teacher(out, target[s]))
        return row

    before = measure(student)
    print("before", json.dumps(before), flush=True)
    train, _ = loaded.labelled_batches("train", args.images, 64)
    t0, kept = time.time(), {}
    for path in layers:
        kept[path] = refit_block_(student, teacher, path, train, args.target, args.ridge)
        print(f"{path} refitted ({time.time() - t0:.0f} s, {kept[path]} cells kept)", flush=True)
    seconds = time.time() - t0
    after = measure(student)
    print("after", json.dumps(after), flush=True)
    os.makedirs(args.out, exist_ok=True)
    torch.save({"format": "tmlp.model", "layers": layers, "model": student}, os.path.join(args.out, "tmlp.pt"))
    if os.path.isfile(cached):
        shutil.copy(cached, os.path.join(args.out, "original_val_logits.pt"))
    write_json(os.path.join(args.out, "sequential.json"),
               {"run": args.run, "layers": layers, "target": args.target, "images": args.images, "ridge": args.ridge,
                "before": before, "after": after, "cells_kept": kept, "seconds": round(seconds, 1)})


if __name__ == "__main__":
    main()
