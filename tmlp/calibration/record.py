"""Recording what the blocks of a model see: the one hook loop that calibration, the least-squares fit, the planner
and the token count share."""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tmlp.blocks import as_rows, channel_dim, rows_of
from tmlp.errors import TmlpError

Recorder = Callable[[str, torch.Tensor, torch.Tensor], None]


class IndexedBatch(NamedTuple):
    """Model inputs ``x`` [B, C, H, W] with the positions ``index`` [B] of their images in a stream of ``total``
    images. Under torchrun each rank streams its share of every batch (tmlp.distributed.batch_share); the positions
    let calibration draw the same token sample whatever the number of processes."""

    index: np.ndarray
    x: torch.Tensor
    total: int


def inputs_of(item: torch.Tensor | IndexedBatch) -> torch.Tensor:
    """The model inputs of a batch (a tensor, or an IndexedBatch)."""
    return item.x if isinstance(item, IndexedBatch) else item


def get_module(model: nn.Module, fqn: str) -> nn.Module:
    """Submodule ``fqn`` of ``model``, or a one-line error naming the fix."""
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        raise TmlpError(f"the model has no block {fqn!r}; list its blocks with `tmlp models show` or fix --layers") \
            from None


def block_rows(model: nn.Module, fqn: str) -> nn.Module:
    """Block ``fqn`` of ``model`` as a map of rows [N, d_in] -> [N, d_out] (tmlp.blocks.as_rows)."""
    return as_rows(get_module(model, fqn))


@torch.no_grad()
def stream_blocks(model: nn.Module, fqns: list[str], batches: Iterable[torch.Tensor], record: Recorder,
                  n_batches: int | None = None, desc: str = "", progress: bool = False) -> None:
    """Run ``model`` (in eval mode) over ``batches`` (model inputs [B, C, H, W], or IndexedBatch) and call ``record(fqn, x, y)`` for
    every block in ``fqns`` with the rows of its input x [n, d_in] and output y [n, d_out] (along the block's channel
    axis, tmlp.blocks), in execution order. A recorder only reads: the hooks return None, so no block's output
    changes."""
    def hook(fqn: str, dim: int) -> Callable:
        def on_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            record(fqn, rows_of(args[0].detach(), dim), rows_of(output.detach(), dim))
        return on_forward

    blocks = {f: get_module(model, f) for f in fqns}
    handles = [b.register_forward_hook(hook(f, channel_dim(b))) for f, b in blocks.items()]
    try:
        model.eval()
        for item in tqdm(batches, total=n_batches, desc=desc, disable=not progress, leave=False):
            x = inputs_of(item)
            if len(x):  # a rank's share of a last, small batch may be empty
                model(x)
    finally:
        for h in handles:
            h.remove()


def tokens_per_image(model: nn.Module, fqn: str, example: torch.Tensor) -> int:
    """How many rows block ``fqn`` sees for one image ``example`` [1, C, H, W]."""
    seen: list[int] = []
    stream_blocks(model, [fqn], [example], lambda f, x, y: seen.append(x.shape[0]))
    return seen[0]
