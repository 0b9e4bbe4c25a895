"""Shared fixtures: a tiny timm ViT (``test_vit``: embed 64, 6 blocks), digits batches, and a temporary cache."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tmlp.data import load_dataset, to_tensor
from tmlp.models import create_model

TINY_VIT = {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10}


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Calibration and model caches go to a per-session temporary folder, never to ~/.cache (session scope, so
    that module-scoped fixtures see it too)."""
    old = os.environ.get("TMLP_CACHE")
    os.environ["TMLP_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    yield
    if old is None:
        del os.environ["TMLP_CACHE"]
    else:
        os.environ["TMLP_CACHE"] = old


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_spec(digits):
    return digits.preprocessing((16, 16))


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return create_model("test_vit", TINY_VIT).eval()


@pytest.fixture(scope="session")
def digit_batches(digits, digits_spec):
    x = to_tensor(digits.train.x[:256], digits_spec)
    return [x[i:i + 64] for i in range(0, 256, 64)]


def shared_data_dir() -> str | None:
    """../shared/data (or $TMLP_SHARED_DATA) if present."""
    path = os.environ.get("TMLP_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    return path if os.path.isdir(path) else None


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def trained_tiny_vit_path(tmp_path_factory):
    """test_vit trained 4 epochs on digits (a few seconds): a model whose MLPs are no longer near-linear."""
    from tmlp.train import TrainConfig, train

    out = str(tmp_path_factory.mktemp("tiny-trained"))
    cfg = TrainConfig(model="test_vit", dataset="digits", model_config={"img_size": 16, "patch_size": 4}, epochs=4,
                      lr=1e-3, batch_size=32, optimizer="adamw", weight_decay=0.05, warmup_epochs=1.0, clip_grad=1.0,
                      augment="none")
    return train(cfg, out, progress=False, log=lambda s: None)["checkpoint"]


@pytest.fixture
def trained_tiny_vit(trained_tiny_vit_path):
    from tmlp.models import load_checkpoint

    return load_checkpoint(trained_tiny_vit_path)[0]
