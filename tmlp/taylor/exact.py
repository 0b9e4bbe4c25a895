"""Exact hidden units: the few units of an MLP that a piecewise-linear block serves worst, kept as they are.

An MLP ``F(x) = W2 act(W1 x + b1) + b2`` is a sum over its hidden units. A unit whose pre-activation
``a_j = W1[j] x + b1[j]`` stays on one side of the activation's bend inside a cell is linear there, and a first-order
cell serves it; a unit whose pre-activation crosses the bend inside cells is what no line in the cell follows. With
``--exact-units m`` the m units with the largest such error are kept exact::

    E(x) = W2[:, U] act(W1[U] x + b1[U])          U: the m units, 2·m·d multiply-adds per token for d = d_in = d_out

and the Taylor block is calibrated (centres, basis, least squares) on ``F − E``, the part it serves; the block's
output is ``T(x) + E(x)``. The score of unit j is ``‖W2[:, j]‖²`` times the squared residual of the least-squares
line of act(a_j) on a_j within each cell, summed over cells and calibration tokens: what a per-cell affine map
leaves of that unit alone. On the CIFAR-10 DeiT-Small 256 units per block (17% of the MLP) halve the held-out block
error and cut the logit KL of 11 replaced blocks by 73% (bench/results/exact-units).
"""
from __future__ import annotations

import torch
from torch import nn

from tmlp.errors import TmlpError

__all__ = ["ExactUnits", "HybridTaylorMLP", "WithoutUnits", "choose_units", "float_scopes", "kept_units",
           "mlp_layers", "unit_scores"]


def mlp_layers(block: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    """(fc1, act, fc2) of a two-layer MLP: a timm ``Mlp`` (fc1, act, fc2; dropout and an identity norm allowed) or
    an ``nn.Sequential`` Linear, activation, Linear. Anything else is refused: exact units need the hidden layer."""
    fc1, act, fc2 = (getattr(block, n, None) for n in ("fc1", "act", "fc2"))
    norm = getattr(block, "norm", None)
    if isinstance(block, nn.Sequential):
        layers = [m for m in block if not isinstance(m, (nn.Dropout, nn.Identity))]
        fc1, act, fc2 = (layers + [None] * 3)[:3] if len(layers) == 3 else (None, None, None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and isinstance(act, nn.Module)
            and fc1.out_features == fc2.in_features and (norm is None or isinstance(norm, nn.Identity))):
        raise TmlpError(f"--exact-units needs a Linear-activation-Linear MLP (timm Mlp); {type(block).__name__} is "
                        "not one: use --exact-units 0 for this block")
    return fc1, act, fc2


class ExactUnits(nn.Module):
    """Hidden units ``units`` [m] of an MLP, exactly: x [..., d_in] -> W2[:, U] act(W1[U] x + b1[U]) [..., d_out]
    (no output bias: the Taylor block carries it). Parameters ``fc1_weight`` [m, d_in], ``fc1_bias`` [m],
    ``fc2_weight`` [d_out, m] (whole-model fine-tuning trains them as the model's other weights)."""

    def __init__(self, block: nn.Module, units: torch.Tensor):
        super().__init__()
        fc1, act, fc2 = mlp_layers(block)
        units = units.long()
        bias = fc1.bias.detach()[units] if fc1.bias is not None else torch.zeros(len(units))
        self.fc1_weight = nn.Parameter(fc1.weight.detach()[units].float().clone())
        self.fc1_bias = nn.Parameter(bias.float().clone())
        self.fc2_weight = nn.Parameter(fc2.weight.detach()[:, units].float().clone())
        self.act = act

    @property
    def m(self) -> int:
        return self.fc1_weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x @ self.fc1_weight.T + self.fc1_bias) @ self.fc2_weight.T


class WithoutUnits(nn.Module):
    """F − E: the MLP ``block`` with the ``exact`` units taken out, the part a Taylor block serves
    (x [..., d_in] -> [..., d_out])."""

    def __init__(self, block: nn.Module, exact: ExactUnits):
        super().__init__()
        self.block, self.exact = block, exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) - self.exact(x)


class HybridTaylorMLP(nn.Module):
    """A Taylor block plus exact hidden units: x [..., d_in] -> taylor(x) + exact(x) [..., d_out]."""

    def __init__(self, taylor: nn.Module, exact: ExactUnits):
        super().__init__()
        self.taylor, self.exact = taylor, exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.taylor(x) + self.exact(x)

    def extra_repr(self) -> str:
        return f"exact_units={self.exact.m}"


@torch.no_grad()
def unit_scores(block: nn.Module, rows: torch.Tensor, cells: torch.Tensor, k: int) -> torch.Tensor:
    """[hidden] float64: per unit, ‖W2[:, j]‖² × the squared residual of a least-squares line of act(a_j) on a_j in
    each of the k cells (``cells`` [n], the cell of each row of ``rows`` [n, d_in]), summed over cells and rows."""
    fc1, act, fc2 = mlp_layers(block)
    a = fc1(rows.float()).double()
    h = act(a)
    err = torch.zeros(a.shape[1], dtype=torch.float64)
    for c in range(k):
        members = cells == c
        if int(members.sum()) < 3:  # a line through two points leaves nothing
            continue
        ac, hc = a[members], h[members]
        ac, hc = ac - ac.mean(0), hc - hc.mean(0)
        slope = (ac * hc).sum(0) / (ac * ac).sum(0).clamp_min(1e-12)
        err += ((hc - slope * ac) ** 2).sum(0)
    return err * fc2.weight.detach().double().pow(2).sum(0)


def choose_units(block: nn.Module, rows: torch.Tensor, cells: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """Indices [m] (int64, ascending) of the m units with the largest ``unit_scores``."""
    fc1, _, _ = mlp_layers(block)
    if not 0 < m <= fc1.out_features:
        raise TmlpError(f"--exact-units must be between 0 and the block's {fc1.out_features} hidden units, got {m}")
    scores = unit_scores(block, rows, cells, k)
    return torch.sort(torch.argsort(scores, descending=True)[:m]).values


def kept_units(model: nn.Module, layers: list[str]) -> dict[str, int]:
    """{layer: hidden units it keeps exact} for the replaced blocks ``layers`` of ``model`` (0: a plain Taylor
    block)."""
    return {p: int(exact.m) if isinstance(exact := getattr(model.get_submodule(p), "exact", None), ExactUnits) else 0
            for p in layers}


def float_scopes(units: dict[str, int]) -> list[str]:
    """Module paths an int8 model keeps in float ("T-MLP + int8, rest of the model"), from {replaced layer: exact
    units}: a plain Taylor block whole; of a block with exact units only its ``taylor`` part, so the units' MatMuls
    are quantized with the rest of the model's weights."""
    return [f"{p}.taylor" if m else p for p, m in units.items()]
