"""The VGG-16 classifier head (512 -> 4096 -> 4096 -> 10) vs its T-MLP, and the head's share of VGG-16's time.

The whole head is one Taylor block, F: R^512 -> R^10, so even dense Jacobians are only 10 x 512 per centre: this
is the one scale at which the "two orders of magnitude" claim for T-MLP can hold.

With ``--checkpoint`` (a trained CIFAR VGG-16) the centres are K-means of the head's real inputs (max-pooled conv
features of ``--calib-images`` training images) and every variant's accuracy is measured on all of ``val.npz``
(no choice is made on it: every k is reported), with the whole model's speed-up from the T-MLP head. Without it
the weights are random: latencies are valid, errors say nothing about a trained head.

    python bench/head.py [--out bench/results/head]
    python bench/head.py --checkpoint bench/vgg16_cifar10_fp16.pt --dataset npz:../shared/data/cifar10-jpeg \
        --out bench/results/head-cifar10
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import torch

from tmlp.calibration import kmeans
from tmlp.data import load_dataset, to_tensor
from tmlp.taylor import TaylorMLP, block_derivatives
from tmlp.export import export_onnx, quantize_int8_dynamic
from tmlp.models import create_model, load_checkpoint
from tmlp.runtime import run


def latency(path: str, shape: tuple[int, ...], runs: int, warmup: int = 10) -> dict:
    session = run.make_session(path, "cpu", 1)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    return run.percentiles(run.time_batches(session, session.get_inputs()[0].name, batches, warmup, runs))


@torch.no_grad()
def head_inputs(vgg: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The head's inputs [N, 512]: max-pooled conv features of ``images`` [N, 3, 32, 32]."""
    return torch.cat([torch.flatten(vgg.pool(vgg.features(x)), 1) for x in images.split(batch)])


def trained_features(checkpoint: str, dataset: str, calib_images: int
                     ) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(VGG-16 of ``checkpoint``, head inputs of ``calib_images`` training images, of every validation image, the
    validation labels, a few preprocessed images for export)."""
    vgg, payload = load_checkpoint(checkpoint, expect_model="vgg16")
    trained = payload.get("train_config", {})
    data = load_dataset(dataset, seed=trained.get("seed", 0), val_fraction=trained.get("val_fraction", 0.2))
    spec = payload.get("preprocessing") or data.preprocessing((32, 32))
    calib = to_tensor(data.train.images(np.arange(min(calib_images, len(data.train)))), spec)
    val = to_tensor(data.val.images(np.arange(len(data.val))), spec)
    return vgg, head_inputs(vgg, calib), head_inputs(vgg, val), torch.as_tensor(data.val.y), val[:2]


def random_features() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, None, torch.Tensor]:
    """A random VGG-16 and the head inputs its conv features give on random images (2048 calib, 512 test)."""
    torch.manual_seed(0)
    vgg = create_model("vgg16", {"num_classes": 10, "hidden": 4096}).eval()
    images = torch.randn(2560, 3, 32, 32)
    feats = head_inputs(vgg, images)
    return vgg, feats[:2048], feats[2048:], None, images[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/head")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--checkpoint", help="a trained CIFAR VGG-16 (default: random weights)")
    parser.add_argument("--dataset", default="npz:../shared/data/cifar10-jpeg")
    parser.add_argument("--calib-images", type=int, default=20000, help="training images whose features K-means sees")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.checkpoint:
        vgg, calib, test, labels, examples = trained_features(args.checkpoint, args.dataset, args.calib_images)
    else:
        vgg, calib, test, labels, examples = random_features()
    head = vgg.classifier
    with torch.no_grad():
        ref = head(test)
    tmp = tempfile.mkdtemp(prefix="tmlp-head-")
    paths = {"fp32 head": os.path.join(tmp, "head.onnx"), "int8 head": os.path.join(tmp, "head.int8.onnx")}
    export_onnx(head, calib[:2], paths["fp32 head"], {})
    quantize_int8_dynamic(paths["fp32 head"], paths["int8 head"])
    import onnxruntime as ort

    s8 = ort.InferenceSession(paths["int8 head"], providers=["CPUExecutionProvider"])
    outputs = {"fp32 head": ref,
               "int8 head": torch.from_numpy(s8.run(None, {s8.get_inputs()[0].name: test.numpy()})[0])}
    taylors = {}
    for k in (10, 100, 1000):
        centres = kmeans(calib, k, seed=0, n_init=1)
        taylor = TaylorMLP(centres, block_derivatives(head, centres, 1), 1).eval()
        name = f"T-MLP dense order 1, k={k}"
        paths[name], taylors[name] = os.path.join(tmp, f"taylor-{k}.onnx"), taylor
        export_onnx(taylor, calib[:2], paths[name], {})
        with torch.no_grad():
            outputs[name] = taylor(test)
    errors = {name: float((y - ref).norm() / ref.norm()) for name, y in outputs.items()}
    accuracy = ({name: float((y.argmax(1) == labels).float().mean()) for name, y in outputs.items()}
                if labels is not None else {})
    rows = []
    for n in (1, 8, 128):
        base = None
        for name, path in paths.items():
            lat = latency(path, (n, 512), args.runs)
            base = base or lat["p50"]
            rows.append({"variant": name, "N": n, "p50_ms": lat["p50"], "p90_ms": lat["p90"],
                         "speedup_vs_fp32": base / lat["p50"], "file_mb": run.model_bytes(path) / 1e6,
                         "rel_err": errors[name], **({"val_acc": accuracy[name]} if accuracy else {})})
    whole = whole_model(vgg, taylors["T-MLP dense order 1, k=100"], examples, tmp, args.runs)
    head_lat = next(r for r in rows if r["variant"] == "fp32 head" and r["N"] == 1)["p50_ms"]
    share = {"vgg16_p50_ms": whole["fp32"][1]["p50"], "head_p50_ms": head_lat,
             "head_share": head_lat / whole["fp32"][1]["p50"], "head_macs": 512 * 4096 + 4096 * 4096 + 4096 * 10,
             "conv_macs": int(sum(m.in_channels * m.out_channels * 9 * s * s for m, s in _conv_sizes(vgg))),
             "whole_model": {n: {"fp32_p50_ms": whole["fp32"][n]["p50"], "tmlp_head_p50_ms": whole["tmlp"][n]["p50"],
                                 "trunk_p50_ms": whole["trunk"][n]["p50"],
                                 "head_alone_p50_ms": whole["head"][n]["p50"],
                                 "head_in_model_share": 1 - whole["trunk"][n]["p50"] / whole["fp32"][n]["p50"],
                                 "bound": whole["fp32"][n]["p50"] / whole["trunk"][n]["p50"],
                                 "speedup": whole["fp32"][n]["p50"] / whole["tmlp"][n]["p50"]} for n in (1, 8)}}
    write_report(args, rows, share, trained=labels is not None)


def whole_model(vgg: torch.nn.Module, taylor: torch.nn.Module, examples: torch.Tensor, tmp: str, runs: int
                ) -> dict[str, dict[int, dict[str, float]]]:
    """p50/p90 latency (ms) at batch 1 and 8 of the whole VGG-16 fp32 (``fp32``), with the T-MLP head (``tmlp``),
    with no head at all (``trunk``: the convolutions and pooling, output [N, 512]) and of the fp32 head alone
    (``head``, input [N, 512]), interleaved. ``fp32 - trunk`` is what the head costs inside the model, which can
    differ from its cost alone: the whole model's bound is ``fp32 / trunk``."""
    import copy

    with_taylor, trunk = copy.deepcopy(vgg), copy.deepcopy(vgg)
    with_taylor.classifier, trunk.classifier = taylor, torch.nn.Identity()
    sessions, shapes = {}, {}
    for name, net, example in (("fp32", vgg, examples), ("tmlp", with_taylor, examples), ("trunk", trunk, examples),
                               ("head", vgg.classifier, head_inputs(vgg, examples))):
        path = os.path.join(tmp, f"vgg16-{name}.onnx")
        export_onnx(net, example, path, {})
        sessions[name], shapes[name] = run.make_session(path, "cpu", 1), tuple(example.shape[1:])
    out: dict[str, dict[int, dict[str, float]]] = {name: {} for name in sessions}
    rng = np.random.default_rng(0)
    for n in (1, 8):  # interleaved in rounds of 10 runs, so that a slow spell of the machine falls on all
        x = {name: [rng.standard_normal((n, *shape)).astype(np.float32) for _ in range(4)]
             for name, shape in shapes.items()}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(max(5, runs // 20)):
            for name, session in sessions.items():
                times[name] += run.time_batches(session, session.get_inputs()[0].name, x[name], 2, 10)
        for name in sessions:
            out[name][n] = run.percentiles(times[name])
    return out


def write_report(args: argparse.Namespace, rows: list[dict], share: dict, trained: bool) -> None:
    """head.json (raw) and head.md (the table) under ``args.out``."""
    os.makedirs(args.out, exist_ok=True)
    machine = run.machine_info()
    with open(os.path.join(args.out, "head.json"), "w") as f:
        json.dump({"rows": rows, "share": share, "machine": machine, "checkpoint": args.checkpoint,
                   **({"dataset": args.dataset, "calib_images": args.calib_images} if trained else {})}, f, indent=2)
    weights = (f"trained: {args.checkpoint}, centres from {args.calib_images} training images, accuracy on all "
               "val.npz images" if trained else "random weights")
    lines = [f"VGG-16 classifier head (512 -> 4096 -> 4096 -> 10, {weights}), onnxruntime {machine['onnxruntime']}"
             f" CPU, 1 thread, {machine['cpu']}; p50 of {args.runs} runs.", "",
             "| N | variant | p50 ms | p90 ms | vs fp32 head | file MB | rel. error |" + (" val acc |" if trained else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if trained else "")]
    lines += [f"| {r['N']} | {r['variant']} | {r['p50_ms']:.4f} | {r['p90_ms']:.4f} | {r['speedup_vs_fp32']:.1f}x | "
              f"{r['file_mb']:.2f} | {r['rel_err']:.4f} |" + (f" {100 * r['val_acc']:.2f}% |" if trained else "")
              for r in rows]
    whole = share["whole_model"]
    lines += ["", f"Whole VGG-16 (32x32, batch 1): p50 {share['vgg16_p50_ms']:.3f} ms; the fp32 head alone "
              f"{share['head_p50_ms']:.4f} ms = {100 * share['head_share']:.1f}% of it (multiply-adds: head "
              f"{share['head_macs'] / 1e6:.1f} M, convolutions {share['conv_macs'] / 1e6:.0f} M). Replacing the head "
              "can save at most that share of VGG-16's time, whatever its own speed-up.", "",
              "Interleaved in one run: the whole model (fp32 head, T-MLP head), the trunk (no head; its time is the "
              "bound for any head) and the fp32 head alone:", "",
              "| whole model | fp32 p50 ms | T-MLP head (k=100) p50 ms | trunk p50 ms | head alone p50 ms "
              "| head's share inside the model | bound fp32/trunk | speed-up |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| batch {n} | {w['fp32_p50_ms']:.3f} | {w['tmlp_head_p50_ms']:.3f} | {w['trunk_p50_ms']:.3f} | "
              f"{w['head_alone_p50_ms']:.3f} | {100 * w['head_in_model_share']:.1f}% | {w['bound']:.2f}x | "
              f"{w['speedup']:.2f}x |" for n, w in whole.items()]
    with open(os.path.join(args.out, "head.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _conv_sizes(vgg):
    """(conv, output side) pairs of the CIFAR VGG at 32x32."""
    side, out = 32, []
    for m in vgg.features:
        if isinstance(m, torch.nn.MaxPool2d):
            side //= 2
        elif isinstance(m, torch.nn.Conv2d):
            out.append((m, side))
    return out


if __name__ == "__main__":
    main()
