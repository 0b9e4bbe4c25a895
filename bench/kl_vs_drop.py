"""Does the logit KL steer better than top-1 on the choose split? For each export run folder: the T-MLP model's
accuracy drop against the original and the mean KL(original ‖ T-MLP) of the class probabilities, on the choose split
(the first half of the validation images, on which every choice was made) and on the report split (the second half,
which no choice saw), both in onnxruntime (original.onnx and tmlp.onnx of the run).

A drop on 2,500 images has a paired standard error of 0.4-0.6 points, so a model chosen because its drop measured
small there is flattered; the mean KL over the same images has a relative standard error of a few percent. If the KL
measured on the choose split matches the report split's while the drop does not, the budget should decide on KL.

    python bench/kl_vs_drop.py runs/cifar-planunits-headroom-2 runs/cifar-planunits-h0 ... \
        [--data ../shared/data/cifar10-jpeg/val.npz] [--out bench/results/plan-units/kl-vs-drop]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from tmlp.io import write_json, write_text
from tmlp.runtime import run


def logits(path: str, x: np.ndarray, preprocessing: dict, batch: int = 100) -> np.ndarray:
    """[N, classes] float64 logits of ONNX model ``path`` on raw images ``x`` [N, H, W, 3] uint8, in onnxruntime."""
    session = run.make_session(path, threads=os.cpu_count() or 1, manifest=False)
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: run.preprocess(x[i:i + batch], preprocessing)})[0] for i in range(0, len(x), batch)]
    return np.concatenate(out).astype(np.float64)


def kl_and_drop(reference: np.ndarray, other: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean KL(softmax(reference) ‖ softmax(other)) in nats, the top-1 drop in points and its paired standard error."""
    p = reference - np.logaddexp.reduce(reference, axis=1, keepdims=True)
    q = other - np.logaddexp.reduce(other, axis=1, keepdims=True)
    kl = (np.exp(p) * (p - q)).sum(1)
    diff = (reference.argmax(1) == y).astype(float) - (other.argmax(1) == y).astype(float)
    return {"kl": float(kl.mean()), "kl_standard_error": float(kl.std(ddof=1) / np.sqrt(len(kl))),
            "drop_points": float(100 * diff.mean()),
            "drop_standard_error_points": float(100 * diff.std(ddof=1) / np.sqrt(len(diff)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="tmlp export run folders (original.onnx, tmlp.onnx, manifest.json)")
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg/val.npz", help="the validation images")
    parser.add_argument("--out", default="bench/results/plan-units/kl-vs-drop")
    args = parser.parse_args()
    data = np.load(args.data)
    x, y = data["x"], data["y"]
    rows, reference = [], None
    for folder in args.runs:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
        source = manifest["spec"]["_data"]["source"]
        n = min(source["eval_images"], len(x))
        n_choose = min(n - 1, max(1, round(n * source["choose_fraction"])))
        report = np.load(os.path.join(folder, "val.npz"))
        if not np.array_equal(report["y"], y[n_choose:n]):
            raise SystemExit(f"{folder}/val.npz is not the second part of {args.data}: pass the export's data")
        if reference is None:  # the same checkpoint in every run: its original.onnx is computed once
            reference = logits(os.path.join(folder, "original.onnx"), x[:n], manifest["preprocessing"])
        tmlp = logits(os.path.join(folder, "tmlp.onnx"), x[:n], manifest["preprocessing"])
        splits = {"choose": slice(0, n_choose), "report": slice(n_choose, n)}
        row = {"run": os.path.basename(os.path.normpath(folder)), "blocks": len(manifest["layers"]),
               **{name: kl_and_drop(reference[s], tmlp[s], y[s]) for name, s in splits.items()}}
        rows.append(row)
        print(f"{row['run']}: choose drop {row['choose']['drop_points']:+.2f} KL {row['choose']['kl']:.4f}; "
              f"report drop {row['report']['drop_points']:+.2f} KL {row['report']['kl']:.4f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "kl_vs_drop.json"), {"data": args.data, "runs": rows})
    lines = ["| run | blocks | choose drop | report drop | choose KL | report KL |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c, p = r["choose"], r["report"]
        lines.append(f"| {r['run']} | {r['blocks']} | {c['drop_points']:+.2f} ± {c['drop_standard_error_points']:.2f} | "
                     f"{p['drop_points']:+.2f} ± {p['drop_standard_error_points']:.2f} | {c['kl']:.4f} ± "
                     f"{c['kl_standard_error']:.4f} | {p['kl']:.4f} ± {p['kl_standard_error']:.4f} |")
    write_text(os.path.join(args.out, "kl_vs_drop.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
