"""Where an ONNX model's time goes: onnxruntime's node profiler, summed per op type and per module.

    python bench/op_profile.py runs/cifar-default/original.int8.onnx runs/cifar-default/tmlp.int8.onnx

Each model runs ``--runs`` times at batch 1 on 1 thread (after ``--warmup``) with profiling on; every node's
kernel time is summed over the runs and divided by them, then grouped by op type and by the module it came from
(the exporter's name scopes, e.g. ``blocks.3.attn``; Taylor blocks show as ``blocks.N.mlp``), so two models can be
compared part by part. Results: ``--out``/profile.json and profile.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def part_of(module: str) -> str:
    """The part of a ViT a module path belongs to: "attention", "mlp" (MLP or Taylor block), "norm" or "other"."""
    if re.search(r"\.attn(\.|$)", module):
        return "attention"
    if re.search(r"\.mlp(\.|$)", module):
        return "mlp"
    if re.search(r"norm", module):
        return "norm"
    return "other"


def profile(path: str, runs: int, warmup: int) -> dict:
    """Mean kernel time per run (ms) of every node of ``path``, grouped by op type, by part and by block."""
    import onnx
    import onnxruntime as ort

    from tmlp.export.quantize import node_modules

    modules = node_modules(onnx.load(path, load_external_data=False))
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "p")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {i.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape]
                                                                  ).astype(np.float32) for i in session.get_inputs()}
        for _ in range(warmup):  # profiled too; their events are dropped below (before the first timed run)
            session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    timed = runs_seen[warmup:]
    start = timed[0]["ts"] if timed else 0
    by_op, by_part, by_block = collections.Counter(), collections.Counter(), collections.Counter()
    total_run = sum(e["dur"] for e in timed) / len(timed) / 1000
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        module = modules.get(node, modules.get(node.split("/")[0], ""))  # fused nodes: "<first node>/<fusion>"
        ms = e["dur"] / len(timed) / 1000
        by_op[op] += ms
        by_part[part_of(module)] += ms
        block = re.match(r"blocks\.(\d+)\.(attn|mlp)", module)
        by_block[f"{block.group(1)}.{block.group(2)}" if block else part_of(module)] += ms
    return {"model": path, "run_ms": round(total_run, 3), "kernels_ms": round(sum(by_op.values()), 3),
            "by_op": {k: round(v, 4) for k, v in by_op.most_common()},
            "by_part": {k: round(v, 4) for k, v in by_part.most_common()},
            "by_block": {k: round(v, 4) for k, v in sorted(by_block.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default=None, help="folder for profile.json / profile.md (default: print only)")
    args = parser.parse_args()
    results = [profile(m, args.runs, args.warmup) for m in args.models]
    parts = sorted({p for r in results for p in r["by_part"]})
    ops = sorted({o for r in results for o in r["by_op"]}, key=lambda o: -max(r["by_op"].get(o, 0) for r in results))
    names = [os.path.basename(r["model"]) for r in results]
    lines = ["| | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1),
             "| whole run (ms) | " + " | ".join(f"{r['run_ms']:.3f}" for r in results) + " |",
             "| kernels (ms) | " + " | ".join(f"{r['kernels_ms']:.3f}" for r in results) + " |"]
    lines += [f"| part: {p} | " + " | ".join(f"{r['by_part'].get(p, 0):.3f}" for r in results) + " |" for p in parts]
    lines += [f"| op: {o} | " + " | ".join(f"{r['by_op'].get(o, 0):.3f}" for r in results) + " |" for o in ops[:15]]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from tmlp.io import write_json, write_text
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "profile.json"), {"runs": args.runs, "models": results})
        write_text(os.path.join(args.out, "profile.md"), text)


if __name__ == "__main__":
    main()
