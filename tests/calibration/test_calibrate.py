"""Calibration: bounded token collection, deterministic K-means, errors for impossible requests, caching."""
import os

import pytest
import torch

import numpy as np

from tmlp.calibration.calibrate import calibrate, collect_inputs, image_rows, kmeans
from tmlp.calibration.record import IndexedBatch
from tmlp.io import cache_path
from tmlp.errors import TmlpError
from tmlp.taylor import TaylorConfig


def test_collect_keeps_at_most_max_tokens_and_leaves_outputs_untouched(tiny_vit, digit_batches):
    before = tiny_vit(digit_batches[0])
    rows = collect_inputs(tiny_vit, ["blocks.0.mlp", "blocks.3.mlp"], iter(digit_batches), 4, max_tokens=300,
                          progress=False)
    assert rows["blocks.0.mlp"].shape == (300, 64) and rows["blocks.3.mlp"].shape == (300, 64)
    assert torch.equal(before, tiny_vit(digit_batches[0]))  # the recording hooks returned None and were removed
    assert not tiny_vit.blocks[0].mlp._forward_pre_hooks


def test_the_token_sample_does_not_depend_on_how_images_are_split(tiny_vit, digit_batches):
    """Each image's rows are drawn from its own seeded generator: streaming the images in other batches (as the
    ranks of a torchrun job do) or as IndexedBatch gives the same sample, in the same order."""
    x = torch.cat(digit_batches)  # 4 batches
    n = len(x)
    plain = collect_inputs(tiny_vit, ["blocks.1.mlp"], iter(digit_batches), 4, max_tokens=150, progress=False)
    odd = [IndexedBatch(np.arange(s, min(n, s + 7)), x[s:s + 7], n) for s in range(0, n, 7)]
    split = collect_inputs(tiny_vit, ["blocks.1.mlp"], iter(odd), len(odd), max_tokens=150, progress=False)
    assert torch.equal(plain["blocks.1.mlp"], split["blocks.1.mlp"])
    a_image, a_row = image_rows(np.array([5, 9]), 17, 3, seed=0)
    b_image, b_row = image_rows(np.array([9]), 17, 3, seed=0)
    assert list(a_image) == [0, 0, 0, 1, 1, 1] and list(a_row[3:]) == list(b_row)  # image 9's rows, either way


def test_kmeans_is_deterministic_for_a_seed():
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    a, b = kmeans(x, 16, seed=3, n_init=2), kmeans(x, 16, seed=3, n_init=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, kmeans(x, 16, seed=4, n_init=2))


def test_k_larger_than_tokens_is_refused():
    with pytest.raises(TmlpError, match="k = 50 expansion points but only 20 input tokens"):
        kmeans(torch.randn(20, 4), 50, seed=0, n_init=1)


def test_nan_activations_are_reported(tiny_vit, digit_batches):
    bad = digit_batches[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(TmlpError, match="NaN or Inf"):
        collect_inputs(tiny_vit, ["blocks.0.mlp"], iter([bad]), 1, max_tokens=100, progress=False)


def test_results_are_cached_by_their_inputs(tiny_vit, digit_batches):
    config = TaylorConfig(k=8, order=1, max_tokens=500)
    key = {"checkpoint": "abc", "dataset": "digits"}
    first = calibrate(tiny_vit, ["blocks.1.mlp"], lambda: iter(digit_batches), 4, config, key=key, progress=False)
    files = os.listdir(cache_path("calibration"))
    assert len(files) >= 1
    calls = []
    second = calibrate(tiny_vit, ["blocks.1.mlp"], lambda: calls.append(1) or iter(digit_batches), 4, config, key=key,
                       progress=False)
    assert not calls  # served from the cache: no data streamed
    assert torch.equal(first["blocks.1.mlp"].centres, second["blocks.1.mlp"].centres)
    calibrate(tiny_vit, ["blocks.1.mlp"], lambda: calls.append(1) or iter(digit_batches), 4,
              TaylorConfig(k=9, order=1, max_tokens=500), key=key, progress=False)
    assert calls  # another k: recomputed


def test_several_configs_share_two_passes_and_equal_separate_calibrations(trained_tiny_vit, digit_batches):
    """calibrate_many (the planner's k values): one collection and one least-squares pass for all, each result
    equal to calibrating that config alone."""
    from tmlp.calibration.calibrate import calibrate_many

    fqns = ["blocks.0.mlp", "blocks.3.mlp"]
    configs = [TaylorConfig(k=k, rank=8, max_tokens=600) for k in (4, 8)] + [TaylorConfig(k=6, rank=8, order=2,
                                                                                         max_tokens=600)]
    passes = []
    together = calibrate_many(trained_tiny_vit, fqns, lambda: passes.append(1) or iter(digit_batches), 4, configs,
                              progress=False)
    assert len(passes) == 2  # one collection (same max_tokens and seed), one least-squares fit
    for config, joint in zip(configs, together):
        alone = calibrate(trained_tiny_vit, fqns, lambda: iter(digit_batches), 4, config, progress=False)
        for fqn in fqns:
            assert torch.equal(joint[fqn].centres, alone[fqn].centres)
            assert torch.equal(joint[fqn].derivatives.s, alone[fqn].derivatives.s)
            assert torch.equal(joint[fqn].derivatives.value, alone[fqn].derivatives.value)
