"""What T-MLP can replace: MLP blocks found by type, their channel layout, and the rows they map.

A *candidate* is a module of timm's MLP family (``Mlp``, ``GluMlp``, ``SwiGLU``, ``GatedMlp``, ``ConvMlp``, ...,
EfficientFormer's ``ConvMlpWithNorm``) or the CIFAR VGG's classifier head, wherever it sits in the model (the way
torchao's ``quantize_`` filters modules by type). Each maps *rows* — vectors along its channel axis — to rows:

- channels last (Linear layers): x [..., d_in] -> [..., d_out], whatever the leading axes are (tokens [B, N, C],
  windows, channels-last maps [B, H, W, C], or transposed token mixing [B, C, N] where the "channels" are tokens);
- channels first (1x1 convolutions): x [B, d_in, H, W] -> [B, d_out, H, W].

A candidate is *supported* when it is pointwise on those rows: each output row depends on its own input row only.
A 3x3 or depthwise convolution, a spatial gating unit or a global response norm mixes rows; such a block is skipped
with a one-line reason (``unsupported_reason``), never half-replaced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BlockInfo", "RowView", "as_rows", "block_table", "channel_dim", "is_mlp_block",
           "mlp_family", "rows_of", "unsupported_reason"]

# timm classes by module and name: imported lazily (timm is optional for the VGG) and tolerant of timm versions
# that lack one of them.
TIMM_MLP_CLASSES = {
    "timm.layers.mlp": ("Mlp", "GluMlp", "SwiGLU", "SwiGLUPacked", "GatedMlp", "ConvMlp", "GlobalResponseNormMlp"),
    "timm.models.efficientformer": ("ConvMlpWithNorm",),
    "timm.models.efficientformer_v2": ("ConvMlpWithNorm",),
}
# Modules that mix rows (positions or tokens) inside an otherwise MLP-shaped block.
ROW_MIXING = ("SpatialGatingUnit", "GlobalResponseNorm", "GlobalResponseNorm2d")

_FAMILY: tuple[type, ...] | None = None


def mlp_family() -> tuple[type, ...]:
    """The classes whose instances are candidates (timm's MLP family that this timm has, and tmlp's VGG head)."""
    global _FAMILY
    if _FAMILY is None:
        import importlib

        from tmlp.models import VGGHead

        found: list[type] = [VGGHead]
        for module_name, names in TIMM_MLP_CLASSES.items():
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            found += [getattr(module, n) for n in names if isinstance(getattr(module, n, None), type)]
        _FAMILY = tuple(found)
    return _FAMILY


def is_mlp_block(module: nn.Module, fqn: str = "") -> bool:
    """The default filter: ``module`` is of the MLP family (``fqn``, its name, is not looked at)."""
    return isinstance(module, mlp_family())


def channel_dim(block: nn.Module) -> int:
    """The axis of ``block``'s input that holds its features: 1 for a 1x1-convolution MLP ([B, C, H, W]), else -1
    (a Taylor block says which it replaced in its ``channel_dim``)."""
    declared = getattr(block, "channel_dim", None)
    if isinstance(declared, int):
        return declared
    for m in block.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            return -1 if isinstance(m, nn.Linear) else 1
    return -1


def unsupported_reason(block: nn.Module) -> str | None:
    """Why ``block`` is not a map of rows to rows (None when it is): a convolution that sees neighbours, or a module
    that mixes positions."""
    for name, m in block.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,)
            s = m.stride if isinstance(m.stride, tuple) else (m.stride,)
            if any(v != 1 for v in k + s) or m.groups != 1:
                return (f"its convolution {name or type(m).__name__} (kernel {'x'.join(map(str, k))}, groups "
                        f"{m.groups}) mixes neighbouring positions")
        if type(m).__name__ in ROW_MIXING:
            return f"its {type(m).__name__} ({name}) mixes positions"
    return None


def rows_of(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The rows of a block input or output x along its channel axis ``dim``: [n, channels]."""
    if dim != -1 and x.dim() > 2:
        x = x.movedim(dim, -1)
    return x.reshape(-1, x.shape[-1])


class RowView(nn.Module):
    """A channels-first block seen as a map of rows [N, d_in] -> [N, d_out] (each row a 1x1 image)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x[:, :, None, None])[:, :, 0, 0]


def as_rows(block: nn.Module) -> nn.Module:
    """``block`` as a module of rows [N, d_in] -> [N, d_out] (itself when its channels are last)."""
    return block if channel_dim(block) == -1 else RowView(block)


# ---------------------------------------------------------------------------------------------------------------------
# What `tmlp models show` lists
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class BlockInfo:
    """One candidate block, measured on one input image: its class, input shape [1, ...], channel axis, rows per
    image, d_in -> d_out, multiply-adds per image (of the block and as a share of the model's) and, when it cannot
    be replaced, why."""

    fqn: str
    kind: str
    input_shape: list[int]
    channel_dim: int
    rows: int
    d_in: int
    d_out: int
    macs: int
    share: float
    skipped: str | None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not (k == "skipped" and v is None)}


@torch.no_grad()
def block_table(model: nn.Module, example: torch.Tensor, fqns: list[str]) -> tuple[list[BlockInfo], int]:
    """(one BlockInfo per block in ``fqns``, the model's multiply-adds per image) for one input ``example`` [1, C, H, W],
    counted with torch's FlopCounterMode (matrix products and convolutions; 1 MAC = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    shapes: dict[str, tuple[list[int], list[int]]] = {}

    def hook(fqn: str):
        def on_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            shapes.setdefault(fqn, (list(args[0].shape), list(output.shape)))
        return on_forward

    hooks = [model.get_submodule(f).register_forward_hook(hook(f)) for f in fqns]
    counter = FlopCounterMode(display=False)
    trainable = [p for p in model.parameters() if p.requires_grad]  # the counter's module tracker trips on
    try:  # parameters that enter a module as inputs (CaiT's class token) while they require grad
        for p in trainable:
            p.requires_grad_(False)
        with counter:
            model.eval()(example)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values()) // 2
    infos = []
    for fqn in fqns:
        block = model.get_submodule(fqn)
        dim = channel_dim(block)
        in_shape, out_shape = shapes.get(fqn, ([0], [0]))
        macs = _module_flops(counts, fqn) // 2
        d_in, d_out = in_shape[dim], out_shape[dim]
        rows = int(torch.tensor(in_shape).prod()) // max(d_in, 1)
        infos.append(BlockInfo(fqn, type(block).__name__, in_shape, dim, rows, d_in, d_out, macs,
                               macs / total if total else 0.0,
                               unsupported_reason(block) if fqn in shapes else "it never runs on this input"))
    return infos, total


def _module_flops(counts: dict[str, dict[Any, int]], fqn: str) -> int:
    """FLOPs FlopCounterMode recorded under module ``fqn`` (it names modules by their path, sometimes prefixed by the
    root module's class)."""
    for name, per_op in counts.items():
        if name == fqn or name.endswith("." + fqn):
            return sum(per_op.values())
    return 0
