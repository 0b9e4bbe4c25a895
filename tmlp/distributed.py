"""Running under ``torchrun``: the process group, who writes, and how work is split.

``torchrun --standalone --nproc_per_node N -m tmlp train ...`` starts N copies of the command with RANK, WORLD_SIZE
and LOCAL_RANK set; ``init()`` joins them into one process group (gloo on CPUs, NCCL on GPUs). Without torchrun
(WORLD_SIZE unset or 1) everything here is a no-op and tmlp runs as one process, as before.

Rules the heavy steps follow: every rank computes, rank 0 alone writes files and prints progress; a batch of the
single-process run is split across the ranks (``batch_share``), so that a step sees the same images whatever the
number of processes; sums (loss, correct predictions, least-squares statistics) are all-reduced.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from tmlp.errors import TmlpError

__all__ = ["World", "active", "all_gather_objects", "all_reduce_", "all_reduce_grads_", "all_reduce_sum", "barrier",
           "batch_share", "broadcast_object", "init", "leave", "lost_rank", "world"]


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the process that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_left = False  # leave() was called: this process goes on alone


def world() -> World:
    """This process's World, from the process group if one is up, else from torchrun's variables (or one process);
    one process after ``leave()``."""
    if _left:
        return World()
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init(device: torch.device | None = None, timeout_minutes: float = 30.0) -> World:
    """Join the process group torchrun set up (gloo for CPUs, NCCL for CUDA; a CUDA rank uses GPU ``LOCAL_RANK``);
    returns the World. One process: nothing to join. A rank that dies makes the others fail at their next
    collective (torchrun stops them) instead of waiting forever: the group has a ``timeout_minutes`` timeout."""
    w = world()
    if not w.distributed or dist.is_initialized():
        return w
    if not dist.is_available():
        raise TmlpError("this PyTorch build has no torch.distributed; run without torchrun")
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(w.local_rank)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    except (RuntimeError, ValueError) as err:
        raise TmlpError(f"cannot join the torchrun process group (rank {w.rank} of {w.size}): "
                        f"{str(err).splitlines()[0]}; check --rdzv-endpoint and that every node started") from None
    return world()


def active() -> bool:
    """True inside a process group of more than one process (torchrun, after ``init``)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def leave() -> None:
    """End this process's part in the group (after the last collective step): rank 0 then goes on alone, as one
    process, with no collective that would wait for the others."""
    global _left
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _left = True


def lost_rank(err: RuntimeError, w: World) -> Exception:
    """The error to raise for ``err``: under torchrun a collective that failed because another rank died or hung
    becomes a one-line TmlpError (nothing was written: files are written after the collective stages); any other
    error is returned unchanged."""
    text = str(err)
    if not w.distributed or not any(s in text.lower() for s in ("gloo", "nccl", "connection", "peer", "timed out",
                                                                 "timeout", "broken pipe")):
        return err
    return TmlpError(f"rank {w.rank} of {w.size}: another process of this torchrun job stopped or stalled "
                     f"({text.splitlines()[0][:160]}); no files were written; see that rank's error above and rerun")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place, with one collective (the tensors flattened into one float64
    buffer); nothing with one process."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]).to(_collective_device())
    dist.all_reduce(flat)
    flat, start = flat.cpu(), 0
    for t in tensors:
        t.copy_(flat[start:start + t.numel()].view_as(t).to(t.dtype))
        start += t.numel()


def all_reduce_grads_(params: list[torch.Tensor], loss_sum: float, count: int) -> tuple[float, int]:
    """One training step's reduction: each rank back-propagated the *sum* of its share's losses; sum the gradients
    of ``params``, the losses and the item counts over the ranks, then divide the gradients by the total count, so
    that every rank holds the gradient of the mean loss over the whole batch (what one process computes). Returns
    (mean loss, items) of the whole batch. A parameter without a gradient (an empty share) counts as zeros."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    totals = torch.tensor([loss_sum, float(count)], dtype=torch.float64)
    all_reduce_(grads + [totals])
    total_loss, n = float(totals[0]), int(round(float(totals[1])))
    for p, g in zip(params, grads):
        p.grad = g.div_(max(1, n))
    return total_loss / max(1, n), n


def all_gather_objects(obj):
    """[the object of rank 0, of rank 1, ...] (pickled; for samples and results, not for per-step tensors);
    [obj] with one process."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (the others pass anything, e.g. None); ``obj`` with one process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the ranks (float64 on the CPU for gloo); the values themselves with one process."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    all_reduce_([t])
    return t


def batch_share(index: np.ndarray, w: World) -> np.ndarray:
    """This rank's share of one batch (rank r takes items r, r + size, ...): the shares of all ranks are the batch."""
    return index[w.rank::w.size]
