"""Model surgery: ``taylorize_(model, config, filter_fn)`` replaces the selected blocks by TaylorMLP, in place.

Modelled on torchao's ``quantize_(model, config, filter_fn=None)``: ``filter_fn(module, fqn) -> bool`` picks the
blocks (default ``tmlp.blocks.is_mlp_block``: every module of timm's MLP family, wherever it sits, and the CIFAR
VGG's classifier head), and ``config`` is one TaylorConfig or a per-block map ``{"blocks.0.mlp": cfg, "_default":
cfg}``. A block the default filter finds but that mixes positions (tmlp.blocks.unsupported_reason) is skipped and
said so; one the user names is refused with that reason.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from tmlp.blocks import channel_dim, is_mlp_block, unsupported_reason
from tmlp.calibration.calibrate import BlockCalibration, calibrate
from tmlp.errors import TmlpError
from tmlp.taylor import TaylorConfig

__all__ = ["candidate_blocks", "config_for", "default_filter", "fold_batch_norm_", "replace_module", "select_blocks",
           "skipped_blocks", "taylorize_"]

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Every module of the MLP family (tmlp.blocks.is_mlp_block), whatever its name."""
    return is_mlp_block(module, fqn)


def _outermost(fqns: list[str]) -> list[str]:
    """``fqns`` without those nested inside another of them."""
    chosen = set(fqns)
    return [f for f in fqns if not any(".".join(f.split(".")[:i]) in chosen for i in range(1, f.count(".") + 1))]


def candidate_blocks(model: nn.Module, filter_fn: FilterFn | None = None) -> list[str]:
    """Names of the outermost modules ``filter_fn`` accepts (default: the MLP family), in model order, whether they
    can be replaced or not."""
    filter_fn = filter_fn or default_filter
    return _outermost([f for f, m in model.named_modules() if f and filter_fn(m, f)])


def skipped_blocks(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, str]:
    """{block name: why it is not replaced} for the candidate blocks that mix positions."""
    reasons = {f: unsupported_reason(model.get_submodule(f)) for f in candidate_blocks(model, filter_fn)}
    return {f: r for f, r in reasons.items() if r is not None}


def select_blocks(model: nn.Module, filter_fn: FilterFn | None = None, layers: Iterable[str] | None = None
                  ) -> list[str]:
    """Fully qualified names of the blocks to replace: ``layers`` if given (each must exist and map rows to rows),
    else those ``filter_fn`` accepts that do (outermost ones; ``skipped_blocks`` says why the others are left), in
    model order."""
    names = dict(model.named_modules())
    if layers is not None:
        chosen = list(layers)
        missing = [f for f in chosen if f not in names]
        if missing:
            raise TmlpError(f"the model has no block {missing[0]!r}; candidates are "
                            f"{select_blocks(model, filter_fn)[:4]}...; fix --layers")
        for f in chosen:
            reason = unsupported_reason(names[f])
            if reason:
                raise TmlpError(f"block {f!r} cannot be replaced: {reason}; leave it out of --layers")
        return chosen
    chosen = [f for f in candidate_blocks(model, filter_fn) if unsupported_reason(names[f]) is None]
    if not chosen:
        why = "; ".join(f"{f}: {r}" for f, r in list(skipped_blocks(model, filter_fn).items())[:2])
        raise TmlpError("no block of this model is an MLP T-MLP can replace" + (f" ({why})" if why else "")
                        + "; pass --layers with module names (tmlp models show NAME lists them)")
    return chosen


def config_for(config: TaylorConfig | dict[str, TaylorConfig], fqn: str) -> TaylorConfig:
    if isinstance(config, TaylorConfig):
        return config
    if fqn in config:
        return config[fqn]
    if "_default" in config:
        return config["_default"]
    raise TmlpError(f"no TaylorConfig for {fqn!r} and no '_default' in the per-block config map")


@torch.no_grad()
def fold_batch_norm_(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into that
    convolution (the BatchNorm becomes Identity), in place; returns how many were folded. The model computes the
    same function up to float rounding, with one op fewer per convolution in the exported graph, and static int8
    then quantizes the folded weights (the scale of each channel included)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training:
                seq[i] = fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = nn.Identity()
                folded += 1
    return folded


def replace_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def taylorize_(model: nn.Module, config: TaylorConfig | dict[str, TaylorConfig],
               filter_fn: FilterFn | None = None, *, calibration: dict[str, BlockCalibration] | None = None,
               batches: Callable[[], Iterable[torch.Tensor]] | None = None, n_batches: int = 0,
               layers: Iterable[str] | None = None, cache_key: dict | None = None,
               progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, BlockCalibration]:
    """Replace the selected blocks of ``model`` by TaylorMLP modules, in place; returns the calibration used.

    Either pass ``calibration`` (from ``tmlp.calibration.calibrate.calibrate``) or ``batches`` (a callable yielding model inputs
    [B, C, H, W]) to calibrate here. Blocks are calibrated on the original model, before any replacement.
    """
    fqns = select_blocks(model, filter_fn, layers)
    if calibration is None:
        if batches is None:
            raise TmlpError("taylorize_ needs calibration data: pass batches= (model inputs) or calibration=")
        calibration = {}
        groups: dict[str, list[str]] = {}
        for f in fqns:
            groups.setdefault(repr(config_for(config, f).to_dict()), []).append(f)
        for group in groups.values():
            calibration.update(calibrate(model, group, batches, n_batches, config_for(config, group[0]),
                                         key=cache_key, progress=progress, log=log))
    for fqn in fqns:
        if fqn not in calibration:
            raise TmlpError(f"no calibration for block {fqn!r}; calibrate it first")
        cal = calibration[fqn]
        original = model.get_submodule(fqn)
        replace_module(model, fqn, cal.build(config_for(config, fqn).order, original, channel_dim(original)))
    return calibration
