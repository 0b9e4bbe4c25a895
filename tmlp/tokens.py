"""Token reduction for timm ViTs that exports to plain ONNX (TopK and GatherElements; no scatter).

After the attention of chosen blocks, each image keeps its prefix (class) tokens and the ``n_keep`` patch tokens that
the class token attends to most (averaged over heads), in the style of EViT (Liang et al., 2022); with ``fuse`` the
dropped tokens are not lost but averaged, weighted by that attention, into one extra token. Later blocks — their
attention and their MLPs, Taylor blocks included — see fewer tokens. Training-free: the class token's attention
already ranks the tokens; ``tmlp.tokens`` leaves the weights as they are.

The learned policy (``policy="learned"``, a score predictor per reducing block as in DynamicViT, Rao et al., 2021)
ranks by log(class-token attention) + s(token), where s is a small MLP of the token and the mean of all tokens
whose last layer starts at zero, so an untrained predictor ranks exactly as EViT. The class token's attention in
an early block is a noisy guide to which patches matter; ``train_token_scorers_`` teaches each predictor to rank
as the unreduced model's *last* block attends: the loss is KL(target ‖ softmax(score)) over the patch tokens a
reducing block sees, the target being the original model's last-block class attention on those patches (a fused
token gets the attention of the patches it stands for). Every other weight stays fixed; at inference the same TopK
and GatherElements run on the learned scores.

    apply_token_reduction_(model, TokenReduction(keep=0.7))   # blocks 3, 6, 9 of 12 keep 70% of their patch tokens
    apply_token_reduction_(model, TokenReduction(keep=0.5, policy="learned"))
    train_token_scorers_(model, original, batches, n_batches)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from tmlp.errors import TmlpError
from tmlp.spec import TOKEN_POLICIES

__all__ = ["POLICIES", "TokenReduction", "TokenScorer", "TopKTokenBlock", "apply_token_reduction_", "default_layers",
           "fused_token", "token_schedule", "train_token_scorers_"]

POLICIES = TOKEN_POLICIES


@dataclass(frozen=True)
class TokenReduction:
    """``keep``: share of the patch tokens each reducing block keeps (0 < keep <= 1); ``layers``: indices of the
    blocks that reduce after their attention (empty: ``default_layers``, EViT's 4th, 7th and 10th of 12 scaled to the
    depth); ``fuse``: add one token, the attention-weighted mean of the dropped ones; ``policy``: "attention" ranks
    by the class token's attention alone, "learned" adds a trained score predictor (TokenScorer)."""

    keep: float = 0.7
    layers: tuple[int, ...] = ()
    fuse: bool = True
    policy: str = "attention"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise TmlpError(f"--token-policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
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


class TokenScorer(nn.Module):
    """A learned correction to the token ranking: x [B, N, C] -> s [B, N],
    s_i = fc2(GELU(fc1([LN(x_i), mean_j LN(x_j)]))) (local and global features, as DynamicViT's predictor). fc2
    starts at zero: an untrained scorer adds nothing."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(16, dim // 4)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        both = torch.cat([h, h.mean(dim=1, keepdim=True).expand_as(h)], dim=-1)
        return self.fc2(self.act(self.fc1(both))).squeeze(-1).clamp(-30.0, 30.0)


class TopKTokenBlock(nn.Module):
    """A timm ViT ``Block`` that, after its attention, keeps the ``num_prefix`` prefix tokens and the ``n_keep`` patch
    tokens with the highest class-token attention (plus one fused token with ``fuse``), then runs its MLP on them.
    x [B, N, C] -> [B, num_prefix + n_keep (+1), C]. Same weights as the wrapped block; its attention is recomputed
    here unfused, because the attention probabilities are needed. The block's modules become this module's own
    children under the same names, so module paths (``blocks.3.mlp``) and state-dict keys do not change. With a
    ``scorer`` (TokenScorer) the ranking score is log(attention) + scorer(patch tokens) (module docstring)."""

    def __init__(self, block: nn.Module, n_keep: int, num_prefix: int = 1, fuse: bool = True,
                 scorer: nn.Module | None = None):
        super().__init__()
        attn = getattr(block, "attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale", "proj")):
            raise TmlpError(f"token reduction needs a timm ViT block with qkv attention, got {type(block).__name__}")
        if getattr(attn, "gate", None) is not None:
            raise TmlpError("token reduction does not support gated attention blocks")
        for name, child in block.named_children():
            self.add_module(name, child)
        self.n_keep, self.num_prefix, self.fuse = n_keep, num_prefix, fuse
        self.scorer = scorer
        self.record = False  # while the scorer trains: keep the ranking logits and the kept positions
        self.logits: torch.Tensor | None = None
        self.index: torch.Tensor | None = None

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
        patches = x[:, p:]
        if self.scorer is None:
            weight = cls_attn
            _, index = cls_attn.topk(self.n_keep, dim=1)
        else:
            learned = self.scorer(patches)  # [B, N - p]
            _, index = (torch.log(cls_attn.clamp_min(1e-12)) + learned).topk(self.n_keep, dim=1)
            weight = cls_attn * torch.exp(learned)
        kept = torch.gather(patches, 1, index.unsqueeze(-1).expand(-1, -1, c))
        if self.record:
            self.index = index
            if self.scorer is not None:
                self.logits = torch.log(cls_attn.detach().clamp_min(1e-12)) + learned
        parts = [x[:, :p], kept]
        if self.fuse:
            parts.append(fused_token(patches, weight, index).unsqueeze(1))
        x = torch.cat(parts, dim=1)
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def fused_token(patches: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The token that stands for the dropped patches: their mean weighted by ``weight`` (class attention).
    patches [B, N, C], weight [B, N] (>= 0), index [B, n_keep] the kept positions -> [B, C].

    Summed over the dropped patches themselves (a 0/1 mask from Equal against the positions: no scatter), never as
    "all minus kept": a trained class token can give the dropped patches 1e-5 of its attention (single weights go
    down to 1e-30), and that difference of two nearly equal sums is rounding noise, different in PyTorch and
    onnxruntime. No additive epsilon either: torch.onnx's optimizer folds ``w + 1e-12`` to ``w``, so the two would
    disagree wherever the weights are that small; when every dropped weight underflows to zero the token is zero."""
    positions = torch.arange(patches.shape[1], device=patches.device)
    kept = (index.unsqueeze(-1) == positions).to(weight.dtype).sum(dim=1)  # [B, N]: 1 where kept, else 0
    dropped = weight * (1.0 - kept)
    return (dropped.unsqueeze(-1) * patches).sum(dim=1) / dropped.sum(dim=1, keepdim=True).clamp_min(1e-30)


@torch.no_grad()
def last_block_class_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class token's attention to each patch in the last block of timm ViT ``model`` (mean over heads) for
    inputs x [B, C, H, W]: [B, N_patches], each row summing to at most 1 (the rest goes to the prefix tokens)."""
    seen: list[torch.Tensor] = []
    block = model.blocks[-1]
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    attn, h = block.attn, block.norm1(seen[0])
    b, n, _ = h.shape
    qk = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qk[0]), attn.k_norm(qk[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, 1, N]
    return weights[:, :, 0].mean(dim=1)[:, int(getattr(model, "num_prefix_tokens", 1)):]


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
        scorer = TokenScorer(int(model.embed_dim)) if cfg.policy == "learned" else None
        model.blocks[i] = TopKTokenBlock(model.blocks[i], n_keep, prefix, cfg.fuse, scorer)
    return {"keep": cfg.keep, "layers": list(layers), "fuse": cfg.fuse, "policy": cfg.policy,
            "patch_tokens_per_block": seen}


def train_token_scorers_(student: nn.Module, teacher: nn.Module,
                         batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], n_batches: int,
                         epochs: int = 1, lr: float = 1e-3, progress: bool = True, check=None) -> list[float]:
    """Train the TokenScorers of ``student`` (a model with learned-policy TopKTokenBlocks) in place, every other
    weight fixed, on the inputs of ``batches()`` — (inputs [B, C, H, W], labels [B]); labels unused — for
    ``epochs`` passes: each reducing block's ranking, softmax(log attention + s) over the patch tokens it sees, is
    pulled towards ``teacher``'s (the unreduced original's) last-block class attention on the same patches (KL,
    summed over the reducing blocks); AdamW at ``lr``; under torchrun each rank passes its share of every batch and
    the gradients are summed over the ranks. Returns the mean loss of each epoch."""
    from tmlp.distill import run_epochs, shared_step

    blocks = [m for m in student.modules() if isinstance(m, TopKTokenBlock) and m.scorer is not None]
    if not blocks:
        raise TmlpError("the model has no learned token policy to train; reduce tokens with policy='learned'")
    reducers = [m for m in student.blocks if isinstance(m, TopKTokenBlock)]
    trainable = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    params = [p for b in blocks for p in b.scorer.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    teacher.eval()
    student.eval()

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, int]:
        x = batch[0]

        def loss_sum() -> torch.Tensor:
            target = last_block_class_attention(teacher, x)  # [B, N]
            target = target / target.sum(dim=1, keepdim=True).clamp_min(1e-12)
            student(x)
            loss = 0.0
            # each reducing block sees some of the original patches (``target`` columns) and, after the first,
            # one fused token standing for all the others
            for block in reducers:
                if block.scorer is not None:
                    loss = loss + nn.functional.kl_div(block.logits.log_softmax(dim=1), target.clamp_min(1e-12).log(),
                                                       log_target=True, reduction="sum")
                target = _kept_target(target, block.index, block.fuse)
            return loss
        return shared_step(optimizer, params, len(x), loss_sum, 1.0)

    for b in reducers:
        b.record = True
    try:
        return run_epochs(step, batches, n_batches, epochs, "token policy", "kl", progress, check)
    finally:
        for b in reducers:
            b.record, b.logits, b.index = False, None, None
        for p, flag in trainable.items():
            p.requires_grad_(flag)


def _kept_target(target: torch.Tensor, index: torch.Tensor, fuse: bool) -> torch.Tensor:
    """The target over the patch tokens after a reduction that kept columns ``index`` [B, n_keep] of ``target``
    [B, N] (and, with ``fuse``, appended one token holding what the others had)."""
    kept = torch.gather(target, 1, index)
    if not fuse:
        return kept / kept.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cat([kept, (1 - kept.sum(dim=1, keepdim=True)).clamp_min(0)], dim=1)
