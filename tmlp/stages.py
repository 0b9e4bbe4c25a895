"""The export's stages, in the order ``tmlp.pipeline.run_export`` chains them. Each takes what the stages before it
produced and the spec section it needs; a library user can run one alone or put another in its place.

    load -> select -> calibrate -> plan -> build -> distil -> export (fit memory, export, verify) -> hold the budget
         -> report -> publish -> manifest
"""
from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

import tmlp
from tmlp.calibration.calibrate import BlockCalibration, calibrate, calibrate_many
from tmlp.calibration.record import IndexedBatch, tokens_per_image
from tmlp.data import DataSet, ImageSplit, augment_batch, load_dataset, to_tensor
from tmlp.distill import distill_, kl_to_teacher
from tmlp.distributed import World, batch_share, world
from tmlp.drop_rate import DropRate, Reading, logit_distance, read
from tmlp.finetune import Recipe, finetune_
from tmlp.errors import TmlpError
from tmlp.io import atomic_path, cache_path, ensure_writable_dir, file_sha256, publish, save_torch, write_json
from tmlp.models import (create_model, input_size, load_checkpoint, model_names, resolve_config,
                         smallest_input_config)
from tmlp.plan import BlockOption, Plan, held_out_tokens, option_calibration, plan_blocks
from tmlp.spec import AVERAGE_IMAGES, ExportSpec, PlanSpec, SourceSpec, TaylorConfig
from tmlp.surgery import select_blocks, skipped_blocks, taylorize_
from tmlp.taylor.exact import kept_units
from tmlp.train import TrainConfig, batches, evaluate, is_trained, resolve_precision, split_logits, train

__all__ = ["AveragedChecks", "Built", "ChooseSplitChecks", "Exported", "Loaded", "ResolvedTarget", "Selection", "ValSplits", "build",
           "calibrate_plan_options", "calibrate_selection", "clear_run_folder", "common_metadata", "distil", "distillation_may_run",
           "embedded_default_checkpoint", "export_models", "export_tmlp", "export_verified", "hold_budget", "load",
           "load_model_and_data", "load_tmlp_model", "parity_examples", "parse_block_k", "parse_layers",
           "plan_configs", "plan_options", "plan_stage", "planning_budget", "publish_run", "reader", "reduce_tokens", "report", "resolve_target",
           "save_model", "select", "summarize", "tensor_batches", "tmlp_metadata", "trained_rate", "versions", "write_manifest",
           "write_val_images"]

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
# Any other timm name: the same short AdamW recipe at the smallest input the family runs at (models.
# smallest_input_config), so that `tmlp export --model NAME` works with no checkpoint, as for the registered ones.
GENERIC_EMBEDDED_RECIPE: dict[str, Any] = {"epochs": 5, "lr": 5e-4, "batch_size": 32, "optimizer": "adamw",
                                           "weight_decay": 0.05, "warmup_epochs": 1.0, "clip_grad": 1.0,
                                           "augment": "none"}


def embedded_recipe(model: str) -> dict[str, Any]:
    """How the embedded default of ``model`` is trained on digits (1 channel, 10 classes)."""
    if model in EMBEDDED_RECIPES:
        return EMBEDDED_RECIPES[model]
    resolve_config(model)  # raises for unknown names
    return {"model_config": smallest_input_config(model, in_chans=1, num_classes=10), **GENERIC_EMBEDDED_RECIPE}

# Files `tmlp bench` derives from an export; a new export into the same folder removes them.
DERIVED_FILES = ("original.int8.onnx", "tmlp.int8.onnx", "tmlp.int8-all.onnx", "original.int8-static.onnx",
                 "tmlp.int8-static.onnx", "bench.json", "bench.md", "pareto.json", "pareto.md", "pareto.png")
DERIVED_FOLDERS = ("pareto",)  # `tmlp bench --pareto` builds its variants here
MODEL_FILE = "tmlp.pt"  # the final T-MLP model as a PyTorch module (save_model / load_tmlp_model)
PARITY_WARN_REL = 1e-3  # export_verified warns above this relative error between onnxruntime and PyTorch


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

    def val_splits(self, source: SourceSpec) -> "ValSplits":
        """The first ``source.eval_images`` validation images, cut into the choose split (the first
        ``choose_fraction`` of them: plans, distillation stops and the budget check are decided on it) and the
        report split (the rest: written to val.npz, reported, never used for a choice)."""
        val = self.data.val
        n = min(source.eval_images, len(val))
        if n < 2:
            raise TmlpError(f"{self.dataset} has {len(val)} validation images and --eval-images is "
                            f"{source.eval_images}; at least 2 are needed (one to choose on, one to report on)")
        n_choose = min(n - 1, max(1, round(n * source.choose_fraction)))
        return ValSplits(val.subset(0, n_choose), val.subset(n_choose, n))

    def batches(self, split: str, limit: int, batch_size: int = 64, share: World | None = None):
        """(gen, n_batches): ``gen()`` yields model inputs of the first ``limit`` images of ``split``; with ``share``
        (calibration, under torchrun or not) IndexedBatch items holding this rank's share of each batch."""
        return tensor_batches(self.data, self.spec, split, limit, batch_size, share)

    def labelled_batches(self, split: str, limit: int, batch_size: int = 64, share: World | None = None,
                         start: int = 0, augment: str = "none", seed: int = 0):
        """(gen, n_batches): ``gen()`` yields (model inputs, labels) of ``limit`` images of ``split`` from the
        ``start``-th on; with ``share`` (torchrun) this rank's share of each batch (possibly empty). ``augment``
        "auto" (the data set's: random crop + flip for photos, crop for digits), "crop_flip", "crop" or "none";
        each batch's crops and flips are drawn from ``seed`` and the batch's first image, for the whole batch before
        it is shared, so every rank count sees the same images."""
        part = getattr(self.data, split)
        n = min(start + limit, len(part))
        mode = self.data.augment if augment == "auto" else augment

        def gen():
            for s in range(start, n, batch_size):
                whole = np.arange(s, min(n, s + batch_size))
                index = _share(whole, share)
                if mode == "none":
                    yield to_tensor(part.images(index), self.spec), torch.from_numpy(part.y[index]).long()
                    continue
                x = augment_batch(to_tensor(part.images(whole), self.spec), mode,
                                  torch.Generator().manual_seed(seed * 1_000_003 + s))
                yield x[torch.from_numpy(index - s)], torch.from_numpy(part.y[index]).long()
        return gen, (n - start + batch_size - 1) // batch_size


def _share(index: np.ndarray, share: World | None) -> np.ndarray:
    return index if share is None else batch_share(index, share)


@dataclass
class ValSplits:
    """The validation images an export uses: ``choose`` (every choice is made on it) and ``report`` (reported
    only; written to val.npz)."""

    choose: ImageSplit
    report: ImageSplit


def tensor_batches(data: DataSet, spec: dict[str, Any], split: str, limit: int, batch_size: int = 64,
                   share: World | None = None):
    """(gen, n_batches): ``gen()`` yields model inputs [B, C, H, W] of the first ``limit`` images of ``split``; with
    ``share``, IndexedBatch items: this rank's share of each batch with the images' positions (tmlp.distributed)."""
    part = getattr(data, split)
    n = min(limit, len(part))

    def gen():
        for s in range(0, n, batch_size):
            index = np.arange(s, min(n, s + batch_size))
            if share is None:
                yield to_tensor(part.images(index), spec)
            else:
                mine = batch_share(index, share)
                yield IndexedBatch(mine, to_tensor(part.images(mine), spec), n)
    return gen, (n + batch_size - 1) // batch_size


def embedded_default_checkpoint(model: str, log: Log = print, progress: bool = True) -> str:
    """Path of ``model`` trained on digits with its embedded recipe, training it first if it is not cached."""
    epochs = EMBEDDED_RECIPES.get(model, GENERIC_EMBEDDED_RECIPE)["epochs"]
    out = cache_path("models", f"{model}-{DEFAULT_DATASET}")
    if is_trained(out, epochs):
        log(f"no --checkpoint: using the embedded default, {model} trained on {DEFAULT_DATASET} (cached in {out})")
        return os.path.join(out, "best.pt")
    recipe = embedded_recipe(model)
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
    """Stage 1: the model and data the spec's source section names, batch norms folded into their convolutions."""
    from tmlp.surgery import fold_batch_norm_

    src = spec.source
    loaded = load_model_and_data(spec.model, src.checkpoint, src.pretrained, src.dataset, src.data_root, log,
                                 progress)
    folded = fold_batch_norm_(loaded.model.eval())
    if folded:
        log(f"folded {folded} batch norm(s) into the convolutions before them")
    return loaded


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
    skipped: dict[str, str] = field(default_factory=dict)  # blocks of the MLP family left as they are, and why


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


def select(loaded: Loaded, spec: ExportSpec, log: Log = print) -> Selection:
    """Stage 2: the blocks to replace and their k, checked against the calibration tokens the data give. MLP blocks
    that mix positions are left as they are, each with a one-line reason."""
    candidates = select_blocks(loaded.model)
    skipped = skipped_blocks(loaded.model)
    for fqn, reason in skipped.items():
        log(f"skip {fqn}: {reason}")
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
    return Selection(fqns, block_k, candidates, available, skipped)


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
    batches, n_batches = loaded.batches("train", calib_images, share=world())  # torchrun: this rank's shares
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
def reader(loaded: Loaded, split: ImageSplit, share: World | None = None) -> Callable[[torch.nn.Module], Reading]:
    """``read(model)``: the model's ``Reading`` on ``split`` against the original (its top-1 accuracy and the
    original's, its logit distance and the paired standard error of its drop); the original's logits are computed
    once, here."""
    reference = split_logits(loaded.model, split, loaded.spec, share=share)
    labels = torch.as_tensor(np.asarray(split.y)).long()
    return lambda model: read(reference, split_logits(model, split, loaded.spec, share=share), labels)


def distillation_may_run(spec: ExportSpec) -> bool:
    """Whether the distil stage may train: epochs N > 0, or auto under a budget."""
    if spec.distill.epochs is None:
        return spec.plan.max_acc_drop is not None
    return spec.distill.epochs > 0


def planning_budget(spec: ExportSpec) -> float:
    """Points of accuracy the plan may lose before distillation: the budget, plus the headroom when distillation
    may win points back (the budget stage checks the final model and backs off if it did not)."""
    return spec.plan.max_acc_drop + (spec.plan.headroom if distillation_may_run(spec) else 0.0)


def plan_options(plan: PlanSpec, config: TaylorConfig, available_tokens: int) -> list[BlockOption]:
    """The (k, rank, exact units) options the planner may choose from: the spec's choices, else the calibration's
    own k, rank and exact units alone. Cheaper options save little: up to rank 32 every option costs 3-7% of the
    MLP it replaces in onnxruntime (bench/results/option-latency), while on the CIFAR-10 DeiT-Small k=25, r=8
    doubles the output error of k=100, r=32, and a plan of the cheapest options lost 1.1 points more before
    fine-tuning than one of the most faithful (bench/results/default-variants). Exact units (``unit_choices``) do
    cost: 256 per block add about 17% of the MLP (bench/results/exact-units)."""
    k_choices = plan.k_choices or (config.k,)
    rank_choices = (plan.rank_choices or (config.rank,)) if config.basis == "shared" else (None,)
    if max(k_choices) > available_tokens:
        raise TmlpError(f"--plan-k {max(k_choices)} exceeds the {available_tokens} calibration tokens; lower it")
    unit_choices = plan.unit_choices or (config.exact_units,)
    return [BlockOption(k, r, m) for k in k_choices for r in rank_choices for m in unit_choices]


def plan_configs(spec: ExportSpec, options: list[BlockOption]) -> dict[tuple[int, int], TaylorConfig]:
    """The calibration config of each (k, exact units) the planner may use: the export's own where it covers that
    k, those units and every rank, else the same at that k and units and the largest rank (U keeps its share of
    columns, plan.truncate_rank)."""
    config = spec.calibration
    max_rank = max(o.rank or config.rank for o in options)
    out = {}
    for k, units in sorted({o.calibrated_as for o in options}):
        if k == config.k and units == config.exact_units and max_rank <= config.rank:
            out[k, units] = config
        else:
            out[k, units] = config.replace(
                k=k, max_tokens=config.max_tokens, exact_units=units, rank=max_rank,
                rank_out=None if config.rank_out is None else round(config.rank_out * max_rank / config.rank))
    return out


def calibrate_plan_options(loaded: Loaded, selection: Selection, spec: ExportSpec, log: Log = print,
                           progress: bool = True) -> dict[tuple[int, int], dict[str, BlockCalibration]]:
    """Stage 3 when a plan follows: the calibration of every selected block at each (k, exact units) the planner
    may use, in one pass over the data for all of them (one collection of inputs, one K-means per k, one
    least-squares pass; each cached as ``calibrate`` alone would cache it)."""
    configs = plan_configs(spec, plan_options(spec.plan, spec.calibration, selection.available_tokens))
    fqns, config = selection.fqns, spec.calibration
    n = min(spec.source.calib_images, len(loaded.data.train))
    ks = sorted({k for k, _ in configs})
    units = sorted({m for _, m in configs})
    extra = f" with {', '.join(map(str, units))} exact hidden units" if units != [config.exact_units] else ""
    log(f"calibrating {len(fqns)} block(s) ({fqns[0]}{' ...' if len(fqns) > 1 else ''}) at k="
        f"{', '.join(map(str, ks))}{extra} for the plan, order {config.order}, "
        f"{(config.replace(exact_units=0) if extra else config).describe()}, on {n} "
        f"training images of {loaded.dataset}")
    batches, n_batches = loaded.batches("train", spec.source.calib_images, share=world())
    results = calibrate_many(loaded.model, fqns, batches, n_batches, list(configs.values()),
                             loaded.calibration_key(spec.source.calib_images), progress, log)
    return dict(zip(configs, results))


def plan_stage(loaded: Loaded, selection: Selection,
               calibrations: dict[tuple[int, int], dict[str, BlockCalibration]],
               spec: ExportSpec, log: Log = print, progress: bool = True
               ) -> tuple[Selection, dict[str, BlockCalibration], Plan]:
    """Stage 4 (with ``--max-acc-drop``): per block, replace or keep, and with which k and rank, from the
    calibrations of ``calibrate_plan_options``; returns the narrowed selection, its calibration and the plan."""
    config, model = spec.calibration, loaded.model
    options = plan_options(spec.plan, config, selection.available_tokens)
    choose = loaded.val_splits(spec.source).choose
    probe = to_tensor(choose.images(np.arange(min(256, len(choose)))), loaded.spec)
    tokens = held_out_tokens(model, selection.fqns, [probe[i:i + 64] for i in range(0, len(probe), 64)],
                             seed=config.seed)
    budget = planning_budget(spec)
    every = "; every block replaced (--replace-all)" if spec.plan.replace_all else ""
    log(f"planning blocks under {budget:g} points before distillation (budget --max-acc-drop "
        f"{spec.plan.max_acc_drop:g}{'' if budget == spec.plan.max_acc_drop else f' + --headroom {spec.plan.headroom:g}'}"
        f"): options {', '.join(o.label() for o in options)}; logit-KL sensitivity on {len(probe)} and accuracy on "
        f"{len(choose)} validation images of the choose split{every}")
    judge = (reader(loaded, choose) if spec.plan.judge == "predicted" else
             lambda m: evaluate(m, choose, loaded.spec, torch.device("cpu")))
    plan = plan_blocks(model, calibrations, options, config.order, judge, budget / 100, tokens, probe, log=log,
                       progress=progress, keep_mlps=not spec.plan.replace_all)
    log(plan.search_table())
    if plan.rate is not None:
        log(f"drops judged as predicted from the logit distance at {plan.rate.rate:.3g} points per unit, fitted "
            f"over the {len(plan.rate.points)} choices measured (tmlp.drop_rate: a measured drop reads within "
            "±0.5 points on these images, so the cheapest reading within the budget would be a lucky one)")
    log(plan.table())
    if not plan.chosen:
        raise TmlpError(f"no block can be replaced within {budget:g} points of accuracy; raise --max-acc-drop, or "
                        "offer larger --plan-k / --plan-rank")
    log(f"plan: replace {len(plan.chosen)} of {len(tokens)} blocks, MACs per token of the candidate blocks "
        f"{plan.mac_ratio():.3f}x the original's")
    chosen = {f: option_calibration(calibrations, f, plan.choice[f]) for f in plan.chosen}
    return Selection(plan.chosen, {}, selection.candidates, selection.available_tokens), chosen, plan


# ---------------------------------------------------------------------------------------------------------------------
# 5. build and 6. distil
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Built:
    """The T-MLP model and the PyTorch accuracies (fractions) of it and of the original on the report split
    (``accuracy``, ``accuracy_original``; ``n_val`` images) and on the choose split (``choose``,
    ``choose_original``)."""

    model: torch.nn.Module
    accuracy_original: float
    accuracy: float
    n_val: int
    choose_original: float
    choose: float
    distillation: dict[str, Any] | None = None
    tokens: dict[str, Any] | None = None  # the token-reduction schedule (tmlp.tokens), when the spec asks for one
    reading: Reading | None = None  # the T-MLP model on the choose split (tmlp.drop_rate), where measured
    rate: DropRate | None = None  # the rate its drops are judged at: the plan's, or its training's

    def with_model(self, model: torch.nn.Module, choose: float, accuracy: float,
                   distillation: dict[str, Any] | None = None, reading: Reading | None = None,
                   rate: DropRate | None = None) -> "Built":
        return Built(model, self.accuracy_original, accuracy, self.n_val, self.choose_original, choose,
                     distillation if distillation is not None else self.distillation, self.tokens, reading,
                     rate if rate is not None else self.rate)

    def judged_drop(self) -> float:
        """The T-MLP model's drop on the choose split (points) as the budget judges it: predicted from its logit
        distance at ``rate`` where both are known, else measured."""
        if self.rate is None or self.reading is None:
            return 100 * (self.choose_original - self.choose)
        return self.rate.judge(self.reading)


def build(loaded: Loaded, selection: Selection, calibration: dict[str, BlockCalibration], config: TaylorConfig,
          source: SourceSpec, log: Log = print, rate: DropRate | None = None) -> Built:
    """Stage 5: a copy of the model with the selected blocks replaced, both models' accuracy on the choose and the
    report split, and the T-MLP model's reading on the choose split (judged at ``rate``, the plan's, if given)."""
    model = copy.deepcopy(loaded.model)
    configs = {"_default": config, **{f: config.replace(k=k, max_tokens=config.max_tokens)
                                      for f, k in selection.block_k.items()}}
    taylorize_(model, configs, layers=selection.fqns, calibration=calibration)
    splits = loaded.val_splits(source)
    cpu = torch.device("cpu")
    reading = reader(loaded, splits.choose)(model)
    acc = {("choose", "original"): reading.original, ("choose", "tmlp"): reading.accuracy,
           **{("report", which): evaluate(net, splits.report, loaded.spec, cpu)
              for which, net in (("original", loaded.model), ("tmlp", model))}}
    for name in ("choose", "report"):
        log(f"PyTorch accuracy on the {name} split ({len(getattr(splits, name))} validation images): original "
            f"{100 * acc[name, 'original']:.2f}%, T-MLP {100 * acc[name, 'tmlp']:.2f}%")
    return Built(model, acc["report", "original"], acc["report", "tmlp"], len(splits.report),
                 acc["choose", "original"], acc["choose", "tmlp"], reading=reading, rate=rate)


def reduce_tokens(loaded: Loaded, built: Built, spec: ExportSpec, log: Log = print, progress: bool = True) -> Built:
    """Stage 5b (``spec.tokens.keep`` set): token reduction of the T-MLP model in place (tmlp.tokens), before
    distillation so that it adapts to it; the learned policy's score predictors are trained here (one pass over
    ``policy_images`` training images, every other weight fixed); original.onnx stays the unreduced reference."""
    from tmlp.tokens import TokenReduction, apply_token_reduction_, train_token_scorers_

    t = spec.tokens
    if t.keep is None:
        return built
    record = apply_token_reduction_(built.model, TokenReduction(keep=t.keep, layers=t.layers, fuse=t.fuse,
                                                                policy=t.policy))
    splits, cpu = loaded.val_splits(spec.source), torch.device("cpu")
    accuracy = lambda name: evaluate(built.model, getattr(splits, name), loaded.spec, cpu)  # noqa: E731
    if t.policy == "learned":
        before = accuracy("choose")
        w = world()
        batches, n_batches = loaded.labelled_batches("train", t.policy_images, share=w)
        t0 = time.time()
        losses = train_token_scorers_(built.model, loaded.model, batches, n_batches, progress=progress and w.main)
        record["policy_training"] = {"images": min(t.policy_images, len(loaded.data.train)), "loss": losses,
                                     "choose_before": before, "seconds": round(time.time() - t0, 1)}
    choose, report = accuracy("choose"), accuracy("report")
    if t.policy == "learned":
        record["policy_training"]["choose_after"] = choose
        log(f"learned token policy trained on {record['policy_training']['images']} training images: choose-split "
            f"accuracy {100 * record['policy_training']['choose_before']:.2f}% (attention ranking) -> "
            f"{100 * choose:.2f}%")
    log(f"token reduction after blocks {record['layers']} (keep {t.keep:g}, {t.policy} policy"
        f"{', fused' if t.fuse else ''}): patch tokens per block {record['patch_tokens_per_block']}; PyTorch T-MLP "
        f"accuracy on the report split {100 * built.accuracy:.2f}% -> {100 * report:.2f}%")
    reduced = built.with_model(built.model, choose, report)
    reduced.tokens = record
    return reduced


def distil(loaded: Loaded, built: Built, spec: ExportSpec, log: Log = print, progress: bool = True) -> Built:
    """Stage 6: fine-tuning of the whole model with the Taylor blocks in place, or (``finetune`` off) logit
    distillation of the Taylor tensors alone. ``epochs`` N: N passes, no checks; auto (None): only when the T-MLP
    model loses more than the budget on the choose split, streaming up to one pass over ``images`` (None: all
    training images) with a choose-split check every ``check_images`` images, stopping at the first check that
    does not improve or that reaches the original's accuracy (nothing left to recover), keeping the best weights."""
    d, budget = spec.distill, spec.plan.max_acc_drop
    if d.epochs == 0 or (d.epochs is None and budget is None):
        return built
    judged = built.judged_drop()
    margin = spec.plan.margin * (built.reading.standard_error if built.reading is not None else 0.0)
    if d.epochs is None and judged + margin <= budget + 1e-9:
        log(f"no distillation needed: the T-MLP model is within the budget on the choose split ({judged:+.2f}"
            + (f" + {margin:.2f} margin" if margin else "") + f" <= {budget:g} points)")
        return built
    t0 = time.time()
    auto = d.epochs is None
    images = d.images or (len(loaded.data.train) if auto else spec.source.calib_images)
    n_images = min(images, len(loaded.data.train))
    splits = loaded.val_splits(spec.source)
    cpu = torch.device("cpu")
    w = world()  # under torchrun each rank trains on its share of every batch and scores its share of the checks
    choose_accuracy = reader(loaded, splits.choose, share=w)  # each check's top-1 and logit distance
    averaged = auto and d.average and d.finetune
    if averaged:
        images = d.images or AVERAGE_IMAGES
        n_images = min(images, len(loaded.data.train))
        checks = AveragedChecks(built.model, loaded.model, splits.choose, loaded.spec, d.check_images, log)
    else:
        checks = ChooseSplitChecks(built.model, choose_accuracy, built.choose, d.check_images, log,
                                   target=built.choose_original, patience=d.patience) if auto else None
    precision = resolve_precision(d.precision, cpu)
    train = dict(epochs=1 if auto else d.epochs, progress=progress and w.main, check=checks, precision=precision)
    batches, n_batches = loaded.labelled_batches("train", images, share=w, augment=d.augment,
                                                 seed=spec.calibration.seed)
    whole_model_checks = None  # the checks of a whole-model fine-tuning that gained nothing and was dropped
    if d.finetune:
        losses = finetune_(built.model, loaded.model, batches, n_batches, recipe=Recipe.of(d), **train)
        what = (f"fine-tuning of the whole model (KL + {d.label_weight} x cross-entropy, lr {d.lr} Taylor / "
                f"{d.finetune_lr} rest, {d.schedule}, {precision})")
        if auto and checks.restore_best() == 0 and d.finetune_lr > 0:
            # Not one check gained: training the network's own weights hurt more than it helped (VGG-16, whose
            # folded convolutions have no normalisation to absorb the drift, lost 7 points in 30 steps). The
            # Taylor tensors alone, from the untouched start, with the same loss and stopping rule.
            log("  fine-tuning the whole model did not improve the choose split; training the Taylor tensors alone "
                "instead")
            whole_model_checks = checks.history
            checks = ChooseSplitChecks(built.model, choose_accuracy, built.choose, d.check_images, log,
                                       target=built.choose_original, patience=d.patience)
            train["check"] = checks
            losses += finetune_(built.model, loaded.model, batches, n_batches,
                                recipe=replace(Recipe.of(d), lr_model=0.0), **train)
            what = f"training of the Taylor tensors alone (KL + {d.label_weight} x cross-entropy, lr {d.lr})"
    else:
        losses = distill_(built.model, loaded.model, lambda: (x for x, _ in batches()), n_batches, lr=d.lr, train_basis=d.train_basis,
                          schedule=d.schedule, **train)
        what = f"distillation of the Taylor tensors (logit KL, lr {d.lr} {d.schedule})"
    seen = checks.restore_best() if auto else n_images * d.epochs
    reading = choose_accuracy(built.model)
    choose = reading.accuracy
    after = evaluate(built.model, splits.report, loaded.spec, cpu)
    rate = trained_rate(checks.history if auto else [], reading) if built.rate is not None else None
    log(f"{what} over {seen} training images: T-MLP accuracy on the choose split {100 * built.choose:.2f}% -> "
        f"{100 * choose:.2f}% (original {100 * built.choose_original:.2f}%), on the report split "
        f"{100 * built.accuracy:.2f}% -> {100 * after:.2f}% (original {100 * built.accuracy_original:.2f}%)")
    record = {"epochs": "auto" if auto else d.epochs, "lr": d.lr, "schedule": d.schedule,
              "train_basis": d.train_basis, "finetune": d.finetune, "precision": precision, "images": n_images,
              "images_seen": seen,
              "kl_per_epoch" if not d.finetune else "loss_per_epoch": losses, "accuracy_before": built.accuracy,
              "accuracy_after": after, "choose_before": built.choose, "choose_after": choose,
              "checks": checks.history if auto else [], "patience": d.patience if auto else None,
              "average": averaged,
              "seconds": round(time.time() - t0, 1)}
    if d.finetune:
        record.update(finetune_lr=d.finetune_lr, label_weight=d.label_weight, whole_model_checks=whole_model_checks)
    if rate is not None:
        record.update(rate=rate.to_dict(), judged_drop_points=rate.judge(reading))
        log(f"  drops of the trained model judged at {rate.rate:.3g} points per unit of logit distance, fitted over "
            f"{rate.source}: judged drop on the choose split {rate.judge(reading):+.2f} points")
    return built.with_model(built.model, choose, after, record, reading=reading, rate=rate)


def trained_rate(history: list[dict[str, float]], final: Reading) -> DropRate:
    """The rate a trained model's drops are judged at: fitted over its training's checks (each a reading of the
    weights of that moment on the choose split, none selected), else (no check measured a distance: trained for a
    fixed number of epochs) over the final model's own reading, which then judges it by its measured drop.
    Training with the labels moves the logits in ways that cost no accuracy, so the plan's rate does not carry
    over (bench/results/kl-rule)."""
    points = [(h["choose_distance"], 100 * (final.original - h["choose_accuracy"])) for h in history
              if h.get("choose_distance") is not None]
    if points:
        return DropRate(f"the {len(points)} check(s) of its training", points)
    return DropRate("the trained model's own reading").add(final)


class AveragedChecks:
    """The averaged stop of automatic fine-tuning (``--check-average``): called every ``every`` training images, it
    adds the weights to their running mean over the checks, measures that mean on the choose split (top-1 and
    KL(original || mean) of the logits) and keeps the mean with the lowest KL; it never stops training.
    ``restore_best()`` loads the kept mean (or the untouched start, when no mean came closer to the original than
    it) and returns the images it had seen. Measured on the CIFAR-10 DeiT-Small's fine-tuning runs, this kept 0.42
    points more on the report split than the best single check (bench/results/finetune-selection)."""

    def __init__(self, model: torch.nn.Module, original: torch.nn.Module, split: ImageSplit, spec: dict[str, Any],
                 every: int, log: Log = print) -> None:
        self.model, self.split, self.spec, self.every, self.log = model, split, spec, every, log
        self.target = self._logits(original)
        self.labels = torch.from_numpy(np.asarray(split.y)).long()
        self.shadow = copy.deepcopy(model)  # holds the mean while it is measured
        self.mean = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.n = 0
        self.best, self.best_kl = self._measure(model)
        self.best_seen, self.best_state = 0, {k: v.clone() for k, v in self.mean.items()}
        self.history: list[dict[str, float]] = []

    @torch.no_grad()
    def _logits(self, model: torch.nn.Module) -> torch.Tensor:
        model.eval()
        return torch.cat([model(x).float() for x, _ in batches(self.split, self.spec, 256)])

    def _measure(self, model: torch.nn.Module) -> tuple[float, float]:
        out = self._logits(model)
        return float((out.argmax(1) == self.labels).float().mean()), float(kl_to_teacher(out, self.target))

    def __call__(self, seen: int) -> bool:
        self.n += 1
        now = self.model.state_dict()
        with torch.no_grad():
            for k, v in self.mean.items():
                v.lerp_(now[k].float(), 1.0 / self.n)  # weight 1 at the first check: a copy
        self.shadow.load_state_dict(self.mean, strict=False)
        acc, kl = self._measure(self.shadow)
        self.history.append({"images": seen, "choose_accuracy": acc, "choose_kl": kl, "choose_distance": kl})
        better = kl < self.best_kl
        self.log(f"  after {seen} training images: mean of {self.n} check(s) on the choose split {100 * acc:.2f}%, "
                 f"KL to the original {kl:.4f}" + (" (lowest so far)" if better else ""))
        if better:
            self.best, self.best_kl, self.best_seen = acc, kl, seen
            self.best_state = {k: v.clone() for k, v in self.mean.items()}
        return False

    def restore_best(self) -> int:
        self.model.load_state_dict(self.best_state, strict=False)
        return self.best_seen


class ChooseSplitChecks:
    """The stopping rule of automatic distillation: called every ``every`` training images with the number seen, it
    measures the choose-split accuracy (``accuracy(model)``: a fraction, or a ``Reading`` whose logit distance is
    kept in ``history`` too, for the trained model's rate), keeps a copy of the best weights, and says stop (True) when the accuracy has
    not improved on the best for ``patience`` checks in a row, or reached ``target`` (the original model's: the T-MLP
    model has nothing left to recover; further training would only train the network on). ``restore_best()`` loads
    the best weights back and returns the images they had seen."""

    def __init__(self, model: torch.nn.Module, accuracy: Callable[[torch.nn.Module], float | Reading], start: float,
                 every: int, log: Log = print, target: float | None = None, patience: int = 1) -> None:
        self.model, self.accuracy, self.every, self.log, self.target = model, accuracy, every, log, target
        self.patience, self.since_best = patience, 0
        self.best, self.best_seen, self.best_state = start, 0, self._copy()
        self.history: list[dict[str, float]] = []

    def _copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def __call__(self, seen: int) -> bool:
        result = self.accuracy(self.model)
        acc = result.accuracy if isinstance(result, Reading) else result
        self.history.append({"images": seen, "choose_accuracy": acc,
                             **({"choose_distance": result.distance} if isinstance(result, Reading) else {})})
        improved = acc > self.best
        reached = self.target is not None and acc >= self.target
        self.since_best = 0 if improved else self.since_best + 1
        stop = reached or self.since_best >= self.patience
        self.log(f"  after {seen} training images: choose-split accuracy {100 * acc:.2f}% "
                 + (f"(the original's {100 * self.target:.2f}% reached: stop)" if reached else
                    "(best so far)" if improved else
                    f"(not above {100 * self.best:.2f}% for {self.since_best} check(s)" + (": stop)" if stop else ")")))
        if improved:
            self.best, self.best_seen = acc, seen
            self.best_state = self._copy()
        return stop

    def restore_best(self) -> int:
        self.model.load_state_dict(self.best_state)
        return self.best_seen


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
            **exact_units_metadata({f: plan.choice[f].units if plan else c.exact_units for f in fqns}),
            "tmlp.layers": json.dumps(fqns), "tmlp.taylor_config": json.dumps(c.to_dict(), sort_keys=True),
            "tmlp.distill_epochs": "auto" if spec.distill.epochs is None else str(spec.distill.epochs),
            **({"tmlp.block_k": json.dumps(block_k, sort_keys=True)} if block_k else {}),
            **({} if plan is None else {"tmlp.plan": json.dumps(plan.to_dict()["choice"], sort_keys=True)})}


def exact_units_metadata(units: dict[str, int]) -> dict[str, str]:
    """``tmlp.exact_units``: the hidden units each replaced block keeps exact, one count when all keep the same
    ("256"), else a JSON object {block: count}; nothing when none keeps any."""
    counts = set(units.values())
    if not any(counts):
        return {}
    return {"tmlp.exact_units": str(counts.pop()) if len(counts) == 1 else json.dumps(units, sort_keys=True)}


def clear_run_folder(out_dir: str) -> None:
    """Remove an earlier export's manifest (rewritten last), external data and what `tmlp bench` derived from it:
    a half-finished export must not look complete."""
    for stale in ("manifest.json", "original.onnx.data", "tmlp.onnx.data") + DERIVED_FILES:
        if os.path.isfile(os.path.join(out_dir, stale)):
            os.unlink(os.path.join(out_dir, stale))
    for stale in DERIVED_FOLDERS:
        if os.path.isdir(os.path.join(out_dir, stale)):
            shutil.rmtree(os.path.join(out_dir, stale))


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
    log(f"wrote {os.path.basename(path)} ({os.path.getsize(path) / 1e6:.1f} MB, {time.time() - t0:.0f} s); onnx.checker "
        f"full_check passed; onnxruntime vs PyTorch: {check}")
    if check.max_rel > PARITY_WARN_REL:
        log(f"warning: onnxruntime and PyTorch disagree on {os.path.basename(path)} (relative error "
            f"{check.max_rel:.1e} > {PARITY_WARN_REL:g}); near-ties in a nearest-centre or top-k choice can do this "
            "for a few inputs, anything more is a bug: please report it with the manifest")
    return {"ops": ops, "parity": check, "files": [path, *external_data_files(path)]}


@dataclass
class Exported:
    """What the export stages wrote into the staging folder: {file name: path}, the parity of each ONNX file
    against PyTorch, the memory fit (None without a budget), and the record of the accuracy budget (None without
    one) and of the report measurements."""

    files: dict[str, str]
    parity: dict[str, dict[str, Any]]
    memory: dict[str, Any] | None
    budget: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None


def export_models(loaded: Loaded, selection: Selection, built: Built, spec: ExportSpec, target: "ResolvedTarget",
                  plan: Plan | None, staging: str, log: Log = print) -> Exported:
    """Export, check and verify original.onnx and tmlp.onnx (fitting the memory budget first, if any) and write
    val.npz (the report split) into the ``staging`` folder."""
    common = common_metadata(loaded, spec.model, target.profile.name if target.profile else None)
    example, parity_inputs = parity_examples(loaded, spec)
    done = export_verified(loaded.model, os.path.join(staging, "original.onnx"), {**common, "tmlp.kind": "original"},
                           example, parity_inputs, target, log)
    exported = Exported({os.path.basename(p): p for p in done["files"]}, {"original.onnx": vars(done["parity"])},
                        None)
    export_tmlp(loaded, selection, built, spec, target, plan, staging, exported, log)
    report = loaded.val_splits(spec.source).report
    exported.files["val.npz"] = write_val_images(staging, report.images(np.arange(len(report))), report.y)
    return exported


def parity_examples(loaded: Loaded, spec: ExportSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The export's example input (2 images) and parity inputs (up to 64), from the choose split."""
    choose = loaded.val_splits(spec.source).choose
    x = choose.images(np.arange(min(64, len(choose))))
    return to_tensor(x[:2], loaded.spec), to_tensor(x, loaded.spec)


def export_tmlp(loaded: Loaded, selection: Selection, built: Built, spec: ExportSpec, target: "ResolvedTarget",
                plan: Plan | None, staging: str, exported: Exported, log: Log = print) -> None:
    """Export, check and verify tmlp.onnx into ``staging`` (again after a back-off), updating ``exported``."""
    common = common_metadata(loaded, spec.model, target.profile.name if target.profile else None)
    meta = tmlp_metadata(common, spec.calibration, selection.fqns, spec, selection.block_k, plan)
    example, parity_inputs = parity_examples(loaded, spec)
    if spec.target.max_memory_mb is not None:
        from tmlp.export.memory import fit_memory

        exported.memory = fit_memory(built.model, selection.fqns, example, spec.target.max_memory_mb,
                                     spec.target.memory_batch, target.opset, target.max_ir, log)
        meta["tmlp.chunks"] = str(exported.memory["chunks"])
    path = os.path.join(staging, "tmlp.onnx")
    for stale in (path, path + ".data"):
        if os.path.isfile(stale):
            os.unlink(stale)
    exported.files = {k: v for k, v in exported.files.items() if not k.startswith("tmlp.onnx")}
    done = export_verified(built.model, path, meta, example, parity_inputs, target, log)
    ops = done["ops"]
    log(f"  Taylor blocks in the graph: ArgMin x{ops.get('ArgMin', 0)}, Gather x{ops.get('Gather', 0)}, "
        f"MatMul x{ops.get('MatMul', 0)}")
    exported.files.update({os.path.basename(p): p for p in done["files"]})
    exported.parity["tmlp.onnx"] = vars(done["parity"])


def hold_budget(loaded: Loaded, selection: Selection, built: Built, spec: ExportSpec, target: "ResolvedTarget",
                plan: Plan | None, staging: str, exported: Exported, log: Log = print
                ) -> tuple[Selection, Built]:
    """Stage 8b (under a budget): measure tmlp.onnx against original.onnx in onnxruntime on the choose split and,
    while it loses more than the budget (as judged: its drop predicted from its logit distance at ``built.rate``,
    tmlp.drop_rate; measured where there is no rate), back off and export again (tmlp.budget.next_move: the move that buys the
    most logit KL per multiply-add, a less sensitive option for a block or its MLP back).
    Raises, with nothing published, when no replaced block can stay."""
    from tmlp.budget import BudgetCheck, back_off, ort_logits

    budget, margin = spec.plan.max_acc_drop, spec.plan.margin
    choose = loaded.val_splits(spec.source).choose
    labels = np.asarray(choose.y)
    reference = ort_logits(exported.files["original.onnx"], choose, loaded.spec)
    rate = built.rate
    check = BudgetCheck(budget, reference.argmax(1) == labels, margin, rate)
    cpu = torch.device("cpu")
    read_choose = reader(loaded, choose)

    def pytorch_drop(model: torch.nn.Module) -> float:  # each back-off step is a point of the fit: none is chosen
        reading = read_choose(model)
        return reading.drop if rate is None else rate.add(reading).judge(reading)

    while True:
        t0 = time.time()
        logits = ort_logits(exported.files["tmlp.onnx"], choose, loaded.spec)
        distance = logit_distance(torch.from_numpy(reference), torch.from_numpy(logits))
        check.measure(selection.fqns, logits.argmax(1) == labels, time.time() - t0, distance)
        with_margin = f" + {margin:g} x {check.standard_error:.2f} standard error" if margin else ""
        judged = "" if rate is None else (f", judged from its logit distance {distance:.4f} "
                                          f"{check.judged:+.2f} points")
        log(f"budget check in onnxruntime on the choose split ({len(choose)} images): original "
            f"{100 * check.original:.2f}%, T-MLP {100 * check.accuracy:.2f}% with {len(selection.fqns)} block(s) "
            f"replaced: drop {check.drop:+.2f} points{judged}{with_margin}, budget {budget:g}: "
            f"{'holds' if check.holds() else 'broken'}")
        if check.holds():
            break
        # in PyTorch the back-off aims at the budget less the margin the last file needed
        fqns = back_off(built.model, loaded.model, selection.fqns, plan, pytorch_drop,
                        budget - margin * check.standard_error, log, keep_mlps=not spec.plan.replace_all,
                        swaps=not fine_tuned_whole(built), recover=recovery(loaded, built, spec, log))
        selection = Selection(fqns, {f: k for f, k in selection.block_k.items() if f in fqns},
                              selection.candidates, selection.available_tokens)
        export_tmlp(loaded, selection, built, spec, target, plan, staging, exported, log)
    exported.budget = check.to_dict()
    if len(check.steps) > 1:
        splits = loaded.val_splits(spec.source)
        reading = read_choose(built.model)
        built = built.with_model(built.model, reading.accuracy,
                                 evaluate(built.model, splits.report, loaded.spec, cpu), reading=reading)
    return selection, built


def fine_tuned_whole(built: Built) -> bool:
    """Whether every weight of the model was fine-tuned with the Taylor blocks in place (the rest of the network
    adapted to them, so a freshly calibrated option would be out of place)."""
    record = built.distillation
    return bool(record and record.get("finetune") and not record.get("whole_model_checks"))


def recovery(loaded: Loaded, built: Built, spec: ExportSpec, log: Log = print
             ) -> Callable[[torch.nn.Module], None] | None:
    """The budget back-off's training after each move, when the model was fine-tuned whole and ``recover_images``
    is set (else None): the same fine-tuning over the ``recover_images`` training images after those fine-tuning
    streamed (from the first when too few are left), checked on the choose split halfway and at the end, keeping
    the best of the start and the checks. Off by default: on the CIFAR-10 DeiT-Small neither of two moves gained
    (5,000 images each, 3.5 min; bench/results/cifar10-deit_small-default)."""
    record, d = built.distillation, spec.distill
    if not d.recover_images or not fine_tuned_whole(built):
        return None
    cpu = torch.device("cpu")
    choose = loaded.val_splits(spec.source).choose
    train = loaded.data.train
    n = min(d.recover_images, len(train))
    seen = max([record["images_seen"]] + [c["images"] for c in record["checks"]])
    start = seen if seen + n <= len(train) else 0

    def recover(model: torch.nn.Module) -> None:
        accuracy = lambda m: evaluate(m, choose, loaded.spec, cpu)  # noqa: E731
        checks = ChooseSplitChecks(model, accuracy, accuracy(model), max(1, n // 2),
                                   lambda line: log(f"    recovery {line.strip()}"), patience=2)
        batches, n_batches = loaded.labelled_batches("train", n, start=start, augment=d.augment,
                                                     seed=spec.calibration.seed)
        finetune_(model, loaded.model, batches, n_batches, epochs=1, recipe=Recipe.of(d), progress=False,
                  check=checks, precision=resolve_precision(d.precision, cpu))
        checks.restore_best()
    return recover


def save_model(built: Built, selection: Selection, staging: str, exported: Exported) -> None:
    """Stage 8d: the final T-MLP model (after fitting, distillation, token reduction and the budget's back-off) as a
    pickled PyTorch module into ``staging``/tmlp.pt, for further stages in Python (``load_tmlp_model``; `tmlp bench
    --pareto` composes token reduction with it). The module itself is stored, so it loads only where the same tmlp,
    timm and torch can rebuild its classes."""
    path = os.path.join(staging, MODEL_FILE)
    save_torch({"format": "tmlp.model", "tmlp": tmlp.__version__, "torch": torch.__version__,
                "layers": list(selection.fqns), "model": built.model}, path)
    exported.files[MODEL_FILE] = path


def load_tmlp_model(run_dir: str) -> tuple[torch.nn.Module, list[str]]:
    """The T-MLP model an export saved in ``run_dir``/tmlp.pt and the module paths of its Taylor blocks."""
    path = os.path.join(run_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise TmlpError(f"{run_dir!r} has no {MODEL_FILE} (exported by an older tmlp); run tmlp export again")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, RuntimeError) as err:
        raise TmlpError(f"{path} does not load here ({type(err).__name__}: {err}); it was saved by another tmlp or "
                        "torch version: run tmlp export again") from None
    if not isinstance(payload, dict) or payload.get("format") != "tmlp.model":
        raise TmlpError(f"{path} is not a tmlp model file; run tmlp export again")
    return payload["model"].eval(), list(payload["layers"])


def report(loaded: Loaded, spec: ExportSpec, exported: Exported, log: Log = print) -> None:
    """Stage 8c: both files' onnxruntime accuracy on the report split (never used for a choice) and a quick
    latency check; logged and kept in ``exported.report``."""
    from tmlp.budget import ort_accuracy, quick_speedup

    split = loaded.val_splits(spec.source).report
    acc = {name: ort_accuracy(exported.files[f"{name}.onnx"], split, loaded.spec) for name in ("original", "tmlp")}
    speed = quick_speedup(exported.files["original.onnx"], exported.files["tmlp.onnx"])
    exported.report = {"split": "report", "images": len(split), "original": acc["original"], "tmlp": acc["tmlp"],
                       "drop_points": 100 * (acc["original"] - acc["tmlp"]), "latency": speed}
    log(f"onnxruntime on the report split ({len(split)} validation images, never used for a choice): original "
        f"{100 * acc['original']:.2f}%, T-MLP {100 * acc['tmlp']:.2f}% ({exported.report['drop_points']:+.2f} "
        f"points); expected speed-up {speed['speedup']:.2f}x at batch 1, 1 thread ({speed['original_ms']:.2f} -> "
        f"{speed['tmlp_ms']:.2f} ms, a quick check: `tmlp bench` measures it properly)")


def publish_run(staging: str, out_dir: str, exported: Exported) -> dict[str, str]:
    """Stage 9a: clear ``out_dir`` of an earlier export's files and move this export's files in from staging."""
    ensure_writable_dir(out_dir)
    clear_run_folder(out_dir)
    return publish(staging, out_dir, sorted(exported.files))


def summarize(spec: ExportSpec, loaded: Loaded, selection: Selection, built: Built, target: "ResolvedTarget",
              plan: Plan | None, exported: Exported, timings: dict[str, float]) -> dict[str, Any]:
    """The manifest's summary of an export (besides the files' sizes and hashes)."""
    return {"spec": spec.to_dict(), "model": spec.model, "model_config": loaded.payload["config"],
            "dataset": loaded.dataset, "checkpoint": loaded.checkpoint, "checkpoint_sha256": loaded.source_sha256,
            "taylor_config": spec.calibration.to_dict(), "layers": selection.fqns, "block_k": selection.block_k,
            "exact_units": kept_units(built.model, selection.fqns),
            "skipped_blocks": selection.skipped,
            "preprocessing": loaded.spec, "pytorch_val_accuracy": {"original": built.accuracy_original,
                                                                   "tmlp": built.accuracy, "split": "report"},
            "pytorch_choose_accuracy": {"original": built.choose_original, "tmlp": built.choose},
            "n_val": built.n_val, "calibration_seconds": timings["calibration_seconds"],
            "distillation": built.distillation, "token_reduction": built.tokens, "layer_plan": None if plan is None else plan.to_dict(),
            "budget": exported.budget, "report": exported.report, "quantization": exported.quantization,
            "device": None if target.profile is None else target.profile.to_dict(), "opset": target.opset,
            "memory": exported.memory, "parity": exported.parity, "versions": versions(),
            "export_seconds": timings["export_seconds"], "processes": timings.get("processes", 1)}


@dataclass
class ResolvedTarget:
    """The target section made concrete: the board profile (or None), the opset and the IR version cap."""

    profile: Any
    opset: int
    max_ir: int | None


def resolve_target(spec: ExportSpec, log: Log = print) -> ResolvedTarget:
    """The opset and IR version an export writes: the spec's opset, capped by the board profile's onnxruntime."""
    from tmlp.export.onnx_export import check_opset

    target = spec.target
    check_opset(target.opset, spec.model)
    if target.device is None:
        return ResolvedTarget(None, target.opset, None)
    from tmlp.devices import load_profile

    profile = load_profile(target.device)
    opset = target.opset
    if opset > profile.max_opset:
        log(f"--device {profile.name}: onnxruntime {profile.onnxruntime} reads opset <= {profile.max_opset} and IR "
            f"<= {profile.max_ir_version}; exporting opset {profile.max_opset}")
        opset = profile.max_opset
        check_opset(opset, spec.model)
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
