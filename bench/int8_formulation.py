"""Do Taylor blocks with fewer ONNX nodes make T-MLP + int8 faster *in the model*?

    python bench/int8_formulation.py --run runs/cifar-default-keep [--out bench/results/int8-ceiling/formulation]

Inside the int8 model each of tmlp's Taylor blocks runs 14 ONNX nodes, and onnxruntime's profiler measured
~3 µs of executor time per added node beside the kernels, plus 17 µs of Reshape/Unsqueeze/Squeeze kernels per block
(``bench/int8_profile.py``). Alone, a block written with fewer nodes was no faster (``bench/block_formulation.py``),
but that block took rows [N, d]: the model's blocks get [B, T, d] and add a Reshape on each side. Variants of the
order-1 shared-basis block, each exported in the run's whole T-MLP model and quantized as ``tmlp bench``'s
T-MLP + int8 row (every MatMul/Gemm outside the Taylor blocks int8, the blocks fp32):

- ``current``: tmlp's ``SharedTaylorMLP``: rows [B·T, d] (Reshape in and out), S_c z as Unsqueeze + batched MatMul +
  Squeeze, a_c + h Uᵀ as one Gemm.
- ``3-D matmul``: on [B, T, d] directly (no Reshape), S_c z still as Unsqueeze + MatMul + Squeeze, h Uᵀ + a_c as
  MatMul + Add.
- ``3-D matmul, 3-D Gather``: the same, with S_c gathered from S [k, r_out, r] in one Gather (an ONNX rewrite
  after export: torch.onnx writes a Gather of the flattened table and a Reshape).
- ``3-D einsum``: on [B, T, d], S_c z as one Einsum.

Each is checked against the run's ``tmlp.onnx`` on 4 random inputs (max abs logit difference), counted (nodes in
the Taylor blocks' scopes) and timed interleaved beside ``original.int8.onnx`` and the run's ``tmlp.int8.onnx``,
onnxruntime CPU, 1 thread, batch 1, median of ``--repeats`` rounds' p50.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def forward_3d(block: torch.nn.Module, x: torch.Tensor, einsum: bool) -> torch.Tensor:
    """An order-1 SharedTaylorMLP on x [B, T, d_in] -> [B, T, d_out] without flattening the tokens into rows."""
    weight = getattr(block, "assign_weight", block.centres)
    projection = getattr(block, "assign_projection", None)
    xa = x @ projection if projection is not None else x
    c = torch.argmin(block.half_sq_norm - xa @ weight.T, dim=-1)  # [B, T]
    z = x @ block.v  # [B, T, r]
    s = torch.nn.functional.embedding(c, block.s_rows).unflatten(-1, block.s.shape[1:])  # [B, T, r_out, r]
    h = torch.einsum("btij,btj->bti", s, z) if einsum else torch.matmul(s, z.unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.embedding(c, block.offset) + h @ block.ut  # embedding: ONNX Gather


@contextlib.contextmanager
def formulation(name: str, model: torch.nn.Module):
    """Swap SharedTaylorMLP.forward for formulation ``name`` while the context is open (the blocks of ``model`` hold
    a buffer ``s_rows``, S as [k, r_out·r], for the Gather, until it closes)."""
    from tmlp.taylor import SharedTaylorMLP

    original = SharedTaylorMLP.forward
    blocks = [m for m in model.modules() if isinstance(m, SharedTaylorMLP)]
    for block in blocks:
        block.register_buffer("s_rows", block.s.flatten(1).contiguous())
    if name != "current":
        einsum = name == "3-D einsum"

        def patched(self, x):
            if self.order != 1 or self.channel_dim != -1 or x.dim() != 3:
                return original(self, x)
            return forward_3d(self, x, einsum)
        SharedTaylorMLP.forward = patched
    try:
        yield
    finally:
        SharedTaylorMLP.forward = original
        for block in blocks:
            del block.s_rows


def gather_3d_tables(path: str) -> int:
    """Rewrite ``path`` in place: each Gather of a flattened S table (``*.s_rows`` [k, r_out·r]) followed by the
    Reshape to [..., r_out, r] becomes one Gather of S [k, r_out, r] (ONNX Gather takes any table rank; torch.onnx
    writes only the flat form). Returns the number of Reshapes removed."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(path)
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed = []
    for node in list(graph.node):
        if node.op_type != "Gather" or not node.input[0].endswith("s_rows") or node.input[0] not in inits:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Reshape" or users[0].input[1] not in inits:
            continue
        reshape = users[0]
        r_out, r = (int(v) for v in numpy_helper.to_array(inits[reshape.input[1]])[-2:])
        flat = numpy_helper.to_array(inits[node.input[0]])
        name = node.input[0][:-len("_rows")] + "_3d"
        if name not in inits:
            inits[name] = numpy_helper.from_array(flat.reshape(len(flat), r_out, r), name)
            graph.initializer.append(inits[name])
        node.input[0] = name
        node.output[0] = reshape.output[0]
        removed.append(reshape)
    for reshape in removed:
        graph.node.remove(reshape)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, path)
    return len(removed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="an export folder with tmlp.pt, tmlp.onnx and the int8 files")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=25,
                        help="interleaved rounds (9 rounds ranked the formulations differently twice on this machine)")
    parser.add_argument("--no-timing", action="store_true", help="export, count and check only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort
    from option_latency import time_paths

    from tmlp.export import export_onnx
    from tmlp.export.quantize import nodes_in_scopes, quantize_int8_dynamic
    from tmlp.stages import load_tmlp_model

    model, layers = load_tmlp_model(args.run)
    reference = ort.InferenceSession(os.path.join(args.run, "tmlp.onnx"), providers=["CPUExecutionProvider"])
    input_name = reference.get_inputs()[0].name
    shape = tuple(d if isinstance(d, int) else 1 for d in reference.get_inputs()[0].shape)
    probe = np.random.default_rng(0).standard_normal((4, *shape[1:])).astype(np.float32)
    expected = reference.run(None, {input_name: probe})[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"int8 original": os.path.join(args.run, "original.int8.onnx"),
                 "T-MLP + int8 (the run's)": os.path.join(args.run, "tmlp.int8.onnx")}
        for name in ("current", "3-D matmul", "3-D matmul, 3-D Gather", "3-D einsum"):
            fp32 = os.path.join(tmp, f"{len(paths)}.onnx")
            with formulation(name.split(",")[0], model), torch.no_grad():
                export_onnx(model, torch.zeros(shape), fp32, {})
            if name.endswith("3-D Gather"):
                gather_3d_tables(fp32)
            proto_nodes = nodes_in_scopes(onnx.load(fp32), layers)
            got = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"]).run(None, {input_name: probe})[0]
            err = float(np.abs(got - expected).max())
            paths[f"T-MLP + int8, {name}"] = fp32.replace(".onnx", ".int8.onnx")
            quantize_int8_dynamic(fp32, paths[f"T-MLP + int8, {name}"], exclude_scopes=layers)
            rows.append({"formulation": name, "taylor_nodes": len(proto_nodes),
                         "nodes_per_block": round(len(proto_nodes) / len(layers), 2), "max_abs_logit_diff": err})
            print(f"{name}: {len(proto_nodes)} nodes in {len(layers)} blocks, max |logit - tmlp.onnx| {err:.2e}",
                  flush=True)
        if args.no_timing:
            return
        p50 = time_paths(paths, shape, args.runs, 20, args.repeats)
    base = p50["int8 original"]
    timing = [{"variant": n, "p50_ms": round(ms, 3), "speedup_vs_int8": round(base / ms, 3)} for n, ms in p50.items()]
    lines = ["| formulation | Taylor nodes per block | max abs logit diff vs tmlp.onnx |", "| --- | --- | --- |"]
    lines += [f"| {r['formulation']} | {r['nodes_per_block']:g} | {r['max_abs_logit_diff']:.1e} |" for r in rows]
    lines += ["", "| variant | p50 ms | speed-up vs int8 original |", "| --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['p50_ms']:.3f} | {r['speedup_vs_int8']:.3f}× |" for r in timing]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from tmlp.io import write_json, write_text
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "formulation.json"),
                   {"run": args.run, "runs": args.runs, "repeats": args.repeats, "blocks": len(layers),
                    "cpu": platform.processor() or platform.machine(), "formulations": rows, "timing": timing})
        write_text(os.path.join(args.out, "formulation.md"), text)


if __name__ == "__main__":
    main()
