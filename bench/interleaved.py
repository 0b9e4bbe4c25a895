"""Latency of several ONNX models side by side in one process, interleaved round by round.

On a shared machine the speed drifts by tens of percent within minutes (tmlp bench's fresh processes per variant,
5 repeats, saw the fp32 original's p50 range from 30.9 to 41.6 ms in one run). Here every model gets one session,
and the models take turns: ``--rounds`` rounds of ``--runs`` timed batches each (after ``--warmup``), so drift hits
all of them alike. Inputs: real images from the val.npz beside each model when there is one. Reported: per model the median over rounds of the per-round p50 and p90, and each model's
speed-up over the first one (and over ``--vs``). Peak memory is not measured here (one process holds every
session): use ``tmlp bench`` for RSS.

    python bench/interleaved.py runs/A/original.onnx runs/A/tmlp.onnx runs/B/tmlp.onnx [--rounds 15]
        [--vs runs/A/original.int8.onnx] [--out bench/results/DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from tmlp.runtime import run


def batches_for(model: str, session, batch: int) -> list[np.ndarray]:
    """Four input batches: real images from the val.npz beside ``model`` (preprocessed as its metadata says), else
    Gaussian noise of the input's shape."""
    data = os.path.join(os.path.dirname(model), "val.npz")
    spec = run.read_metadata(model).get(run.PREPROCESSING_KEY)
    if os.path.isfile(data) and spec:
        images, _ = run.load_images(data)
        x = run.preprocess(images[:4 * batch], json.loads(spec))
        return [x[i * batch:(i + 1) * batch] for i in range(4)]
    shape = [batch] + [d for d in session.get_inputs()[0].shape[1:]]
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="ONNX files; the first is the reference")
    parser.add_argument("--vs", action="append", default=[], help="also give speed-ups against this model (one of "
                        "the models); repeatable")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=20, help="timed batches per model and round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=None, help="folder for interleaved.json and interleaved.md")
    args = parser.parse_args()
    missing = [m for m in args.models + args.vs if not os.path.isfile(m)]
    if missing:
        raise SystemExit(f"error: no such model file {missing[0]!r}; run tmlp export / tmlp bench first")
    stray = [v for v in args.vs if v not in args.models]
    if stray:
        raise SystemExit(f"error: --vs {stray[0]!r} is not among the models; list it as a model too")
    sessions = {m: run.make_session(m, "cpu", args.threads) for m in args.models}
    inputs = {m: batches_for(m, s, args.batch) for m, s in sessions.items()}
    per_round = {m: [] for m in args.models}
    for r in range(args.rounds):
        for m in (args.models if r % 2 == 0 else args.models[::-1]):  # alternate the order too
            s = sessions[m]
            per_round[m].append(run.percentiles(run.time_batches(s, s.get_inputs()[0].name, inputs[m],
                                                                 args.warmup, args.runs)))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{os.path.basename(os.path.dirname(m))}/"
              f"{os.path.basename(m)} {per_round[m][-1]['p50']:.2f}" for m in args.models), flush=True)
    rows = []
    for m in args.models:
        p50 = float(np.median([t["p50"] for t in per_round[m]]))
        rows.append({"model": m, "p50_ms": p50, "p90_ms": float(np.median([t["p90"] for t in per_round[m]])),
                     "round_p50_ms": [t["p50"] for t in per_round[m]], "file_mb": run.model_bytes(m) / 1e6})
    refs = [args.models[0]] + args.vs
    for row in rows:
        row["speedup"] = {ref: next(r["p50_ms"] for r in rows if r["model"] == ref) / row["p50_ms"] for ref in refs}
    machine = run.machine_info()
    lines = [f"Interleaved in one process: {args.rounds} rounds x {args.runs} runs (after {args.warmup} warm-up), "
             f"batch {args.batch}, {args.threads} thread(s), onnxruntime {machine['onnxruntime']} CPU on "
             f"{machine['cpu']}; median over rounds of each round's p50/p90.", "",
             "| model | p50 ms | p90 ms | file MB | " + " | ".join(f"vs `{r}`" for r in refs) + " |",
             "| --- | --- | --- | --- |" + " --- |" * len(refs)]
    for row in rows:
        lines.append(f"| `{row['model']}` | {row['p50_ms']:.3f} | {row['p90_ms']:.3f} | {row['file_mb']:.2f} | "
                     + " | ".join(f"{row['speedup'][r]:.2f}x" for r in refs) + " |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "interleaved.json"), "w") as f:
            json.dump({"args": vars(args), "machine": machine, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M")},
                      f, indent=2)
        with open(os.path.join(args.out, "interleaved.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
