"""Which measurement on the choose split predicts a candidate's drop on the report split: its own top-1 drop, or its
logit KL through one exchange rate fitted over every candidate?

For the default export spec of a model (the same data, calibration and plan options; ``--plan-units`` offers exact
hidden units as the export does; calibrations come from the cache), this script walks the plan's whole λ path (``tmlp.plan.candidate_choices``, with and without the original
MLP as an option: every choice the plan's search could measure), builds each candidate in PyTorch, untrained, and
measures on both halves of the validation images its top-1 drop against the original and the mean KL(original ‖
candidate) of the class probabilities. No choice is made on these numbers, so neither half is flattered.

The analysis fits drop = a · sqrt(KL) and drop = b · KL through the origin over all candidates' choose-split points
(least squares) and compares three predictors of the report-split drop: the choose-split drop itself, a · sqrt(KL)
and b · KL (of the choose-split KL). It also replays the plan's choice at a budget (the cheapest candidate whose
predicted drop fits) under each predictor and reports what that candidate loses on the report split.

    python bench/plan_path.py [--checkpoint bench/deit_small_cifar10_fp16.pt] \
        [--dataset npz:/work/shared/data/cifar10-jpeg] [--plan-units 0,64,256] [--budget 1.0] \
        [--out bench/results/kl-rule/default] [--replot]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from tmlp import ExportSpec
from tmlp.data import to_tensor
from tmlp.io import write_json, write_text
from tmlp.plan import candidate_choices, held_out_tokens, plan_blocks
from tmlp.stages import calibrate_plan_options, load, plan_options, select
from tmlp.surgery import replace_module
from tmlp.train import batches


@torch.no_grad()
def split_logits(model: torch.nn.Module, split, spec: dict) -> torch.Tensor:
    """[N, classes] float32 logits of ``model`` on every image of ``split``."""
    model.eval()
    return torch.cat([model(x).float() for x, _ in batches(split, spec, 250)])


def kl_and_drop(reference: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Mean KL(softmax(reference) ‖ softmax(logits)) in nats with its standard error, the mean over images of the
    square root of each image's KL (``root_kl``), the share of images whose top-1 class changed (``disagreement``,
    a fraction), and the top-1 drop in points with its paired standard error."""
    p, q = torch.log_softmax(reference.double(), 1), torch.log_softmax(logits.double(), 1)
    kl = (p.exp() * (p - q)).sum(1).clamp_min(0)
    diff = (reference.argmax(1) == y).double() - (logits.argmax(1) == y).double()
    n = len(y)
    return {"kl": float(kl.mean()), "kl_standard_error": float(kl.std() / n ** 0.5),
            "root_kl": float(kl.sqrt().mean()),
            "disagreement": float((reference.argmax(1) != logits.argmax(1)).double().mean()),
            "drop_points": float(100 * diff.mean()), "drop_standard_error_points": float(100 * diff.std() / n ** 0.5)}


def fit_through_origin(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y = slope · x."""
    return float((x * y).sum() / max((x * x).sum(), 1e-30))


def analyse(rows: list[dict], budget: float) -> dict:
    """The fitted rates, each predictor's error on the report split and the choice each would make at ``budget``."""
    kl = np.array([r["choose"]["kl"] for r in rows])
    root = np.array([r["choose"]["root_kl"] for r in rows])
    flips = np.array([r["choose"]["disagreement"] for r in rows])
    choose = np.array([r["choose"]["drop_points"] for r in rows])
    report = np.array([r["report"]["drop_points"] for r in rows])
    a, b = fit_through_origin(np.sqrt(kl), choose), fit_through_origin(kl, choose)
    c, d = fit_through_origin(root, choose), fit_through_origin(flips, choose)
    predictors = {"choose top-1 drop": choose, "a·sqrt(KL)": a * np.sqrt(kl), "b·KL": b * kl,
                  "c·mean sqrt(KL_i)": c * root, "d·disagreement": d * flips}
    errors = {name: {"rmse_points": float(np.sqrt(((p - report) ** 2).mean())),
                     "mean_error_points": float((p - report).mean())} for name, p in predictors.items()}
    choices = {}
    for name, predicted in predictors.items():
        fits = [i for i in range(len(rows)) if predicted[i] <= budget + 1e-9]
        i = min(fits, key=lambda j: rows[j]["mac_ratio"])
        choices[name] = {"candidate": i, "blocks": rows[i]["blocks"], "mac_ratio": rows[i]["mac_ratio"],
                         "predicted_points": float(predicted[i]), "report_drop_points": float(report[i])}
    return {"rate_sqrt_points_per_sqrt_nat": a, "rate_linear_points_per_nat": b, "rate_root_kl": c,
            "rate_disagreement": d, "predictors": errors,
            "choices_at_budget": choices, "budget_points": budget}


def write_table(rows: list[dict], analysis: dict, title: str) -> str:
    a = analysis["rate_sqrt_points_per_sqrt_nat"]
    lines = [f"# {title}", "", "| # | blocks | MACs vs MLPs | choose KL | choose mean sqrt(KL_i) | choose "
             "disagreement | choose drop | a·sqrt(KL) | report drop |", "| --- | --- | --- | --- | --- | --- | --- | "
             "--- | --- |"]
    for i, r in enumerate(rows):
        c, p = r["choose"], r["report"]
        lines.append(f"| {i} | {r['blocks']} | {r['mac_ratio']:.3f}x | {c['kl']:.4f} | {c['root_kl']:.4f} | "
                     f"{100 * c['disagreement']:.2f}% | {c['drop_points']:+.2f} ± "
                     f"{c['drop_standard_error_points']:.2f} | {a * np.sqrt(c['kl']):+.2f} | {p['drop_points']:+.2f} |")
    lines += ["", f"Fitted over the {len(rows)} candidates' choose-split points: a = "
              f"{a:.2f} points per sqrt(nat), b = {analysis['rate_linear_points_per_nat']:.1f} points per nat, c = "
              f"{analysis['rate_root_kl']:.2f}, d = {analysis['rate_disagreement']:.1f} points per unit of "
              "disagreement.", "",
              "| predictor of the report drop | RMSE (points) | mean error (points) |", "| --- | --- | --- |"]
    lines += [f"| {n} | {e['rmse_points']:.2f} | {e['mean_error_points']:+.2f} |"
              for n, e in analysis["predictors"].items()]
    lines += ["", f"| choice at a {analysis['budget_points']:g}-point budget, by | candidate | blocks | MACs | "
              "predicted | report drop |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {c['candidate']} | {c['blocks']} | {c['mac_ratio']:.3f}x | {c['predicted_points']:+.2f} | "
              f"{c['report_drop_points']:+.2f} |" for n, c in analysis["choices_at_budget"].items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], analysis: dict, path: str, title: str) -> None:
    """Each candidate's top-1 drop on the choose split and on the report split against its choose-split logit KL, with
    the line b · KL fitted over the choose points, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = np.array([r["choose"]["kl"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(kl, [r["choose"]["drop_points"] for r in rows], s=18, color="tab:blue",
               label="choose split (every choice is made here)")
    ax.scatter(kl, [r["report"]["drop_points"] for r in rows], s=18, color="tab:red", marker="^",
               label="report split (never used for a choice)")
    line = np.linspace(0, kl.max() * 1.05, 50)
    ax.plot(line, analysis["rate_linear_points_per_nat"] * line, color="tab:blue", lw=1.2,
            label=f"fitted on the choose split: {analysis['rate_linear_points_per_nat']:.1f} points per nat")
    ax.axhline(analysis["budget_points"], color="grey", ls=":", lw=1)
    ax.set_xlabel("logit KL to the original on the choose split (nats)")
    ax.set_ylabel("top-1 drop (points)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small")
    parser.add_argument("--checkpoint", default="bench/deit_small_cifar10_fp16.pt")
    parser.add_argument("--dataset", default="npz:/work/shared/data/cifar10-jpeg",
                        help="as given to tmlp export (the calibration cache is keyed by this string)")
    parser.add_argument("--plan-units", default=None, help="--plan-units of the export, e.g. 0,64,256")
    parser.add_argument("--budget", type=float, default=1.0, help="points, for the replayed choice")
    parser.add_argument("--out", default="bench/results/kl-rule/default")
    parser.add_argument("--replot", action="store_true", help="only redraw OUT/plan_path.png from OUT/plan_path.json")
    args = parser.parse_args()
    if args.replot:
        with open(os.path.join(args.out, "plan_path.json")) as f:
            done = json.load(f)
        plot(done["candidates"], done["analysis"], os.path.join(args.out, "plan_path.png"),
             f"Every choice on the plan's λ path: {len(done['options'])} option(s) per block, untrained")
        return
    units = None if args.plan_units is None else tuple(int(m) for m in args.plan_units.split(","))
    spec = ExportSpec.from_flags(args.model, {"source__checkpoint": args.checkpoint, "source__dataset": args.dataset,
                                              "plan__unit_choices": units})
    t0 = time.time()
    loaded = load(spec, print, progress=False)
    selection = select(loaded, spec, print)
    calibrations = calibrate_plan_options(loaded, selection, spec, print, progress=False)
    options = plan_options(spec.plan, spec.calibration, selection.available_tokens)
    splits = loaded.val_splits(spec.source)
    probe = to_tensor(splits.choose.images(np.arange(min(256, len(splits.choose)))), loaded.spec)
    tokens = held_out_tokens(loaded.model, selection.fqns, [probe[i:i + 64] for i in range(0, len(probe), 64)],
                             seed=spec.calibration.seed)
    plan = plan_blocks(loaded.model, calibrations, options, spec.calibration.order, lambda m: 0.0, 1.0, tokens,
                       probe)  # a budget of 100 points: the sensitivities and costs, with one evaluation
    model = loaded.model
    halves = {"choose": splits.choose, "report": splits.report}
    reference = {h: split_logits(model, s, loaded.spec) for h, s in halves.items()}
    labels = {h: torch.from_numpy(np.asarray(s.y)).long() for h, s in halves.items()}
    seen, rows = set(), []
    for keep in (True, False):
        for _, choice in candidate_choices(plan.sensitivity, plan.macs, keep_original=keep):
            key = tuple(choice.items())
            if key in seen or all(o is None for o in choice.values()):
                continue
            seen.add(key)
            originals = {f: model.get_submodule(f) for f in choice}
            try:
                for fqn, option in choice.items():
                    if option is not None:
                        replace_module(model, fqn, plan.build_block(fqn, option))
                row = {h: kl_and_drop(reference[h], split_logits(model, s, loaded.spec), labels[h])
                       for h, s in halves.items()}
            finally:
                for fqn, module in originals.items():
                    replace_module(model, fqn, module)
            row.update(blocks=sum(o is not None for o in choice.values()), mac_ratio=plan.mac_ratio(choice),
                       choice={f: None if o is None else o.label() for f, o in choice.items()})
            rows.append(row)
            print(f"candidate {len(rows)}: {row['blocks']} blocks, MACs {row['mac_ratio']:.3f}x, choose KL "
                  f"{row['choose']['kl']:.4f} drop {row['choose']['drop_points']:+.2f}, report KL "
                  f"{row['report']['kl']:.4f} drop {row['report']['drop_points']:+.2f} ({time.time() - t0:.0f} s)",
                  flush=True)
    rows.sort(key=lambda r: r["mac_ratio"])
    analysis = analyse(rows, args.budget)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "plan_path.json"),
               {"spec": spec.to_dict(), "options": [o.label() for o in options], "candidates": rows,
                "analysis": analysis, "seconds": round(time.time() - t0, 1)})
    plot(rows, analysis, os.path.join(args.out, "plan_path.png"),
         f"Every choice on the plan's λ path: {len(options)} option(s) per block, untrained")
    write_text(os.path.join(args.out, "plan_path.md"),
               write_table(rows, analysis, f"Plan path of {', '.join(o.label() for o in options)}"))
    print(open(os.path.join(args.out, "plan_path.md")).read())


if __name__ == "__main__":
    main()
