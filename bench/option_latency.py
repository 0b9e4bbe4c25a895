"""Latency of one shared-basis Taylor block per plan option (k, rank), against the fp32 MLP it replaces, at the
token count of the CIFAR-10 DeiT-Small (65 tokens, batch 1) and of a 224×224 ViT (197), to see how well the plan's
cost model (multiply-adds per token, tmlp.plan.option_macs) predicts what a block costs in onnxruntime.

The per-centre tensors are random (latency does not depend on their values); the partition is the default (input
space, 16 principal directions). onnxruntime CPU, 1 thread, the runtime/run.py timing code, variants timed in
``--repeats`` interleaved rounds (median of the rounds' p50).

    python bench/option_latency.py [--out bench/results/option-latency]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import numpy as np
import torch
from timm.layers import Mlp

from tmlp.export import export_onnx
from tmlp.plan import BlockOption, mlp_macs, option_macs
from tmlp.runtime import run
from tmlp.taylor import SharedDerivatives, build_taylor_block


def random_block(d: int, k: int, rank: int, q: int, seed: int = 0) -> torch.nn.Module:
    """A shared-basis order-1 Taylor block, d -> d, k centres, rank ``rank``, cells in ``q`` directions."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(d, rank, generator=g))[0]
    derivatives = SharedDerivatives(torch.randn(k, d, generator=g), u, v, torch.randn(k, rank, rank, generator=g))
    projection = torch.linalg.qr(torch.randn(d, q, generator=g))[0]
    return build_taylor_block(torch.randn(k, d, generator=g), derivatives, 1, projection).eval()


def time_paths(paths: dict[str, str], shape: tuple[int, ...], runs: int, warmup: int, repeats: int,
               inputs: dict[str, list[np.ndarray]] | None = None) -> dict[str, float]:
    """Median over ``repeats`` interleaved rounds of each model's p50 (ms) on random inputs of ``shape`` (the
    batches ``inputs[name]`` instead, for the names it holds)."""
    sessions = {name: run.make_session(path, "cpu", 1) for name, path in paths.items()}
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    rounds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, session in sessions.items():
            input_name = session.get_inputs()[0].name
            data = (inputs or {}).get(name, batches)
            rounds[name].append(run.percentiles(run.time_batches(session, input_name, data, warmup, runs))["p50"])
    return {name: float(np.median(v)) for name, v in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/option-latency")
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--ks", default="25,50,100")
    parser.add_argument("--ranks", default="8,16,32,64")
    parser.add_argument("--tokens", default="65,197")
    parser.add_argument("--partition-rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    d, q = args.d, args.partition_rank
    torch.manual_seed(0)
    mlp = Mlp(d, 4 * d).eval()
    options = [BlockOption(int(k), int(r)) for k in args.ks.split(",") for r in args.ranks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"MLP": os.path.join(tmp, "mlp.onnx")}
        example = torch.randn(2, d)  # tokens as the (dynamic) batch axis, as bench/block.py
        export_onnx(mlp, example, paths["MLP"], {})
        for opt in options:
            paths[opt.label()] = os.path.join(tmp, f"k{opt.k}r{opt.rank}.onnx")
            export_onnx(random_block(d, opt.k, opt.rank, q), example, paths[opt.label()], {})
        for n in (int(t) for t in args.tokens.split(",")):
            ms = time_paths(paths, (n, d), args.runs, args.warmup, args.repeats)
            for opt in options:
                rows.append({"tokens": n, "option": opt.label(), "k": opt.k, "rank": opt.rank,
                             "ms": ms[opt.label()], "mlp_ms": ms["MLP"], "latency_ratio": ms[opt.label()] / ms["MLP"],
                             "mac_ratio_plan": option_macs(opt, d, d, 1) / mlp_macs(mlp, d, d),
                             "mac_ratio_partition": (q * (d + opt.k) + 2 * d * opt.rank + opt.rank ** 2)
                             / mlp_macs(mlp, d, d)})
    os.makedirs(args.out, exist_ok=True)
    header = {"cpu": platform.processor() or platform.machine(), "onnxruntime_threads": 1, "d": d,
              "partition_rank": q, "runs": args.runs, "repeats": args.repeats}
    with open(os.path.join(args.out, "option_latency.json"), "w") as f:
        json.dump({"setup": header, "rows": rows}, f, indent=1)
    lines = ["| tokens | option | ms | MLP ms | latency / MLP | MACs / MLP (plan's model) | MACs / MLP (with the "
             f"{q}-direction partition) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['option']} | {r['ms']:.3f} | {r['mlp_ms']:.3f} | {r['latency_ratio']:.3f} | "
              f"{r['mac_ratio_plan']:.3f} | {r['mac_ratio_partition']:.3f} |" for r in rows]
    with open(os.path.join(args.out, "option_latency.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
