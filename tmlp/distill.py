"""Distillation fine-tuning of the Taylor parameters from the original model.

Only the per-centre tensors (offsets ``a``, ``S`` / Jacobians, second-order terms) and optionally the shared bases
U, V are trained; the centres (hence each token's assignment) and every other weight of the model stay fixed. The
loss is the KL divergence from the original model's logits to the T-MLP model's (logit distillation). AdamW, with
the learning rate held constant (``schedule="constant"``, the default) or decayed to zero over all steps on a cosine.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from tmlp.distributed import all_reduce_grads_
from tmlp.errors import TmlpError
from tmlp.taylor import SharedTaylorMLP, TaylorMLP
from tmlp.train import autocast

__all__ = ["BASES", "Check", "SCHEDULES", "TRAINABLE", "distill_", "kl_to_teacher", "lr_factor", "mean_kl", "run_epochs",
           "shared_step", "taylor_blocks"]

TRAINABLE = {TaylorMLP: ("offset", "jacobian", "hessian_diag"), SharedTaylorMLP: ("offset", "s", "half_t")}
BASES = ("v", "ut")
SCHEDULES = ("constant", "cosine")


class Check(Protocol):
    """Called every ``every`` training images (and after the last batch) with the images seen so far; True stops
    training (tmlp.stages.ChooseSplitChecks)."""

    every: int

    def __call__(self, seen: int) -> bool: ...


def taylor_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (TaylorMLP, SharedTaylorMLP))]


def _to_parameters(block: nn.Module, names: Iterable[str]) -> list[nn.Parameter]:
    params = []
    for name in names:
        if name in block._buffers and block._buffers[name] is not None:
            tensor = block._buffers.pop(name)
            block.register_parameter(name, nn.Parameter(tensor.clone()))
            params.append(getattr(block, name))
    return params


def _to_buffers(block: nn.Module) -> None:
    for name in list(block._parameters):
        tensor = block._parameters.pop(name)
        block.register_buffer(name, tensor.detach().clone())


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
                  ) -> torch.Tensor:
    """KL(teacher || student) of the softened class distributions, times T² (mean over the batch)."""
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student_logits / t, -1),
                                nn.functional.log_softmax(teacher_logits / t, -1), log_target=True,
                                reduction="batchmean") * t * t


def lr_factor(schedule: str, total_steps: int, warmup: float = 0.0) -> Callable[[int], float]:
    """The learning-rate multiplier at each step (for ``torch.optim.lr_scheduler.LambdaLR``): 1 throughout
    ("constant"), or a linear rise over the first ``warmup`` fraction of ``total_steps`` and then a cosine decay
    to zero at the last step ("cosine")."""
    if schedule not in SCHEDULES:
        raise TmlpError(f"unknown learning-rate schedule {schedule!r}; use one of {SCHEDULES}")
    if not 0.0 <= warmup < 1.0:
        raise TmlpError(f"the warm-up is a fraction of the steps in [0, 1), got {warmup}")
    total = max(1, total_steps)
    rise = int(warmup * total)

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < rise:
            return (step + 1) / rise
        return 0.5 * (1.0 + math.cos(math.pi * min(step - rise, total - rise) / max(1, total - rise)))
    return factor


def distill_(student: nn.Module, teacher: nn.Module, batches: Callable[[], Iterable[torch.Tensor]], n_batches: int,
             epochs: int, lr: float = 1e-4, train_basis: bool = False, temperature: float = 1.0,
             progress: bool = True, schedule: str = "constant", check: Check | None = None,
             precision: str = "fp32") -> list[float]:
    """Fine-tune the Taylor parameters of ``student`` in place to match ``teacher``'s logits over ``batches()``
    (model inputs [B, C, H, W]; called once per epoch) for ``epochs`` passes of ``n_batches``
    steps; returns the mean loss of each epoch. ``check`` (see ``run_epochs``) may stop it early; ``precision``
    "bf16" runs the forward passes under bf16 autocast (the loss in fp32). Under torchrun each
    rank passes its share of every batch: the gradients are summed over the ranks (tmlp.distributed.all_reduce_grads_),
    so each step is the one-process step on the whole batch."""
    if epochs < 0 or lr <= 0:
        raise TmlpError(f"--distill-epochs must be >= 0 and --distill-lr > 0, got {epochs}, {lr}")
    if schedule not in SCHEDULES:
        raise TmlpError(f"unknown distillation schedule {schedule!r}; use one of {SCHEDULES}")
    blocks = taylor_blocks(student)
    if not blocks:
        raise TmlpError("the model has no Taylor blocks to distil; run taylorize_ first")
    if epochs == 0:
        return []
    for p in student.parameters():
        p.requires_grad_(False)
    params = []
    for block in blocks:
        names = TRAINABLE[type(block)] + (BASES if train_basis and isinstance(block, SharedTaylorMLP) else ())
        params += _to_parameters(block, names)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, epochs * n_batches))
    teacher.eval()
    student.eval()  # dropout etc. off; the Taylor parameters still receive gradients

    def step(x: torch.Tensor) -> tuple[float, int]:
        def loss_sum() -> torch.Tensor:
            with autocast(x.device, precision):
                with torch.no_grad():
                    target = teacher(x).float()
                logits = student(x).float()
            return kl_to_teacher(logits, target, temperature) * len(x)
        mean, n = shared_step(optimizer, params, len(x), loss_sum)
        scheduler.step()
        return mean, n
    try:
        losses = run_epochs(step, batches, n_batches, epochs, "distil", "kl", progress, check)
    finally:
        for block in blocks:
            _to_buffers(block)
    return losses


def shared_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], share_size: int,
                loss_sum: Callable[[], torch.Tensor], clip_grad: float | None = None) -> tuple[float, int]:
    """One optimizer step on this rank's share of a batch (``share_size`` items; under torchrun possibly 0):
    back-propagate ``loss_sum()`` (the loss summed over the share), sum gradients, losses and counts over the ranks
    (tmlp.distributed.all_reduce_grads_: the one-process step on the whole batch), clip, step. Returns (mean loss,
    items) of the whole batch. Shared by distillation, fine-tuning and the learned token policy."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    if share_size:
        loss = loss_sum()
        loss.backward()
        total = loss.item()
    mean, n = all_reduce_grads_(params, total, share_size)
    if clip_grad:
        nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()
    return mean, n


def run_epochs(step: Callable[[Any], tuple[float, int]], batches: Callable[[], Iterable[Any]], n_batches: int,
               epochs: int, desc: str, metric: str, progress: bool, check: Check | None = None) -> list[float]:
    """Call ``step(batch) -> (mean loss, batch size)`` on every batch of ``batches()`` for ``epochs`` passes, with a
    progress bar; returns the mean loss of each epoch (shared by distillation and fine-tuning). ``check(images seen)
    -> stop`` is called every ``check.every`` training images and after the last batch; True ends training."""
    check_every = check.every if check is not None else 0
    losses, seen, next_check = [], 0, check_every
    for epoch in range(epochs):
        total, count, stop = 0.0, 0, False
        bar = tqdm(batches(), total=n_batches, desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        for batch in bar:
            loss, n = step(batch)
            total, count, seen = total + loss * n, count + n, seen + n
            bar.set_postfix({metric: f"{total / count:.4f}"})
            if check is not None and seen >= next_check:
                next_check = seen + check_every
                if check(seen):
                    stop = True
                    break
        bar.close()
        losses.append(total / max(1, count))
        if stop:
            return losses
    if check is not None and seen + check_every > next_check:  # images since the last check
        check(seen)
    return losses


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """Mean KL(teacher || student) over ``batches`` (for reports and tests)."""
    total, count = 0.0, 0
    for x in batches:
        total += kl_to_teacher(student(x), teacher(x)).item() * len(x)
        count += len(x)
    return total / max(1, count)
