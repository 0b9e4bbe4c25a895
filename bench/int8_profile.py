"""Where does T-MLP + int8 spend the time its Taylor blocks add? onnxruntime's own per-node profile.

    python bench/int8_profile.py --checkpoint bench/deit_small_cifar10_fp16.pt --run runs/cifar-default \
        --out bench/results/int8-ceiling/profile

``bench/int8_ceiling.py --chain`` found a Taylor block costing ~0.10 ms inside the T-MLP + int8 model (that model
minus the int8 model with the same MLPs removed) but ~0.065 ms in a chain of the same blocks outside it. This
script profiles three models with onnxruntime's profiler (CPU, 1 thread, batch 1, the same random input), rounds
interleaved:

- ``tmlp``: the run's ``tmlp.int8.onnx``;
- ``removed``: the checkpoint's model with those MLPs replaced by ``nn.Identity``, dynamically quantized the same way;
- ``chain``: the run's Taylor blocks alone, chained x ← x + block(x) on random tokens [1, N, d].

Each node of onnxruntime's optimized graph is a *Taylor node* when it lies between a replaced block's ``norm2``
LayerNormalization and the residual that ends the block (an Add, or an Add fused with the next norm; in ``chain``:
every node but the residual Adds). The tables set, per block and per op type, the Taylor nodes' kernel time in the
model against the chain, and the other nodes' kernel time in ``tmlp`` against ``removed`` (do the Taylor blocks slow
the rest of the model down?).
What kernel times do not cover (the executor's per-node overhead, allocation) is the wall time minus their sum.
Results: ``--out``/profile.json and profile.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


RESIDUAL_OPS = ("Add", "SkipLayerNormalization")  # what ends a block's MLP branch (Add, or Add fused with a norm)


def profiled_session(path: str, optimized: str, prefix: str):
    """An onnxruntime CPU session of ``path`` (1 thread) that profiles every run and writes its optimized graph to
    ``optimized``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    options.optimized_model_filepath = optimized
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def taylor_nodes(graph, chain: bool) -> set[str]:
    """Names of the nodes of the optimized graph ``graph`` (onnx GraphProto) that belong to a Taylor block: everything reached
    from a ``blocks.<i>.norm2`` LayerNormalization's output up to (not including) the residual (``RESIDUAL_OPS``),
    for blocks whose MLP is a Taylor block (its ``half_sq_norm`` is read downstream); in a chain, every non-Add
    node."""
    if chain:
        return {n.name for n in graph.node if n.op_type != "Add"}
    consumers: dict[str, list] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    found: set[str] = set()
    for node in graph.node:
        if node.op_type != "LayerNormalization" or ".norm2." not in (node.input[1] if len(node.input) > 1 else ""):
            continue
        block, stack = set(), [node.output[0]]
        while stack:
            for nxt in consumers[stack.pop()]:
                if nxt.op_type in RESIDUAL_OPS or nxt.name in block:
                    continue
                block.add(nxt.name)
                stack.extend(nxt.output)
        reads = {i for n in graph.node if n.name in block for i in n.input}
        if any(name.endswith(".mlp.half_sq_norm") for name in reads):
            found |= block
    return found


def op_counts(graph, skip: set[str]) -> dict[str, int]:
    """Nodes per op type in the graph ``graph`` (onnx GraphProto), leaving out the nodes named in ``skip``."""
    return dict(collections.Counter(n.op_type for n in graph.node if n.name not in skip))


def node_times(profile: str, skip_runs: int) -> tuple[dict[str, tuple[str, float]], float]:
    """From an onnxruntime profile: {node name: (op type, mean kernel µs per run)} over the runs after the first
    ``skip_runs``, and the mean wall µs of those runs."""
    with open(profile) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    kept = runs[skip_runs:]
    start = kept[0]["ts"]
    total: dict[str, float] = collections.defaultdict(float)
    op: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        name = e["name"][: -len("_kernel_time")]
        total[name] += e["dur"]
        op[name] = e["args"].get("op_name", "?")
    n = len(kept)
    return {name: (op[name], t / n) for name, t in total.items()}, float(np.mean([r["dur"] for r in kept]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--run", required=True, help="an export folder with tmlp.int8.onnx")
    parser.add_argument("--runs", type=int, default=200, help="profiled runs per round, after 20 warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import onnx
    from int8_ceiling import Chain, without_mlps

    from tmlp.export import export_onnx
    from tmlp.export.quantize import quantize_int8_dynamic
    from tmlp.stages import load_model_and_data, load_tmlp_model

    loaded = load_model_and_data("deit_small", args.checkpoint, progress=False)
    model = loaded.model.eval()
    example = torch.zeros(1, *loaded.input_size)
    tmlp_model, layers = load_tmlp_model(args.run)
    replaced = [int(f.split(".")[1]) for f in layers]
    blocks = [tmlp_model.get_submodule(f).eval() for f in layers]
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    rng = np.random.default_rng(0)
    warmup = 20
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"tmlp": os.path.join(args.run, "tmlp.int8.onnx"), "removed": os.path.join(tmp, "removed.int8.onnx"),
                 "chain": os.path.join(tmp, "chain.onnx")}
        export_onnx(without_mlps(model, replaced), example, os.path.join(tmp, "removed.onnx"), {})
        quantize_int8_dynamic(os.path.join(tmp, "removed.onnx"), paths["removed"])
        export_onnx(Chain(blocks), torch.zeros(1, tokens, blocks[0].d_in), paths["chain"], {})
        inputs = {"tmlp": rng.standard_normal(example.shape).astype(np.float32),
                  "chain": rng.standard_normal((1, tokens, blocks[0].d_in)).astype(np.float32)}
        inputs["removed"] = inputs["tmlp"]
        times: dict[str, list] = {name: [] for name in paths}
        taylor: dict[str, set[str]] = {}
        counts: dict[str, dict[str, int]] = {}
        for r in range(args.repeats):
            for name, path in paths.items():
                optimized = os.path.join(tmp, f"{name}.opt.onnx")
                session = profiled_session(path, optimized, os.path.join(tmp, f"{name}-{r}"))
                feed = {session.get_inputs()[0].name: inputs[name]}
                for _ in range(warmup + args.runs):
                    session.run(None, feed)
                times[name].append(node_times(session.end_profiling(), warmup))
                if r == 0:  # the optimized graph is the same every round: classify its nodes once
                    graph = onnx.load(optimized, load_external_data=False).graph
                    taylor[name] = taylor_nodes(graph, name == "chain") if name != "removed" else set()
                    counts[name] = op_counts(graph, taylor[name])
    summary = summarize(times, taylor, len(blocks))
    summary["other_nodes"] = {name: counts[name] for name in ("tmlp", "removed")}
    summary.update(checkpoint=args.checkpoint, run=args.run, runs=args.runs, repeats=args.repeats, blocks=layers,
                   tokens=tokens, cpu=platform.processor() or platform.machine())
    text = render(summary)
    print(text)
    if args.out:
        from tmlp.io import write_json, write_text
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "profile.json"), summary)
        write_text(os.path.join(args.out, "profile.md"), text)


def summarize(times: dict[str, list], taylor: dict[str, set[str]], n_blocks: int) -> dict:
    """Medians over rounds (µs per run): per op type, the Taylor nodes per block (model and chain), the other
    nodes (tmlp and removed), every kernel and the wall time."""
    def by_op(rounds: list, keep) -> dict[str, float]:
        per_round = []
        for nodes, _wall in rounds:
            acc: dict[str, float] = collections.defaultdict(float)
            for name, (op, us) in nodes.items():
                if keep(name):
                    acc[op] += us
            per_round.append(acc)
        ops = sorted({op for acc in per_round for op in acc})
        return {op: float(np.median([acc.get(op, 0.0) for acc in per_round])) for op in ops}

    def per_block(d: dict[str, float]) -> dict[str, float]:
        return {op: round(us / n_blocks, 2) for op, us in d.items()}

    in_model, in_chain = taylor["tmlp"], taylor["chain"]
    return {
        "taylor_in_model_us_per_block": per_block(by_op(times["tmlp"], lambda n: n in in_model)),
        "taylor_in_chain_us_per_block": per_block(by_op(times["chain"], lambda n: n in in_chain)),
        "rest_tmlp_us": {op: round(us, 1) for op, us in by_op(times["tmlp"], lambda n: n not in in_model).items()},
        "rest_removed_us": {op: round(us, 1) for op, us in by_op(times["removed"], lambda n: True).items()},
        "wall_us": {name: round(float(np.median([w for _n, w in rounds])), 1) for name, rounds in times.items()},
        "kernels_us": {name: round(float(np.median([sum(us for _op, us in n.values()) for n, _w in rounds])), 1)
                       for name, rounds in times.items()},
    }


def render(s: dict) -> str:
    """The summary as markdown: Taylor nodes per block (model vs chain), the rest (tmlp vs removed), totals."""
    model, chain = s["taylor_in_model_us_per_block"], s["taylor_in_chain_us_per_block"]
    lines = [f"Kernel µs per run, onnxruntime profiler, median of {s['repeats']} interleaved rounds of "
             f"{s['runs']} runs; {len(s['blocks'])} Taylor blocks, {s['tokens']} tokens.", "",
             "| Taylor nodes, op type | in the model, µs per block | in the chain, µs per block | model / chain |",
             "| --- | --- | --- | --- |"]
    for op in sorted(set(model) | set(chain), key=lambda o: -model.get(o, 0.0)):
        m, c = model.get(op, 0.0), chain.get(op, 0.0)
        lines.append(f"| {op} | {m:.2f} | {c:.2f} | {m / c:.2f}× |" if c else f"| {op} | {m:.2f} | {c:.2f} | — |")
    tm, tc = sum(model.values()), sum(chain.values())
    lines.append(f"| **all** | **{tm:.2f}** | **{tc:.2f}** | **{tm / tc:.2f}×** |")
    rest_t, rest_r = s["rest_tmlp_us"], s["rest_removed_us"]
    n_t, n_r = s["other_nodes"]["tmlp"], s["other_nodes"]["removed"]
    lines += ["", "| other nodes, op type | T-MLP + int8, µs | MLPs removed, µs | difference µs "
              "| nodes (T-MLP / removed) |",
              "| --- | --- | --- | --- | --- |"]
    for op in sorted(set(rest_t) | set(rest_r) | set(n_t) | set(n_r), key=lambda o: -rest_t.get(o, 0.0)):
        a, b = rest_t.get(op, 0.0), rest_r.get(op, 0.0)
        lines.append(f"| {op} | {a:.1f} | {b:.1f} | {a - b:+.1f} | {n_t.get(op, 0)} / {n_r.get(op, 0)} |")
    a, b = sum(rest_t.values()), sum(rest_r.values())
    lines.append(f"| **all** | **{a:.1f}** | **{b:.1f}** | **{a - b:+.1f}** "
                 f"| {sum(n_t.values())} / {sum(n_r.values())} |")
    lines += ["", "| model | wall µs per run | kernels µs | wall − kernels µs |", "| --- | --- | --- | --- |"]
    for name in s["wall_us"]:
        w, k = s["wall_us"][name], s["kernels_us"][name]
        lines.append(f"| {name} | {w:.1f} | {k:.1f} | {w - k:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
