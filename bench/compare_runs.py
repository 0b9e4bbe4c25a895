"""Export folders side by side on the whole validation set: accuracy on the choose split, the report split and both
(5,000 images: 1/√2 of one split's noise), and on each split the mean KL(original || T-MLP) per image and the top-1
agreement with the original, the least noisy measures of how closely a T-MLP model follows the original.

    python bench/compare_runs.py --checkpoint bench/deit_small_cifar10_fp16.pt --dataset npz:../shared/data/cifar10-jpeg \
        --runs runs/pre-ft,runs/pre-ft-hidden --out bench/results/partition-default

Each run's ``tmlp.pt`` is evaluated in PyTorch fp32 (onnxruntime agrees to ~1e-6, the export's parity check). The
original's logits are computed once and kept in the first run's folder (``original_val_logits.pt``, as
bench/finetune_selection.py does). A paired standard error of each drop is given (the T-MLP and original's
correctness per image differ on few images, so the drop is much less noisy than either accuracy alone).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--runs", required=True, help="comma-separated export folders (each with tmlp.pt)")
    parser.add_argument("--names", default=None, help="comma-separated labels for the runs (default: folder names)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from tmlp.distill import kl_to_teacher
    from tmlp.io import write_json, write_text
    from tmlp.stages import load_model_and_data, load_tmlp_model
    from tmlp.train import batches

    runs = args.runs.split(",")
    names = args.names.split(",") if args.names else [os.path.basename(r.rstrip("/")) for r in runs]
    if len(names) != len(runs):
        raise SystemExit(f"--names gives {len(names)} labels for {len(runs)} runs")
    loaded = load_model_and_data("deit_small", args.checkpoint, dataset=args.dataset, progress=False)
    val = loaded.data.val
    n = min(5000, len(val))
    splits = {"choose": val.subset(0, n // 2), "report": val.subset(n // 2, n)}
    labels = {s: torch.from_numpy(np.asarray(split.y)).long() for s, split in splits.items()}

    @torch.no_grad()
    def logits(model: torch.nn.Module, split) -> torch.Tensor:
        model.eval()
        return torch.cat([model(x).float() for x, _ in batches(split, loaded.spec, 256)])

    cached = os.path.join(runs[0], "original_val_logits.pt")
    target = torch.load(cached) if os.path.isfile(cached) else {s: logits(loaded.model, sp) for s, sp in splits.items()}
    torch.save(target, cached)
    right_original = {s: (target[s].argmax(1) == labels[s]).float() for s in splits}

    def row(name: str, run: str) -> dict:
        model, layers = load_tmlp_model(run)
        r = {"name": name, "run": run, "blocks": len(layers)}
        right = {}
        for s, split in splits.items():
            out = logits(model, split)
            right[s] = (out.argmax(1) == labels[s]).float()
            r[f"{s}_kl"] = float(kl_to_teacher(out, target[s]))
            r[f"{s}_agreement"] = 100 * float((out.argmax(1) == target[s].argmax(1)).float().mean())
        for s in ("choose", "report", "all"):
            t = torch.cat([right[k] for k in splits]) if s == "all" else right[s]
            o = torch.cat([right_original[k] for k in splits]) if s == "all" else right_original[s]
            diff = (o - t).double()
            r[f"{s}_accuracy"] = 100 * float(t.mean())
            r[f"{s}_drop"] = 100 * float(diff.mean())
            r[f"{s}_drop_se"] = 100 * float(diff.std() / len(diff) ** 0.5)
        print(json.dumps(r), flush=True)
        return r

    rows = [row(nm, r) for nm, r in zip(names, runs)]
    original = {s: 100 * float(torch.cat([right_original[k] for k in splits]).mean() if s == "all"
                               else right_original[s].mean()) for s in ("choose", "report", "all")}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "compare.json"), {"checkpoint": args.checkpoint, "original": original,
                                                        "rows": rows})
    lines = [f"Original: choose {original['choose']:.2f}%, report {original['report']:.2f}%, all {original['all']:.2f}% "
             f"({args.checkpoint}). Drops in points, ± one paired standard error; KL per image to the original.", "",
             "| run | blocks | choose | report | all 5,000 | choose KL | report KL | top-1 agreement (all) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        acc = " | ".join(f"{r[s + '_accuracy']:.2f}% (−{r[s + '_drop']:.2f} ± {r[s + '_drop_se']:.2f})"
                         for s in ("choose", "report", "all"))
        agree = (r["choose_agreement"] + r["report_agreement"]) / 2
        lines.append(f"| {r['name']} | {r['blocks']} | {acc} | {r['choose_kl']:.4f} | {r['report_kl']:.4f} | {agree:.2f}% |")
    write_text(os.path.join(args.out, "compare.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
