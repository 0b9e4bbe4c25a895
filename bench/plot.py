"""Accuracy against speed-up from bench.json files (written by `tmlp bench`): one colour per export, one marker per
variant, the Pareto front (no other point both faster and more accurate) drawn as a line.

    python bench/plot.py A/bench.json B/bench.json --labels "all 12 MLPs" "block 0 kept" --out plot.png

The x axis is each variant's speed-up over the fp32 original *of the same run*, so runs timed in different hours
stay comparable. Needs matplotlib (a tmlp dependency).
"""
from __future__ import annotations

import argparse
import json
import os

MARKERS = {"fp32 original": "o", "int8 original (ORT dynamic)": "s", "T-MLP": "^",
           "T-MLP + int8 (rest of the model)": "D", "T-MLP + int8 (per-centre tensors too)": "P"}


def points(path: str) -> list[tuple[str, float, float]]:
    """(variant, speed-up vs this run's fp32, accuracy %) of each row with an accuracy."""
    result = json.load(open(path))
    rows = [r for r in result["rows"] if r.get("accuracy") is not None]
    fp32 = next(r["latency_ms"]["p50"] for r in rows if r["variant"] == "fp32 original")
    return [(r["variant"], fp32 / r["latency_ms"]["p50"], 100 * r["accuracy"]) for r in rows]


def pareto(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speed-up and accuracy, by speed-up."""
    front = [p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)]
    return sorted(set(front))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", nargs="+", help="bench.json files")
    parser.add_argument("--labels", nargs="+", default=None, help="one short name per file [default: its folder]")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default="bench/results/accuracy_vs_speedup.png")
    args = parser.parse_args()
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.bench]
    if len(labels) != len(args.bench):
        parser.error("give one --labels entry per bench.json")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    first = json.load(open(args.bench[0]))
    fig, ax = plt.subplots(figsize=(9, 5))
    everything = []
    for n, (path, label) in enumerate(zip(args.bench, labels)):
        colour = f"C{n}"
        for variant, speed, acc in points(path):
            if variant == "fp32 original" and n > 0:
                continue  # the same model in every run: drawn once
            ax.scatter(speed, acc, marker=MARKERS.get(variant, "x"), s=70, color=colour, edgecolors="black",
                       linewidths=0.5, zorder=3)
            everything.append((speed, acc))
    front = pareto(everything)
    ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="black", linewidth=1, alpha=0.6, zorder=2)
    exports = [Line2D([], [], color=f"C{n}", marker="o", linestyle="", markersize=8, label=label)
               for n, label in enumerate(labels)]
    variants = [Line2D([], [], color="grey", marker=m, linestyle="", markersize=8, label=v) for v, m in MARKERS.items()]
    front_handle = [Line2D([], [], color="black", alpha=0.6, label="Pareto front")]
    legend = ax.legend(handles=exports, title="export", fontsize=8, title_fontsize=8, loc="upper left",
                       bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(legend)
    ax.legend(handles=variants + front_handle, title="variant", fontsize=8, title_fontsize=8, loc="lower left",
              bbox_to_anchor=(1.01, 0.0))
    machine = first["machine"]
    title = args.title or f"{first['model']} on {os.path.basename(first['dataset'].rstrip('/'))}"
    ax.set_title(f"{title}: accuracy vs speed-up (batch {first['batch']}, onnxruntime {machine['onnxruntime']} CPU, "
                 "1 thread)", fontsize=10)
    ax.set_xlabel("speed-up over the fp32 original of the same run (p50 latency ratio)")
    ax.set_ylabel(f"validation accuracy, % ({first['rows'][0]['n_eval']} images)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
