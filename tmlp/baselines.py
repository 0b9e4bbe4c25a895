"""The compressors T-MLP is compared with, on the same blocks and the same multiply-add budget.

- ``prune_hidden_``: structured pruning of an MLP's hidden units — keep the ``keep`` share of units with the largest
  magnitude score ‖fc1 row‖·‖fc2 column‖ (both Linear layers shrink; the function stays an MLP).
- ``low_rank_``: each Linear (or 1×1 convolution) of an MLP factored by a truncated SVD into two, at the rank that
  keeps the ``keep`` share of its multiply-adds.
- ``tucker_conv_``: Tucker-2 decomposition of k×k convolutions (VGG-16): 1×1 (C_in → R_in), k×k (R_in → R_out),
  1×1 (R_out → C_out), the core and factors from a higher-order SVD of the kernel's channel modes.

All work in place, return a record for the manifest, and leave the weights exact at ``keep=1``; a short distillation
fine-tune (``tmlp.finetune.finetune_(..., require_taylor=False)``) recovers part of what they lose.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from tmlp.errors import TmlpError
from tmlp.surgery import replace_module

__all__ = ["low_rank_", "low_rank_linear", "prune_hidden_", "rank_for_keep", "tucker_conv", "tucker_conv_"]


def _check_keep(keep: float, what: str) -> None:
    if not 0 < keep <= 1:
        raise TmlpError(f"{what} must be in (0, 1], the share of multiply-adds kept, got {keep}")


def _layers(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    fc1, fc2 = getattr(block, "fc1", None), getattr(block, "fc2", None)
    if fc1 is None or fc2 is None:
        raise TmlpError(f"{type(block).__name__} has no fc1/fc2 pair (a timm Mlp or ConvMlp)")
    return fc1, fc2


def _is_1x1(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1


def _hidden_reason(block: nn.Module) -> str | None:
    """Why hidden-unit pruning cannot shrink ``block`` (None: it can)."""
    fc1, fc2 = getattr(block, "fc1", None), getattr(block, "fc2", None)
    if not all(isinstance(m, nn.Linear) or _is_1x1(m) for m in (fc1, fc2)):
        return "not an fc1 -> act -> fc2 MLP of Linear or 1x1 convolution layers"
    if fc1.weight.shape[0] != fc2.weight.shape[1]:
        return "gated MLP (fc1 makes two halves)"
    if not isinstance(getattr(block, "norm", nn.Identity()), nn.Identity):
        return "normalises its hidden layer (pruning would change the statistics)"
    return None


def _sliced(layer: nn.Module, index: torch.Tensor, dim: int) -> nn.Module:
    """A copy of Linear/1×1-conv ``layer`` keeping output units (dim 0) or input units (dim 1) ``index``."""
    weight = layer.weight.detach().index_select(dim, index)
    out_f, in_f = weight.shape[0], weight.shape[1]
    bias = layer.bias is not None
    new = nn.Linear(in_f, out_f, bias=bias) if isinstance(layer, nn.Linear) else nn.Conv2d(in_f, out_f, 1, bias=bias)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias:
            new.bias.copy_(layer.bias.detach() if dim == 1 else layer.bias.detach()[index])
    return new.to(layer.weight.device)


def prune_hidden_(model: nn.Module, fqns: Iterable[str], keep: float) -> dict[str, Any]:
    """Keep the ``keep`` share of the hidden units of each MLP ``fqns`` (magnitude score ‖fc1_j‖·‖fc2_:,j‖); returns
    {"method", "keep", "blocks": {fqn: hidden kept}, "skipped": {fqn: reason}}."""
    _check_keep(keep, "--prune-keep")
    record: dict[str, Any] = {"method": "prune_hidden", "keep": keep, "blocks": {}, "skipped": {}}
    for fqn in fqns:
        block = model.get_submodule(fqn)
        reason = _hidden_reason(block)
        if reason:
            record["skipped"][fqn] = reason
            continue
        fc1, fc2 = _layers(block)
        w1, w2 = fc1.weight.detach().flatten(1), fc2.weight.detach().flatten(1)
        score = w1.norm(dim=1) * w2.norm(dim=0)
        n_keep = max(1, round(keep * score.numel()))
        index = score.topk(n_keep).indices.sort().values
        block.fc1, block.fc2 = _sliced(fc1, index, 0), _sliced(fc2, index, 1)
        record["blocks"][fqn] = n_keep
    return record


def rank_for_keep(d_in: int, d_out: int, keep: float) -> int:
    """The rank r whose factorisation r·(d_in + d_out) keeps the ``keep`` share of d_in·d_out multiply-adds."""
    return max(1, min(min(d_in, d_out), round(keep * d_in * d_out / (d_in + d_out))))


def low_rank_linear(layer: nn.Module, rank: int) -> nn.Sequential:
    """``layer`` (Linear or 1×1 conv, weight [d_out, d_in]) as two layers d_in -> rank -> d_out from its truncated
    SVD W ≈ (U √S)(√S Vᵀ); the bias stays on the second."""
    weight = layer.weight.detach().flatten(1).double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    first, second = (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root[None]).float()
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        a, b = nn.Linear(weight.shape[1], rank, bias=False), nn.Linear(rank, weight.shape[0], bias=bias)
    else:
        a, b = nn.Conv2d(weight.shape[1], rank, 1, bias=False), nn.Conv2d(rank, weight.shape[0], 1, bias=bias)
    with torch.no_grad():
        a.weight.copy_(first.reshape(a.weight.shape))
        b.weight.copy_(second.reshape(b.weight.shape))
        if bias:
            b.bias.copy_(layer.bias.detach())
    return nn.Sequential(a, b).to(layer.weight.device)


def low_rank_(model: nn.Module, fqns: Iterable[str], keep: float) -> dict[str, Any]:
    """Factor fc1 and fc2 of each MLP ``fqns`` by truncated SVD, keeping the ``keep`` share of each one's
    multiply-adds (a layer whose rank would not save anything stays whole); returns {"method", "keep", "blocks":
    {fqn: [rank of fc1, rank of fc2]}, "skipped": {fqn: reason}}."""
    _check_keep(keep, "--low-rank-keep")
    record: dict[str, Any] = {"method": "low_rank", "keep": keep, "blocks": {}, "skipped": {}}
    for fqn in fqns:
        block = model.get_submodule(fqn)
        ranks = []
        for name in ("fc1", "fc2"):
            layer = getattr(block, name, None)
            if not (isinstance(layer, nn.Linear) or _is_1x1(layer)):
                ranks = None
                break
            d_out, d_in = layer.weight.shape[:2]
            rank = rank_for_keep(d_in, d_out, keep)
            if rank * (d_in + d_out) < d_in * d_out:
                setattr(block, name, low_rank_linear(layer, rank))
                ranks.append(rank)
            else:
                ranks.append(None)
        if ranks is None:
            record["skipped"][fqn] = "fc1/fc2 are not Linear or 1x1 convolution layers"
        else:
            record["blocks"][fqn] = ranks
    return record


def _mode_basis(kernel: torch.Tensor, mode: int, rank: int) -> torch.Tensor:
    """The leading ``rank`` left singular vectors of ``kernel`` unfolded along ``mode`` ([size of mode, rank])."""
    unfolded = kernel.movedim(mode, 0).flatten(1)
    return torch.linalg.svd(unfolded, full_matrices=False)[0][:, :rank]


def tucker_conv(conv: nn.Conv2d, rank_out: int, rank_in: int, iterations: int = 2) -> nn.Sequential:
    """Tucker-2 of ``conv`` (kernel [C_out, C_in, k, k]): 1×1 C_in -> rank_in, k×k rank_in -> rank_out (the core,
    same stride/padding/dilation), 1×1 rank_out -> C_out (with the bias). Factors from a higher-order SVD refined by
    ``iterations`` rounds of alternating least squares (HOOI)."""
    if conv.groups != 1:
        raise TmlpError("Tucker decomposition covers ungrouped convolutions")
    kernel = conv.weight.detach().double()
    u_out, u_in = _mode_basis(kernel, 0, rank_out), _mode_basis(kernel, 1, rank_in)
    for _ in range(iterations):
        u_out = _mode_basis(torch.einsum("oikl,ir->orkl", kernel, u_in), 0, rank_out)
        u_in = _mode_basis(torch.einsum("oikl,or->rikl", kernel, u_out), 1, rank_in)
    core = torch.einsum("oikl,or,is->rskl", kernel, u_out, u_in)  # [rank_out, rank_in, k, k]
    first = nn.Conv2d(conv.in_channels, rank_in, 1, bias=False)
    middle = nn.Conv2d(rank_in, rank_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
    last = nn.Conv2d(rank_out, conv.out_channels, 1, bias=conv.bias is not None)
    with torch.no_grad():
        first.weight.copy_(u_in.T[:, :, None, None].float())
        middle.weight.copy_(core.float())
        last.weight.copy_(u_out[:, :, None, None].float())
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, middle, last).to(conv.weight.device)


def tucker_conv_(model: nn.Module, keep: float, skip_first: bool = True, iterations: int = 2) -> dict[str, Any]:
    """Tucker-2 every k×k convolution of ``model`` (k > 1; the first, 3-channel one left whole with ``skip_first``)
    with both ranks the share √keep·(1 + …) that keeps about ``keep`` of its multiply-adds; returns {"method",
    "keep", "layers": {fqn: [rank_out, rank_in]}}."""
    _check_keep(keep, "--tucker-keep")
    record: dict[str, Any] = {"method": "tucker", "keep": keep, "layers": {}}
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    for i, (fqn, conv) in enumerate(convs):
        if (skip_first and i == 0) or conv.groups != 1:
            continue
        c_out, c_in, kh, kw = conv.weight.shape
        full = c_out * c_in * kh * kw
        # ranks proportional to the channels (r_out = a·C_out, r_in = a·C_in), a from the MAC share (per pixel):
        # a·C_in·C_in + a²·C_in·C_out·k² + a·C_out·C_out = keep·C_out·C_in·k²
        qa, qb, qc = c_in * c_out * kh * kw, c_in * c_in + c_out * c_out, -keep * full
        a = float((-qb + (qb * qb - 4 * qa * qc) ** 0.5) / (2 * qa))
        r_out, r_in = max(1, min(c_out, round(a * c_out))), max(1, min(c_in, round(a * c_in)))
        if c_in * r_in + r_in * r_out * kh * kw + r_out * c_out >= full:
            continue
        replace_module(model, fqn, tucker_conv(conv, r_out, r_in, iterations))
        record["layers"][fqn] = [r_out, r_in]
    return record
