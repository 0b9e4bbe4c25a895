"""The static memory estimate (tmlp.export.memory) against peak RSS measured by runtime/run.py.

    python bench/memory_estimate.py runs/dense-k10/tmlp.onnx:16 runs/dense-mem/tmlp.onnx:16 runs/deit_small-digits/original.onnx:64

Each argument is MODEL.onnx:BATCH. For each, the estimate (weights + peak live activations at that batch) is
compared with what runtime/run.py measures in fresh processes, arena on and off: the peak RSS above the process
before the session (the whole model in memory) and the part of it the timed runs add above the loaded session
(the activations). Results: bench/results/memory/memory.json and memory.md.
"""
from __future__ import annotations

import argparse
import json
import os

from tmlp.measure import measure_in_subprocess
from tmlp.export import MIB, estimate_memory
from tmlp.io import write_json, write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="MODEL.onnx:BATCH")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default="bench/results/memory")
    args = parser.parse_args()
    rows = []
    for spec in args.models:
        path, _, batch = spec.rpartition(":")
        batch = int(batch)
        est = estimate_memory(path, batch)
        row = {"model": path, "batch": batch, "estimate_weights_mib": est.weights_bytes / MIB,
               "estimate_activations_mib": est.peak_activation_bytes / MIB, "estimate_total_mib": est.total_bytes / MIB,
               "largest_tensor": est.largest[0][0], "largest_tensor_mib": est.largest[0][1] / MIB}
        for arena in (True, False):
            m = measure_in_subprocess(path, None, "cpu", 1, 2, args.runs, batch, accuracy=False, arena=arena)
            key = "arena_on" if arena else "arena_off"
            row[key] = {"peak_rss_delta_mib": m["peak_rss_delta_mb"], "static_rss_mib": m["static_rss_mb"],
                        "activation_rss_mib": m["activation_rss_mb"]}
        off = row["arena_off"]
        row["total_error"] = row["estimate_total_mib"] / off["peak_rss_delta_mib"] - 1
        row["activation_error"] = row["estimate_activations_mib"] / off["activation_rss_mib"] - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "memory.json"), {"rows": rows})
    lines = ["# Memory: estimate vs measured", "",
             "Estimate: weights + peak sum of live activations over the topological order (tmlp.export.memory). "
             "Measured: runtime/run.py in a fresh process, random inputs, 1 thread; peak RSS above the process before "
             "the session, and the part the timed runs add above the loaded session. Error = estimate / measured - 1 "
             "(arena off).", "",
             "| model | batch | est. weights MiB | est. activations MiB | est. total MiB | measured peak MiB (arena off / on)"
             " | measured activations MiB (off / on) | total error | activation error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        on, off = r["arena_on"], r["arena_off"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['estimate_weights_mib']:.1f} | "
                     f"{r['estimate_activations_mib']:.1f} | {r['estimate_total_mib']:.1f} | "
                     f"{off['peak_rss_delta_mib']:.1f} / {on['peak_rss_delta_mib']:.1f} | "
                     f"{off['activation_rss_mib']:.1f} / {on['activation_rss_mib']:.1f} | {100 * r['total_error']:+.0f}% | "
                     f"{100 * r['activation_error']:+.0f}% |")
    write_text(os.path.join(args.out, "memory.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
