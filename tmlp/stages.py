"""The export's stages, in the order ``tmlp.pipeline.run_export`` chains them. Each takes what the stages before it
produced and the spec section it needs; a library user can run one alone or put another in its place.

    load -> select -> calibrate -> plan -> build -> distil -> fit memory -> export and verify -> manifest
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

import tmlp
from tmlp.calibration.calibrate import BlockCalibration, calibrate
from tmlp.calibration.record import tokens_per_image
from tmlp.data import DataSet, load_dataset, to_tensor
from tmlp.distill import distill_
from tmlp.finetune import finetune_
from tmlp.errors import TmlpError
from tmlp.io import atomic_path, cache_path, ensure_writable_dir, file_sha256, write_json
from tmlp.models import create_model, input_size, load_checkpoint, model_names, resolve_config
from tmlp.plan import BlockOption, Plan, held_out_tokens, option_calibration, plan_blocks
from tmlp.spec import ExportSpec, PlanSpec, TaylorConfig
from tmlp.surgery import select_blocks, taylorize_
from tmlp.train import TrainConfig, evaluate, is_trained, train

__all__ = ["Built", "Loaded", "ResolvedTarget", "Selection", "build", "calibrate_selection", "clear_run_folder",
           "common_metadata", "distil", "embedded_default_checkpoint", "export_verified", "load",
           "load_model_and_data", "parse_block_k", "parse_layers", "plan_options", "plan_stage", "resolve_target",
           "select", "tensor_batches", "tmlp_metadata", "versions", "write_manifest", "write_val_images", "Exported", "export_models", "summarize"]

Log = Callable[[str], None]

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


# ---------------------------------------------------------------------------------------------------------------------
# 1. load
# ---------------------------------------------------------------------------------------------------------------------
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

    def batches(self, split: str, limit: int, batch_size: int = 64):
        """(gen, n_batches): ``gen()`` yields model inputs of the first ``limit`` images of ``split``."""
        return tensor_batches(self.data, self.spec, split, limit, batch_size)

    def labelled_batches(self, split: str, limit: int, batch_size: int = 64):
        """(gen, n_batches): ``gen()`` yields (model inputs, labels) of the first ``limit`` images of ``split``."""
        part = getattr(self.data, split)
        n = min(limit, len(part))

        def gen():
            for s in range(0, n, batch_size):
                index = np.arange(s, min(n, s + batch_size))
                yield to_tensor(part.images(index), self.spec), torch.from_numpy(part.y[index]).long()
        return gen, (n + batch_size - 1) // batch_size


def tensor_batches(data: DataSet, spec: dict[str, Any], split: str, limit: int, batch_size: int = 64):
    """(gen, n_batches): ``gen()`` yields model inputs [B, C, H, W] of the first ``limit`` images of ``split``."""
    part = getattr(data, split)
    n = min(limit, len(part))

    def gen():
        for s in range(0, n, batch_size):
            yield to_tensor(part.images(np.arange(s, min(n, s + batch_size))), spec)
    return gen, (n + batch_size - 1) // batch_size


def embedded_default_checkpoint(model: str, log: Log = print, progress: bool = True) -> str:
    """Path of ``model`` trained on digits with its embedded recipe, training it first if it is not cached."""
    if model not in EMBEDDED_RECIPES:
        raise TmlpError(f"no embedded default for {model!r} (only {sorted(EMBEDDED_RECIPES)}); pass --checkpoint")
    recipe = EMBEDDED_RECIPES[model]
    out = cache_path("models", f"{model}-{DEFAULT_DATASET}")
    if is_trained(out, recipe["epochs"]):
        log(f"no --checkpoint: using the embedded default, {model} trained on {DEFAULT_DATASET} (cached in {out})")
        return os.path.join(out, "best.pt")
    log(f"no --checkpoint: training the embedded default, {model} on {DEFAULT_DATASET} "
        f"({recipe['epochs']} epochs, once; cached in {out})")
    cfg = TrainConfig(model=model, dataset=DEFAULT_DATASET, eval_every=5, patience=recipe["epochs"], **recipe)
    summary = train(cfg, out, progress=progress, log=log)
    log(f"embedded default trained: best val acc {100 * summary['best_acc']:.2f}% at epoch {summary['best_epoch']}")
    return summary["checkpoint"]


def load_model_and_data(model_name: str, checkpoint: str | None = None, pretrained: bool = False,
                        dataset: str | None = None, data_root: str | None = None, log: Log = print,
                        progress: bool = True) -> Loaded:
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
    chans, h, w = input_size(model_name, payload["config"])
    trained = payload.get("train_config", {})
    data = load_dataset(dataset, data_root, seed=trained.get("seed", 0), image_size=h,
                        val_fraction=trained.get("val_fraction", 0.2))
    if data.channels != chans:
        raise TmlpError(f"{dataset} images have {data.channels} channels, the model takes {chans}; pick the data set "
                        "the checkpoint was trained on")
    same_data = payload.get("dataset") == dataset and payload.get("preprocessing")
    spec = payload["preprocessing"] if same_data else data.preprocessing((h, w))
    source_sha = file_sha256(ckpt_path) if ckpt_path else "pretrained:" + model_name
    return Loaded(model, payload, ckpt_path, data, spec, dataset, (chans, h, w), source_sha)


def load(spec: ExportSpec, log: Log = print, progress: bool = True) -> Loaded:
    """Stage 1: the model and data the spec's source section names."""
    src = spec.source
    return load_model_and_data(spec.model, src.checkpoint, src.pretrained, src.dataset, src.data_root, log, progress)


# ---------------------------------------------------------------------------------------------------------------------
# 2. select
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """The blocks to replace (``fqns``, model order), the k of blocks that have their own (``block_k``), the
    candidates they were chosen from and how many calibration tokens there are per block."""

    fqns: list[str]
    block_k: dict[str, int]
    candidates: list[str]
    available_tokens: int


def parse_layers(text: str | None, candidates: list[str]) -> list[str] | None:
    """``--layers``: None/'all' -> every candidate; '0,3,5' -> those indices of the candidates; otherwise a comma
    list of module names."""
    if text is None or text == "all":
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise TmlpError("--layers is empty; pass 'all', block indices (0,1,2) or module names (blocks.0.mlp)")
    if all(s.isdigit() for s in items):
        return [candidate_at(candidates, int(s), "--layers index") for s in items]
    return items


def candidate_at(candidates: list[str], index: int, what: str) -> str:
    if index >= len(candidates):
        raise TmlpError(f"{what} {index} does not exist: the model has {len(candidates)} replaceable blocks "
                        f"(0..{len(candidates) - 1})")
    return candidates[index]


def parse_block_k(text: str | None, candidates: list[str]) -> dict[str, int]:
    """``--block-k``: '0=400,blocks.5.mlp=200' -> {block name: k}; blocks are indices of the candidates or names."""
    out = {}
    for item in (s.strip() for s in (text or "").split(",") if s.strip()):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not value.isdigit() or int(value) <= 0:
            raise TmlpError(f"--block-k item {item!r} is not BLOCK=K with K a positive integer; write e.g. "
                            "--block-k 0=400 or --block-k blocks.0.mlp=400")
        out[candidate_at(candidates, int(name), "--block-k block index") if name.isdigit() else name] = int(value)
    return out


def select(loaded: Loaded, spec: ExportSpec) -> Selection:
    """Stage 2: the blocks to replace and their k, checked against the calibration tokens the data give."""
    candidates = select_blocks(loaded.model)
    fqns = select_blocks(loaded.model, layers=parse_layers(spec.blocks.layers, candidates))
    block_k = parse_block_k(spec.blocks.block_k, candidates)
    if block_k and spec.plan.max_acc_drop is not None:
        raise TmlpError("--block-k and --max-acc-drop both choose k per block; give one of them (the plan may use "
                        "several k: --plan-k)")
    stray = [f for f in block_k if f not in fqns]
    if stray:
        raise TmlpError(f"--block-k names {stray[0]!r}, which is not among the blocks to replace ({fqns[0]} ...); "
                        "fix --block-k or --layers")
    n_images = min(spec.source.calib_images, len(loaded.data.train))
    per_image = tokens_per_image(loaded.model, fqns[0], torch.zeros(1, *loaded.input_size))
    available = n_images * per_image
    largest_k = max([spec.calibration.k, *block_k.values()])
    if largest_k > available:
        raise TmlpError(f"k = {largest_k} expansion points but the calibration data give only {available} tokens "
                        f"({n_images} images x {per_image}); lower --k / --block-k")
    return Selection(fqns, block_k, candidates, available)


# ---------------------------------------------------------------------------------------------------------------------
# 3. calibrate
# ---------------------------------------------------------------------------------------------------------------------
def calibrate_selection(loaded: Loaded, selection: Selection, config: TaylorConfig, calib_images: int,
                        log: Log = print, progress: bool = True) -> dict[str, BlockCalibration]:
    """Stage 3: centres and per-centre tensors of every selected block (cached by the hash of their inputs)."""
    fqns = selection.fqns
    n = min(calib_images, len(loaded.data.train))
    log(f"calibrating {len(fqns)} block(s) ({fqns[0]}{' ...' if len(fqns) > 1 else ''}) with k={config.k}, order "
        f"{config.order}, {config.describe()}, on {n} training images of {loaded.dataset}")
    batches, n_batches = loaded.batches("train", calib_images)
    key = loaded.calibration_key(calib_images)
    calibration = calibrate(loaded.model, fqns, batches, n_batches, config, progress=progress, log=log, key=key)
    # Blocks with their own k are calibrated again at that k. The run above still includes them, so that it keeps
    # the cache key (and cache hits) of the same export without --block-k.
    for k in sorted(set(selection.block_k.values()) - {config.k}):
        group = [f for f in fqns if selection.block_k.get(f) == k]
        log(f"--block-k: calibrating {', '.join(group)} with k={k}")
        calibration.update(calibrate(loaded.model, group, batches, n_batches, config.replace(k=k, max_tokens=config.max_tokens),
                                     progress=progress, log=log, key=key))
    return calibration


# ---------------------------------------------------------------------------------------------------------------------
# 4. plan
# ---------------------------------------------------------------------------------------------------------------------
def plan_options(plan: PlanSpec, config: TaylorConfig, available_tokens: int) -> list[BlockOption]:
    """The (k, rank) options the planner may choose from: the spec's choices, else {x/4, x/2, x}."""
    def around(largest: int) -> tuple[int, ...]:
        return tuple(sorted({max(1, largest // 4), max(1, largest // 2), largest}))
    k_choices = plan.k_choices or around(config.k)
    rank_choices = (plan.rank_choices or around(config.rank)) if config.basis == "shared" else (None,)
    if max(k_choices) > available_tokens:
        raise TmlpError(f"--plan-k {max(k_choices)} exceeds the {available_tokens} calibration tokens; lower it")
    return [BlockOption(k, r) for k in k_choices for r in rank_choices]


def plan_stage(loaded: Loaded, selection: Selection, calibration: dict[str, BlockCalibration], spec: ExportSpec,
               log: Log = print, progress: bool = True) -> tuple[Selection, dict[str, BlockCalibration], Plan]:
    """Stage 4 (with ``--max-acc-drop``): per block, replace or keep, and with which k and rank; returns the
    narrowed selection, its calibration and the plan."""
    config, model = spec.calibration, loaded.model
    options = plan_options(spec.plan, config, selection.available_tokens)
    max_rank = max(o.rank or config.rank for o in options)
    batches, n_batches = loaded.batches("train", spec.source.calib_images)
    calibrations = {}
    for k in sorted({o.k for o in options}):
        if k == config.k and max_rank <= config.rank:
            calibrations[k] = calibration
        else:  # U keeps its share of columns at the wider rank (plan.truncate_rank)
            wider = config.replace(k=k, max_tokens=config.max_tokens, rank=max_rank, rank_out=None
                                   if config.rank_out is None else round(config.rank_out * max_rank / config.rank))
            calibrations[k] = calibrate(model, selection.fqns, batches, n_batches, wider, progress=progress, log=log,
                                        key=loaded.calibration_key(spec.source.calib_images))
    n_eval = min(spec.source.eval_images, len(loaded.data.val))
    probe = to_tensor(loaded.data.val.images(np.arange(min(256, n_eval))), loaded.spec)
    tokens = held_out_tokens(model, selection.fqns, [probe[i:i + 64] for i in range(0, len(probe), 64)],
                             seed=config.seed)
    log(f"planning blocks under --max-acc-drop {spec.plan.max_acc_drop} points: options "
        f"{', '.join(o.label() for o in options)}; logit-KL sensitivity on {len(probe)} validation images, "
        f"accuracy on {n_eval}")
    accuracy = lambda m: evaluate(m, loaded.data.val, loaded.spec, torch.device("cpu"), limit=n_eval)  # noqa: E731
    plan = plan_blocks(model, calibrations, options, config.order, accuracy, spec.plan.max_acc_drop / 100, tokens,
                       probe, log=log)
    log(plan.search_table())
    log(plan.table())
    if not plan.chosen:
        raise TmlpError(f"no block can be replaced within --max-acc-drop {spec.plan.max_acc_drop} points; raise "
                        "it, or offer larger --plan-k / --plan-rank")
    log(f"plan: replace {len(plan.chosen)} of {len(tokens)} blocks, MACs per token of the candidate blocks "
        f"{plan.mac_ratio():.3f}x the original's")
    chosen = {f: option_calibration(calibrations, f, plan.choice[f]) for f in plan.chosen}
    return Selection(plan.chosen, {}, selection.candidates, selection.available_tokens), chosen, plan


# ---------------------------------------------------------------------------------------------------------------------
# 5. build and 6. distil
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Built:
    """The T-MLP model and the PyTorch validation accuracies (fractions) of it and of the original."""

    model: torch.nn.Module
    accuracy_original: float
    accuracy: float
    n_val: int
    distillation: dict[str, Any] | None = None


def build(loaded: Loaded, selection: Selection, calibration: dict[str, BlockCalibration], config: TaylorConfig,
          eval_images: int, log: Log = print) -> Built:
    """Stage 5: a copy of the model with the selected blocks replaced, and both models' validation accuracy."""
    model = copy.deepcopy(loaded.model)
    configs = {"_default": config, **{f: config.replace(k=k, max_tokens=config.max_tokens)
                                      for f, k in selection.block_k.items()}}
    taylorize_(model, configs, layers=selection.fqns, calibration=calibration)
    n_eval = min(eval_images, len(loaded.data.val))
    cpu = torch.device("cpu")
    acc_orig = evaluate(loaded.model, loaded.data.val, loaded.spec, cpu, limit=n_eval)
    acc = evaluate(model, loaded.data.val, loaded.spec, cpu, limit=n_eval)
    log(f"PyTorch accuracy on {n_eval} validation images: original {100 * acc_orig:.2f}%, T-MLP {100 * acc:.2f}%")
    return Built(model, acc_orig, acc, n_eval)


def distil(loaded: Loaded, built: Built, spec: ExportSpec, log: Log = print, progress: bool = True) -> Built:
    """Stage 6: logit distillation of the Taylor parameters, or with ``finetune`` of the whole model
    (``spec.distill``; nothing when epochs is 0)."""
    d = spec.distill
    if d.epochs == 0:
        return built
    t0 = time.time()
    images = d.images or spec.source.calib_images
    if d.finetune:
        batches, n_batches = loaded.labelled_batches("train", images)
        losses = finetune_(built.model, loaded.model, batches, n_batches, d.epochs, d.lr, d.finetune_lr,
                           d.label_weight, progress=progress)
        what = (f"fine-tuning of the whole model ({d.epochs} epoch(s) over {min(images, len(loaded.data.train))} "
                f"images, KL + {d.label_weight} x cross-entropy, lr {d.lr} Taylor / {d.finetune_lr} rest)")
    else:
        batches, n_batches = loaded.batches("train", images)
        losses = distill_(built.model, loaded.model, batches, n_batches, d.epochs, d.lr, d.train_basis,
                          progress=progress, schedule=d.schedule)
        what = f"distillation ({d.epochs} epoch(s), logit KL, lr {d.lr} {d.schedule})"
    before = built.accuracy
    after = evaluate(built.model, loaded.data.val, loaded.spec, torch.device("cpu"), limit=built.n_val)
    log(f"{what}: T-MLP accuracy {100 * before:.2f}% -> {100 * after:.2f}% "
        f"(original {100 * built.accuracy_original:.2f}%)")
    record = {"epochs": d.epochs, "lr": d.lr, "schedule": d.schedule, "train_basis": d.train_basis,
              "finetune": d.finetune, "images": min(images, len(loaded.data.train)),
              "kl_per_epoch" if not d.finetune else "loss_per_epoch": losses, "accuracy_before": before,
              "accuracy_after": after, "seconds": round(time.time() - t0, 1)}
    if d.finetune:
        record.update(finetune_lr=d.finetune_lr, label_weight=d.label_weight)
    return Built(built.model, built.accuracy_original, after, built.n_val, record)


# ---------------------------------------------------------------------------------------------------------------------
# 8. export and verify, 9. manifest (7, fitting memory, is tmlp.export.memory.fit_memory)
# ---------------------------------------------------------------------------------------------------------------------
def common_metadata(loaded: Loaded, model_name: str, device: str | None) -> dict[str, str]:
    """ONNX metadata both models carry: what they are, where their weights came from, their preprocessing."""
    return {**({"tmlp.device": device} if device else {}), "tmlp.version": tmlp.__version__, "tmlp.model": model_name,
            "tmlp.model_config": json.dumps(loaded.payload["config"], sort_keys=True), "tmlp.dataset": loaded.dataset,
            "tmlp.preprocessing": json.dumps(loaded.spec, sort_keys=True),
            "tmlp.source_checkpoint_sha256": loaded.source_sha256}


def tmlp_metadata(common: dict[str, str], config: TaylorConfig, fqns: list[str], spec: ExportSpec,
                  block_k: dict[str, int], plan: Plan | None) -> dict[str, str]:
    """ONNX metadata of the T-MLP model: the calibration that built it and which blocks it replaced."""
    c, shared = config, config.basis == "shared"
    return {**common, "tmlp.kind": "tmlp", "tmlp.k": str(c.k), "tmlp.order": str(c.order), "tmlp.basis": c.basis,
            "tmlp.partition": c.partition,
            **({"tmlp.partition_rank": str(c.partition_rank)} if c.partition_rank else {}),
            **({"tmlp.rank": str(c.rank), "tmlp.basis_source": c.basis_source, "tmlp.fit": c.fit} if shared else {}),
            **({"tmlp.rank_out": str(c.rank_out)} if shared and c.rank_out else {}),
            "tmlp.layers": json.dumps(fqns), "tmlp.taylor_config": json.dumps(c.to_dict(), sort_keys=True),
            "tmlp.distill_epochs": str(spec.distill.epochs),
            **({"tmlp.block_k": json.dumps(block_k, sort_keys=True)} if block_k else {}),
            **({} if plan is None else {"tmlp.plan": json.dumps(plan.to_dict()["choice"], sort_keys=True)})}


def clear_run_folder(out_dir: str) -> None:
    """Remove an earlier export's manifest (rewritten last), external data and what `tmlp bench` derived from it:
    a half-finished export must not look complete."""
    for stale in ("manifest.json", "original.onnx.data", "tmlp.onnx.data") + DERIVED_FILES:
        if os.path.isfile(os.path.join(out_dir, stale)):
            os.unlink(os.path.join(out_dir, stale))


def export_verified(net: torch.nn.Module, path: str, metadata: dict[str, str], example: torch.Tensor,
                    parity_inputs: torch.Tensor, target: "ResolvedTarget", log: Log = print) -> dict[str, Any]:
    """Stage 8 for one model: export ``net`` to ``path``, refuse ops the device lacks, run the checker and the
    onnxruntime-vs-PyTorch parity check; returns {"ops", "parity", "files"} (files: the model and external data)."""
    from tmlp.export.onnx_export import export_onnx, external_data_files, parity

    t0 = time.time()
    try:
        ops = export_onnx(net, example, path, metadata, opset=target.opset, max_ir_version=target.max_ir)
        if target.profile is not None:
            try:
                target.profile.check_ops(set(ops))
            except TmlpError:
                os.unlink(path)
                raise
    except TmlpError as err:
        if target.profile is None:
            raise
        raise TmlpError(f"cannot export for device {target.profile.name}: {err}") from None
    check = parity(path, net, parity_inputs)
    log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, {time.time() - t0:.0f} s); onnx.checker "
        f"full_check passed; onnxruntime vs PyTorch: {check}")
    return {"ops": ops, "parity": check, "files": [path, *external_data_files(path)]}


@dataclass
class Exported:
    """What export_models wrote: {file name: path}, the parity of each ONNX file against PyTorch, the memory fit
    (None without a budget) and the number of validation images in val.npz."""

    files: dict[str, str]
    parity: dict[str, dict[str, Any]]
    memory: dict[str, Any] | None


def export_models(loaded: Loaded, selection: Selection, built: Built, spec: ExportSpec, target: "ResolvedTarget",
                  plan: Plan | None, out_dir: str, log: Log = print) -> Exported:
    """Fit the memory budget (if any), then export, check and verify original.onnx and tmlp.onnx and write
    val.npz into ``out_dir`` (emptied of an earlier export's files first)."""
    val_x = loaded.data.val.images(np.arange(built.n_val))
    example, parity_inputs = to_tensor(val_x[:2], loaded.spec), to_tensor(val_x[:64], loaded.spec)
    common = common_metadata(loaded, spec.model, target.profile.name if target.profile else None)
    meta_tmlp = tmlp_metadata(common, spec.calibration, selection.fqns, spec, selection.block_k, plan)
    memory = None
    if spec.target.max_memory_mb is not None:
        from tmlp.export.memory import fit_memory

        memory = fit_memory(built.model, selection.fqns, example, spec.target.max_memory_mb, spec.target.memory_batch,
                            target.opset, target.max_ir, log)
        meta_tmlp["tmlp.chunks"] = str(memory["chunks"])
    ensure_writable_dir(out_dir)
    clear_run_folder(out_dir)
    files, parity = {}, {}
    for name, net, meta in (("original.onnx", loaded.model, {**common, "tmlp.kind": "original"}),
                            ("tmlp.onnx", built.model, meta_tmlp)):
        done = export_verified(net, os.path.join(out_dir, name), meta, example, parity_inputs, target, log)
        if name == "tmlp.onnx":
            ops = done["ops"]
            log(f"  Taylor blocks in the graph: ArgMin x{ops.get('ArgMin', 0)}, Gather x{ops.get('Gather', 0)}, "
                f"MatMul x{ops.get('MatMul', 0)}")
        files.update({os.path.basename(p): p for p in done["files"]})
        parity[name] = vars(done["parity"])
    files["val.npz"] = write_val_images(out_dir, val_x, loaded.data.val.y[:built.n_val])
    return Exported(files, parity, memory)


def summarize(spec: ExportSpec, loaded: Loaded, selection: Selection, built: Built, target: "ResolvedTarget",
              plan: Plan | None, exported: Exported, timings: dict[str, float]) -> dict[str, Any]:
    """The manifest's summary of an export (besides the files' sizes and hashes)."""
    return {"spec": spec.to_dict(), "model": spec.model, "model_config": loaded.payload["config"],
            "dataset": loaded.dataset, "checkpoint": loaded.checkpoint, "checkpoint_sha256": loaded.source_sha256,
            "taylor_config": spec.calibration.to_dict(), "layers": selection.fqns, "block_k": selection.block_k,
            "preprocessing": loaded.spec, "pytorch_val_accuracy": {"original": built.accuracy_original,
                                                                   "tmlp": built.accuracy},
            "n_val": built.n_val, "calibration_seconds": timings["calibration_seconds"],
            "distillation": built.distillation, "layer_plan": None if plan is None else plan.to_dict(),
            "device": None if target.profile is None else target.profile.to_dict(), "opset": target.opset,
            "memory": exported.memory, "parity": exported.parity, "versions": versions(),
            "export_seconds": timings["export_seconds"]}


@dataclass
class ResolvedTarget:
    """The target section made concrete: the board profile (or None), the opset and the IR version cap."""

    profile: Any
    opset: int
    max_ir: int | None


def resolve_target(spec: ExportSpec, log: Log = print) -> ResolvedTarget:
    """The opset and IR version an export writes: the spec's opset, capped by the board profile's onnxruntime."""
    target = spec.target
    if target.device is None:
        return ResolvedTarget(None, target.opset, None)
    from tmlp.devices import load_profile

    profile = load_profile(target.device)
    opset = target.opset
    if opset > profile.max_opset:
        log(f"--device {profile.name}: onnxruntime {profile.onnxruntime} reads opset <= {profile.max_opset} and IR "
            f"<= {profile.max_ir_version}; exporting opset {profile.max_opset}")
        opset = profile.max_opset
    return ResolvedTarget(profile, opset, profile.max_ir_version)


def write_val_images(out_dir: str, x: np.ndarray, y: np.ndarray) -> str:
    """val.npz: the raw validation images and labels the bench and the device runner measure on."""
    path = os.path.join(out_dir, "val.npz")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=x, y=y)
    return path


def write_manifest(out_dir: str, files: dict[str, str], summary: dict[str, Any]) -> str:
    """Stage 9, last: manifest.json with the run's spec and summary and each file's sha256 and size."""
    entries = {os.path.basename(p): {"sha256": file_sha256(p), "bytes": os.path.getsize(p)} for p in files.values()}
    path = os.path.join(out_dir, "manifest.json")
    write_json(path, {"files": entries, **summary})
    return path


def versions() -> dict[str, str]:
    return {"tmlp": tmlp.__version__, "torch": torch.__version__, "python": platform.python_version()}
