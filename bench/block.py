"""One MLP block vs its Taylor variants and onnxruntime int8, as standalone ONNX models.

Grid: d in {192, 384, 768} (hidden 4d), k in {10, 100, 1000}, N in {1, 197, 8x197} tokens, 1 and 2 threads.
Variants: fp32 MLP, int8 MLP (quantize_dynamic), dense Taylor order 1, shared basis r=32 order 1 and order 2, each
shared one also with its per-centre tensors least-squares fitted to the block's outputs (``--fit lstsq``, tmlp.taylor.fit),
and least-squares variants on the cells of each of ``--partitions`` (tmlp.taylor.partition: ``hidden`` K-means on the
first layer's pre-activations; ``:q`` in its q leading principal directions, ``--partition-rank q``, which shrinks
the nearest-centre MatMul) at the ranks of ``--partition-ranks`` (``r`` or ``r/r_out``: V of rank r, U of rank
r_out, ``--rank-out``).
Latency: onnxruntime CPU, the runtime/run.py timing code in this process (warm-up 10, 50 runs, p50/p90; the
variants of a cell are timed in --repeats interleaved rounds and the median is reported); file size; relative
output error ‖y_T − y‖/‖y‖ on held-out tokens.

Weights: at d=384 the block is ``--block`` (default blocks.5.mlp) of a trained DeiT-Small (``--checkpoint``, e.g.
the CIFAR-10 model bench/deit_small_cifar10_fp16.pt; default the embedded digits model), with its real activations
(K-means and bases from 20,000 tokens of 2,000 training images, the least-squares fit on all of those images'
tokens, error on held-out validation tokens); other widths use a
random-initialised timm Mlp with Gaussian-mixture inputs, so their errors say little about trained models (latency
does not depend on the values). Dense variants whose per-centre tensors exceed --max-dense-gb are skipped and listed.

    python bench/block.py [--quick] [--checkpoint CKPT] [--out bench/results/block]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from timm.layers import Mlp

from tmlp.calibration import kmeans, partition_kmeans, shared_block
from tmlp.data import to_tensor
from tmlp.taylor import (
    CellSums, SharedTaylorMLP, TaylorConfig, TaylorMLP, accumulate_, block_derivatives, partition_projection,
    solve_cells,
)
from tmlp.export import export_onnx, quantize_int8_dynamic
from tmlp.runtime import run


def block_and_tokens(d: int, n_calib: int, n_test: int, checkpoint: str | None, fqn: str, seed: int = 0):
    """(block, calibration tokens [n, d], held-out tokens [m, d], source description)."""
    if d == 384:
        try:
            return trained_block(checkpoint, fqn, n_calib, n_test)
        except Exception as err:  # noqa: BLE001  (no cached default model: fall back, and say so)
            print(f"d=384: trained block unavailable ({err}); using a random block", file=sys.stderr)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = Mlp(d, 4 * d).eval()
    modes = torch.randn(64, d, generator=g)
    def draw(n):
        return modes[torch.randint(0, 64, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    return block, draw(n_calib), draw(n_test), "random-init timm Mlp, Gaussian-mixture inputs"


def trained_block(checkpoint: str | None, fqn: str, n_calib: int, n_test: int):
    """Block ``fqn`` of a trained DeiT-Small (``checkpoint``, or the embedded digits default) with its real inputs:
    calibration tokens from the training split, held-out tokens from the validation split."""
    from tmlp.calibration import collect_inputs
    from tmlp.stages import load_model_and_data

    loaded = load_model_and_data("deit_small", checkpoint, progress=False)
    model, data, spec = loaded.model.eval(), loaded.data, loaded.spec
    def tokens(split, n_images, limit):
        x = to_tensor(split.images(np.arange(min(n_images, len(split)))), spec)
        return collect_inputs(model, [fqn], iter(x.split(128)), (len(x) + 127) // 128, limit, progress=False)[fqn]
    calib = tokens(data.train, 2000, n_calib)
    test = tokens(data.val, 1000, n_test)
    name = checkpoint or "the embedded digits DeiT-Small"
    return model.get_submodule(fqn), calib, test, f"{fqn} of {name}, real activations ({loaded.dataset})"


def time_model(path: str, n: int, d: int, threads: int, warmup: int, runs: int) -> dict:
    session = run.make_session(path, "cpu", threads)
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, d)).astype(np.float32) for _ in range(4)]
    return run.percentiles(run.time_batches(session, name, batches, warmup, runs))


def parse_ranks(spec: str) -> tuple[int, int | None]:
    """'32' -> (32, None); '32/48' -> (32, 48): input rank (V) and output rank (U)."""
    rank, _, rank_out = spec.partition("/")
    return int(rank), (int(rank_out) if rank_out else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/block")
    parser.add_argument("--quick", action="store_true", help="d=384, k=100, N=197 only")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-dense-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved timing rounds per cell; the median p50/p90 is reported")
    parser.add_argument("--checkpoint", default=None,
                        help="trained DeiT-Small for the d=384 block [default: the embedded digits model]")
    parser.add_argument("--block", default="blocks.5.mlp", help="which MLP of it")
    parser.add_argument("--partitions", default="hidden,hidden:16",
                        help="partitions of the extra lstsq variants, each optionally :q (--partition-rank q)")
    parser.add_argument("--partition-ranks", default=None,
                        help="basis ranks of those variants, each r or r/r_out (input/output rank), e.g. 32,48,32/48 "
                             "[default: --rank]")
    args = parser.parse_args()
    dims, ks, ns, threads = ([384], [100], [197], [1]) if args.quick else ([192, 384, 768], [10, 100, 1000],
                                                                          [1, 197, 8 * 197], [1, 2])
    partition_ranks = [parse_ranks(r) for r in (args.partition_ranks or str(args.rank)).split(",")]
    partitions = [p for p in args.partitions.split(",") if p]
    rows, skipped = [], []
    tmp = tempfile.mkdtemp(prefix="tmlp-block-")
    for d in dims:
        block, calib_all, test, source = block_and_tokens(d, 130000, 5000, args.checkpoint, args.block)
        calib_all = calib_all[torch.randperm(len(calib_all), generator=torch.Generator().manual_seed(0))]
        calib = calib_all[:20000]  # a uniform sample over all calibration images
        with torch.no_grad():
            ref = block(test)
            y_all = torch.cat([block(calib_all[s:s + 8192]) for s in range(0, len(calib_all), 8192)])
        def rel_err(module):
            with torch.no_grad():
                return float((module(test) - ref).norm() / ref.norm())
        models = {}
        fp32 = os.path.join(tmp, f"mlp-{d}.onnx")
        export_onnx(block, calib[:2], fp32, {})
        int8 = os.path.join(tmp, f"mlp-{d}.int8.onnx")
        quantize_int8_dynamic(fp32, int8)
        import onnxruntime as ort
        sess = ort.InferenceSession(int8, providers=["CPUExecutionProvider"])
        y8 = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: test.numpy()})[0])
        models[("fp32 MLP", None)] = (fp32, 0.0)
        models[("int8 MLP", None)] = (int8, float((y8 - ref).norm() / ref.norm()))
        for k in ks:
            centres = kmeans(calib, k, seed=0, n_init=1)
            dense_gb = k * d * d * 4 / 1e9
            if dense_gb <= args.max_dense_gb:
                t = TaylorMLP(centres, block_derivatives(block, centres, 1), 1).eval()
                path = os.path.join(tmp, f"dense-{d}-{k}.onnx")
                export_onnx(t, calib[:2], path, {})
                models[("dense order 1", k)] = (path, rel_err(t))
            else:
                skipped.append(f"dense order 1, d={d}, k={k}: {dense_gb:.2f} GB of Jacobians")
            for order in (1, 2):
                cfg = TaylorConfig(k=k, order=order, basis="shared", rank=args.rank)
                taylor = shared_block(block, calib, centres, cfg)
                t = SharedTaylorMLP(centres, taylor, order).eval()
                path = os.path.join(tmp, f"shared-{d}-{k}-{order}.onnx")
                export_onnx(t, calib[:2], path, {})
                models[(f"shared r={args.rank} order {order}", k)] = (path, rel_err(t))
                sums = CellSums.for_block(taylor, order)
                accumulate_(sums, calib_all, y_all, centres, taylor.u, taylor.v, order)
                t = SharedTaylorMLP(centres, solve_cells(sums, taylor, 1e-2)[0], order).eval()
                path = os.path.join(tmp, f"lstsq-{d}-{k}-{order}.onnx")
                export_onnx(t, calib[:2], path, {})
                models[(f"shared r={args.rank} order {order} lstsq", k)] = (path, rel_err(t))
            for part in partitions:
                name, _, q = part.partition(":")
                proj = partition_projection(block, name, calib, int(q) if q else None)
                centres_p = partition_kmeans(calib, k, 0, 1, proj)
                label = f"{name} partition" + (f" q={q}" if q else "")
                for rank, rank_out in partition_ranks:
                    for order in (1, 2):
                        cfg = TaylorConfig(k=k, order=order, basis="shared", rank=rank, rank_out=rank_out,
                                           partition=name)
                        taylor = shared_block(block, calib, centres_p, cfg, projection=proj)
                        sums = CellSums.for_block(taylor, order)
                        accumulate_(sums, calib_all, y_all, centres_p, taylor.u, taylor.v, order, projection=proj)
                        t = SharedTaylorMLP(centres_p, solve_cells(sums, taylor, 1e-2)[0], order, proj).eval()
                        ranks = f"{rank}" if rank_out is None else f"{rank}/{rank_out}"
                        path = os.path.join(tmp, f"{name}-{q or 'all'}-{d}-{k}-{order}-{rank}-{rank_out}.onnx")
                        export_onnx(t, calib[:2], path, {})
                        models[(f"shared r={ranks} order {order} lstsq, {label}", k)] = (path, rel_err(t))
        for n in ns:
            for th in threads:
                timings = {key: [] for key in models}
                for _ in range(args.repeats):  # interleaved: this machine's speed drifts between minutes
                    for key, (path, _err) in models.items():
                        timings[key].append(time_model(path, n, d, th, args.warmup, args.runs))
                for (variant, k), (path, err) in models.items():
                    p50 = float(np.median([t["p50"] for t in timings[variant, k]]))
                    p90 = float(np.median([t["p90"] for t in timings[variant, k]]))
                    rows.append({"d": d, "k": k, "N": n, "threads": th, "variant": variant, "p50_ms": p50,
                                 "p90_ms": p90, "file_mb": run.model_bytes(path) / 1e6, "rel_err": err,
                                 "weights": source})
                    print(f"d={d} k={k} N={n} threads={th} {variant}: p50 {p50:.3f} ms, err {err:.4f}", flush=True)
    for r in rows:  # ratios against the fp32 MLP at the same d, N and threads
        base = next(b for b in rows if b["variant"] == "fp32 MLP" and (b["d"], b["N"], b["threads"]) ==
                    (r["d"], r["N"], r["threads"]))
        int8 = next(b for b in rows if b["variant"] == "int8 MLP" and (b["d"], b["N"], b["threads"]) ==
                    (r["d"], r["N"], r["threads"]))
        r["speedup_vs_fp32"] = base["p50_ms"] / r["p50_ms"]
        r["speedup_vs_int8"] = int8["p50_ms"] / r["p50_ms"]
    os.makedirs(args.out, exist_ok=True)
    machine = {"cpu": run.machine_info()["cpu"], "cores": os.cpu_count(), "python": platform.python_version(),
               "onnxruntime": run.machine_info()["onnxruntime"], "torch": torch.__version__}
    with open(os.path.join(args.out, "block.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows, "skipped": skipped, "date": time.strftime("%Y-%m-%d")}, f,
                  indent=2)
    lines = [f"One block, onnxruntime {machine['onnxruntime']} CPU on {machine['cpu']} ({machine['cores']} cores); "
             f"p50 of {args.runs} runs after {args.warmup} warm-up, median of {args.repeats} interleaved rounds.", "",
             "| d | k | N | threads | variant | p50 ms | p90 ms | vs fp32 | vs int8 | file MB | rel. error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['d']} | {r['k'] or '-'} | {r['N']} | {r['threads']} | {r['variant']} | "
                     f"{r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['speedup_vs_fp32']:.2f}x | "
                     f"{r['speedup_vs_int8']:.2f}x | {r['file_mb']:.2f} | {r['rel_err']:.4f} |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    sources = sorted({(r["d"], r["weights"]) for r in rows})
    lines += ["", "Weights: " + "; ".join(f"d={d}: {w}" for d, w in sources)]
    with open(os.path.join(args.out, "block.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
