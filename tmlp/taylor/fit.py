"""Least-squares fit of a shared-basis block's per-centre tensors to the block's own outputs ("--fit lstsq").

The Taylor tensors are the tangent of F at each centre; every token of a centre's Voronoi cell is then served by
that tangent, however far from the centre it lies. With the centres C, the assignment and the bases U, V fixed, the
block's output is *linear* in its per-centre tensors, so the ones that minimise the block's output error over the
calibration tokens have a closed form, per centre c::

    f    = z            (order 1)  or  [z, z²] (order 2),   z = Vᵀ(x − C_c)            features [F]
    y   ≈ value_c + U W_c f,        W_c = [S_c] or [S_c, ½T_c]                         [r_out, F]
    W_c  = (Σ Uᵀ(y − ȳ)(f − f̄)ᵀ + λ P_c) (Σ (f − f̄)(f − f̄)ᵀ + λ I)⁻¹,   value_c = ȳ − U W_c f̄

(ridge λ = ``ridge`` · trace(Σ (f − f̄)(f − f̄)ᵀ) / F, pulling W_c towards its Taylor value P_c). The output's part
outside span(U) can only be matched by the constant, which takes its cell mean. The sums are accumulated in one
streaming pass over the calibration images (forward hooks; memory k·F² per block, never the activations), so every
token of every calibration image is used. The graph, the ONNX export and the speed are those of the Taylor block:
only the numbers in ``value``, ``s`` and ``t`` change. Cells with fewer than F + 2 tokens, or whose tokens do not
vary (a singular system), keep their Taylor values.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tmlp.taylor.derivatives import SharedDerivatives
from tmlp.errors import TmlpError
from tmlp.taylor.partition import nearest_centre



@dataclass
class CellSums:
    """Per-centre sums over the tokens of each cell (float64): count ``n`` [k], ``f`` Σf [k, F], ``y`` Σy
    [k, d_out], ``ff`` Σffᵀ [k, F, F], ``uyf`` Σ(Uᵀy)fᵀ [k, r_out, F] (F = r, or 2r at order 2; r and r_out the
    ranks of V and U)."""

    n: torch.Tensor
    f: torch.Tensor
    y: torch.Tensor
    ff: torch.Tensor
    uyf: torch.Tensor

    @classmethod
    def zeros(cls, k: int, n_features: int, rank_out: int, d_out: int) -> "CellSums":
        z = torch.zeros
        return cls(z(k, dtype=torch.float64), z(k, n_features, dtype=torch.float64), z(k, d_out, dtype=torch.float64),
                   z(k, n_features, n_features, dtype=torch.float64), z(k, rank_out, n_features, dtype=torch.float64))

    @classmethod
    def for_block(cls, derivatives: SharedDerivatives, order: int) -> "CellSums":
        """Empty sums sized for ``derivatives`` (k centres, V's rank r, U's rank r_out) fitted at ``order``."""
        return cls.zeros(len(derivatives.value), derivatives.v.shape[1] * order, derivatives.u.shape[1],
                         derivatives.value.shape[1])


def cell_features(x: torch.Tensor, centres: torch.Tensor, v: torch.Tensor, order: int,
                  projection: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest centre [N] int64 in x·``projection``, features [N, F]) of rows x [N, d_in]: z = Vᵀ(x − C_c), and z² for
    order 2."""
    c = nearest_centre(x, centres, projection)
    z = (x - centres[c]) @ v
    return c, (torch.cat([z, z * z], 1) if order == 2 else z)


def accumulate_(sums: CellSums, x: torch.Tensor, y: torch.Tensor, centres: torch.Tensor, u: torch.Tensor,
                v: torch.Tensor, order: int, chunk: int = 2048, projection: torch.Tensor | None = None) -> None:
    """Add the tokens x [N, d_in] with block outputs y [N, d_out] to ``sums`` in place (cells in
    x·``projection``, tmlp.taylor.partition)."""
    u64 = u.double()
    for s in range(0, len(x), chunk):
        xs, ys = x[s:s + chunk].float(), y[s:s + chunk].float()
        c, f = cell_features(xs, centres, v, order, projection)
        f, ys = f.double(), ys.double()
        sums.n.index_add_(0, c, torch.ones(len(c), dtype=torch.float64))
        sums.f.index_add_(0, c, f)
        sums.y.index_add_(0, c, ys)
        sums.ff.index_add_(0, c, f[:, :, None] * f[:, None, :])
        sums.uyf.index_add_(0, c, (ys @ u64)[:, :, None] * f[:, None, :])


def solve_cells(sums: CellSums, derivatives: SharedDerivatives, ridge: float) -> tuple[SharedDerivatives, int]:
    """The least-squares per-centre tensors from ``sums`` (ridge towards ``derivatives``, the Taylor ones);
    returns them and the number of cells that kept their Taylor values (too few tokens)."""
    if ridge < 0:
        raise TmlpError(f"--fit-ridge must be >= 0, got {ridge}")
    u = derivatives.u.double()
    rank = derivatives.v.shape[1]  # z = Vᵀ(x − C_c) has V's rank; W_c has U's rank rows
    n_features = sums.f.shape[1]
    order = 2 if n_features == 2 * rank else 1
    value, s = derivatives.value.double().clone(), derivatives.s.double().clone()
    t = None if derivatives.t is None else derivatives.t.double().clone()
    kept = 0
    eye = torch.eye(n_features, dtype=torch.float64)
    for c in range(len(sums.n)):
        n = float(sums.n[c])
        if n < n_features + 2:
            kept += 1
            continue
        f_mean, y_mean = sums.f[c] / n, sums.y[c] / n
        cov_ff = sums.ff[c] - n * torch.outer(f_mean, f_mean)
        cov_yf = sums.uyf[c] - n * torch.outer(u.T @ y_mean, f_mean)
        spread = float(torch.diagonal(cov_ff).sum())
        if spread <= 1e-9 * float(torch.diagonal(sums.ff[c]).sum()) + 1e-300:
            kept += 1  # its tokens all coincide (a singular system): it keeps its Taylor values
            continue
        lam = ridge * spread / n_features
        prior = s[c] if order == 1 else torch.cat([s[c], 0.5 * t[c]], 1)
        try:
            w = torch.linalg.solve(cov_ff + lam * eye, (cov_yf + lam * prior).T).T  # [r_out, F] (cov_ff symmetric)
        except torch.linalg.LinAlgError:  # singular in fewer directions than all, with no ridge
            kept += 1
            continue
        s[c] = w[:, :rank]
        if order == 2:
            t[c] = 2.0 * w[:, rank:]
        value[c] = y_mean - u @ (w @ f_mean)
    return replace(derivatives, value=value.float(), s=s.float(), t=None if t is None else t.float()), kept
