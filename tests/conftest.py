"""Shared fixtures: a tiny timm ViT (``test_vit``: embed 64, 6 blocks), digits batches, and a temporary cache.

The tests mirror the package: tests/taylor/ checks tmlp/taylor/, tests/calibration/ tmlp/calibration/, tests/export/
export/, tests/runtime/ runtime/, and tests/test_<module>.py tmlp/<module>.py; test_structure, test_readme,
test_reliability and test_fuzz check the whole."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tmlp.data import load_dataset, to_tensor
from tmlp.models import create_model

TINY_VIT = {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10}

if os.environ.get("PYTEST_XDIST_WORKER"):  # two xdist workers share the cores: one thread each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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


# The catalogue of bad inputs: each of these tests feeds one and asserts a one-line error naming the problem
# and the fix, a non-zero exit or exception, and nothing written. `python -m pytest -m bad_input` runs them all;
# `--collect-only -q -m bad_input` counts them (the README gives the count).
BAD_INPUT_TESTS = (
    "test_unknown_model", "test_unknown_dataset", "test_missing_checkpoint", "test_truncated_checkpoint",
    "test_wrong_architecture_checkpoint", "test_checkpoint_of_another_model", "test_bad_npz_contents",
    "test_missing_and_corrupt_npz", "test_cifar_missing_without_download", "test_imagefolder_without_val_is_a_clear",
    "test_download_404_is_a_clear_error", "test_download_with_a_bad_md5", "test_bad_export_options",
    "test_k_larger_than_tokens", "test_full_hessian_is_refused", "test_config_rejects_bad_values",
    "test_nan_activations_are_reported", "test_nan_weights_are_reported", "test_unknown_layer_is_a_clear_error",
    "test_missing_calibration_is_a_clear_error", "test_ranks_beyond_their_sides_are_refused",
    "test_negative_budget_is_refused", "test_unwritable_output", "test_a_disk_that_fills_up_mid_write",
    "test_bench_without_a_run", "test_pretrained_without_network", "test_resume_with_other_settings_is_refused",
    "test_distilling_a_model_without_taylor_blocks", "test_profile_errors_name_the_field",
    "test_an_export_that_cannot_meet_a_profile", "test_check_refuses_a_board_without_emulation",
    "test_bad_model_files_give_one_line_errors", "test_a_model_that_differs_from_its_manifest",
    "test_inputs_of_the_wrong_shape_are_refused", "test_labels_out_of_range_are_refused",
    "test_wrong_image_dtype_is_refused", "test_config_round_trips_and_refuses_other_versions",
    "test_device_report_and_side_by_side_comparison", "test_an_opset_outside_what_the_model_exports_at",
    "test_a_provider_this_onnxruntime_lacks_is_refused", "test_bench_reports_the_provider_that_ran",
    "test_each_option_alone", "test_random_combinations", "test_run_py_every_option",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname.startswith(BAD_INPUT_TESTS):
            item.add_marker(pytest.mark.bad_input)
