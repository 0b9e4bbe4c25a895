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

__all__ = ["World", "all_reduce_sum", "barrier", "batch_share", "init", "world"]


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


def world() -> World:
    """This process's World, from the process group if one is up, else from torchrun's variables (or one process)."""
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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the ranks (float64 on the CPU for gloo); the values themselves with one process."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        if backend == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu()


def batch_share(index: np.ndarray, w: World) -> np.ndarray:
    """This rank's share of one batch (rank r takes items r, r + size, ...): the shares of all ranks are the batch."""
    return index[w.rank::w.size]
