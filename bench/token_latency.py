"""Where does token reduction pay on this CPU? Latency of DeiT-Small with and without it, at 65 and 197 tokens.

    python bench/token_latency.py [--keeps 0.9 0.7 0.5] [--batches 1 8] [--rounds 5 --runs 10]

For each geometry — 32x32 input with 4x4 patches (64 patches + the class token = 65 tokens, the CIFAR model's) and
224x224 with 16x16 patches (197 tokens, ImageNet's) — a DeiT-Small (random weights, seeded: latency does not depend
on training) is exported to ONNX as is and with token reduction (tmlp.tokens, EViT-style: after blocks 3, 6 and 9
keep that share of the patch tokens plus one fused token; TopK + GatherElements), each checked against PyTorch in
onnxruntime, then all of a geometry's files are timed interleaved in one process (bench/interleaved.py's method:
rounds of timed batches, the order alternating) at each batch size, 1 thread. Reported: p50/p90, the speed-up over
the unreduced model, and the share of token-rows the reduced model still processes (sum over blocks of the tokens
each block sees, relative). Accuracy is not measured here: at 65 tokens it comes with the CIFAR model's Pareto run
(`tmlp bench --pareto`); no 224x224 model is trained in this project.
Results: bench/results/token-latency/token_latency.json, .md and .png.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
GEOMETRIES = {65: {"img_size": 32, "patch_size": 4}, 197: {"img_size": 224, "patch_size": 16}}


def build(tokens: int, keeps: list[float], folder: str) -> list[dict]:
    """ONNX files of DeiT-Small at ``tokens`` tokens: unreduced, then one per keep share; with parity checked."""
    import onnxruntime as ort

    from tmlp.export import export_onnx
    from tmlp.models import create_model
    from tmlp.tokens import TokenReduction, apply_token_reduction_, token_schedule

    torch.manual_seed(0)
    cfg = GEOMETRIES[tokens]
    base = create_model("deit_small", {**cfg, "num_classes": 10}).eval()
    x = torch.randn(2, 3, cfg["img_size"], cfg["img_size"], generator=torch.Generator().manual_seed(1))
    n_patches, depth = tokens - 1, len(base.blocks)
    full = depth * tokens
    out = []
    for keep in [None] + keeps:
        net = copy.deepcopy(base)
        name = "unreduced" if keep is None else f"keep-{keep:g}"
        rows = full
        if keep is not None:
            apply_token_reduction_(net, TokenReduction(keep=keep))
            rows = sum(1 + n for n in token_schedule(n_patches, depth, TokenReduction(keep=keep)))
        path = os.path.join(folder, f"deit_small-{tokens}tok-{name}.onnx")
        if not os.path.isfile(path):
            export_onnx(net, x, path, {})
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = net(x).numpy()
        out.append({"tokens": tokens, "keep": keep, "name": name, "onnx": path,
                    "token_rows_share": rows / full, "parity_max_abs": float(np.abs(got - want).max())})
    return out


def time_interleaved(paths: list[str], batch: int, rounds: int, runs: int, warmup: int) -> dict[str, dict]:
    """{path: {p50_ms, p90_ms}}: one session per file, taking turns round by round (the order alternating)."""
    from tmlp.runtime import run

    sessions = {p: run.make_session(p, "cpu", 1) for p in paths}
    rng = np.random.default_rng(0)
    inputs = {p: [rng.standard_normal([batch, *s.get_inputs()[0].shape[1:]]).astype(np.float32) for _ in range(2)]
              for p, s in sessions.items()}
    per_round: dict[str, list[dict]] = {p: [] for p in paths}
    for r in range(rounds):
        for p in (paths if r % 2 == 0 else paths[::-1]):
            s = sessions[p]
            per_round[p].append(run.percentiles(run.time_batches(s, s.get_inputs()[0].name, inputs[p], warmup, runs)))
    return {p: {"p50_ms": float(np.median([t["p50"] for t in per_round[p]])),
                "p90_ms": float(np.median([t["p90"] for t in per_round[p]]))} for p in paths}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (tokens, batch), style in zip(sorted({(r["tokens"], r["batch"]) for r in rows}), ("o-", "s--", "o-", "s--")):
        pts = sorted((r["keep"] or 1.0, r["speedup"]) for r in rows if r["tokens"] == tokens and r["batch"] == batch)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{tokens} tokens, batch {batch}",
                color="tab:blue" if tokens == 65 else "tab:red")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("share of patch tokens kept after blocks 3, 6, 9 (1 = no reduction)")
    ax.set_ylabel("speed-up over the unreduced model (p50)")
    ax.set_title("Token reduction on DeiT-Small, onnxruntime CPU, 1 thread")
    ax.invert_xaxis()
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[65, 197], choices=sorted(GEOMETRIES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10, help="timed batches per model and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--work", default=os.path.join("runs", "token-latency"), help="folder for the ONNX files")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "token-latency"))
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for tokens in args.tokens:
        models = build(tokens, args.keeps, args.work)
        for batch in args.batches:
            t0 = time.time()
            times = time_interleaved([m["onnx"] for m in models], batch, args.rounds, args.runs, args.warmup)
            base = times[models[0]["onnx"]]["p50_ms"]
            for m in models:
                row = {**m, "batch": batch, **times[m["onnx"]], "speedup": base / times[m["onnx"]]["p50_ms"]}
                row["onnx"] = os.path.basename(m["onnx"])
                rows.append(row)
                print(json.dumps(row), flush=True)
            print(f"{tokens} tokens, batch {batch}: {time.time() - t0:.0f} s", flush=True)
    from tmlp.runtime import run
    from tmlp.io import write_json, write_text

    os.makedirs(args.out, exist_ok=True)
    machine = run.machine_info()
    write_json(os.path.join(args.out, "token_latency.json"), {"rows": rows, "machine": machine, "args": vars(args)})
    lines = [f"# Token reduction latency, DeiT-Small, onnxruntime {machine['onnxruntime']} CPU, 1 thread", "",
             f"{machine['cpu']}; interleaved, {args.rounds} rounds x {args.runs} runs; median of the per-round p50/p90.",
             "", "| tokens | batch | keep | token-rows share | p50 ms | p90 ms | speed-up | parity max abs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        keep = "-" if r["keep"] is None else f"{r['keep']:g}"
        lines.append(f"| {r['tokens']} | {r['batch']} | {keep} | "
                     f"{r['token_rows_share']:.2f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['parity_max_abs']:.1e} |")
    write_text(os.path.join(args.out, "token_latency.md"), "\n".join(lines) + "\n")
    plot(rows, os.path.join(args.out, "token_latency.png"))


if __name__ == "__main__":
    main()
