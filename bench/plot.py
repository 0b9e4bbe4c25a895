"""Accuracy vs latency from bench.json files (written by `tmlp bench`): one point per variant, ratios readable.

    python bench/plot.py bench/results/digits-deit_small/bench.json [...] --out bench/results/accuracy_vs_latency.png

Needs matplotlib (`pip install -e ".[plot]"`).
"""
from __future__ import annotations

import argparse
import json
import os

MARKERS = {"fp32 original": "o", "int8 original (ORT dynamic)": "s", "T-MLP": "^",
           "T-MLP + int8 (rest of the model)": "D", "T-MLP + int8 (per-centre tensors too)": "P"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", nargs="+", help="bench.json files")
    parser.add_argument("--out", default="bench/results/accuracy_vs_latency.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (used as matplotlib.ticker)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {v: f"C{i}" for i, v in enumerate(MARKERS)}
    runs = []
    for n, path in enumerate(args.bench):
        result = json.load(open(path))
        label = f"{result['model']} / {os.path.basename(result['dataset'].rstrip('/'))} (batch {result['batch']})"
        rows = [r for r in result["rows"] if r.get("accuracy") is not None]
        xs = [r["latency_ms"]["p50"] for r in rows]
        ys = [100 * r["accuracy"] for r in rows]
        ax.plot(xs, ys, ":", color="grey", linewidth=0.8)
        for i, (r, x, y) in enumerate(zip(rows, xs, ys)):
            colour = colours.get(r["variant"], "black")
            ax.scatter(x, y, marker=MARKERS.get(r["variant"], "x"), s=50, edgecolors=colour,
                       facecolors=colour if n == 0 else "none", label=r["variant"] if n == 0 else None)
            ax.annotate(f"{r['file_bytes'] / 1e6:.0f} MB", (x, y), textcoords="offset points",
                        xytext=(5, 6 if i % 2 == 0 else -12), fontsize=7)
        runs.append(os.path.basename(os.path.dirname(os.path.abspath(path))))
        ax.set_title(label if len(args.bench) == 1 else
                     f"{label}: filled {runs[0]}, hollow " + ", ".join(runs[1:]), fontsize=9)
    m = json.load(open(args.bench[0]))["machine"]
    ax.set_xlabel(f"p50 latency, ms (onnxruntime {m['onnxruntime']} CPU, 1 thread, {m['cpu']})")
    ax.set_ylabel("validation accuracy, %")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
