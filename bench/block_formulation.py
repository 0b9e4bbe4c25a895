"""How should a shared-basis Taylor block be written in ONNX to run fastest in onnxruntime at batch 1?

    python bench/block_formulation.py [--out bench/results/block-formulation]

The order-1 block computes ``y = a_c + (S_c (Vᵀ x)) Uᵀ`` with ``c = ArgMin(½‖C P‖² − (x P)(C P)ᵀ)``. The same
numbers can be written with different ONNX nodes; at 65 tokens a node's dispatch may cost as much as its
arithmetic, so the formulation may matter. Variants (all agree with the current one to float rounding, checked):

- ``current``: tmlp's SharedTaylorMLP today: two MatMuls on x (P and V), Gather S_c [N, r, r], batched MatMul
  with Unsqueeze/Squeeze, Gather a_c, MatMul Uᵀ, Add.
- ``mul-reduce``: S_c z as Mul + ReduceSum instead of the batched MatMul.
- ``fused-xpv``: one MatMul x [P | V] then Split, and the batched MatMul.
- ``fold-assign``: P (C P)ᵀ folded into one [d, k] matrix: one MatMul for the distances instead of two.
- ``fold-assign + fused-xpv``: one MatMul x [P (C P)ᵀ | V] then Split.
- ``einsum``: S_c z as one Einsum node.

Each is exported with torch.onnx from the same random block (d 384, k 100, r 32, q 16: the CIFAR-10 DeiT-Small's
blocks) and timed with runtime/run.py's timing code, interleaved rounds, 1 thread, beside the fp32 and int8 MLP.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from option_latency import random_block, time_paths  # noqa: E402


class Formulation(torch.nn.Module):
    """A SharedTaylorMLP's order-1 forward on rows [N, d], written with ``mul_reduce`` and/or ``fused_xpv``."""

    def __init__(self, block: torch.nn.Module, mul_reduce: bool, fused_xpv: bool, fold_assign: bool = False,
                 einsum: bool = False) -> None:
        super().__init__()
        self.b, self.mul_reduce, self.fused_xpv = block, mul_reduce, fused_xpv
        self.fold, self.einsum = fold_assign, einsum
        first = block.assign_projection @ block.assign_weight.T if fold_assign else block.assign_projection
        self.q = first.shape[1]
        self.register_buffer("first", first.contiguous())
        self.register_buffer("pv", torch.cat([first, block.v], 1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.b
        if self.fused_xpv:
            xp, z = torch.split(x @ self.pv, [self.q, self.pv.shape[1] - self.q], dim=1)
        else:
            xp, z = x @ self.first, x @ b.v
        c = torch.argmin(b.half_sq_norm - (xp if self.fold else xp @ b.assign_weight.T), dim=1)
        s = torch.index_select(b.s, 0, c)
        if self.einsum:
            h = torch.einsum("nij,nj->ni", s, z)
        else:
            h = (s * z.unsqueeze(1)).sum(-1) if self.mul_reduce else torch.matmul(s, z.unsqueeze(-1)).squeeze(-1)
        return torch.index_select(b.offset, 0, c) + h @ b.ut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[65, 197])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from timm.layers import Mlp

    from tmlp.export import export_onnx
    from tmlp.export.quantize import quantize_int8_dynamic

    d, k, r, q = 384, 100, 32, 16
    block = random_block(d, k, r, q)
    variants = {"current": block}
    for name, mr, fx, fa, es in (("mul-reduce", True, False, False, False), ("fused-xpv", False, True, False, False),
                                 ("fold-assign", False, False, True, False),
                                 ("fold-assign + fused-xpv", False, True, True, False),
                                 ("einsum", False, False, False, True)):
        variants[name] = Formulation(block, mr, fx, fa, es).eval()
    x = torch.randn(65, d)
    with torch.no_grad():
        ref = block(x)
        for name, net in variants.items():
            err = float((net(x) - ref).abs().max())
            assert err < 1e-4, (name, err)
    mlp = Mlp(d, 4 * d).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32 MLP": os.path.join(tmp, "mlp.onnx"), "int8 MLP": os.path.join(tmp, "mlp8.onnx")}
        export_onnx(mlp, x, paths["fp32 MLP"], {})
        quantize_int8_dynamic(paths["fp32 MLP"], paths["int8 MLP"])
        for name, net in variants.items():
            paths[name] = os.path.join(tmp, f"{len(paths)}.onnx")
            export_onnx(net, x, paths[name], {})
        for n in args.tokens:
            times = time_paths(paths, (n, d), args.runs, 20, args.repeats)
            for name, ms in times.items():
                rows.append({"tokens": n, "variant": name, "p50_ms": round(ms, 4),
                             "vs_current": round(times["current"] / ms, 3)})
                print(f"N={n:4d} {name:26s} {1000 * ms:8.1f} us  {times['current'] / ms:5.2f}x current", flush=True)
    if args.out:
        from tmlp.io import write_json, write_text
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "formulation.json"), {"d": d, "k": k, "rank": r, "q": q, "rows": rows,
                                                                 "cpu": platform.processor() or platform.machine()})
        lines = ["| tokens | variant | p50 µs | speed vs current |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['tokens']} | {r['variant']} | {1000 * r['p50_ms']:.1f} | {r['vs_current']:.2f}× |"
                  for r in rows]
        write_text(os.path.join(args.out, "formulation.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
