"""Ways of choosing the shared basis (U, V), and ranks, compared on a trained model: per block and whole model.

    python bench/basis_sources.py --checkpoint bench/deit_small_cifar10_fp16.pt [--k 100] [--ranks 8,16,32,64]

For each basis source (``data``: PCA of the blocks' input/output deviations; ``jacobian``: dominant subspaces of the
stacked Jacobians; see tmlp/basis.py) every block is calibrated once at the largest rank and truncated to the
smaller ones (exact: the columns are ordered by eigenvalue). Dense per-centre Jacobians are the reference.
Reported per block: relative output error ‖T(x) − F(x)‖/‖F(x)‖ on held-out validation tokens and the logit KL with
that block alone replaced (``--probe-images`` validation images); per configuration: PyTorch validation accuracy
with every block replaced. Results: bench/results/basis/basis.json and basis.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch

from tmlp.calibration import calibrate
from tmlp.data import to_tensor
from tmlp.stages import load_model_and_data, tensor_batches
from tmlp.plan import held_out_tokens, logit_kl_with, relative_error, truncate_rank
from tmlp.surgery import replace_module, select_blocks
from tmlp.taylor import TaylorConfig, build_taylor_block
from tmlp.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small")
    parser.add_argument("--checkpoint", default=None, help="a tmlp train checkpoint [default: the embedded default]")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--ranks", default="8,16,32,64")
    parser.add_argument("--sources", default="data,jacobian")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense-Jacobian reference")
    parser.add_argument("--calib-images", type=int, default=5000)
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--probe-images", type=int, default=256)
    parser.add_argument("--out", default="bench/results/basis")
    args = parser.parse_args()
    ranks = sorted(int(r) for r in args.ranks.split(","))
    started = time.time()

    loaded = load_model_and_data(args.model, args.checkpoint)
    model, data, spec = loaded.model.eval(), loaded.data, loaded.spec
    fqns = select_blocks(model)
    batches, n_batches = tensor_batches(data, spec, "train", args.calib_images)
    key = loaded.calibration_key(args.calib_images)
    probe = to_tensor(data.val.images(np.arange(min(args.probe_images, len(data.val)))), spec)
    tokens = held_out_tokens(model, fqns, [probe[i:i + 64] for i in range(0, len(probe), 64)])
    with torch.no_grad():
        reference = model(probe)
    n_eval = min(args.eval_images, len(data.val))
    acc_original = evaluate(model, data.val, spec, torch.device("cpu"), limit=n_eval)
    print(f"{args.model} ({args.checkpoint or 'embedded default'}): original accuracy {100 * acc_original:.2f}% "
          f"on {n_eval} validation images", flush=True)

    configs: dict[str, dict] = {}
    variants = [(s, r) for s in args.sources.split(",") for r in ranks] + ([] if args.no_dense else [("dense", None)])
    calibrations = {}
    for source, rank in variants:
        if source not in calibrations:
            cfg = (TaylorConfig(k=args.k, basis="dense") if source == "dense" else
                   TaylorConfig(k=args.k, basis="shared", rank=max(ranks), basis_source=source))
            t0 = time.time()
            calibrations[source] = (calibrate(model, fqns, batches, n_batches, cfg, key=key, progress=False),
                                    time.time() - t0)
        calibration, seconds = calibrations[source]
        label = "dense" if rank is None else f"{source} r={rank}"
        blocks = {}
        for fqn in fqns:
            cal = calibration[fqn]
            derivs = cal.derivatives if rank is None else truncate_rank(cal.derivatives, rank)
            blocks[fqn] = build_taylor_block(cal.centres, derivs, 1, cal.projection).eval()
        per_block = {fqn: {"rel_error": relative_error(blocks[fqn], *tokens[fqn]),
                           "kl": logit_kl_with(model, fqn, blocks[fqn], reference, probe)} for fqn in fqns}
        whole = copy.deepcopy(model)
        for fqn in fqns:
            replace_module(whole, fqn, blocks[fqn])
        accuracy = evaluate(whole, data.val, spec, torch.device("cpu"), limit=n_eval)
        configs[label] = {"source": source, "rank": rank, "accuracy": accuracy, "blocks": per_block,
                          "calibration_seconds": round(seconds, 1)}
        mean_err = sum(b["rel_error"] for b in per_block.values()) / len(per_block)
        print(f"{label:>14}: accuracy {100 * accuracy:.2f}% (original {100 * acc_original:.2f}%), mean block rel. "
              f"error {mean_err:.4f}, summed single-block KL {sum(b['kl'] for b in per_block.values()):.4f}",
              flush=True)

    os.makedirs(args.out, exist_ok=True)
    result = {"model": args.model, "checkpoint": args.checkpoint, "k": args.k, "order": 1, "n_val": n_eval,
              "probe_images": args.probe_images, "original_accuracy": acc_original, "configs": configs,
              "seconds": round(time.time() - started, 1)}
    with open(os.path.join(args.out, "basis.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    with open(os.path.join(args.out, "basis.md"), "w") as f:
        f.write(markdown(result, fqns))
    print(markdown(result, fqns))
    plot(result, os.path.join(args.out, "basis.png"))


def plot(result: dict, path: str) -> None:
    """Accuracy vs rank for each basis source, with the dense reference and the original as lines."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed (pip install -e .): no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    configs = result["configs"].values()
    for source in sorted({c["source"] for c in configs} - {"dense"}):
        points = sorted((c["rank"], 100 * c["accuracy"]) for c in configs if c["source"] == source)
        ax.plot(*zip(*points), "o-", label=f"shared basis from {source}")
    for c in configs:
        if c["source"] == "dense":
            ax.axhline(100 * c["accuracy"], color="grey", linestyle="--", label="dense Jacobians")
    ax.axhline(100 * result["original_accuracy"], color="black", linestyle=":", label="original")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r of the shared basis")
    ax.set_ylabel(f"validation accuracy, % (n={result['n_val']})")
    ax.set_title(f"{result['model']}, k={result['k']}, all MLPs replaced")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def markdown(result: dict, fqns: list[str]) -> str:
    configs = result["configs"]
    source = result["checkpoint"] or "embedded default"
    lines = [f"# Shared-basis sources and ranks: {result['model']} ({source}), k = {result['k']}, order 1", "",
             f"Whole model: PyTorch top-1 on {result['n_val']} validation images with all {len(fqns)} MLPs replaced "
             f"(original {100 * result['original_accuracy']:.2f}%). Per block: relative output error on held-out "
             f"validation tokens / logit KL (nats) with that block alone replaced, on {result['probe_images']} "
             "validation images.", "",
             "| basis | accuracy | drop (points) | mean rel. error | summed KL |", "| --- | --- | --- | --- | --- |"]
    for label, c in configs.items():
        errs = [b["rel_error"] for b in c["blocks"].values()]
        kls = [b["kl"] for b in c["blocks"].values()]
        drop = 100 * (result["original_accuracy"] - c["accuracy"])
        lines.append(f"| {label} | {100 * c['accuracy']:.2f}% | {drop:.2f} | {sum(errs) / len(errs):.4f} "
                     f"| {sum(kls):.4f} |")
    lines += ["", "Per block, relative error (KL):", "",
              "| block | " + " | ".join(configs) + " |", "| --- |" + " --- |" * len(configs)]
    for fqn in fqns:
        cells = [f"{c['blocks'][fqn]['rel_error']:.3f} ({c['blocks'][fqn]['kl']:.4f})" for c in configs.values()]
        lines.append(f"| {fqn} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
