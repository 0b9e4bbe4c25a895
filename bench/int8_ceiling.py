"""How much faster than onnxruntime's int8 model can T-MLP + int8 get at all? The MLPs removed outright.

    python bench/int8_ceiling.py --checkpoint bench/deit_small_cifar10_fp16.pt --run runs/cifar-default

T-MLP + int8 keeps everything outside the Taylor blocks as the int8 original has it, so its speed-up over the
int8 original is bounded by what the MLPs cost there. This script measures that bound: the checkpoint's model
with its MLPs replaced by nothing (``nn.Identity``: the residual branch adds zero work; accuracy is meaningless)
— all 12, and blocks 1–11 as the default plan replaces them — each exported and dynamically quantized exactly like
``tmlp bench``'s int8 rows, timed interleaved beside the run folder's ``original.int8.onnx`` and
``tmlp.int8.onnx``, and that T-MLP + int8 file with its per-centre tables stored in fp16 (a Cast after each
Gather: is reading them what makes a Taylor block cost more in the model than alone?); onnxruntime CPU, 1 thread,
batch 1, median of ``--repeats`` rounds' p50.

``--chain`` also times the run's Taylor blocks outside the model, on random tokens [1, N, d] (N the model's tokens):
one block alone (also on the tokens it sees in the model for 4 validation images: do real tokens, spread over more
cells, gather more distinct rows of the tables?), and all of them chained (x ← x + block(x)), interleaved. Set against the blocks'
in-model cost (T-MLP + int8 minus the model with those MLPs removed), it says whether a block costs more in the
model because of the blocks themselves (their tables together outgrow the cache: the chain costs more than the
blocks alone) or because of what runs around them (the chain costs what the blocks alone do).
Results: ``--out``/ceiling.json and ceiling.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def without_mlps(model: torch.nn.Module, blocks: list[int]) -> torch.nn.Module:
    """A copy of the timm ViT ``model`` whose ``blocks[i].mlp`` are ``nn.Identity`` for every i in ``blocks``."""
    net = copy.deepcopy(model).eval()
    for i in blocks:
        net.blocks[i].mlp = torch.nn.Identity()
    return net


def loaded_images(loaded, n: int) -> torch.Tensor:
    """The first ``n`` validation images of ``loaded`` (tmlp.stages.load_model_and_data), preprocessed [n, C, H, W]."""
    from tmlp.train import batches

    return next(iter(batches(loaded.data.val.subset(0, n), loaded.spec, n)))[0]


class Chain(torch.nn.Module):
    """Taylor blocks applied in sequence with a residual, x ← x + block(x): x [B, N, d] -> [B, N, d]."""

    def __init__(self, blocks: list[torch.nn.Module]):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def fp16_tables(src: str, dst: str) -> int:
    """Copy ``src`` with every Gathered float initializer (the Taylor blocks' per-centre tables S_c and a_c) stored
    in fp16 and a Cast to fp32 after its Gather: half the bytes each run reads. Returns the tables converted."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(src)
    inits = {i.name: i for i in model.graph.initializer}
    nodes, converted = [], set()
    for node in model.graph.node:
        nodes.append(node)
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type != onnx.TensorProto.FLOAT:
            continue
        if table.name not in converted:
            table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table).astype("float16"), table.name))
            converted.add(table.name)
        half = node.output[0] + "_fp16"
        cast = helper.make_node("Cast", [half], [node.output[0]], to=onnx.TensorProto.FLOAT,
                                name=node.name + "_cast")
        node.output[0] = half
        nodes.append(cast)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, dst)
    return len(converted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--run", required=True, help="an export folder with original.int8.onnx and tmlp.int8.onnx")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chain", action="store_true", help="also time the run's Taylor blocks outside the model")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from option_latency import time_paths

    from tmlp.export import export_onnx
    from tmlp.export.quantize import quantize_int8_dynamic
    from tmlp.stages import load_model_and_data

    loaded = load_model_and_data("deit_small", args.checkpoint, progress=False)
    model = loaded.model.eval()
    example = torch.zeros(1, *loaded.input_size)
    n_blocks = len(model.blocks)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"int8 original": os.path.join(args.run, "original.int8.onnx"),
                 "T-MLP + int8 (the run's)": os.path.join(args.run, "tmlp.int8.onnx")}
        for name, blocks in ((f"int8, MLPs 1-{n_blocks - 1} removed", list(range(1, n_blocks))),
                             (f"int8, all {n_blocks} MLPs removed", list(range(n_blocks)))):
            fp32 = os.path.join(tmp, f"{len(paths)}.onnx")
            export_onnx(without_mlps(model, blocks), example, fp32, {})
            paths[name] = fp32.replace(".onnx", ".int8.onnx")
            quantize_int8_dynamic(fp32, paths[name])
        paths["T-MLP + int8, per-centre tables fp16"] = os.path.join(tmp, "tables16.onnx")
        n_tables = fp16_tables(paths["T-MLP + int8 (the run's)"], paths["T-MLP + int8, per-centre tables fp16"])
        print(f"{n_tables} per-centre tables stored in fp16", flush=True)
        p50 = time_paths(paths, tuple(example.shape), args.runs, 10, args.repeats)
        chain = (taylor_chain(args.run, tmp, model, loaded_images(loaded, 4), args.runs, args.repeats)
                 if args.chain else None)
    base = p50["int8 original"]
    rows = [{"variant": name, "p50_ms": round(ms, 3), "speedup_vs_int8": round(base / ms, 3)}
            for name, ms in p50.items()]
    lines = ["| variant | p50 ms | speed-up vs int8 original |", "| --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['p50_ms']:.3f} | {r['speedup_vs_int8']:.2f}× |" for r in rows]
    if chain is not None:
        removed = next(ms for name, ms in p50.items() if name.startswith("int8, MLPs 1-"))
        chain["in_model_ms_per_block"] = round((p50["T-MLP + int8 (the run's)"] - removed) / chain["blocks"], 4)
        lines += ["", f"The run's {chain['blocks']} Taylor blocks on random tokens {chain['shape']}, fp32, interleaved:",
                  "", "| measure | ms per block |", "| --- | --- |",
                  f"| one block alone (`{chain['alone']}`) | {chain['alone_ms']:.4f} |",
                  f"| the same block on the tokens it sees in the model (4 validation images) | {chain['alone_real_ms']:.4f} |",
                  f"| all {chain['blocks']} chained, per block | {chain['chain_ms'] / chain['blocks']:.4f} |",
                  f"| in the model (T-MLP + int8 minus MLPs removed), per block | {chain['in_model_ms_per_block']:.4f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from tmlp.io import write_json, write_text
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "ceiling.json"),
                   {"checkpoint": args.checkpoint, "run": args.run, "runs": args.runs, "repeats": args.repeats,
                    "cpu": platform.processor() or platform.machine(), "rows": rows, "chain": chain})
        write_text(os.path.join(args.out, "ceiling.md"), text)


def block_inputs(model: torch.nn.Module, fqn: str, images: torch.Tensor) -> list[np.ndarray]:
    """The inputs [1, N, d] that block ``fqn`` of ``model`` sees for each of ``images`` [B, C, H, W]."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(fqn).register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    return [row[None].numpy().astype(np.float32) for row in seen[0]]


def taylor_chain(run_dir: str, tmp: str, model: torch.nn.Module, images: torch.Tensor, runs: int, repeats: int
                 ) -> dict:
    """Time the Taylor blocks of ``run_dir``'s T-MLP model outside the model, fp32, interleaved: its middle block
    alone on random tokens [1, N, d] (N the tokens ``model`` makes) and on the tokens it sees for ``images`` in the
    original model, and all of them chained (``Chain``) on random tokens."""
    from option_latency import time_paths

    from tmlp.export import export_onnx
    from tmlp.stages import load_tmlp_model

    tmlp_model, layers = load_tmlp_model(run_dir)
    blocks = [tmlp_model.get_submodule(f).eval() for f in layers]
    middle = len(blocks) // 2
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    example = torch.zeros(1, tokens, blocks[0].d_in)
    alone, chain = os.path.join(tmp, "alone.onnx"), os.path.join(tmp, "chain.onnx")
    export_onnx(Chain([blocks[middle]]), example, alone, {})
    export_onnx(Chain(blocks), example, chain, {})
    p50 = time_paths({"alone": alone, "alone_real": alone, "chain": chain}, tuple(example.shape), runs, 10, repeats,
                     inputs={"alone_real": block_inputs(model, layers[middle], images)})
    return {"blocks": len(blocks), "alone": layers[middle], "shape": list(example.shape),
            "alone_ms": round(p50["alone"], 4), "alone_real_ms": round(p50["alone_real"], 4),
            "chain_ms": round(p50["chain"], 4)}


if __name__ == "__main__":
    main()
