"""One-process export against the same export under torchrun: do they write the same model?

    python bench/distributed_export.py                     # tmlp export --model deit_small --k 100, 1 vs 2 processes
    python bench/distributed_export.py --nproc 2 -- --model deit_small --k 100 --checkpoint CKPT --dataset DATA

Runs ``tmlp export ARGS`` in one process and ``torchrun --standalone --nproc_per_node N -m tmlp export ARGS`` with
the same threads per process (``--threads``, default 1), and once more in one process with ``--more-threads``
(default: all cores), each with its own empty calibration cache (the model cache is shared: all use the same
embedded default); then runs the tmlp.onnx files on the run's val.npz in onnxruntime and compares their logits
with the one-process run's (relative Frobenius error, top-1 agreement): the torchrun run shows what distribution
changes, the other what a different thread count changes. Results: bench/results/distributed-export/result.json
and result.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def logits(run_dir: str) -> np.ndarray:
    from runtime.run import load_images, make_session, preprocess, read_metadata

    x, _ = load_images(os.path.join(run_dir, "val.npz"))
    path = os.path.join(run_dir, "tmlp.onnx")
    session = make_session(path)
    feed = preprocess(x, json.loads(read_metadata(path)["tmlp.preprocessing"]))
    return session.run(None, {session.get_inputs()[0].name: feed})[0]


def export(args: list[str], out: str, cache: str, nproc: int, threads: int) -> float:
    """Seconds of one export into ``out`` with the calibration cache in ``cache`` (trained defaults: the user's)."""
    from tmlp.io import cache_root

    os.makedirs(cache, exist_ok=True)
    os.makedirs(os.path.join(cache_root(), "models"), exist_ok=True)
    if not os.path.exists(os.path.join(cache, "models")):
        os.symlink(os.path.join(cache_root(), "models"), os.path.join(cache, "models"))
    entry = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
             if nproc > 1 else [sys.executable])
    t0 = time.time()
    proc = subprocess.run([*entry, "-m", "tmlp", "export", *args, "--out", out], capture_output=True, text=True,
                          env={**os.environ, "TMLP_CACHE": cache,
                               "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(entry)} -m tmlp export failed:\n{proc.stderr[-2000:]}")
    return time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process of the compared runs")
    parser.add_argument("--more-threads", type=int, default=os.cpu_count() or 2,
                        help="threads of the second one-process run")
    parser.add_argument("--work", default=None, help="folder for the two runs [default: a temporary one]")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "distributed-export"))
    parser.add_argument("export_args", nargs="*", default=["--model", "deit_small", "--k", "100"],
                        help="tmlp export's arguments (after --)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="tmlp-distributed-")
    runs = {"one": (1, args.threads), f"nproc{args.nproc}": (args.nproc, args.threads),
            f"one-{args.more_threads}threads": (1, args.more_threads)}
    seconds, out = {}, {}
    for name, (nproc, threads) in runs.items():
        seconds[name] = export(args.export_args, os.path.join(work, name), os.path.join(work, "cache-" + name), nproc,
                               threads)
        out[name] = logits(os.path.join(work, name))
    manifests = {name: json.load(open(os.path.join(work, name, "manifest.json"))) for name in runs}
    a = out["one"]
    compared = {name: {"processes": runs[name][0], "threads_per_process": runs[name][1],
                       "rel_logit_error": float(np.linalg.norm(out[name] - a) / np.linalg.norm(a)),
                       "max_abs_logit_error": float(np.abs(out[name] - a).max()),
                       "top1_agreement": float((a.argmax(1) == out[name].argmax(1)).mean()),
                       "same_layers": manifests[name]["layers"] == manifests["one"]["layers"],
                       "seconds": round(seconds[name], 1),
                       "calibration_seconds": manifests[name]["calibration_seconds"]} for name in runs}
    result = {"command": "tmlp export " + " ".join(args.export_args), "val_images": int(len(a)),
              "reference": "one", "runs": compared, "layers": manifests["one"]["layers"]}
    print(json.dumps(result, indent=1))
    from tmlp.io import write_json, write_text

    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "result.json"), result)
    lines = [f"# `{result['command']}`: one process vs torchrun", "",
             f"Logits of each run's tmlp.onnx on the {len(a)} val.npz images against the one-process run's "
             f"({args.threads} thread{'s' if args.threads > 1 else ''}).", "",
             "| run | processes | threads each | rel. logit error | max abs error | top-1 agreement | same blocks | "
             "wall s | calibration s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in compared.items():
        lines.append(f"| {name} | {r['processes']} | {r['threads_per_process']} | {r['rel_logit_error']:.2e} | "
                     f"{r['max_abs_logit_error']:.2e} | {100 * r['top1_agreement']:.2f}% | {r['same_layers']} | "
                     f"{r['seconds']:.0f} | {r['calibration_seconds']:.0f} |")
    write_text(os.path.join(args.out, "result.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
