"""Shared low-rank bases for the Taylor blocks: ``J_c ≈ U S_c Vᵀ`` with U [d_out, r_out] and V [d_in, r] shared by
all centres of a block (orthonormal columns) and a small S_c [r_out, r] per centre (r_out = r unless asked otherwise,
``--rank-out``).

Two ways of choosing U and V:

- ``data``: principal directions of what the first-order term acts on and produces — V from the inputs' deviations
  from their nearest centre (x − C_c), U from the outputs' deviations (F(x) − F(C_c)).
- ``jacobian``: the dominant singular subspaces of the stacked Jacobians, U from Σ_c J_c J_cᵀ and V from
  Σ_c J_cᵀ J_c (each centre weighted by the share of tokens it serves).
"""
from __future__ import annotations

import torch

from tmlp.errors import TmlpError



def top_eigvecs(gram: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading eigenvectors [d, r] of a symmetric PSD matrix [d, d] (float64 for stability)."""
    values, vectors = torch.linalg.eigh(gram.double())
    return vectors[:, torch.argsort(values, descending=True)[:r]].float().contiguous()


def data_basis(inputs: torch.Tensor, outputs: torch.Tensor, centres: torch.Tensor, centre_values: torch.Tensor,
               assign: torch.Tensor, r: int, r_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [d_out, r_out], V [d_in, r]) from PCA of input deviations x − C_c [n, d_in] and output deviations
    F(x) − F(C_c) [n, d_out], with ``assign`` [n] the nearest centre of each row."""
    dx = (inputs - centres[assign]).double()
    dy = (outputs - centre_values[assign]).double()
    return top_eigvecs(dy.T @ dy, r_out), top_eigvecs(dx.T @ dx, r)


def jacobian_basis(jacobian_gram_out: torch.Tensor, jacobian_gram_in: torch.Tensor, r: int, r_out: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [d_out, r_out], V [d_in, r]) from the accumulated Grams Σ_c w_c J_c J_cᵀ [d_out, d_out] and
    Σ_c w_c J_cᵀ J_c [d_in, d_in]."""
    return top_eigvecs(jacobian_gram_out, r_out), top_eigvecs(jacobian_gram_in, r)


def check_rank(r: int, d_in: int, d_out: int, r_out: int | None = None) -> None:
    """Refuse an input rank outside 1..d_in or an output rank outside 1..d_out (``r_out`` None: r for both, so
    1..min(d_in, d_out))."""
    if r_out is None:
        if r < 1 or r > min(d_in, d_out):
            raise TmlpError(f"rank {r} must lie in 1..min(d_in, d_out) = {min(d_in, d_out)}; lower --rank")
        return
    if r < 1 or r > d_in:
        raise TmlpError(f"rank {r} must lie in 1..d_in = {d_in}; lower --rank")
    if r_out < 1 or r_out > d_out:
        raise TmlpError(f"output rank {r_out} must lie in 1..d_out = {d_out}; lower --rank-out")
