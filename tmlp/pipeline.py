"""The export pipeline: checkpoint (or the embedded default) -> calibrate -> T-MLP -> original.onnx, tmlp.onnx,
val.npz and manifest.json in one run folder."""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

import tmlp
from tmlp.data import DataSet, load_dataset, to_tensor
from tmlp.calibrate import calibrate
from tmlp.distill import distill_
from tmlp.errors import TmlpError
from tmlp.export.onnx_export import export_onnx, external_data_files, parity
from tmlp.io import atomic_path, check_can_write, ensure_writable_dir, write_json
from tmlp.models import create_model, file_sha256, input_size, load_checkpoint, model_names, resolve_config
from tmlp.plan import BlockOption, held_out_tokens, option_calibration, plan_blocks
from tmlp.surgery import select_blocks, taylorize_
from tmlp.taylor import TaylorConfig
from tmlp.train import TrainConfig, evaluate, is_trained, train

# The embedded default: each registered model, shaped as named, trained on scikit-learn's digits once and cached.
DEFAULT_DATASET = "digits"
EMBEDDED_RECIPES: dict[str, dict[str, Any]] = {
    # Measured here: AdamW 5e-4, batch 32, no augmentation reached 90.0% in 6 epochs (1e-3 stalled near 15%).
    "deit_small": {"model_config": {"img_size": 16, "patch_size": 4}, "epochs": 10, "lr": 5e-4, "batch_size": 32,
                   "optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 1.0, "clip_grad": 1.0,
                   "augment": "none"},
    "deit_tiny": {"model_config": {"img_size": 16, "patch_size": 4}, "epochs": 10, "lr": 5e-4, "batch_size": 32,
                  "optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 1.0, "clip_grad": 1.0,
                  "augment": "none"},
    "vgg16": {"model_config": {"img_size": 32, "hidden": 512}, "epochs": 15, "lr": 0.02, "batch_size": 64},
}


# Files `tmlp bench` derives from an export; a new export into the same folder removes them.
DERIVED_FILES = ("original.int8.onnx", "tmlp.int8.onnx", "tmlp.int8-all.onnx", "bench.json", "bench.md")


def cache_root() -> str:
    return os.environ.get("TMLP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tmlp"))


def embedded_default_checkpoint(model: str, log: Callable[[str], None] = print, progress: bool = True) -> str:
    """Path of ``model`` trained on digits with its embedded recipe, training it first if it is not cached."""
    if model not in EMBEDDED_RECIPES:
        raise TmlpError(f"no embedded default for {model!r} (only {sorted(EMBEDDED_RECIPES)}); pass --checkpoint")
    recipe = EMBEDDED_RECIPES[model]
    out = os.path.join(cache_root(), "models", f"{model}-{DEFAULT_DATASET}")
    if is_trained(out, recipe["epochs"]):
        log(f"no --checkpoint: using the embedded default, {model} trained on {DEFAULT_DATASET} (cached in {out})")
        return os.path.join(out, "best.pt")
    log(f"no --checkpoint: training the embedded default, {model} on {DEFAULT_DATASET} "
        f"({recipe['epochs']} epochs, once; cached in {out})")
    cfg = TrainConfig(model=model, dataset=DEFAULT_DATASET, eval_every=5, patience=recipe["epochs"], **recipe)
    summary = train(cfg, out, progress=progress, log=log)
    log(f"embedded default trained: best val acc {100 * summary['best_acc']:.2f}% at epoch {summary['best_epoch']}")
    return summary["checkpoint"]


def parse_layers(spec: str | None, candidates: list[str]) -> list[str] | None:
    """``--layers``: None/'all' -> every candidate; '0,3,5' -> those indices of the candidates; otherwise a comma
    list of module names."""
    if spec is None or spec == "all":
        return None
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise TmlpError("--layers is empty; pass 'all', block indices (0,1,2) or module names (blocks.0.mlp)")
    if all(s.isdigit() for s in items):
        bad = [int(s) for s in items if int(s) >= len(candidates)]
        if bad:
            raise TmlpError(f"--layers index {bad[0]} does not exist: the model has {len(candidates)} replaceable "
                            f"blocks (0..{len(candidates) - 1})")
        return [candidates[int(s)] for s in items]
    return items


def parse_block_k(spec: str | None, candidates: list[str]) -> dict[str, int]:
    """``--block-k``: '0=400,blocks.5.mlp=200' -> {block name: k}; blocks are indices of the candidates or names."""
    if not spec:
        return {}
    out = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not value.strip().isdigit() or int(value) <= 0:
            raise TmlpError(f"--block-k item {item!r} is not BLOCK=K with K a positive integer; write e.g. "
                            "--block-k 0=400 or --block-k blocks.0.mlp=400")
        if name.isdigit():
            if int(name) >= len(candidates):
                raise TmlpError(f"--block-k block index {name} does not exist: the model has {len(candidates)} "
                                f"replaceable blocks (0..{len(candidates) - 1})")
            name = candidates[int(name)]
        out[name] = int(value)
    return out


@dataclass
class ExportResult:
    out_dir: str
    files: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)


def tensor_batches(data: DataSet, spec: dict[str, Any], split: str, limit: int, batch_size: int = 64):
    """(gen, n_batches): ``gen()`` yields model inputs [B, C, H, W] of the first ``limit`` images of ``split``."""
    part = getattr(data, split)
    n = min(limit, len(part))

    def gen():
        for s in range(0, n, batch_size):
            yield to_tensor(part.images(np.arange(s, min(n, s + batch_size))), spec)
    return gen, (n + batch_size - 1) // batch_size


@dataclass
class Loaded:
    """A model ready to calibrate: weights, checkpoint payload (config, preprocessing), the data set and the
    preprocessing spec to feed it with."""
    model: torch.nn.Module
    payload: dict[str, Any]
    checkpoint: str | None
    data: DataSet
    spec: dict[str, Any]
    dataset: str
    input_size: tuple[int, int, int]
    source_sha256: str  # of the checkpoint file, or "pretrained:<model>"

    def calibration_key(self, calib_images: int) -> dict[str, Any]:
        """What a calibration of this model depends on besides its TaylorConfig (the cache key of calibrate)."""
        return {"checkpoint": self.source_sha256, "dataset": self.dataset, "calib_images": calib_images,
                "spec": self.spec, "version": tmlp.__version__}


def load_model_and_data(model_name: str, checkpoint: str | None = None, pretrained: bool = False,
                        dataset: str | None = None, data_root: str | None = None,
                        log: Callable[[str], None] = print, progress: bool = True) -> Loaded:
    """The model (``checkpoint``, timm's pretrained weights, or the embedded default) and its data set, split and
    preprocessed as it was in training."""
    if model_name not in model_names():
        resolve_config(model_name)  # raises for unknown names
    if checkpoint is not None:
        model, payload = load_checkpoint(checkpoint, expect_model=model_name)
        ckpt_path = checkpoint
    elif pretrained:
        if dataset is None:
            raise TmlpError("--pretrained needs --dataset to calibrate and evaluate on (e.g. imagefolder:PATH)")
        model = create_model(model_name, pretrained=True).eval()
        payload, ckpt_path = {"model": model_name, "config": resolve_config(model_name)}, None
    else:
        ckpt_path = embedded_default_checkpoint(model_name, log, progress)
        model, payload = load_checkpoint(ckpt_path)
    dataset = dataset or payload.get("dataset", DEFAULT_DATASET)
    mcfg = payload["config"]
    chans, h, w = input_size(model_name, mcfg)
    data = load_dataset(dataset, data_root, seed=payload.get("train_config", {}).get("seed", 0),
                        image_size=h, val_fraction=payload.get("train_config", {}).get("val_fraction", 0.2))
    if data.channels != chans:
        raise TmlpError(f"{dataset} images have {data.channels} channels, the model takes {chans}; pick the data set "
                        "the checkpoint was trained on")
    same_data = payload.get("dataset") == dataset and payload.get("preprocessing")
    spec = payload["preprocessing"] if same_data else data.preprocessing((h, w))
    source_sha = file_sha256(ckpt_path) if ckpt_path else "pretrained:" + model_name
    return Loaded(model, payload, ckpt_path, data, spec, dataset, (chans, h, w), source_sha)


def run_export(model_name: str, k: int = 100, order: int = 1, basis: str = "shared", rank: int = 32,
               rank_out: int | None = None, basis_source: str = "data", fit: str = "auto", fit_ridge: float = 1e-2,
               partition: str = "input", partition_rank: int | None = 16, layers: str | None = None,
               dataset: str | None = None, checkpoint: str | None = None, out_dir: str | None = None,
               hessian: str = "diag", seed: int = 0, calib_images: int = 5000, eval_images: int = 10000,
               data_root: str | None = None, pretrained: bool = False, opset: int = 20, distill_epochs: int = 0,
               distill_lr: float = 1e-3, distill_basis: bool = False, distill_schedule: str = "constant",
               max_acc_drop: float | None = None, plan_k: str | None = None, plan_rank: str | None = None,
               block_k: str | None = None, device: str | None = None, max_memory_mb: float | None = None,
               memory_batch: int = 1, log: Callable[[str], None] = print, progress: bool = True) -> ExportResult:
    """Calibrate, build the T-MLP model, export original.onnx and tmlp.onnx, check them, and write val.npz and
    manifest.json (last) into ``out_dir``."""
    started = time.time()
    profile = None
    max_ir = None
    if device is not None:
        from tmlp.devices import load_profile

        profile = load_profile(device)
        if opset > profile.max_opset:
            log(f"--device {profile.name}: onnxruntime {profile.onnxruntime} reads opset <= {profile.max_opset} and IR "
                f"<= {profile.max_ir_version}; exporting opset {profile.max_opset}")
            opset = profile.max_opset
        max_ir = profile.max_ir_version
    if fit == "auto":  # the least-squares fit needs the shared basis; dense Jacobians keep the Taylor values
        fit = "lstsq" if basis == "shared" else "taylor"
    config = TaylorConfig(k=k, order=order, hessian=hessian, seed=seed, basis=basis, rank=rank,
                          rank_out=rank_out, basis_source=basis_source, fit=fit, fit_ridge=fit_ridge,
                          partition=partition, partition_rank=partition_rank)
    loaded = load_model_and_data(model_name, checkpoint, pretrained, dataset, data_root, log, progress)
    model, payload, ckpt_path, data, spec, dataset = (loaded.model, loaded.payload, loaded.checkpoint, loaded.data,
                                                      loaded.spec, loaded.dataset)
    mcfg = payload["config"]
    chans, h, w = loaded.input_size
    out_dir = out_dir or os.path.join("runs", f"{model_name}-{_slug(dataset)}")
    check_can_write(out_dir)

    candidates = select_blocks(model)
    chosen = parse_layers(layers, candidates)
    fqns = select_blocks(model, layers=chosen)
    k_override = parse_block_k(block_k, candidates)
    if k_override and max_acc_drop is not None:
        raise TmlpError("--block-k and --max-acc-drop both choose k per block; give one of them (the plan may use "
                        "several k: --plan-k)")
    stray = [f for f in k_override if f not in fqns]
    if stray:
        raise TmlpError(f"--block-k names {stray[0]!r}, which is not among the blocks to replace ({fqns[0]} ...); "
                        "fix --block-k or --layers")
    tokens_per_image = _tokens_per_image(model, fqns[0], torch.zeros(1, chans, h, w))
    available = min(calib_images, len(data.train)) * tokens_per_image
    largest_k = max([k, *k_override.values()])
    if largest_k > available:
        raise TmlpError(f"k = {largest_k} expansion points but the calibration data give only {available} tokens "
                        f"({min(calib_images, len(data.train))} images x {tokens_per_image}); lower --k / --block-k")
    ranks = f"rank {rank}" if rank_out is None else f"rank {rank} in, {rank_out} out"
    form = f"shared basis {ranks} ({basis_source})" if basis == "shared" else "dense Jacobians"
    if fit == "lstsq":
        form += f", least-squares fit (ridge {fit_ridge})"
    if partition != "input" or partition_rank:
        form += f", {partition} partition" + (f" in {partition_rank} principal directions" if partition_rank else "")
    log(f"calibrating {len(fqns)} block(s) ({fqns[0]}{' ...' if len(fqns) > 1 else ''}) with k={k}, order {order}, "
        f"{form}, on {min(calib_images, len(data.train))} training images of {dataset}")
    ckpt_sha = loaded.source_sha256
    batches, n_batches = tensor_batches(data, spec, "train", calib_images)
    tmlp_model = copy.deepcopy(model)
    t0 = time.time()
    calib_key = loaded.calibration_key(calib_images)
    calibration = calibrate(model, fqns, batches, n_batches, config, progress=progress, log=log, key=calib_key)
    # Blocks with their own k are calibrated again at that k. The run above still includes them, so that it keeps
    # the cache key (and cache hits) of the same export without --block-k.
    for kk in sorted(set(k_override.values()) - {k}):
        group = [f for f in fqns if k_override.get(f) == kk]
        log(f"--block-k: calibrating {', '.join(group)} with k={kk}")
        calibration.update(calibrate(model, group, batches, n_batches, replace(config, k=kk), progress=progress,
                                     log=log, key=calib_key))
    calib_seconds = time.time() - t0

    n_eval = min(eval_images, len(data.val))
    val_x = data.val.images(np.arange(n_eval))
    val_y = data.val.y[:n_eval]
    device = torch.device("cpu")
    layer_plan = None
    if max_acc_drop is not None:
        k_choices = parse_choices(plan_k, k, "--plan-k")
        rank_choices = parse_choices(plan_rank, rank, "--plan-rank") if basis == "shared" else [None]
        if max(k_choices) > available:
            raise TmlpError(f"--plan-k {max(k_choices)} exceeds the {available} calibration tokens; lower it")
        options = [BlockOption(kk, rr) for kk in k_choices for rr in rank_choices]
        max_rank = max(rank_choices) if basis == "shared" else rank
        calibrations = {}
        for kk in k_choices:
            if kk == k and max_rank <= rank:
                calibrations[kk] = calibration
            else:
                wider = replace(config, k=kk, rank=max_rank,  # U keeps its share of columns (plan.truncate_rank)
                                rank_out=None if rank_out is None else round(rank_out * max_rank / rank))
                calibrations[kk] = calibrate(model, fqns, batches, n_batches, wider, progress=progress, log=log,
                                             key=calib_key)
        probe = to_tensor(val_x[:256], spec)
        tokens = held_out_tokens(model, fqns, [probe[i:i + 64] for i in range(0, len(probe), 64)], seed=seed)
        log(f"planning blocks under --max-acc-drop {max_acc_drop} points: options "
            f"{', '.join(o.label() for o in options)}; logit-KL sensitivity on {len(probe)} validation images, "
            f"accuracy on {n_eval}")
        layer_plan = plan_blocks(model, calibrations, options, order,
                                 lambda m: evaluate(m, data.val, spec, device, limit=n_eval), max_acc_drop / 100,
                                 tokens, probe, log=log)
        log(layer_plan.search_table())
        log(layer_plan.table())
        if not layer_plan.chosen:
            raise TmlpError(f"no block can be replaced within --max-acc-drop {max_acc_drop} points; raise it, or "
                            "offer larger --plan-k / --plan-rank")
        fqns = layer_plan.chosen
        calibration = {f: option_calibration(calibrations, f, layer_plan.choice[f]) for f in fqns}
        log(f"plan: replace {len(fqns)} of {len(tokens)} blocks, MACs per token of the candidate blocks "
            f"{layer_plan.mac_ratio():.3f}x the original's")
    block_configs = {"_default": config, **{f: replace(config, k=kk) for f, kk in k_override.items()}}
    taylorize_(tmlp_model, block_configs, layers=fqns, calibration=calibration)
    acc_orig = evaluate(model, data.val, spec, device, limit=n_eval)
    acc_tmlp = evaluate(tmlp_model, data.val, spec, device, limit=n_eval)
    log(f"PyTorch accuracy on {n_eval} validation images: original {100 * acc_orig:.2f}%, T-MLP {100 * acc_tmlp:.2f}%")
    distillation = None
    if distill_epochs > 0:
        t0 = time.time()
        losses = distill_(tmlp_model, model, batches, n_batches, distill_epochs, distill_lr, distill_basis,
                          progress=progress, schedule=distill_schedule)
        acc_before, acc_tmlp = acc_tmlp, evaluate(tmlp_model, data.val, spec, device, limit=n_eval)
        distillation = {"epochs": distill_epochs, "lr": distill_lr, "schedule": distill_schedule,
                        "train_basis": distill_basis, "kl_per_epoch": losses, "accuracy_before": acc_before,
                        "accuracy_after": acc_tmlp, "seconds": round(time.time() - t0, 1)}
        log(f"distillation ({distill_epochs} epoch(s), logit KL, lr {distill_lr} {distill_schedule}): T-MLP "
            f"accuracy {100 * acc_before:.2f}% -> {100 * acc_tmlp:.2f}% (original {100 * acc_orig:.2f}%)")

    meta_common = {**({"tmlp.device": profile.name} if profile else {}),
                   "tmlp.version": tmlp.__version__, "tmlp.model": model_name, "tmlp.model_config": json.dumps(
        mcfg, sort_keys=True), "tmlp.dataset": dataset, "tmlp.preprocessing": json.dumps(spec, sort_keys=True),
        "tmlp.source_checkpoint_sha256": ckpt_sha}
    meta_tmlp = {**meta_common, "tmlp.kind": "tmlp", "tmlp.k": str(k), "tmlp.order": str(order), "tmlp.basis": basis,
                 "tmlp.partition": partition,
                 **({"tmlp.partition_rank": str(partition_rank)} if partition_rank else {}),
                 **({"tmlp.rank": str(rank), "tmlp.basis_source": basis_source, "tmlp.fit": fit}
                    if basis == "shared" else {}),
                 **({"tmlp.rank_out": str(rank_out)} if basis == "shared" and rank_out else {}),
                 "tmlp.layers": json.dumps(fqns), "tmlp.taylor_config": json.dumps(config.to_dict(), sort_keys=True),
                 "tmlp.distill_epochs": str(distill_epochs),
                 **({"tmlp.block_k": json.dumps(k_override, sort_keys=True)} if k_override else {}),
                 **({} if layer_plan is None else {"tmlp.plan": json.dumps(layer_plan.to_dict()["choice"],
                                                                          sort_keys=True)})}
    example = to_tensor(val_x[:2], spec)
    parity_inputs = to_tensor(val_x[:64], spec)
    memory = None
    if max_memory_mb is not None:
        memory = fit_memory(tmlp_model, example, max_memory_mb, memory_batch, opset, max_ir, log)
        meta_tmlp["tmlp.chunks"] = str(memory["chunks"])
    files = {}
    ensure_writable_dir(out_dir)
    for stale in ("manifest.json", "original.onnx.data", "tmlp.onnx.data") + DERIVED_FILES:  # an earlier export's manifest (rewritten last) and what
        # `tmlp bench` derived from it: a half-finished export must not look complete
        if os.path.isfile(os.path.join(out_dir, stale)):
            os.unlink(os.path.join(out_dir, stale))
    for name, net, meta in (("original.onnx", model, {**meta_common, "tmlp.kind": "original"}),
                            ("tmlp.onnx", tmlp_model, meta_tmlp)):
        path = os.path.join(out_dir, name)
        t0 = time.time()
        try:
            ops = export_onnx(net, example, path, meta, opset=opset, max_ir_version=max_ir)
            if profile is not None:
                try:
                    profile.check_ops(set(ops))
                except TmlpError:
                    os.unlink(path)
                    raise
        except TmlpError as err:
            if profile is None:
                raise
            raise TmlpError(f"cannot export for device {profile.name}: {err}") from None
        check = parity(path, net, parity_inputs)
        log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, {time.time() - t0:.0f} s); onnx.checker "
            f"full_check passed; onnxruntime vs PyTorch: {check}")
        if name == "tmlp.onnx":
            log(f"  Taylor blocks in the graph: ArgMin x{ops.get('ArgMin', 0)}, Gather x{ops.get('Gather', 0)}, "
                f"MatMul x{ops.get('MatMul', 0)}")
        files[name] = path
        for extra in external_data_files(path):  # > 2 GiB: the model's external data file, listed in the manifest
            files[os.path.basename(extra)] = extra
        files[name + ".parity"] = check
    val_path = os.path.join(out_dir, "val.npz")
    with atomic_path(val_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=val_x, y=val_y)
    files["val.npz"] = val_path
    summary = {"model": model_name, "model_config": mcfg, "dataset": dataset, "checkpoint": ckpt_path,
               "checkpoint_sha256": ckpt_sha, "taylor_config": config.to_dict(), "layers": fqns, "block_k": k_override,
               "preprocessing": spec, "pytorch_val_accuracy": {"original": acc_orig, "tmlp": acc_tmlp},
               "n_val": n_eval, "calibration_seconds": round(calib_seconds, 1), "distillation": distillation,
               "layer_plan": None if layer_plan is None else layer_plan.to_dict(),
               "device": None if profile is None else profile.to_dict(), "opset": opset, "memory": memory,
               "parity": {n: vars(files.pop(n + ".parity")) for n in ("original.onnx", "tmlp.onnx")},
               "versions": {"tmlp": tmlp.__version__, "torch": torch.__version__, "python": platform.python_version()},
               "export_seconds": round(time.time() - started, 1)}
    write_manifest(out_dir, files, summary)
    return ExportResult(out_dir, files, summary)


def fit_memory(model: torch.nn.Module, example: torch.Tensor, budget_mb: float, batch: int, opset: int,
               max_ir: int | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Choose how many token chunks the Taylor blocks evaluate in so that the exported graph's estimated memory
    (weights + peak live activations at ``batch``, tmlp.export.memory) fits ``budget_mb`` MiB; sets ``chunks`` on
    every Taylor block of ``model`` and returns the choice with its estimates."""
    import tempfile

    from tmlp.export.memory import MIB, estimate_memory
    from tmlp.taylor import TaylorMLP, SharedTaylorMLP

    blocks = [m for m in model.modules() if isinstance(m, (TaylorMLP, SharedTaylorMLP))]
    if budget_mb <= 0 or batch < 1:
        raise TmlpError(f"--max-memory must be > 0 MiB and --memory-batch >= 1, got {budget_mb} and {batch}")
    tried = []
    with tempfile.TemporaryDirectory(prefix="tmlp-memory-") as tmp:
        chunks = 1
        while True:
            for b in blocks:
                b.chunks = chunks
            path = os.path.join(tmp, f"chunks{chunks}.onnx")
            export_onnx(model, example, path, {}, opset=opset, max_ir_version=max_ir)
            est = estimate_memory(path, batch)
            tried.append({"chunks": chunks, "weights_mib": est.weights_bytes / MIB,
                          "peak_activations_mib": est.peak_activation_bytes / MIB, "total_mib": est.total_bytes / MIB})
            log(f"memory estimate with the Taylor blocks in {chunks} chunk(s): {est.summary()}")
            if est.total_bytes <= budget_mb * MIB:
                return {"budget_mib": budget_mb, "batch": batch, "chunks": chunks, "estimates": tried}
            if est.weights_bytes > budget_mb * MIB:
                raise TmlpError(f"the weights alone take {est.weights_bytes / MIB:.1f} MiB, over --max-memory "
                                f"{budget_mb} MiB; lower --k / --rank or use --basis shared")
            if not blocks or chunks >= 256:
                raise TmlpError(f"cannot fit --max-memory {budget_mb} MiB at batch {batch}: {est.summary()} even with "
                                f"{chunks} chunk(s); the largest tensor is {est.largest[0][0]} "
                                f"({est.largest[0][1] / MIB:.1f} MiB); raise the budget or lower --memory-batch")
            chunks *= 2


def write_manifest(out_dir: str, files: dict[str, str], summary: dict[str, Any]) -> str:
    """manifest.json, written last: the run's config and each file's sha256 and size."""
    entries = {os.path.basename(p): {"sha256": file_sha256(p), "bytes": os.path.getsize(p)} for p in files.values()}
    path = os.path.join(out_dir, "manifest.json")
    write_json(path, {"files": entries, **summary})
    return path


def parse_choices(spec: str | None, largest: int, flag: str) -> list[int]:
    """``--plan-k``/``--plan-rank``: '25,50,100' -> [25, 50, 100]; None -> {largest/4, largest/2, largest}."""
    if spec is None:
        return sorted({max(1, largest // 4), max(1, largest // 2), largest})
    try:
        values = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        raise TmlpError(f"{flag} takes comma-separated positive integers like 25,50,100, got {spec!r}") from None
    if not values or values[0] < 1:
        raise TmlpError(f"{flag} takes comma-separated positive integers like 25,50,100, got {spec!r}")
    return values


def _slug(dataset: str) -> str:
    return dataset.replace(":", "-").replace("/", "_").strip("_.-") or "data"


@torch.no_grad()
def _tokens_per_image(model: torch.nn.Module, fqn: str, example: torch.Tensor) -> int:
    """How many rows block ``fqn`` sees for one image ``example`` [1, C, H, W]."""
    seen: list[int] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])

    handle = model.get_submodule(fqn).register_forward_pre_hook(record)
    try:
        model(example)
    finally:
        handle.remove()
    return seen[0]

