"""Which expansion point serves a token: the partition of a block's input space into k cells.

Every token is served by one centre, ``c = argmin_i ‖x − C_i‖_M`` with ‖v‖²_M = vᵀ M v. Expanding the square and
dropping xᵀMx (the same for every i) gives the form the ONNX graph computes::

    c = argmin_i ( ½ C_iᵀ M C_i − x · (M C_i) )        weights W = C M [k, d_in], biases b = ½ diag(C M Cᵀ) [k]

so any metric costs exactly what the plain Euclidean distance costs (one MatMul, one Sub, one ArgMin).

Partitions (``--partition``):

- ``input``: M = I, K-means on the block's inputs x (the DESIGN's nearest centre).
- ``hidden``: M = W₁ᵀW₁, with W₁ [h, d_in] the block's first Linear layer: K-means on its pre-activations W₁x. A
  token's cell then follows which hidden units are on or off, i.e. where the GELU/ReLU bends, which is where a
  first-order model fails; at equal k this lowers the held-out error of the best affine map per cell (see
  bench/partition.py). The centres (expansion points) stay in input space: C = Z L⁻¹ for the K-means centres Z of
  x L, with M = L Lᵀ (Cholesky).
"""
from __future__ import annotations

import torch
from torch import nn

from tmlp.errors import TmlpError

PARTITIONS = ("input", "hidden")


def first_linear(block: nn.Module, d_in: int) -> nn.Linear:
    """The first Linear layer of ``block`` that reads its d_in inputs (fc1 of a timm Mlp)."""
    for m in block.modules():
        if isinstance(m, nn.Linear) and m.in_features == d_in:
            return m
    raise TmlpError(f"--partition hidden needs a block whose first layer is a Linear reading its {d_in} inputs; "
                    "this block has none: use --partition input")


def partition_metric(block: nn.Module, partition: str, d_in: int) -> torch.Tensor | None:
    """The metric M [d_in, d_in] (float32) of ``partition`` for ``block``, or None for the Euclidean ``input``."""
    if partition not in PARTITIONS:
        raise TmlpError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    if partition == "input":
        return None
    w1 = first_linear(block, d_in).weight.detach().double()
    metric = w1.T @ w1
    if w1.shape[0] < d_in or torch.linalg.matrix_rank(metric) < d_in:
        raise TmlpError(f"--partition hidden needs the block's first layer to keep all {d_in} input directions "
                        f"(rank {int(torch.linalg.matrix_rank(metric))}); use --partition input")
    return metric.float()


def metric_factor(metric: torch.Tensor) -> torch.Tensor:
    """L [d, d] (lower triangular, float64) with M = L Lᵀ, so that ‖v‖_M = ‖v L‖ for row vectors v."""
    return torch.linalg.cholesky(metric.double())


def to_metric_space(rows: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
    """Rows [n, d] mapped so that Euclidean distances there are M-distances here: x L (x itself for M = None)."""
    return rows if metric is None else (rows.double() @ metric_factor(metric)).float()


def from_metric_space(points: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
    """Inverse of ``to_metric_space``: Z [k, d] -> C = Z L⁻¹ [k, d]."""
    if metric is None:
        return points
    factor = metric_factor(metric)  # Z = C L  <=>  Lᵀ Cᵀ = Zᵀ
    return torch.linalg.solve_triangular(factor.T, points.double().T, upper=True).T.float()


def assignment_tensors(centres: torch.Tensor, metric: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W = C M [k, d_in], b = ½ diag(C M Cᵀ) [k]) with nearest centre argmin(b − x Wᵀ)."""
    weight = centres.float() if metric is None else (centres.double() @ metric.double()).float()
    return weight, 0.5 * (weight.double() * centres.double()).sum(1).float()


def nearest_centre(x: torch.Tensor, centres: torch.Tensor, metric: torch.Tensor | None = None,
                   chunk: int = 8192) -> torch.Tensor:
    """Index [N] (int64) of the nearest (in M) of ``centres`` [k, d] for each row of x [N, d]."""
    weight, bias = assignment_tensors(centres, metric)
    return torch.cat([torch.argmin(bias - x[s:s + chunk].float() @ weight.T, dim=1)
                      for s in range(0, max(len(x), 1), chunk)])
