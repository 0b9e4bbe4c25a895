"""Row chunking for the exported graph: a block evaluated on its rows in pieces, so that onnxruntime never holds
every piece's gathered per-centre tensors at once (``tmlp export --max-memory``).

This is an onnxruntime scheduling matter, not part of the block's math: ``RowChunks`` wraps any module that maps
rows [..., d_in] -> [..., d_out] and gives the same result for every number of rows.
"""
from __future__ import annotations

import torch
from torch import nn


class RowChunks(nn.Module):
    """``block`` on the rows of x [..., d_in] in ``chunks`` pieces (ONNX: a Slice per piece, then Concat); a block
    whose ``channel_dim`` is 1 takes [B, d_in, ...] and gives [B, d_out, ...]."""

    def __init__(self, block: nn.Module, chunks: int = 1):
        super().__init__()
        self.block = block
        self.chunks = chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.block, "channel_dim", -1) == 1 and x.dim() > 2:
            return self._channels_last(x.movedim(1, -1)).movedim(-1, 1)
        return self._channels_last(x)

    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if self.chunks == 1:
            y = self.block(x)
        else:  # slice bounds computed from N at run time: exact for every N (some pieces may be empty)
            size = (x.shape[0] + self.chunks - 1) // self.chunks
            outs: list[torch.Tensor] = []
            for i in range(self.chunks):
                part = x[i * size:(i + 1) * size]
                if outs:  # a data dependency on the previous piece (adds 0): without it onnxruntime runs every
                    # piece's Gather first and holds all the gathered tensors at once, which chunking exists to avoid
                    part = part + 0.0 * outs[-1][:1, :1].sum()
                outs.append(self.block(part))
            y = torch.cat(outs, dim=0)
        return y.reshape(*lead, y.shape[-1])


def chunk_rows_(model: nn.Module, fqns: list[str], chunks: int) -> list[RowChunks]:
    """Wrap (or re-chunk) the blocks ``fqns`` of ``model`` in place so that each runs in ``chunks`` pieces; returns
    the wrappers."""
    wrappers = []
    for fqn in fqns:
        module = model.get_submodule(fqn)
        if not isinstance(module, RowChunks):
            module = RowChunks(module)
            parent_name, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
        module.chunks = chunks
        wrappers.append(module)
    return wrappers
