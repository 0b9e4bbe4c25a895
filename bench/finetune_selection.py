"""Which fine-tuning weights to keep: the best check by accuracy, by KL, or an average of the weights?

    python bench/finetune_selection.py --run runs/pre-ft --checkpoint bench/deit_small_cifar10_fp16.pt \
        --dataset npz:../shared/data/cifar10-jpeg

``--run`` is an export made with ``--distill-epochs 0`` (its tmlp.pt holds the calibrated T-MLP model before any
training). This script fine-tunes that model whole as ``tmlp export`` does (``tmlp.finetune.finetune_``: AdamW,
Taylor tensors at ``--lr-taylor``, every other weight at ``--lr-model``, KL to the original + ``--ce-weight`` x
cross-entropy, bf16 forward) over ``--images`` training images without stopping, and every ``--every`` images measures three sets
of weights on both validation splits (first half: choose, second half: report):

- ``raw``: the weights as they stand (what the export's checks keep the best of),
- ``ema``: an exponential moving average of the weights over steps (decay ``--ema``),
- ``mean``: the uniform mean of the weights at every check so far (SWA-style).

For each it records the top-1 accuracy and the mean KL(original || T-MLP) per image, so a stopping rule can be
replayed afterwards: which check would "best choose accuracy" or "lowest choose KL" keep, and what does that check
score on the report split. ``--feature-weight W`` adds W x the normalized squared error of every transformer block's
output against the original's to the loss (``match_features``). Results: ``--out``/selection.json and selection.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached fp32 copy of every floating-point tensor of ``model``'s state (parameters and buffers)."""
    return {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}


class _AddFeatureGrad(torch.autograd.Function):
    """Identity in the forward pass; the backward pass adds the gradient of ``scale`` x ||out - target||^2 to the
    incoming one, so a feature-matching loss joins the logits' loss without changing ``finetune_``."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(out, target)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, target = ctx.saved_tensors
        return grad + (2 * ctx.scale * (out.float() - target.float())).to(grad.dtype), None, None


def match_features(student: torch.nn.Module, teacher: torch.nn.Module, paths: list[str], weight: float) -> None:
    """Hooks that add ``weight`` x the mean over ``paths`` of ||s - t||^2 / mean(t^2) (each module's output in the
    student s against the teacher t on the same batch, the teacher run first) to every gradient step of the student;
    inactive while gradients are off (measurements). Scaled by the batch size, as ``finetune_``'s summed loss is."""
    seen: dict[str, torch.Tensor] = {}
    for path in paths:
        def keep(_m, _i, out, path=path):
            seen[path] = out.detach()
        teacher.get_submodule(path).register_forward_hook(keep)

        def pull(_m, _i, out, path=path):
            if not torch.is_grad_enabled() or path not in seen:
                return None
            t = seen.pop(path)
            scale = weight * len(out) / (len(paths) * t.numel() * float(t.float().pow(2).mean()))
            return _AddFeatureGrad.apply(out, t, scale)
        student.get_submodule(path).register_forward_hook(pull)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="export folder made with --distill-epochs 0")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--images", type=int, default=10240, help="training images streamed (one pass, no stop)")
    parser.add_argument("--every", type=int, default=1280, help="training images between two measurements")
    parser.add_argument("--lr-taylor", type=float, default=1e-3)
    parser.add_argument("--lr-model", type=float, default=2e-5)
    parser.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                        help="both learning rates constant, or a linear warm-up then a cosine decay to zero")
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps (cosine only)")
    parser.add_argument("--ce-weight", type=float, default=0.5, help="weight of the labels' cross-entropy")
    parser.add_argument("--ema", type=float, default=0.99, help="decay of the per-step moving average")
    parser.add_argument("--eval-precision", default="bf16", choices=["fp32", "bf16"],
                        help="the T-MLP model's forward when measured (the original's reference logits are fp32)")
    parser.add_argument("--keep-mlp", default="",
                        help="comma-separated module paths (e.g. blocks.11.mlp) whose original MLP is put back before "
                             "training: the same run with fewer blocks replaced; 'all': the original model itself, "
                             "fine-tuned the same way (the control)")
    parser.add_argument("--feature-weight", type=float, default=0.0,
                        help="also match every transformer block's output to the original's (normalized squared "
                             "error, mean over blocks, this weight; 0: logits only, as the export does)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "finetune-selection"))
    args = parser.parse_args()

    from tmlp.distill import kl_to_teacher
    from tmlp.finetune import Recipe, finetune_
    from tmlp.io import write_json, write_text
    from tmlp.stages import load_model_and_data, load_tmlp_model
    from tmlp.train import autocast, batches

    loaded = load_model_and_data("deit_small", args.checkpoint, dataset=args.dataset, progress=False)
    teacher = loaded.model.eval()
    student, layers = load_tmlp_model(args.run)
    keep = list(layers) if args.keep_mlp == "all" else list(filter(None, args.keep_mlp.split(",")))
    for path in keep:
        if path not in layers:
            raise SystemExit(f"--keep-mlp {path}: not a Taylor block of {args.run} ({', '.join(layers)})")
        student.set_submodule(path, copy.deepcopy(teacher.get_submodule(path)))
        layers.remove(path)
    if args.feature_weight > 0:
        match_features(student, teacher, [f"blocks.{i}" for i in range(len(teacher.blocks))], args.feature_weight)
    val = loaded.data.val
    n = min(5000, len(val))
    splits = {"choose": val.subset(0, n // 2), "report": val.subset(n // 2, n)}

    @torch.no_grad()
    def logits(model: torch.nn.Module, split, precision: str = "fp32") -> torch.Tensor:
        model.eval()
        with autocast(torch.device("cpu"), precision):
            return torch.cat([model(x).float() for x, _ in batches(split, loaded.spec, 256)])

    labels = {s: torch.from_numpy(np.asarray(split.y)).long() for s, split in splits.items()}
    cached = os.path.join(args.run, "original_val_logits.pt")  # the original's fp32 logits: 2 min on 1 core
    target = torch.load(cached) if os.path.isfile(cached) else {s: logits(teacher, sp) for s, sp in splits.items()}
    torch.save(target, cached)

    def measure(model: torch.nn.Module) -> dict[str, float]:
        row = {}
        for s, split in splits.items():
            out = logits(model, split, args.eval_precision)
            row[f"{s}_accuracy"] = float((out.argmax(1) == labels[s]).float().mean())
            row[f"{s}_kl"] = float(kl_to_teacher(out, target[s]))
        return row

    original = {s: float((target[s].argmax(1) == labels[s]).float().mean()) for s in splits}
    print(f"original: choose {100 * original['choose']:.2f}%, report {100 * original['report']:.2f}%", flush=True)
    shadow = copy.deepcopy(student)  # holds the averaged weights while they are measured
    ema, mean, n_mean = float_state(student), float_state(student), 0
    rows = [{"images": 0, "raw": measure(student)}]
    print(json.dumps(rows[-1]), flush=True)

    class Track:
        every = 64  # called after every step of the default batch: updates the EMA, measures every --every images

        def __init__(self) -> None:
            self.next_measure = args.every

        def __call__(self, seen: int) -> bool:
            nonlocal n_mean
            now = student.state_dict()
            with torch.no_grad():
                for k in ema:
                    ema[k].lerp_(now[k].float(), 1 - args.ema)
            if seen >= self.next_measure or seen >= args.images:
                self.next_measure += args.every
                n_mean += 1
                with torch.no_grad():
                    for k in mean:
                        mean[k].lerp_(now[k].float(), 1 / n_mean)  # weight 1 at the first check: a copy
                row = {"images": seen, "raw": measure(student)}
                for name, state in (("ema", ema), ("mean", mean)):
                    shadow.load_state_dict(state, strict=False)
                    row[name] = measure(shadow)
                rows.append(row)
                print(json.dumps(row), flush=True)
            return False

    t0 = time.time()
    train, n_batches = loaded.labelled_batches("train", args.images, 64)
    recipe = Recipe(lr_taylor=args.lr_taylor, lr_model=args.lr_model, ce_weight=args.ce_weight,
                    schedule=args.schedule, warmup=args.warmup)
    finetune_(student, teacher, train, n_batches, epochs=1, recipe=recipe, check=Track(), precision="bf16",
              require_taylor=bool(layers))
    seconds = time.time() - t0

    def replay(kind: str, key: str, best) -> dict[str, float]:
        candidates = [r for r in rows if kind in r]
        pick = best(candidates, key=lambda r: r[kind][key])
        return {"rule": f"{kind}: {'max' if best is max else 'min'} {key}", "images": pick["images"],
                "choose_accuracy": pick[kind]["choose_accuracy"], "report_accuracy": pick[kind]["report_accuracy"]}

    rules = [replay("raw", "choose_accuracy", max), replay("raw", "choose_kl", min),
             replay("ema", "choose_accuracy", max), replay("ema", "choose_kl", min),
             replay("mean", "choose_accuracy", max), replay("mean", "choose_kl", min)]
    result = {"run": args.run, "layers": layers, "checkpoint": args.checkpoint, "dataset": loaded.dataset,
              "images": args.images, "every": args.every, "lr_taylor": args.lr_taylor, "lr_model": args.lr_model,
              "ce_weight": args.ce_weight, "feature_weight": args.feature_weight, "schedule": args.schedule,
              "warmup": args.warmup if args.schedule == "cosine" else 0.0, "eval_precision": args.eval_precision,
              "ema": args.ema, "original": original,
              "rows": rows, "rules": rules, "seconds": round(seconds, 1)}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "selection.json"), result)
    lines = [f"Original: choose {100 * original['choose']:.2f}%, report {100 * original['report']:.2f}%.", "",
             "| images | raw choose | raw report | raw choose KL | ema choose | ema report | ema choose KL "
             "| mean choose | mean report | mean choose KL |", "|" + " --- |" * 10]
    for r in rows:
        cells = [str(r["images"])]
        for kind in ("raw", "ema", "mean"):
            m = r.get(kind)
            cells += ([f"{100 * m['choose_accuracy']:.2f}", f"{100 * m['report_accuracy']:.2f}",
                       f"{m['choose_kl']:.4f}"] if m else ["", "", ""])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| rule | keeps the weights after | choose | report | report drop |", "|" + " --- |" * 5]
    for rule in rules:
        lines.append(f"| {rule['rule']} | {rule['images']} | {100 * rule['choose_accuracy']:.2f} | "
                     f"{100 * rule['report_accuracy']:.2f} | "
                     f"{100 * (rule['report_accuracy'] - original['report']):+.2f} |")
    write_text(os.path.join(args.out, "selection.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
