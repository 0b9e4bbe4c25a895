"""Whole-model fine-tuning (--finetune) against distilling the Taylor parameters alone, at the same number of epochs
over the same training images, and the original fine-tuned the same way (is the gain extra training of an
under-trained model?).

    python bench/finetune.py --checkpoint bench/deit_small_cifar10_fp16.pt --epochs 1 --images 5000 \\
        --out bench/results/finetune

Each export goes through ``tmlp.run_export`` (the calibration is computed once and then read from the cache);
reported per variant: PyTorch accuracy on the report split of the validation images before and after, the training seconds (this
machine, other jobs paused), and the drop against the original. Writes finetune.json and finetune.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

import tmlp
from tmlp.finetune import Recipe, finetune_
from tmlp.io import write_json, write_text
from tmlp.stages import load
from tmlp.train import evaluate


def export_variant(base: tmlp.ExportSpec, distill: tmlp.DistillSpec, out: str) -> dict:
    """One export with ``distill``; its accuracy before/after and training seconds from the manifest."""
    result = tmlp.run_export(tmlp.ExportSpec(base.model, source=base.source, blocks=base.blocks,
                                             calibration=base.calibration, plan=base.plan, distill=distill,
                                             out_dir=out))
    record = result.summary["distillation"]
    return {"before": record["accuracy_before"], "after": record["accuracy_after"], "seconds": record["seconds"],
            "original": result.summary["pytorch_val_accuracy"]["original"]}


def finetune_original(base: tmlp.ExportSpec, distill: tmlp.DistillSpec) -> dict:
    """The original model fine-tuned with the same recipe (KL to itself + labels, the model's learning rate)."""
    loaded = load(base, progress=False)
    report = loaded.val_splits(base.source).report  # the split the exports report on
    student = copy.deepcopy(loaded.model)
    batches, n_batches = loaded.labelled_batches("train", distill.images or base.source.calib_images)
    before = evaluate(student, report, loaded.spec, torch.device("cpu"))
    t0 = time.time()
    finetune_(student, loaded.model, batches, n_batches, distill.epochs, Recipe.of(distill), require_taylor=False)
    seconds = time.time() - t0
    after = evaluate(student, report, loaded.spec, torch.device("cpu"))
    return {"before": before, "after": after, "seconds": round(seconds, 1), "original": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small")
    parser.add_argument("--checkpoint", default=None, help="[default: the embedded default]")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--images", type=int, default=5000, help="training images per epoch")
    parser.add_argument("--calib-images", type=int, default=5000)
    parser.add_argument("--eval-images", type=int, default=10000)
    parser.add_argument("--out", default="bench/results/finetune")
    args = parser.parse_args()
    base = tmlp.ExportSpec(args.model, source=tmlp.SourceSpec(checkpoint=args.checkpoint,
                                                              calib_images=args.calib_images,
                                                              eval_images=args.eval_images),
                           calibration=tmlp.TaylorConfig(k=args.k), plan=tmlp.PlanSpec(max_acc_drop=None))
    runs = os.path.join("runs", "bench-finetune")
    variants = {
        "distil the Taylor tensors": export_variant(
            base, tmlp.DistillSpec(epochs=args.epochs, images=args.images, finetune=False),
            os.path.join(runs, "distil")),
        "fine-tune the whole T-MLP model": export_variant(
            base, tmlp.DistillSpec(epochs=args.epochs, images=args.images, finetune=True),
            os.path.join(runs, "finetune")),
        "fine-tune the original (same recipe)": finetune_original(
            base, tmlp.DistillSpec(epochs=args.epochs, images=args.images, finetune=True)),
    }
    original = variants["distil the Taylor tensors"]["original"]
    rows = ["| variant | before | after | vs original | training s |", "| --- | --- | --- | --- | --- |"]
    for name, v in variants.items():
        rows.append(f"| {name} | {100 * v['before']:.2f}% | {100 * v['after']:.2f}% | "
                    f"{100 * (v['after'] - original):+.2f} | {v['seconds']:.0f} |")
    header = (f"{args.model} ({args.checkpoint or 'embedded default'}), k={args.k}, all blocks, {args.epochs} "
              f"epoch(s) over {args.images} training images; original {100 * original:.2f}%; PyTorch accuracy on "
              f"the report split of the validation images")
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "finetune.json"), {"args": vars(args), "variants": variants})
    write_text(os.path.join(args.out, "finetune.md"), header + "\n\n" + "\n".join(rows) + "\n")
    print(header + "\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
