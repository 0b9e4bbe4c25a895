"""Model surgery: ``taylorize_(model, config, filter_fn)`` replaces the selected blocks by TaylorMLP, in place.

Modelled on torchao's ``quantize_(model, config, filter_fn=None)``: ``filter_fn(module, fqn) -> bool`` picks the
blocks (default: every ``blocks.i.mlp`` of a ViT, the ``classifier`` head of the CIFAR VGG), and ``config`` is one
TaylorConfig or a per-block map ``{"blocks.0.mlp": cfg, "_default": cfg}``.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from tmlp.calibration.calibrate import BlockCalibration, calibrate
from tmlp.errors import TmlpError
from tmlp.taylor import TaylorConfig, build_taylor_block

__all__ = ["config_for", "default_filter", "replace_module", "select_blocks", "taylorize_"]

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, fqn: str) -> bool:
    """ViT MLPs (``blocks.<i>.mlp``) and a top-level ``classifier`` MLP head."""
    parts = fqn.split(".")
    vit_mlp = len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] == "mlp"
    return vit_mlp or (fqn == "classifier" and any(isinstance(m, nn.Linear) for m in module.modules()))


def select_blocks(model: nn.Module, filter_fn: FilterFn | None = None, layers: Iterable[str] | None = None
                  ) -> list[str]:
    """Fully qualified names of the blocks to replace: ``layers`` if given (each must exist), else those
    ``filter_fn`` accepts, in model order."""
    names = dict(model.named_modules())
    if layers is not None:
        chosen = list(layers)
        missing = [f for f in chosen if f not in names]
        if missing:
            raise TmlpError(f"the model has no block {missing[0]!r}; candidates are "
                            f"{select_blocks(model, filter_fn)[:4]}...; fix --layers")
        return chosen
    filter_fn = filter_fn or default_filter
    chosen = [f for f, m in names.items() if f and filter_fn(m, f)]
    if not chosen:
        raise TmlpError("no block of this model matches the filter; pass --layers with module names")
    return chosen


def config_for(config: TaylorConfig | dict[str, TaylorConfig], fqn: str) -> TaylorConfig:
    if isinstance(config, TaylorConfig):
        return config
    if fqn in config:
        return config[fqn]
    if "_default" in config:
        return config["_default"]
    raise TmlpError(f"no TaylorConfig for {fqn!r} and no '_default' in the per-block config map")


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
        replace_module(model, fqn, build_taylor_block(cal.centres, cal.derivatives, config_for(config, fqn).order,
                                                      cal.projection))
    return calibration
