"""One MLP block vs its Taylor variants and onnxruntime int8, as standalone ONNX models.

Grid: d in {192, 384, 768} (hidden 4d), k in {10, 100, 1000}, N in {1, 197, 8x197} tokens, 1 and 2 threads.
Variants: fp32 MLP, int8 MLP (quantize_dynamic), dense Taylor order 1, shared basis r=32 order 1 and order 2.
Latency: onnxruntime CPU, the runtime/run.py timing code in this process (warm-up 10, 50 runs, p50/p90);
file size; relative output error ‖y_T − y‖/‖y‖ on held-out tokens.

Weights: at d=384 the block is ``blocks.5.mlp`` of the embedded digits DeiT-Small (trained), with its real
activations (calibration on 1,000 images, error on the held-out validation split); other widths use a
random-initialised timm Mlp with Gaussian-mixture inputs, so their errors say little about trained models (latency
does not depend on the values). Dense variants whose per-centre tensors exceed --max-dense-gb are skipped and listed.

    python bench/block.py [--quick] [--out bench/results/block]
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

from tmlp.calibrate import kmeans, shared_block
from tmlp.derivatives import block_derivatives
from tmlp.export.onnx_export import export_onnx
from tmlp.export.quantize import quantize_int8_dynamic
from tmlp.runtime import run
from tmlp.taylor import SharedTaylorMLP, TaylorConfig, TaylorMLP


def block_and_tokens(d: int, n_calib: int, n_test: int, seed: int = 0):
    """(block, calibration tokens [n, d], held-out tokens [m, d], source description)."""
    if d == 384:
        try:
            return digits_block(n_calib, n_test)
        except Exception as err:  # noqa: BLE001  (no cached default model: fall back, and say so)
            print(f"d=384: trained digits block unavailable ({err}); using a random block", file=sys.stderr)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = Mlp(d, 4 * d).eval()
    modes = torch.randn(64, d, generator=g)
    def draw(n):
        return modes[torch.randint(0, 64, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    return block, draw(n_calib), draw(n_test), "random-init timm Mlp, Gaussian-mixture inputs"


def digits_block(n_calib: int, n_test: int):
    from tmlp.calibrate import collect_inputs
    from tmlp.data import load_dataset, to_tensor
    from tmlp.models import load_checkpoint
    from tmlp.pipeline import embedded_default_checkpoint

    model, payload = load_checkpoint(embedded_default_checkpoint("deit_small"))
    data = load_dataset("digits")
    spec = payload["preprocessing"]
    fqn = "blocks.5.mlp"
    def tokens(split, n_images, limit):
        x = to_tensor(split.x[:n_images], spec)
        return collect_inputs(model, [fqn], iter(x.split(128)), (len(x) + 127) // 128, limit, progress=False)[fqn]
    calib = tokens(data.train, 1000, n_calib)
    test = tokens(data.val, 359, n_test)
    return model.get_submodule(fqn), calib, test, "blocks.5.mlp of the embedded digits DeiT-Small, real activations"


def time_model(path: str, n: int, d: int, threads: int, warmup: int, runs: int) -> dict:
    session = run.make_session(path, "cpu", threads)
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, d)).astype(np.float32) for _ in range(4)]
    return run.percentiles(run.time_batches(session, name, batches, warmup, runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/block")
    parser.add_argument("--quick", action="store_true", help="d=384, k=100, N=197 only")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-dense-gb", type=float, default=1.0)
    args = parser.parse_args()
    dims, ks, ns, threads = ([384], [100], [197], [1]) if args.quick else ([192, 384, 768], [10, 100, 1000],
                                                                          [1, 197, 8 * 197], [1, 2])
    rows, skipped = [], []
    tmp = tempfile.mkdtemp(prefix="tmlp-block-")
    for d in dims:
        block, calib, test, source = block_and_tokens(d, 20000, 5000)
        with torch.no_grad():
            ref = block(test)
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
                t = SharedTaylorMLP(centres, shared_block(block, calib, centres, cfg), order).eval()
                path = os.path.join(tmp, f"shared-{d}-{k}-{order}.onnx")
                export_onnx(t, calib[:2], path, {})
                models[(f"shared r={args.rank} order {order}", k)] = (path, rel_err(t))
        for (variant, k), (path, err) in models.items():
            for n in ns:
                for th in threads:
                    lat = time_model(path, n, d, th, args.warmup, args.runs)
                    rows.append({"d": d, "k": k, "N": n, "threads": th, "variant": variant,
                                 "p50_ms": lat["p50"], "p90_ms": lat["p90"], "file_mb": run.model_bytes(path) / 1e6,
                                 "rel_err": err, "weights": source})
                    print(f"d={d} k={k} N={n} threads={th} {variant}: p50 {lat['p50']:.3f} ms, err {err:.4f}",
                          flush=True)
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
             "p50 of 50 runs after 10 warm-up.", "",
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
