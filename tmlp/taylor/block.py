"""The Taylor block: a drop-in replacement for an MLP that computes, in PyTorch, exactly what the ONNX graph does.

For inputs x [N, d_in], centres C [k, d_in]::

    c    = argmin_i (1/2 ||C_i||^2 - x . C_i)          (= argmin_i ||x - C_i||; ||x||^2 is the same for every i)
                                                        (in a partition: ||(x - C_i) P||, tmlp.taylor.partition)
    y    = a_c                                          order 0  (a = F(C))
    y    = a_c + J_c x                                  order 1  (a = F(C) - J C, folded at calibration)
    y    = a_c + J_c x + 1/2 H_c (x - C_c)^2            order 2, diagonal Hessian
"""
from __future__ import annotations

import torch
from torch import nn

from tmlp.errors import TmlpError
from tmlp.taylor.derivatives import BlockDerivatives, SharedDerivatives
from tmlp.taylor.partition import assignment_tensors


class _NearestCentre(nn.Module):
    """Holds the centres [k, d_in] and assigns each row of x [N, d_in] to its nearest one, in the coordinates x P of
    the partition's projection P [d_in, q] when given (tmlp.taylor.partition): buffers ``assign_projection`` P (q < d_in
    only) and ``assign_weight`` W (C P [k, q], or C P Pᵀ [k, d_in] when q = d_in).

    ``channel_dim`` is the input axis that holds the features: -1 (rows [..., d_in], a Linear MLP) or 1 (maps
    [B, d_in, H, W], a 1x1-convolution MLP; a 2-D input [N, d_in] is rows either way)."""

    def __init__(self, centres: torch.Tensor, projection: torch.Tensor | None = None, channel_dim: int = -1):
        super().__init__()
        if channel_dim not in (-1, 1):
            raise TmlpError(f"channel_dim must be -1 (channels last) or 1 (channels first), got {channel_dim}")
        centres = centres.float()
        self.d_in = centres.shape[1]
        self.channel_dim = channel_dim
        self.register_buffer("centres", centres.contiguous())
        proj, weight, half_sq_norm = assignment_tensors(centres, projection)
        if proj is not None:
            self.register_buffer("assign_projection", proj.contiguous())
        if projection is not None:
            self.register_buffer("assign_weight", weight.contiguous())
        self.register_buffer("half_sq_norm", half_sq_norm)

    @property
    def k(self) -> int:
        return self.centres.shape[0]

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centre for each row of x [N, d_in] -> [N] (int64): ArgMin(½‖C‖² − x·Cᵀ), in a
        partition ArgMin(½‖C P‖² − (x P)·Wᵀ) (x itself in place of x P when P is square, folded into W)."""
        weight = getattr(self, "assign_weight", self.centres)
        projection = getattr(self, "assign_projection", None)
        if projection is not None:
            x = x @ projection
        return torch.argmin(self.half_sq_norm - x @ weight.T, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> [..., d_out] (channels first: [B, d_in, ...] -> [B, d_out, ...]): the rows of x through
        ``rows``."""
        if self.channel_dim == 1 and x.dim() > 2:
            return self._channels_last(x.movedim(1, -1)).movedim(-1, 1)
        return self._channels_last(x)

    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.rows(x.reshape(-1, self.d_in)).reshape(*lead, self.d_out)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of the per-centre and basis tensors."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class TaylorMLP(_NearestCentre):
    """Piecewise Taylor approximation of a block R^d_in -> R^d_out; x [..., d_in] -> y [..., d_out].

    Buffers: ``centres`` [k, d_in], ``half_sq_norm`` [k], ``offset`` a [k, d_out], and for order >= 1
    ``jacobian`` [k, d_out, d_in], for order 2 ``hessian_diag`` [k, d_out, d_in].
    """

    def __init__(self, centres: torch.Tensor, derivatives: BlockDerivatives, order: int,
                 projection: torch.Tensor | None = None, channel_dim: int = -1):
        super().__init__(centres, projection, channel_dim)
        if order not in (0, 1, 2):
            raise TmlpError(f"Taylor order must be 0, 1 or 2, got {order}")
        centres = self.centres
        self.order = order
        self.d_out = derivatives.value.shape[1]
        offset = derivatives.value.float()
        if order >= 1:
            if derivatives.jacobian is None:
                raise TmlpError("order >= 1 needs Jacobians; calibrate with order >= 1")
            jac = derivatives.jacobian.float()
            offset = offset - torch.einsum("koi,ki->ko", jac, centres)
            self.register_buffer("jacobian", jac.contiguous())
        if order == 2:
            if derivatives.hessian_diag is None:
                raise TmlpError("order 2 needs Hessian diagonals; calibrate with order 2")
            self.register_buffer("hessian_diag", (0.5 * derivatives.hessian_diag.float()).contiguous())
        self.register_buffer("offset", offset.contiguous())

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d_in] -> [N, d_out]."""
        c = self.assign(x)
        y = torch.index_select(self.offset, 0, c)  # index_select exports as ONNX Gather
        if self.order >= 1:
            y = y + torch.matmul(torch.index_select(self.jacobian, 0, c), x.unsqueeze(-1)).squeeze(-1)
        if self.order == 2:
            diff = x - torch.index_select(self.centres, 0, c)
            y = y + torch.matmul(torch.index_select(self.hessian_diag, 0, c), (diff * diff).unsqueeze(-1)).squeeze(-1)
        return y

    def extra_repr(self) -> str:
        return f"k={self.k}, order={self.order}, d_in={self.d_in}, d_out={self.d_out}"


class SharedTaylorMLP(_NearestCentre):
    """Taylor block with a shared low-rank basis, J_c ≈ U S_c Vᵀ; x [..., d_in] -> y [..., d_out].

    Order 1: ``y = a_c + ((S_c (Vᵀ x)) Uᵀ)`` with a_c = F(C_c) − U S_c Vᵀ C_c folded at build time.
    Order 2: ``z = Vᵀ x − (VᵀC)_c``, ``y = F(C_c) + (S_c z + ½ T_c z²) Uᵀ`` (diagonal Hessian in the V coordinates).
    Buffers (r input rank, r_out output rank): ``v`` [d_in, r], ``ut`` Uᵀ [r_out, d_out], ``s`` [k, r_out, r],
    ``offset`` [k, d_out]; order 2 adds ``half_t`` [k, r_out, r] and ``centres_v`` [k, r].
    """

    def __init__(self, centres: torch.Tensor, derivatives: SharedDerivatives, order: int,
                 projection: torch.Tensor | None = None, channel_dim: int = -1):
        super().__init__(centres, projection, channel_dim)
        if order not in (1, 2):
            raise TmlpError(f"a shared-basis block needs order 1 or 2, got {order}")
        self.order = order
        self.d_out = derivatives.value.shape[1]
        self.rank, self.rank_out = derivatives.v.shape[1], derivatives.u.shape[1]
        u, v, s = derivatives.u.float(), derivatives.v.float(), derivatives.s.float()
        self.register_buffer("v", v.contiguous())
        self.register_buffer("ut", u.T.contiguous())
        self.register_buffer("s", s.contiguous())
        centres_v = self.centres @ v  # [k, r]
        if order == 1:
            offset = derivatives.value.float() - torch.einsum("krs,ks->kr", s, centres_v) @ u.T
        else:
            if derivatives.t is None:
                raise TmlpError("order 2 needs second derivatives; calibrate with order 2")
            offset = derivatives.value.float()
            self.register_buffer("half_t", (0.5 * derivatives.t.float()).contiguous())
            self.register_buffer("centres_v", centres_v.contiguous())
        self.register_buffer("offset", offset.contiguous())

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d_in] -> [N, d_out]."""
        c = self.assign(x)
        z = x @ self.v  # [N, r]
        if self.order == 2:
            z = z - torch.index_select(self.centres_v, 0, c)
        h = torch.matmul(torch.index_select(self.s, 0, c), z.unsqueeze(-1)).squeeze(-1)
        if self.order == 2:
            h = h + torch.matmul(torch.index_select(self.half_t, 0, c), (z * z).unsqueeze(-1)).squeeze(-1)
        return torch.index_select(self.offset, 0, c) + h @ self.ut

    def extra_repr(self) -> str:
        ranks = f"rank={self.rank}" + (f", rank_out={self.rank_out}" if self.rank_out != self.rank else "")
        return f"k={self.k}, order={self.order}, {ranks}, d_in={self.d_in}, d_out={self.d_out}"


def build_taylor_block(centres: torch.Tensor, derivatives: BlockDerivatives | SharedDerivatives, order: int,
                       projection: torch.Tensor | None = None, channel_dim: int = -1) -> TaylorMLP | SharedTaylorMLP:
    """The Taylor module that matches the kind of per-centre tensors calibration produced (cells in x·``projection``,
    tmlp.taylor.partition), reading its features on axis ``channel_dim`` as the block it replaces did."""
    if isinstance(derivatives, SharedDerivatives):
        return SharedTaylorMLP(centres, derivatives, order, projection, channel_dim)
    return TaylorMLP(centres, derivatives, order, projection, channel_dim)
