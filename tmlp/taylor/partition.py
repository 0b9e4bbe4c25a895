"""Which expansion point serves a token: the partition of a block's input space into k cells.

A partition is Euclidean nearest centre in the coordinates x P of a projection P [d_in, q] (None: P = I)::

    c = argmin_i ‖(x − C_i) P‖ = argmin_i ( ½ ‖C_i P‖² − (x P) · (C_i P) )

(‖x P‖² is the same for every i). The ONNX graph computes it in the cheaper of two forms:

- q = d_in: one MatMul against W = C P Pᵀ [k, d_in] (``assign_weight``), as costly as the plain distance;
- q < d_in: x P first (``assign_projection``), then a [q, k] MatMul against W = C P: N·q·(d_in + k) instead of
  N·d_in·k multiply-adds (d_in = 384, k = 100, q = 16: 7.8× fewer).

Partitions (``--partition``, default ``input``; ``auto`` is ``hidden`` wherever the block allows it, else ``input``):

- ``input``: P = I, K-means on the block's inputs x (the DESIGN's nearest centre).
- ``hidden``: P = L with L Lᵀ = W₁ᵀW₁ (Cholesky), W₁ [h, d_in] the block's first Linear layer: K-means on its
  pre-activations (‖x L‖ = ‖W₁ x‖). A token's cell then follows which hidden units are on or off, i.e. where the
  GELU/ReLU bends, which is where a first-order model fails; at equal k this lowers the held-out error of the best
  affine map per cell (bench/fit_error.py).

``--partition-rank q`` keeps the q leading principal directions of those coordinates (PCA of x P over the
calibration tokens), so cells are found, and tokens assigned, in q dimensions. On the CIFAR DeiT-Small the cells
of q = 8..64 fit as well as the full ones (bench/fit_error.py) and the assignment, the largest cost of a shared-basis
block, shrinks by the factor above.

Centres (expansion points) stay in input space: C = Z P⁻¹ for the K-means centres Z when P is square, and the mean
of the input rows of each cell when q < d_in (its K-means centre is that mean's projection).
"""
from __future__ import annotations

import torch
from torch import nn

from tmlp.taylor.basis import top_eigvecs
from tmlp.errors import TmlpError
from tmlp.spec import PARTITIONS



def first_weight(block: nn.Module, d_in: int) -> torch.Tensor:
    """W₁ [h, d_in]: the weight of the first Linear layer (or 1x1 convolution) of ``block`` that reads its d_in
    inputs (fc1 of a timm Mlp)."""
    for m in block.modules():
        if isinstance(m, nn.Linear) and m.in_features == d_in:
            return m.weight
        if isinstance(m, nn.Conv2d) and m.in_channels == d_in and m.kernel_size == (1, 1) and m.groups == 1:
            return m.weight[:, :, 0, 0]
    raise TmlpError(f"--partition hidden needs a block whose first layer is a Linear reading its {d_in} inputs; "
                    "this block has none: use --partition input")


def hidden_factor(block: nn.Module, d_in: int) -> torch.Tensor:
    """L [d_in, d_in] (float32, lower triangular) with L Lᵀ = W₁ᵀW₁ for the block's first Linear layer W₁."""
    w1 = first_weight(block, d_in).detach().double()
    if w1.shape[0] < d_in:  # rank < d_in for sure, and the d_in x d_in Gram may not even fit (VGG-16's head)
        raise TmlpError(f"--partition hidden needs the block's first layer to keep all {d_in} input directions "
                        f"(it has {w1.shape[0]} outputs); use --partition input")
    gram = w1.T @ w1
    rank = int(torch.linalg.matrix_rank(gram))
    if rank < d_in:
        raise TmlpError(f"--partition hidden needs the block's first layer to keep all {d_in} input directions "
                        f"(rank {rank}); use --partition input")
    return torch.linalg.cholesky(gram).float()


def resolve_partition(block: nn.Module, partition: str, d_in: int) -> str:
    """The partition ``block`` gets: ``partition`` itself, or for "auto" "hidden" when the block's first layer reads
    its d_in inputs and keeps all their directions (timm's Mlp: 384 -> 1536), "input" otherwise (VGG-16's head,
    25088 -> 4096, or a block with no such layer)."""
    if partition not in PARTITIONS:
        raise TmlpError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    if partition != "auto":
        return partition
    return "input" if _factor(block, partition, d_in) is None else "hidden"


def _factor(block: nn.Module, partition: str, d_in: int) -> torch.Tensor | None:
    """The hidden partition's L (hidden_factor) for "hidden", and for "auto" where the block allows it; else None."""
    if partition == "auto":
        try:
            return hidden_factor(block, d_in)  # refuses a narrower first layer before forming its d_in x d_in Gram
        except TmlpError:
            return None
    return hidden_factor(block, d_in) if partition == "hidden" else None


def partition_projection(block: nn.Module, partition: str, rows: torch.Tensor, rank: int | None = None
                         ) -> torch.Tensor | None:
    """The projection P [d_in, q] (float32) of ``partition`` for ``block`` ("auto": resolve_partition), q =
    ``rank`` leading principal directions of the partition's coordinates over ``rows`` [n, d_in] (all d_in when
    None); None for the plain Euclidean distance (``input`` at full rank)."""
    if partition not in PARTITIONS:
        raise TmlpError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    d_in = rows.shape[1]
    if rank is not None and rank < 1:
        raise TmlpError(f"--partition-rank must be >= 1, got {rank}")
    factor = _factor(block, partition, d_in)  # one Cholesky, "auto" included
    if rank is None or rank >= d_in:
        return factor
    coords = rows.double() if factor is None else rows.double() @ factor.double()
    coords = coords - coords.mean(0)
    directions = top_eigvecs(coords.T @ coords, rank).double()  # [d_in, q]
    return (directions if factor is None else factor.double() @ directions).float().contiguous()


def project(rows: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """Rows [n, d_in] in the partition's coordinates: x P [n, q] (x itself for P = None)."""
    return rows if projection is None else (rows.double() @ projection.double()).float()


def centres_from_projected(points: torch.Tensor, rows: torch.Tensor, projection: torch.Tensor | None
                           ) -> torch.Tensor:
    """Input-space centres [k, d_in] for K-means centres ``points`` [k, q] of ``project(rows, projection)``:
    Z P⁻¹ for a square P, else the mean of the rows of each cell (Z P⁺, the least-norm preimage, for a cell that
    no row falls in)."""
    if projection is None:
        return points
    p = projection.double()
    if p.shape[0] == p.shape[1]:
        return torch.linalg.solve(p.T, points.double().T).T.float()
    k = points.shape[0]
    cell = nearest_centre(project(rows, projection), points)  # Euclidean cells of the K-means centres, in x P
    counts = torch.bincount(cell, minlength=k).double()
    sums = torch.zeros(k, rows.shape[1], dtype=torch.float64).index_add_(0, cell, rows.double())
    preimage = torch.linalg.lstsq(p.T, points.double().T).solution.T  # min-norm C with C P = Z
    means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], preimage)
    return means.float()


def assignment_tensors(centres: torch.Tensor, projection: torch.Tensor | None
                       ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(P or None, W, b) with nearest centre argmin(b − (x P) Wᵀ) (argmin(b − x Wᵀ) when P is None): for q < d_in
    P [d_in, q] and W = C P [k, q]; else no projection and W = C P Pᵀ [k, d_in] (C for P = None); b [k] = ½‖C P‖²."""
    c = centres.double()
    if projection is None:
        return None, centres.float(), (0.5 * (c * c).sum(1)).float()
    p = projection.double()
    cp = c @ p
    half_sq_norm = (0.5 * (cp * cp).sum(1)).float()
    if p.shape[1] < p.shape[0]:
        return projection.float(), cp.float(), half_sq_norm
    return None, (cp @ p.T).float(), half_sq_norm


def nearest_centre(x: torch.Tensor, centres: torch.Tensor, projection: torch.Tensor | None = None,
                   chunk: int = 8192) -> torch.Tensor:
    """Index [N] (int64) of the nearest (in x P) of ``centres`` [k, d_in] for each row of x [N, d_in]."""
    proj, weight, bias = assignment_tensors(centres, projection)
    def scores(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.float() if proj is None else rows.float() @ proj
        return bias - rows @ weight.T
    return torch.cat([torch.argmin(scores(x[s:s + chunk]), dim=1) for s in range(0, max(len(x), 1), chunk)])
