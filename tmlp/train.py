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
from tmlp.errors import TmlpError
from tmlp.io import atomic_path, ensure_writable_dir
from tmlp.models import create_model, input_size, read_checkpoint, resolve_config, save_checkpoint


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
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TmlpError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


class BatchSource(torch.utils.data.Dataset):
    """Item b is batch b of a fixed order over ``split``: (float inputs [B, C, H, W], labels [B])."""

    def __init__(self, split: ImageSplit, spec: dict[str, Any], order: np.ndarray, batch_size: int):
        self.split, self.spec, self.order, self.batch_size = split, spec, order, batch_size

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.order[b * self.batch_size:(b + 1) * self.batch_size]
        return to_tensor(self.split.images(index), self.spec), torch.from_numpy(self.split.y[index])


def batches(split: ImageSplit, spec: dict[str, Any], batch_size: int, order: np.ndarray | None = None,
            start: int = 0, num_workers: int = 0):
    """DataLoader over whole batches of ``split`` in ``order`` (default: as stored), from batch ``start``."""
    order = np.arange(len(split)) if order is None else order
    source = BatchSource(split, spec, order, batch_size)
    sampler = range(start, len(source))
    return torch.utils.data.DataLoader(source, batch_size=None, sampler=sampler, num_workers=num_workers)


@torch.no_grad()
def evaluate(model: nn.Module, split: ImageSplit, spec: dict[str, Any], device: torch.device, batch_size: int = 256,
             precision: str = "fp32", num_workers: int = 0, limit: int | None = None) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``split``."""
    model.eval()
    correct = total = 0
    order = np.arange(len(split) if limit is None else min(limit, len(split)))
    for x, y in batches(split, spec, batch_size, order, num_workers=num_workers):
        with autocast(device, precision):
            logits = model(x.to(device))
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / max(1, total)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
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


def train(cfg: TrainConfig, out_dir: str, progress: bool = True, log=print) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` into ``out_dir`` (resuming from ``out_dir/last.pt`` if present and
    made by the same config); returns a summary with the best validation accuracy and the checkpoint path."""
    ensure_writable_dir(out_dir)
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
    spec = data.preprocessing((h, w))
    augment = data.augment if cfg.augment == "auto" else cfg.augment
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, mcfg).to(device)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = (len(data.train) + cfg.batch_size - 1) // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    state = {"epoch": 0, "batch": 0, "best_acc": -1.0, "best_epoch": -1, "stale": 0, "seconds": 0.0}
    identity = {"train_config": asdict(cfg), "model_config": mcfg}
    last_path, best_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
    log_path = os.path.join(out_dir, "train_log.jsonl")
    if os.path.isfile(last_path):
        resumed = torch.load(last_path, map_location="cpu", weights_only=False)
        same = {k: v for k, v in resumed["identity"]["train_config"].items() if k not in RESUMABLE_CHANGES}
        mine = {k: v for k, v in identity["train_config"].items() if k not in RESUMABLE_CHANGES}
        if same != mine:
            diff = sorted(k for k in mine if mine[k] != same.get(k))
            raise TmlpError(f"{out_dir} holds a run with other settings ({', '.join(diff)}); resume with the same "
                            "options or choose another --path")
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        state = resumed["state"]
        log(f"resuming {out_dir} at epoch {state['epoch'] + 1}, batch {state['batch']} "
            f"(best val {100 * state['best_acc']:.2f}% at epoch {state['best_epoch'] + 1})")

    def save_last() -> None:
        with atomic_path(last_path) as tmp:
            torch.save({"identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "state": state}, tmp)

    summary_extra = {"dataset": cfg.dataset, "preprocessing": spec, "train_config": asdict(cfg)}
    last_save = time.time()
    while state["epoch"] < cfg.epochs and state["stale"] < cfg.patience:
        epoch = state["epoch"]
        model.train()
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        bar = tqdm(batches(data.train, spec, cfg.batch_size, order.numpy(), state["batch"], cfg.num_workers),
                   total=steps_per_epoch, initial=state["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False)
        t0 = epoch_start = time.time()
        loss_sum, seen = 0.0, 0
        for x, y in bar:
            step = epoch * steps_per_epoch + state["batch"]
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
            x = augment_batch(x, augment, gen).to(device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total_steps, warmup_steps)
            with autocast(device, cfg.precision):
                loss = criterion(model(x), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            if not math.isfinite(loss.item()):
                raise TmlpError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower --lr or add "
                                "--clip-grad 1.0")
            loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
            state["batch"] += 1
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if time.time() - last_save > 60 * cfg.checkpoint_minutes:
                state["seconds"] += time.time() - t0
                t0 = time.time()
                save_last()
                last_save = time.time()
        state["seconds"] += time.time() - t0
        train_seconds = time.time() - epoch_start
        acc = evaluate(model, data.val, spec, device, precision=cfg.precision, num_workers=cfg.num_workers)
        improved = acc > state["best_acc"]
        if improved:
            state.update(best_acc=acc, best_epoch=epoch, stale=0)
            save_checkpoint(best_path, model, cfg.model, mcfg,
                            {**summary_extra, "epoch": epoch + 1, "val_acc": acc})
        else:
            state["stale"] += 1
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "val_acc": acc,
               "lr": optimizer.param_groups[0]["lr"], "train_seconds": round(train_seconds, 1),
               "images_per_s": round(seen / max(1e-9, train_seconds), 1)}
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        state.update(epoch=epoch + 1, batch=0)
        save_last()
        last_save = time.time()
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or epoch == 0:
            log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val acc {100 * acc:.2f}% "
                f"(best {100 * state['best_acc']:.2f}% at epoch {state['best_epoch'] + 1})")
    if state["stale"] >= cfg.patience:
        log(f"early stop: no better validation accuracy for {cfg.patience} epochs")
    return {"best_acc": state["best_acc"], "best_epoch": state["best_epoch"] + 1, "checkpoint": best_path,
            "epochs_run": state["epoch"], "train_seconds": state["seconds"]}


# Options that may change between an interrupted run and its resumption without changing what is trained.
RESUMABLE_CHANGES = {"epochs", "patience", "eval_every", "num_workers", "device", "threads", "checkpoint_minutes",
                     "data_root", "download"}


def is_trained(out_dir: str, epochs: int) -> bool:
    """True when ``out_dir`` holds a best checkpoint and its run finished (``epochs`` done or stopped early)."""
    last, best = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
    try:
        read_checkpoint(best)
        state = torch.load(last, map_location="cpu", weights_only=False)["state"]
    except (TmlpError, OSError, KeyError, RuntimeError):
        return False
    return state["epoch"] >= epochs or state["stale"] >= state.get("patience", epochs)
