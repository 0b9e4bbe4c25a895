"""Does chunking the Taylor blocks' tokens lower onnxruntime's peak memory? With and without its buffer reuse.

    MALLOC_MMAP_THRESHOLD_=65536 python bench/chunk_reuse.py blocks.0.mlp          # one dense Taylor block
    MALLOC_MMAP_THRESHOLD_=65536 python bench/chunk_reuse.py blocks.0.mlp,blocks.1.mlp 0   # two, reuse off

test_vit (random weights) with the named blocks replaced by dense Taylor blocks (k = 8), exported with 1 and 4
token chunks, run at batch 1024 (17 tokens each) with the arena and memory pattern off; prints the peak RSS of the
second run above the RSS before it. The glibc setting makes freed tensors leave RSS at once, so the peak is the live
set. Second argument: 1 (default) keeps onnxruntime's buffer reuse on, 0 turns it off.
"""
import sys

import numpy as np
import torch

from tmlp.export import export_onnx
from tmlp.models import create_model
from tmlp.runtime import run
from tmlp.surgery import taylorize_
from tmlp.taylor import TaylorConfig, TaylorMLP


def main() -> None:
    import onnxruntime as ort

    layers = sys.argv[1].split(",") if len(sys.argv) > 1 else ["blocks.0.mlp"]
    reuse = sys.argv[2] != "0" if len(sys.argv) > 2 else True
    torch.manual_seed(0)
    model = create_model("test_vit", {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10}).eval()
    xs = [torch.randn(32, 1, 16, 16) for _ in range(2)]
    taylorize_(model, TaylorConfig(k=8, basis="dense"), layers=layers, batches=lambda: iter(xs), n_batches=2,
               progress=False)
    n = 1024
    for chunks in (1, 4):
        for module in model.modules():
            if isinstance(module, TaylorMLP):
                module.chunks = chunks
        path = f"/tmp/tmlp-chunk-reuse-{chunks}.onnx"
        export_onnx(model, xs[0][:2], path, {})
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        options.enable_mem_reuse = reuse
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((n, 1, 16, 16), dtype=np.float32)
        session.run(None, {"image": x})
        base = run.current_rss_mb()
        run.reset_peak_rss()
        session.run(None, {"image": x})
        print(f"{','.join(layers)}: {chunks} chunk(s), buffer reuse {'on' if reuse else 'off'}: gathered Jacobians "
              f"{n * 17 * 64 * 64 * 4 / 2**20:.0f} MiB per block; peak above the run's start "
              f"{run.peak_rss_mb() - base:.1f} MiB")


if __name__ == "__main__":
    main()
