"""Peak memory of an export against the number of calibration images, on an ImageNet-layout image folder.

    python bench/calibration_memory.py                      # 1,000 and 8,000 images, one process
    python bench/calibration_memory.py --sizes 1000 8000 --nproc 2   # the same under torchrun (2 processes)

Generates a folder (``train/<class>/*.jpg``, ``val/<class>/*.jpg``; 10 classes of 64x64 JPEGs, each class its own
colour and stripe frequency over noise), writes a DeiT-Small (32x32 input, 4x4 patches, 3 channels, 10 classes; its
weights random: memory does not depend on training) checkpoint, and runs ``tmlp export --model deit_small
--checkpoint CKPT --dataset imagefolder:DIR --calib-images N --k 100 --distill-epochs 0`` in a fresh process per
size, each with its own empty cache (so every run calibrates). The peak RSS of the export process (of the largest
rank, under torchrun) comes from ``wait4``'s resource usage. Calibration streams the folder (images are decoded
batch by batch) and keeps a bounded token sample, so the peak should not grow with N.
Results: bench/results/calibration-memory/memory.json and memory.md.
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


def make_folder(root: str, n_train: int, n_val: int, classes: int = 10, size: int = 64, seed: int = 0) -> None:
    """An ImageNet-layout folder of ``n_train`` + ``n_val`` JPEGs (round-robin over ``classes``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c:02d}"), exist_ok=True)
        for i in range(n):
            c = i % classes
            stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (c + 1) * (xx + yy * (c % 3)))
            colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256]) / 255
            image = 0.6 * stripes[..., None] * colour + 0.4 * rng.random((size, size, 3))
            Image.fromarray((255 * image).astype(np.uint8)).save(
                os.path.join(root, split, f"class{c:02d}", f"{i:06d}.jpg"), quality=90)


def make_checkpoint(path: str) -> None:
    from tmlp.models import create_model, save_checkpoint

    config = {"img_size": 32, "patch_size": 4, "in_chans": 3, "num_classes": 10}
    save_checkpoint(path, create_model("deit_small", config).eval(), "deit_small", config)


def run_export(args: list[str], cache: str, nproc: int) -> tuple[int, float, str]:
    """(return code, peak RSS of the export in MiB, stderr tail): one fresh process (or torchrun job)."""
    entry = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
             if nproc > 1 else [sys.executable])
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*entry, "-m", "tmlp", *args], stdout=subprocess.DEVNULL, stderr=err, text=True,
                                env={**os.environ, "TMLP_CACHE": cache, "OMP_NUM_THREADS": "2"})
        # wait4: this child's own resource usage, with the largest resident set of it and the descendants it
        # waited for (under torchrun, its ranks)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, usage.ru_maxrss / 1024, err.read()[-1500:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000], help="calibration images per run")
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun when > 1)")
    parser.add_argument("--work", default=None, help="folder for the images and runs [default: a temporary one]")
    parser.add_argument("--out", default="bench/results/calibration-memory")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    work = args.work or tempfile.mkdtemp(prefix="tmlp-calib-memory-")
    folder, ckpt = os.path.join(work, "images"), os.path.join(work, "deit_small-32.pt")
    t0 = time.time()
    make_folder(folder, max(sizes), args.val_images)
    print(f"generated {max(sizes)} + {args.val_images} JPEGs in {time.time() - t0:.0f} s under {folder}", flush=True)
    make_checkpoint(ckpt)
    rows = []
    for n in sizes:
        run = os.path.join(work, f"run-{n}")
        cmd = ["export", "--model", "deit_small", "--checkpoint", ckpt, "--dataset", f"imagefolder:{folder}",
               "--calib-images", str(n), "--k", "100", "--distill-epochs", "0", "--eval-images",
               str(args.val_images), "--out", run]
        t0 = time.time()
        code, peak_mib, err = run_export(cmd, os.path.join(work, f"cache-{n}"), args.nproc)
        if code != 0:
            sys.exit(f"export of {n} images failed:\n{err}")
        manifest = json.load(open(os.path.join(run, "manifest.json")))
        row = {"calib_images": n, "processes": args.nproc, "peak_rss_mib": round(peak_mib, 1),
               "calibration_seconds": manifest["calibration_seconds"], "export_seconds": round(time.time() - t0, 1),
               "max_tokens": manifest["taylor_config"]["_data"]["max_tokens"], "command": "tmlp " + " ".join(cmd)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    from tmlp.io import write_json, write_text

    os.makedirs(args.out, exist_ok=True)
    suffix = "" if args.nproc == 1 else f"-nproc{args.nproc}"
    write_json(os.path.join(args.out, f"memory{suffix}.json"), {"rows": rows, "val_images": args.val_images})
    growth = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"] - 1
    lines = [f"# Peak RSS of `tmlp export` against calibration images ({args.nproc} process"
             f"{'es' if args.nproc > 1 else ''})", "",
             "ImageNet-layout folder of generated 64x64 JPEGs, DeiT-Small at 32x32 (4x4 patches), k=100, no "
             f"distillation, {args.val_images} validation images; peak RSS of the export process from wait4 "
             "(`bench/calibration_memory.py`).", "",
             "| calibration images | peak RSS MiB | calibration s | export s | token sample per block |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['calib_images']} | {r['peak_rss_mib']:.0f} | {r['calibration_seconds']:.0f} | "
                     f"{r['export_seconds']:.0f} | {r['max_tokens']} |")
    lines += ["", f"{rows[-1]['calib_images'] / rows[0]['calib_images']:.0f}x the images: peak RSS "
              f"{100 * growth:+.1f}%."]
    write_text(os.path.join(args.out, f"memory{suffix}.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
