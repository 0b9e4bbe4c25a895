"""Model registry (short names -> builders) and checkpoints that rebuild their model alone.

``deit_small`` / ``deit_tiny`` are timm's ``deit_*_patch16_224`` with ``img_size``, ``patch_size``, ``in_chans`` and
``num_classes`` overrides; ``vgg16`` is the CIFAR VGG-16 with batch norm and a classifier MLP; any other timm model
name is passed to ``timm.create_model``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from tmlp.errors import TmlpError
from tmlp.io import file_sha256, save_torch

__all__ = ["MODELS", "ModelEntry", "VGG", "VGGHead", "create_model", "input_size", "load_checkpoint", "model_names",
           "read_checkpoint", "resolve_config", "save_checkpoint", "smallest_input_config", "split_state"]

CHECKPOINT_FORMAT = "tmlp-checkpoint"
CHECKPOINT_VERSION = 1
SHARD_FORMAT = "tmlp-checkpoint-shard"
COMMIT_FILE_MB = 45.0  # fp16 copies meant for a repository stay under its 50 MB file limit


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, default keyword arguments and the keyword arguments it accepts."""

    builder: Callable[..., nn.Module]
    defaults: dict[str, Any]
    description: str
    allowed: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------------------------------------------------
# VGG-16 for CIFAR
# ---------------------------------------------------------------------------------------------------------------------
VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGGHead(nn.Module):
    """The VGG classifier MLP: ``fc1 -> ReLU -> dropout -> fc2 -> ReLU -> dropout -> fc3``; [N, d_in] -> [N, classes]."""

    def __init__(self, in_features: int = 512, hidden: int = 4096, num_classes: int = 10, drop: float = 0.5):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act1 = nn.ReLU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.drop2 = nn.Dropout(drop)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act1(self.fc1(x)))
        x = self.drop2(self.act2(self.fc2(x)))
        return self.fc3(x)


class VGG(nn.Module):
    """VGG with batch norm for 32x32 inputs: conv features (cfg table) -> global max-pooled 512 vector -> head."""

    def __init__(self, cfg: str = "vgg16", num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 hidden: int = 4096, drop: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for v in VGG_CFGS[cfg]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = VGGHead(channels, hidden, num_classes, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _vgg16(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise TmlpError("vgg16 (CIFAR) has no pretrained weights to download; train it with `tmlp train --model vgg16`"
                        " or pass --checkpoint")
    return VGG("vgg16", **kwargs)


def _timm(timm_name: str) -> Callable[..., nn.Module]:
    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        import timm

        try:
            return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            if pretrained:
                first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                raise TmlpError(f"cannot fetch pretrained weights for {timm_name} ({first}); without network access "
                                "pass --checkpoint with weights you trained (tmlp train)") from None
            raise
    return build


VIT_KWARGS = ("img_size", "patch_size", "in_chans", "num_classes", "drop_path_rate", "drop_rate")
MODELS: dict[str, ModelEntry] = {
    "deit_small": ModelEntry(_timm("deit_small_patch16_224"),
                             {"img_size": 224, "patch_size": 16, "in_chans": 3, "num_classes": 1000},
                             "DeiT-Small (timm deit_small_patch16_224): embed 384, depth 12, 6 heads", VIT_KWARGS),
    "deit_tiny": ModelEntry(_timm("deit_tiny_patch16_224"),
                            {"img_size": 224, "patch_size": 16, "in_chans": 3, "num_classes": 1000},
                            "DeiT-Tiny (timm deit_tiny_patch16_224): embed 192, depth 12, 3 heads", VIT_KWARGS),
    "vgg16": ModelEntry(_vgg16, {"img_size": 32, "in_chans": 3, "num_classes": 10, "hidden": 4096},
                        "VGG-16 with batch norm for CIFAR (32x32), classifier MLP 512 -> 4096 -> 4096 -> classes",
                        ("img_size", "in_chans", "num_classes", "hidden", "drop")),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def resolve_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full keyword config of model ``name`` with ``overrides`` (None values ignored) applied and checked."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name in MODELS:
        entry = MODELS[name]
        unknown = sorted(set(overrides) - set(entry.allowed))
        if unknown:
            raise TmlpError(f"model {name} does not take {unknown}; it takes {list(entry.allowed)}")
        return {**entry.defaults, **overrides}
    if _is_timm_name(name):
        return dict(overrides)
    raise TmlpError(f"unknown model {name!r}; choose one of {model_names()} or a timm model name (timm.list_models())")


def _is_timm_name(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)


def create_model(name: str, config: dict[str, Any] | None = None, pretrained: bool = False) -> nn.Module:
    """Build model ``name`` with keyword ``config`` (from resolve_config); [N, C, H, W] -> [N, classes]. The key
    ``input_size`` ([H, W]: what a fully convolutional timm model was trained at) is tmlp's, not the builder's."""
    config = {k: v for k, v in resolve_config(name, **(config or {})).items() if k != INPUT_SIZE_KEY}
    if name in MODELS:
        return MODELS[name].builder(pretrained=pretrained, **config)
    return _timm(name)(pretrained=pretrained, **config)


INPUT_SIZE_KEY = "input_size"


def smallest_input_config(name: str, in_chans: int, num_classes: int, sides: tuple[int, ...] = (32, 64, 96, 128,
                                                                                               160, 224, 256)
                          ) -> dict[str, Any]:
    """The config of timm model ``name`` at the smallest square input in ``sides`` it runs at, with ``in_chans``
    channels and ``num_classes`` classes: ``img_size`` where the builder takes one (ViTs, Swin, CaiT, ...), else the
    recorded ``input_size`` of a fully convolutional model (ConvNeXt, PoolFormer, MobileViT)."""
    base = {"in_chans": in_chans, "num_classes": num_classes}
    tried = []
    for side in sides:
        for config in ({**base, "img_size": side}, {**base, INPUT_SIZE_KEY: [side, side]}):
            try:
                with torch.no_grad():
                    out = create_model(name, config).eval()(torch.zeros(2, in_chans, side, side))
            except Exception as err:  # any builder or forward failure: try the next size
                tried.append(f"{side}: {type(err).__name__}")
                continue
            if tuple(out.shape) == (2, num_classes):
                return config
    raise TmlpError(f"{name} runs at none of the input sizes {list(sides)} ({'; '.join(tried[-2:])}); pass "
                    "--checkpoint with a model you trained")



def input_size(name: str, config: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of the model's input: the config's ``img_size`` and ``in_chans``, else timm's
    default input size for a timm name, else 3 x 224 x 224."""
    default_chans, default_h, default_w = _timm_input_size(name) if name not in MODELS else (3, 224, 224)
    size = config.get("img_size", config.get(INPUT_SIZE_KEY, (default_h, default_w)))
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(config.get("in_chans", default_chans)), int(h), int(w)


def _timm_input_size(name: str) -> tuple[int, int, int]:
    try:
        import timm

        return tuple(timm.models.get_pretrained_cfg(name).input_size)
    except Exception:  # not a timm name, or a timm without a default config for it
        return 3, 224, 224


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, model: nn.Module, name: str, config: dict[str, Any],
                    extra: dict[str, Any] | None = None, half: bool = False, max_file_mb: float | None = None) -> None:
    """Write a checkpoint holding the model name, its config and weights (fp16 with ``half``), atomically. With
    ``max_file_mb``, weights beyond that size go to shard files ``<stem>.part1.pt``, ... beside it (each under the
    limit; for repositories that refuse large files), written first and named with their sha256 in the main file."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
             for k, v in model.state_dict().items()}
    parts = split_state(state, None if max_file_mb is None else int(max_file_mb * 1e6))
    path = os.fspath(path)
    stem = path[:-3] if path.endswith(".pt") else path
    shards = []
    for i, part in enumerate(parts[1:], start=1):
        shard = f"{stem}.part{i}.pt"
        save_torch({"format": SHARD_FORMAT, "of": os.path.basename(path), "state_dict": part}, shard)
        shards.append({"file": os.path.basename(shard), "sha256": file_sha256(shard)})
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": name, "config": config,
               "state_dict": parts[0], **({"shards": shards} if shards else {}), **(extra or {})}
    save_torch(payload, path)


def split_state(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """``state`` cut, in order, into dicts of at most ``max_bytes`` of tensor data each (one part without a limit;
    a tensor larger than the limit gets a part of its own). The first part leaves 1 MB for the checkpoint's
    metadata."""
    if max_bytes is None:
        return [state]
    parts: list[dict[str, torch.Tensor]] = [{}]
    used, room = 0, max_bytes - 1_000_000
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if parts[-1] and used + size > room:
            parts.append({})
            used, room = 0, max_bytes - 100_000
        parts[-1][key] = tensor
        used += size
    return parts


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict, with one-line errors for a missing, truncated or foreign file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TmlpError(f"checkpoint {path!r} does not exist; train one with `tmlp train` or fix the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # zipfile / pickle / EOF errors from a truncated or corrupt file
        raise TmlpError(f"checkpoint {path!r} is corrupt or truncated ({type(err).__name__}); re-copy it or "
                        "train again") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TmlpError(f"{path!r} is not a tmlp checkpoint (no model name and config inside); save weights with "
                        "`tmlp train`")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise TmlpError(f"{path!r} is checkpoint version {payload['version']}, newer than this tmlp reads "
                        f"({CHECKPOINT_VERSION}); upgrade tmlp")
    for shard in payload.pop("shards", []):
        payload["state_dict"].update(_read_shard(path, shard))
    return payload


def _read_shard(path: str, shard: dict[str, str]) -> dict[str, torch.Tensor]:
    """The weights in shard ``shard`` ({"file", "sha256"}) of checkpoint ``path``, checked against its hash."""
    shard_path = os.path.join(os.path.dirname(path), shard["file"])
    if not os.path.isfile(shard_path):
        raise TmlpError(f"checkpoint {path!r} keeps part of its weights in {shard['file']!r}, which is missing; copy "
                        "it next to the checkpoint")
    if file_sha256(shard_path) != shard["sha256"]:
        raise TmlpError(f"{shard_path!r} is not the shard checkpoint {path!r} was written with (sha256 differs); "
                        "copy both files from the same save")
    part = torch.load(shard_path, map_location="cpu", weights_only=False)
    if not isinstance(part, dict) or part.get("format") != SHARD_FORMAT:
        raise TmlpError(f"{shard_path!r} is not a tmlp checkpoint shard; copy it again")
    return part["state_dict"]


def load_checkpoint(path: str | os.PathLike, expect_model: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint names and load its weights (as fp32); returns (model in eval mode, payload)."""
    payload = read_checkpoint(path)
    name = payload["model"]
    if expect_model is not None and expect_model != name:
        raise TmlpError(f"checkpoint {os.fspath(path)!r} holds a {name}, not a {expect_model}; pass --model {name} "
                        "or another checkpoint")
    model = create_model(name, payload["config"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise TmlpError(f"checkpoint {os.fspath(path)!r} does not fit a {name} with config {payload['config']} "
                        f"({str(err).splitlines()[0][:120]}); it was saved from another architecture") from None
    return model.eval(), payload
