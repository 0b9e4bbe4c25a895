"""Token reduction by the class token's attention (EViT-style, training-free) against the learned policy.

    python bench/token_policy.py --checkpoint bench/deit_small_cifar10_fp16.pt --dataset npz:../shared/data/cifar10-jpeg

For each keep share, the checkpoint's model with token reduction after blocks 3, 6 and 9 (tmlp.tokens): ranked by
the class token's attention, and by the learned policy (score predictors trained with ``train_token_scorers_`` for
one pass over ``--images`` training images, every other weight fixed). PyTorch top-1 accuracy on all validation
images (no choice is made on them: fixed hyper-parameters, every keep reported); nothing is fine-tuned, so the
rows show the ranking alone. Results: bench/results/token-policy/token_policy.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--images", type=int, default=5000, help="training images the learned policy trains on")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "token-policy"))
    args = parser.parse_args()

    from tmlp.io import write_json, write_text
    from tmlp.stages import load_model_and_data
    from tmlp.tokens import TokenReduction, apply_token_reduction_, train_token_scorers_
    from tmlp.train import evaluate

    loaded = load_model_and_data("deit_small", args.checkpoint, dataset=args.dataset, progress=False)
    model, cpu = loaded.model.eval(), torch.device("cpu")
    accuracy = lambda net: evaluate(net, loaded.data.val, loaded.spec, cpu)  # noqa: E731
    original = accuracy(model)
    print(f"original: {100 * original:.2f}% on {len(loaded.data.val)} validation images", flush=True)
    rows = []
    for keep in args.keeps:
        attention = copy.deepcopy(model)
        schedule = apply_token_reduction_(attention, TokenReduction(keep=keep))
        learned = copy.deepcopy(model)
        apply_token_reduction_(learned, TokenReduction(keep=keep, policy="learned"))
        batches, n_batches = loaded.labelled_batches("train", args.images, 64)
        t0 = time.time()
        losses = train_token_scorers_(learned, model, batches, n_batches, lr=args.lr)
        row = {"keep": keep, "patch_tokens_per_block": schedule["patch_tokens_per_block"],
               "attention": accuracy(attention), "learned": accuracy(learned), "train_images": args.images,
               "train_seconds": round(time.time() - t0, 1), "policy_loss": losses}
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "token_policy.json"),
               {"checkpoint": args.checkpoint, "dataset": loaded.dataset, "original": original, "rows": rows,
                "val_images": len(loaded.data.val)})
    lines = [f"# Token reduction: attention vs learned policy ({os.path.basename(args.checkpoint)})", "",
             f"PyTorch top-1 on all {len(loaded.data.val)} validation images of {loaded.dataset}; original "
             f"{100 * original:.2f}%. Reduction after blocks 3, 6, 9; no fine-tuning.", "",
             "| keep | patch tokens per block | attention | learned | learned − attention | policy training s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['keep']:g} | {r['patch_tokens_per_block']} | {100 * r['attention']:.2f}% | "
                     f"{100 * r['learned']:.2f}% | {100 * (r['learned'] - r['attention']):+.2f} | "
                     f"{r['train_seconds']:.0f} |")
    write_text(os.path.join(args.out, "token_policy.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
