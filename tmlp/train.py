"""Training: a resumable loop with a held-out validation split, best-checkpoint keeping and early stopping.

A run folder holds ``last.pt`` (model, optimizer, schedule and position, written every epoch and every few minutes
inside an epoch, so an interrupted run resumes where it stopped), ``best.pt`` (the best validation accuracy so far,
a model checkpoint ``tmlp export --checkpoint`` takes) and ``train_log.jsonl`` (one JSON row per epoch).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tmlp.data import ImageSplit, augment_batch, load_dataset, to_tensor
from tmlp.distributed import World, all_reduce_sum, barrier, batch_share, world
from tmlp.errors import TmlpError
from tmlp.io import check_can_write, folder_kept_on_success, save_torch
from tmlp.models import COMMIT_FILE_MB, create_model, input_size, read_checkpoint, resolve_config, save_checkpoint

__all__ = ["Run", "TrainConfig", "autocast", "batches", "evaluate", "load_initial_weights", "split_logits", "train",
           "write_run_snapshot"]


@dataclass
class TrainConfig:
    """Everything that determines a training run. Defaults are the lab's CIFAR recipe (SGD, momentum 0.95,
    Nesterov, weight decay 1e-4, cosine LR, random crop + flip, batch 128)."""

    model: str
    dataset: str
    model_config: dict[str, Any] = field(default_factory=dict)
    epochs: int = 200
    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.95
    warmup_epochs: float = 0.0
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    augment: str = "auto"  # auto (the data set's: crop+flip for photos, crop for digits), crop_flip, crop, none
    precision: str = "fp32"  # fp32, or bf16 autocast (faster only on CPUs with fast bf16 matmuls: measure)
    val_fraction: float = 0.2
    patience: int = 20  # epochs without a better validation accuracy before stopping
    eval_every: int = 10  # print validation accuracy every N epochs
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    threads: int | None = None
    checkpoint_minutes: float = 5.0
    data_root: str | None = None
    download: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.patience < 1 or self.eval_every < 1:
            raise TmlpError("--epoch, --batch_size, --patience and --eval-every must be >= 1 and --lr > 0")
        if self.optimizer not in ("sgd", "adamw"):
            raise TmlpError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.augment not in ("auto", "crop_flip", "crop", "none"):
            raise TmlpError(f"--augment must be auto, crop_flip, crop or none, got {self.augment!r}")
        if self.precision not in ("bf16", "fp32"):
            raise TmlpError(f"--precision must be bf16 or fp32, got {self.precision!r}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise TmlpError(f"--device {name!r} is not a device; use cpu, cuda, cuda:1 or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TmlpError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    return device


class BatchSource(torch.utils.data.Dataset):
    """Item b is batch b of a fixed order over ``split``: (float inputs [B, C, H, W], labels [B]); under torchrun,
    this rank's share of it (``share``; a last batch smaller than the number of ranks is repeated to fill them)."""

    def __init__(self, split: ImageSplit, spec: dict[str, Any], order: np.ndarray, batch_size: int,
                 share: World | None = None):
        self.split, self.spec, self.order, self.batch_size, self.share = split, spec, order, batch_size, share

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.order[b * self.batch_size:(b + 1) * self.batch_size]
        if self.share is not None and self.share.distributed:
            index = batch_share(np.resize(index, max(len(index), self.share.size)), self.share)
        return to_tensor(self.split.images(index), self.spec), torch.from_numpy(self.split.y[index])


def batches(split: ImageSplit, spec: dict[str, Any], batch_size: int, order: np.ndarray | None = None,
            start: int = 0, num_workers: int = 0, share: World | None = None):
    """DataLoader over whole batches of ``split`` in ``order`` (default: as stored), from batch ``start``; with
    ``share`` (torchrun) each batch is this rank's share of it."""
    order = np.arange(len(split)) if order is None else order
    source = BatchSource(split, spec, order, batch_size, share)
    sampler = range(start, len(source))
    return torch.utils.data.DataLoader(source, batch_size=None, sampler=sampler, num_workers=num_workers)


@torch.no_grad()
def evaluate(model: nn.Module, split: ImageSplit, spec: dict[str, Any], device: torch.device, batch_size: int = 256,
             precision: str = "fp32", num_workers: int = 0, limit: int | None = None,
             share: World | None = None) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``split``; with ``share`` (torchrun) each rank scores its share of
    every batch and the counts are summed over the ranks."""
    model.eval()
    correct = total = 0
    order = np.arange(len(split) if limit is None else min(limit, len(split)))
    if share is not None and share.distributed:  # no repeated items: a rank may get an empty share
        order = np.concatenate([batch_share(order[i:i + batch_size], share)
                                for i in range(0, len(order), batch_size)] or [order[:0]])
    for x, y in batches(split, spec, batch_size, order, num_workers=num_workers):
        with autocast(device, precision):
            logits = model(x.to(device))
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += len(y)
    if share is not None and share.distributed:
        correct, total = (int(v) for v in all_reduce_sum([correct, total]))
    return correct / max(1, total)


@torch.no_grad()
def split_logits(model: nn.Module, split: ImageSplit, spec: dict[str, Any], batch_size: int = 256,
                 share: World | None = None) -> torch.Tensor:
    """[N, classes] float32 logits of ``model`` on every image of ``split`` (CPU, fp32); with ``share`` (torchrun)
    each rank computes its share of every batch and the rows are summed over the ranks into the whole."""
    model.eval()
    order = np.arange(len(split))
    if share is None or not share.distributed:
        return torch.cat([model(x).float() for x, _ in batches(split, spec, batch_size, order)])
    mine = np.concatenate([batch_share(order[i:i + batch_size], share) for i in range(0, len(order), batch_size)]
                          or [order[:0]])
    parts = [model(x).float() for x, _ in batches(split, spec, batch_size, mine)]
    width, ranks = all_reduce_sum([parts[0].shape[1] if parts else 0, 1 if parts else 0]).tolist()
    classes = round(width / max(ranks, 1))  # a rank with an empty share learns the width from the others
    out = torch.zeros(len(split), classes, dtype=torch.float64)
    if parts:
        out[torch.from_numpy(mine)] = torch.cat(parts).double()
    return all_reduce_sum(out).float()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (a CPU with AMX or AVX-512 BF16, a GPU with bf16), where
    bf16 autocast speeds training up (2.05x per DeiT-Small step on a 2-core AMX Xeon); elsewhere it slows it down."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` "auto": "bf16" where ``native_bf16(device)``, else "fp32"; "fp32" and "bf16" as they are."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision`` "bf16" (or "auto" on a device with native bf16: ``resolve_precision``), else
    nothing; shared by training, distillation and fine-tuning."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


@dataclass
class Run:
    """A training run in ``out_dir``: the model, its optimizer, the data and the position in the schedule."""

    cfg: TrainConfig
    out_dir: str
    model: nn.Module
    model_config: dict[str, Any]
    data: Any  # tmlp.data.Dataset
    spec: dict[str, Any]
    device: torch.device
    optimizer: torch.optim.Optimizer
    init_from: str | None = None  # the checkpoint whose weights started the run (recorded in best.pt)
    world: World = field(default_factory=World)  # this process under torchrun (rank 0 of 1 without)
    forward: nn.Module | None = None  # what the steps call: the model, or its DistributedDataParallel wrapper
    state: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "batch": 0, "best_acc": -1.0,
                                                           "best_epoch": -1, "stale": 0, "seconds": 0.0})

    @property
    def steps_per_epoch(self) -> int:
        return (len(self.data.train) + self.cfg.batch_size - 1) // self.cfg.batch_size

    @property
    def identity(self) -> dict[str, Any]:
        return {"train_config": asdict(self.cfg), "model_config": self.model_config}

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def save_last(self) -> None:
        if not self.world.main:
            return
        save_torch({"identity": self.identity, "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "state": self.state}, self.path("last.pt"))


def build_run(cfg: TrainConfig, out_dir: str) -> Run:
    """Data, model and optimizer of ``cfg`` (the model freshly initialised from ``cfg.seed``); creates nothing (the
    caller creates ``out_dir``)."""
    check_can_write(out_dir, "--path")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.val_fraction, cfg.seed, cfg.download)
    mcfg = resolve_config(cfg.model, **{"num_classes": data.num_classes, "in_chans": data.channels,
                                        **cfg.model_config})
    if mcfg.get("num_classes", data.num_classes) < data.num_classes:
        raise TmlpError(f"model has {mcfg['num_classes']} classes but {cfg.dataset} has {data.num_classes}")
    chans, h, w = input_size(cfg.model, mcfg)
    if chans != data.channels:
        raise TmlpError(f"model takes {chans} input channels, {cfg.dataset} has {data.channels}; set in_chans")
    from tmlp.distributed import init

    w_ = init(device)  # torchrun: join the process group (one process: nothing to do)
    if device.type == "cuda" and w_.distributed:
        device = torch.device("cuda", w_.local_rank)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = create_model(cfg.model, mcfg).to(device)
    run = Run(cfg, out_dir, model, mcfg, data, data.preprocessing((h, w)), device, make_optimizer(model, cfg),
              world=w_, forward=model)
    if w_.distributed:
        from torch.nn.parallel import DistributedDataParallel

        run.forward = DistributedDataParallel(model, device_ids=[w_.local_rank] if device.type == "cuda" else None)
    return run


def restore(run: Run, log=print) -> None:
    """Resume ``run`` from its ``last.pt``, or start it from ``run.init_from`` (a run snapshot of the same options
    continues where it stood), or leave it fresh."""
    cfg, last_path = run.cfg, run.path("last.pt")
    if os.path.isfile(last_path):
        resumed = torch.load(last_path, map_location="cpu", weights_only=False)
        same, mine = resumed["identity"]["train_config"], run.identity["train_config"]
        if not same_run(same, mine):
            diff = sorted(k for k in mine if mine[k] != same.get(k) and k not in RESUMABLE_CHANGES)
            raise TmlpError(f"{run.out_dir} holds a run with other settings ({', '.join(diff)}); resume with the "
                            "same options or choose another --path")
        run.model.load_state_dict(resumed["model"])
        run.optimizer.load_state_dict(resumed["optimizer"])
        run.state = resumed["state"]
        log(f"resuming {run.out_dir} at epoch {run.state['epoch'] + 1}, batch {run.state['batch']} "
            f"(best val {100 * run.state['best_acc']:.2f}% at epoch {run.state['best_epoch'] + 1})")
    elif run.init_from:
        carried = load_initial_weights(run.model, run.init_from, cfg.model, run.model_config).get("train_run")
        if carried and same_run(carried["train_config"], run.identity["train_config"]):
            # the position carries over; best.pt (not carried) starts again in this folder
            run.state = {**carried["state"], "best_acc": -1.0, "best_epoch": -1, "stale": 0}
            if run.world.main:
                with open(run.path("train_log.jsonl"), "w") as f:
                    f.writelines(json.dumps(row) + "\n" for row in carried["log"])
            log(f"continuing the run snapshot {run.init_from} at epoch {run.state['epoch'] + 1}, batch "
                f"{run.state['batch']} (fresh optimizer state)")
        else:
            log(f"starting from the weights of {run.init_from} (fresh optimizer and schedule)")


def train_epoch(run: Run, progress: bool) -> tuple[float, int]:
    """Train from the current position to the end of the epoch, saving ``last.pt`` every few minutes; returns (mean
    training loss, images seen)."""
    cfg, state, epoch = run.cfg, run.state, run.state["epoch"]
    steps, total_steps = run.steps_per_epoch, cfg.epochs * run.steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps))
    augment = run.data.augment if cfg.augment == "auto" else cfg.augment
    # summed over this rank's share, divided by the whole batch, times the ranks: DDP's gradient average is then
    # the gradient of the single-process mean loss over the whole batch
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")
    run.model.train()
    order = torch.randperm(len(run.data.train), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    whole = np.minimum(cfg.batch_size, len(run.data.train) - np.arange(steps) * cfg.batch_size)  # each batch's size
    bar = tqdm(batches(run.data.train, run.spec, cfg.batch_size, order.numpy(), state["batch"], cfg.num_workers,
                       share=run.world),
               total=steps, initial=state["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not progress or not run.world.main, leave=False)
    t0 = last_save = time.time()
    loss_sum, seen = 0.0, 0
    for x, y in bar:
        step = epoch * steps + state["batch"]
        x = augment_batch(x, augment, torch.Generator().manual_seed(cfg.seed * 7919 + step)).to(run.device)
        for group in run.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, total_steps, warmup_steps)
        with autocast(run.device, cfg.precision):
            loss = criterion(run.forward(x), y.to(run.device)) * (run.world.size / int(whole[state["batch"]]))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
        run.optimizer.step()
        if not math.isfinite(loss.item()):
            raise TmlpError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower --lr or add "
                            "--clip-grad 1.0")
        loss_sum, seen = loss_sum + loss.item() * int(whole[state["batch"]]) / run.world.size, seen + len(y)
        state["batch"] += 1
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
        if time.time() - last_save > 60 * cfg.checkpoint_minutes:
            state["seconds"] += time.time() - t0
            t0 = last_save = time.time()
            run.save_last()
    state["seconds"] += time.time() - t0
    if run.world.distributed:
        loss_sum, seen = (float(v) for v in all_reduce_sum([loss_sum, seen]))
        seen = int(seen)
    return loss_sum / max(1, seen), seen


def end_epoch(run: Run, train_loss: float, seen: int, train_seconds: float, log=print) -> None:
    """Validate, keep ``best.pt`` on improvement, append the log row, save ``last.pt``."""
    cfg, state, epoch = run.cfg, run.state, run.state["epoch"]
    acc = evaluate(run.model, run.data.val, run.spec, run.device, precision=cfg.precision,
                   num_workers=cfg.num_workers, share=run.world)
    if acc > state["best_acc"]:
        state.update(best_acc=acc, best_epoch=epoch, stale=0)
        if run.world.main:
            save_checkpoint(run.path("best.pt"), run.model, cfg.model, run.model_config,
                            {"dataset": cfg.dataset, "preprocessing": run.spec, "train_config": asdict(cfg),
                             "epoch": epoch + 1, "val_acc": acc,
                             **({"init_from": run.init_from} if run.init_from else {})})
    else:
        state["stale"] += 1
    row = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": acc, "lr": run.optimizer.param_groups[0]["lr"],
           "train_seconds": round(train_seconds, 1), "images_per_s": round(seen / max(1e-9, train_seconds), 1),
           "precision": cfg.precision}
    if run.world.main:
        with open(run.path("train_log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    state.update(epoch=epoch + 1, batch=0)
    run.save_last()
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or epoch == 0:
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val acc {100 * acc:.2f}% "
            f"(best {100 * state['best_acc']:.2f}% at epoch {state['best_epoch'] + 1})")


def train(cfg: TrainConfig, out_dir: str, progress: bool = True, log=print,
          init_from: str | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` into ``out_dir`` (resuming from ``out_dir/last.pt`` if present and
    made by the same config; else starting from the weights of checkpoint ``init_from`` if given); returns a summary
    with the best validation accuracy and the checkpoint path."""
    run = build_run(cfg, out_dir)
    run.init_from = init_from
    if not run.world.main:  # under torchrun rank 0 alone prints and writes
        log = lambda s: None  # noqa: E731
    folder = folder_kept_on_success(out_dir, "--path") if run.world.main else contextlib.nullcontext()
    with folder:
        barrier()  # rank 0 has created the folder; every rank reads the same last.pt
        restore(run, log)
        while run.state["epoch"] < cfg.epochs and run.state["stale"] < cfg.patience:
            start = time.time()
            train_loss, seen = train_epoch(run, progress)
            end_epoch(run, train_loss, seen, time.time() - start, log)
        barrier()  # rank 0 has written its last files
    if run.state["stale"] >= cfg.patience:
        log(f"early stop: no better validation accuracy for {cfg.patience} epochs")
    return {"best_acc": run.state["best_acc"], "best_epoch": run.state["best_epoch"] + 1,
            "checkpoint": run.path("best.pt"), "epochs_run": run.state["epoch"], "train_seconds": run.state["seconds"]}


# Model options that only regularise training: a run may start from weights trained with other values.
REGULARISATION_KEYS = ("drop_path_rate", "drop_rate", "drop")


def load_initial_weights(model: nn.Module, path: str, name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Load the weights of checkpoint ``path`` (fp16 or fp32) into ``model`` and return the checkpoint; it must hold
    the same model with the same architecture config (regularisation options aside), except that a ViT may start at
    another ``img_size``: its absolute position embeddings are resampled to the new patch grid (bicubic, timm's
    ``resample_abs_pos_embed``, prefix tokens kept), the usual way of fine-tuning a ViT at a new resolution."""
    payload = read_checkpoint(path)

    def arch(c: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if k not in REGULARISATION_KEYS}
    old, new = arch(payload["config"]), arch(config)
    differ = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    resample = differ == {"img_size"} and "pos_embed" in payload["state_dict"] and hasattr(model, "patch_embed")
    if payload["model"] != name or (differ and not resample):
        raise TmlpError(f"--init {path} holds a {payload['model']} with config {old}, not a {name} with {new}; pass "
                        "the matching --model/--img-size/--patch-size or another checkpoint")
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    if resample:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix)
    model.load_state_dict(state)
    return payload


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two train configs describe the same run (options that may change on resumption aside)."""
    # (an "init_from" entry says where a run started, not what it trains)
    keep = lambda c: {k: v for k, v in c.items() if k not in RESUMABLE_CHANGES | {"init_from"}}  # noqa: E731
    return keep(a) == keep(b)


def write_run_snapshot(out_dir: str, dst: str) -> dict[str, Any]:
    """Write the weights of a run's ``last.pt`` in fp16 to ``dst`` with its schedule position and log: a file small
    enough to commit from which ``tmlp train --init dst`` (same options) continues the run on another machine, with a
    fresh optimizer state. Returns the carried state."""
    resumed = torch.load(os.path.join(out_dir, "last.pt"), map_location="cpu", weights_only=False)
    ident = resumed["identity"]
    cfg = ident["train_config"]
    log_path = os.path.join(out_dir, "train_log.jsonl")
    rows = [json.loads(line) for line in open(log_path)] if os.path.isfile(log_path) else []
    model = create_model(cfg["model"], ident["model_config"])
    model.load_state_dict(resumed["model"])
    best_path = os.path.join(out_dir, "best.pt")
    preprocessing = read_checkpoint(best_path).get("preprocessing") if os.path.isfile(best_path) else None
    run = {"train_config": cfg, "state": resumed["state"], "log": rows}
    save_checkpoint(dst, model, cfg["model"], ident["model_config"],
                    {"dataset": cfg["dataset"], "preprocessing": preprocessing, "train_config": cfg,
                     "epoch": resumed["state"]["epoch"], "train_run": run}, half=True,
                    max_file_mb=COMMIT_FILE_MB)
    return resumed["state"]


# Options that may change between an interrupted run and its resumption without changing what is trained.
RESUMABLE_CHANGES = {"epochs", "patience", "eval_every", "num_workers", "device", "threads", "checkpoint_minutes",
                     "data_root", "download", "precision"}


def is_trained(out_dir: str, epochs: int) -> bool:
    """True when ``out_dir`` holds a best checkpoint and its run finished (``epochs`` done or stopped early)."""
    last, best = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
    try:
        read_checkpoint(best)
        state = torch.load(last, map_location="cpu", weights_only=False)["state"]
    except (TmlpError, OSError, KeyError, RuntimeError):
        return False
    return state["epoch"] >= epochs or state["stale"] >= state.get("patience", epochs)
