"""Whole-model Taylor-aware fine-tuning: every weight of the network trained with the Taylor blocks in place.

Distillation (tmlp.distill) trains only the Taylor blocks' per-centre tensors. Fine-tuning also trains every other
weight — attention, norms, the remaining MLPs, the head — so the rest of the network adapts to the Taylor blocks,
the way quantization-aware training adapts a network to int8. Each token keeps its hard nearest-centre assignment
(the centres stay fixed); the loss is KL(original ‖ T-MLP) of the logits plus ``ce_weight`` × the cross-entropy to
the labels. AdamW with two learning rates (``lr_taylor`` for the per-centre tensors, ``lr_model`` for the rest),
constant or on a warm-up + cosine schedule, gradient norm clipped at ``CLIP_GRAD``. The model runs in eval mode
(dropout off, batch-norm statistics fixed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from tmlp.distill import (TRAINABLE, Check, _to_buffers, _to_parameters, kl_to_teacher, lr_factor, run_epochs,
                          shared_step, taylor_blocks)
from tmlp.train import autocast
from tmlp.errors import TmlpError

__all__ = ["CLIP_GRAD", "Recipe", "finetune_"]

CLIP_GRAD = 1.0  # gradient-norm clip of every fine-tuning step

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class Recipe:
    """How fine-tuning trains: AdamW at ``lr_taylor`` for the per-centre tensors and ``lr_model`` for every other
    weight (0: those stay fixed), loss KL to the original + ``ce_weight`` x cross-entropy to the labels, both rates
    ``schedule`` "constant" or "cosine" (a linear rise over the first ``warmup`` fraction of the steps, then a
    cosine decay to zero)."""

    lr_taylor: float = 1e-3
    lr_model: float = 2e-5
    ce_weight: float = 0.5
    schedule: str = "constant"
    warmup: float = 0.05

    @classmethod
    def of(cls, distill) -> "Recipe":
        """The recipe a ``tmlp.spec.DistillSpec`` asks for."""
        return cls(lr_taylor=distill.lr, lr_model=distill.finetune_lr, ce_weight=distill.label_weight,
                   schedule=distill.schedule)


def finetune_(student: nn.Module, teacher: nn.Module, batches: Batches, n_batches: int, epochs: int,
              recipe: Recipe = Recipe(), progress: bool = True, require_taylor: bool = True,
              check: Check | None = None, precision: str = "fp32") -> list[float]:
    """Fine-tune all of ``student`` (a model with Taylor blocks; any model with ``require_taylor=False``, for
    comparisons) in place against ``teacher`` (the original) over ``batches()`` — (inputs [B, C, H, W], labels [B])
    pairs, called once per epoch — for ``epochs`` passes of ``n_batches`` steps; returns the mean loss of each
    epoch. ``check`` (see ``tmlp.distill.run_epochs``) may stop it early; ``precision`` "bf16" runs the forward
    passes under bf16 autocast (the loss in fp32). Under torchrun each rank passes its share of
    every batch and the gradients are summed over the ranks before clipping, as in ``tmlp.distill.distill_``.
    A "cosine" ``recipe.schedule`` runs over all ``epochs * n_batches`` steps (a check that stops early stops it
    part-way)."""
    r = recipe
    lr_taylor, lr_model, ce_weight = r.lr_taylor, r.lr_model, r.ce_weight
    if epochs < 0 or lr_taylor <= 0 or lr_model < 0 or ce_weight < 0:
        raise TmlpError(f"--finetune-epochs must be >= 0, the learning rates > 0 (the model's >= 0) and the label "
                        f"weight >= 0, got {epochs}, {lr_taylor}, {lr_model}, {ce_weight}")
    blocks = taylor_blocks(student)
    if not blocks and require_taylor:
        raise TmlpError("the model has no Taylor blocks to fine-tune with; run taylorize_ first")
    if epochs == 0:
        return []
    was_trainable = {p: p.requires_grad for p in student.parameters()}
    rest = [p for p in student.parameters()]
    for p in rest:
        p.requires_grad_(lr_model > 0)
    taylor = [p for block in blocks for p in _to_parameters(block, TRAINABLE[type(block)])]
    groups = ([{"params": taylor, "lr": lr_taylor}] if taylor else []) + \
        ([{"params": rest, "lr": lr_model}] if lr_model > 0 else [])
    if not groups:
        raise TmlpError("nothing to fine-tune: no Taylor blocks and --finetune-lr 0")
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(r.schedule, epochs * n_batches, r.warmup))
    teacher.eval()
    student.eval()

    trained = taylor + (rest if lr_model > 0 else [])

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, int]:
        x, y = batch

        def loss_sum() -> torch.Tensor:
            with autocast(x.device, precision):
                with torch.no_grad():
                    target = teacher(x).float()
                logits = student(x).float()
            return (kl_to_teacher(logits, target) + ce_weight * nn.functional.cross_entropy(logits, y)) * len(x)
        mean, n = shared_step(optimizer, trained, len(x), loss_sum, CLIP_GRAD)
        scheduler.step()
        if not math.isfinite(mean):
            raise TmlpError(f"fine-tuning diverged (loss {mean}); lower --finetune-lr")
        return mean, n
    try:
        losses = run_epochs(step, batches, n_batches, epochs, "fine-tune", "loss", progress, check)
    finally:
        for block in blocks:
            _to_buffers(block)
        for p, flag in was_trainable.items():
            p.requires_grad_(flag)
    return losses
