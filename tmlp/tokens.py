"""Token reduction for timm ViTs that exports to plain ONNX (TopK and GatherElements; no scatter).

After the attention of chosen blocks, each image keeps its prefix (class) tokens and the ``n_keep`` patch tokens that
the class token attends to most (averaged over heads), in the style of EViT (Liang et al., 2022); with ``fuse`` the
dropped tokens are not lost but averaged, weighted by that attention, into one extra token. Later blocks — their
attention and their MLPs, Taylor blocks included — see fewer tokens. Training-free: the class token's attention
already ranks the tokens; ``tmlp.tokens`` leaves the weights as they are.

    apply_token_reduction_(model, TokenReduction(keep=0.7))   # blocks 3, 6, 9 of 12 keep 70% of their patch tokens
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tmlp.errors import TmlpError

__all__ = ["TokenReduction", "TopKTokenBlock", "apply_token_reduction_", "default_layers", "token_schedule"]


@dataclass(frozen=True)
class TokenReduction:
    """``keep``: share of the patch tokens each reducing block keeps (0 < keep <= 1); ``layers``: indices of the
    blocks that reduce after their attention (empty: ``default_layers``, EViT's 4th, 7th and 10th of 12 scaled to the
    depth); ``fuse``: add one token, the attention-weighted mean of the dropped ones."""

    keep: float = 0.7
    layers: tuple[int, ...] = ()
    fuse: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise TmlpError(f"--token-keep must be in (0, 1], the share of patch tokens kept, got {self.keep}")
        if any(i < 0 for i in self.layers):
            raise TmlpError(f"--token-layers takes block indices >= 0, got {self.layers}")


def default_layers(depth: int) -> tuple[int, ...]:
    """EViT's schedule (blocks 3, 6 and 9 of 12, 0-based) scaled to ``depth`` blocks."""
    return tuple(sorted({min(depth - 1, round(i * depth / 12)) for i in (3, 6, 9)}))


def token_schedule(n_patches: int, depth: int, cfg: TokenReduction) -> list[int]:
    """Patch tokens each block sees at its input: [n_patches, ..., ] of length ``depth`` (the fused token counted)."""
    layers = set(cfg.layers or default_layers(depth))
    seen, n = [], n_patches
    for i in range(depth):
        seen.append(n)
        if i in layers:
            n = max(1, round(cfg.keep * n)) + (1 if cfg.fuse else 0)
    return seen


class TopKTokenBlock(nn.Module):
    """A timm ViT ``Block`` that, after its attention, keeps the ``num_prefix`` prefix tokens and the ``n_keep`` patch
    tokens with the highest class-token attention (plus one fused token with ``fuse``), then runs its MLP on them.
    x [B, N, C] -> [B, num_prefix + n_keep (+1), C]. Same weights as the wrapped block; its attention is recomputed
    here unfused, because the attention probabilities are needed. The block's modules become this module's own
    children under the same names, so module paths (``blocks.3.mlp``) and state-dict keys do not change."""

    def __init__(self, block: nn.Module, n_keep: int, num_prefix: int = 1, fuse: bool = True):
        super().__init__()
        attn = getattr(block, "attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale", "proj")):
            raise TmlpError(f"token reduction needs a timm ViT block with qkv attention, got {type(block).__name__}")
        if getattr(attn, "gate", None) is not None:
            raise TmlpError("token reduction does not support gated attention blocks")
        for name, child in block.named_children():
            self.add_module(name, child)
        self.n_keep, self.num_prefix, self.fuse = n_keep, num_prefix, fuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blk, attn, p = self, self.attn, self.num_prefix
        b, n, c = x.shape
        qkv = attn.qkv(blk.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, N]
        out = (weights @ v).transpose(1, 2).reshape(b, n, -1)
        x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(attn.norm(out)))))
        cls_attn = weights[:, :, 0, p:].mean(dim=1)  # [B, N - p]: how much the class token looks at each patch
        score, index = cls_attn.topk(self.n_keep, dim=1)
        patches = x[:, p:]
        kept = torch.gather(patches, 1, index.unsqueeze(-1).expand(-1, -1, c))
        parts = [x[:, :p], kept]
        if self.fuse:
            total = (cls_attn.unsqueeze(-1) * patches).sum(dim=1) - (score.unsqueeze(-1) * kept).sum(dim=1)
            dropped = (cls_attn.sum(dim=1) - score.sum(dim=1)).clamp_min(1e-6).unsqueeze(-1)
            parts.append((total / dropped).unsqueeze(1))
        x = torch.cat(parts, dim=1)
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _patch_tokens(model: nn.Module) -> tuple[int, int]:
    embed = getattr(model, "patch_embed", None)
    n = getattr(embed, "num_patches", None)
    if n is None or not hasattr(model, "blocks"):
        raise TmlpError(f"token reduction works on timm ViTs (patch_embed + blocks); {type(model).__name__} is not one")
    return int(n), int(getattr(model, "num_prefix_tokens", 1))


def apply_token_reduction_(model: nn.Module, cfg: TokenReduction) -> dict[str, Any]:
    """Wrap the reducing blocks of timm ViT ``model`` in place; returns the schedule (for the manifest): the
    reducing block indices and the patch tokens each block sees."""
    n_patches, prefix = _patch_tokens(model)
    if prefix < 1:
        raise TmlpError("token reduction ranks tokens by the class token's attention; this ViT has no class token")
    depth = len(model.blocks)
    layers = tuple(cfg.layers or default_layers(depth))
    if any(i >= depth for i in layers):
        raise TmlpError(f"--token-layers {layers}: the model has blocks 0..{depth - 1}")
    seen = token_schedule(n_patches, depth, cfg)
    for i in layers:
        if isinstance(model.blocks[i], TopKTokenBlock):
            raise TmlpError(f"block {i} already reduces tokens")
        n_keep = max(1, round(cfg.keep * seen[i]))
        model.blocks[i] = TopKTokenBlock(model.blocks[i], n_keep, prefix, cfg.fuse)
    return {"keep": cfg.keep, "layers": list(layers), "fuse": cfg.fuse, "patch_tokens_per_block": seen}
