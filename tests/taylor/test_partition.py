"""Partitions of a block's input space (--partition, --partition-rank): nearest centre in x P, K-means there, export."""
import copy

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import torch
from timm.layers import Mlp
from torch import nn

from tmlp.calibration.calibrate import kmeans, shared_block
from tmlp.errors import TmlpError
from tmlp.export.onnx_export import export_onnx
from tmlp.taylor.partition import (assignment_tensors, centres_from_projected, hidden_factor, nearest_centre,
                            partition_projection, project, resolve_partition)
from tmlp.surgery import taylorize_
from tmlp.taylor import SharedTaylorMLP, TaylorConfig


def _random_projection(d: int, q: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, q, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("q", [3, 8])
def test_nearest_centre_in_a_projection_is_the_brute_force_argmin(q):
    torch.manual_seed(0)
    x, centres, proj = torch.randn(500, 8), torch.randn(20, 8), _random_projection(8, q)
    brute = ((((x[:, None, :] - centres[None]) @ proj) ** 2).sum(-1)).argmin(1)
    assert torch.equal(nearest_centre(x, centres, proj, chunk=64), brute)
    assert torch.equal(nearest_centre(x, centres), ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1))


def test_assignment_folds_a_square_projection_and_keeps_a_narrow_one():
    centres = torch.randn(5, 8)
    square, narrow = _random_projection(8, 8), _random_projection(8, 3)
    proj, weight, bias = assignment_tensors(centres, square)
    assert proj is None and torch.allclose(weight, centres @ square @ square.T, atol=1e-4)
    proj, weight, bias = assignment_tensors(centres, narrow)
    assert torch.equal(proj, narrow) and weight.shape == (5, 3)
    assert torch.allclose(bias, 0.5 * ((centres @ narrow) ** 2).sum(1), atol=1e-5)


def test_square_projection_maps_centres_back_exactly():
    rows, proj = torch.randn(50, 8), _random_projection(8, 8, seed=1)
    assert torch.allclose(centres_from_projected(project(rows[:5], proj), rows, proj), rows[:5], atol=1e-4)


def test_hidden_factor_gives_the_first_layers_distance():
    block = Mlp(12, 48)
    factor = hidden_factor(block, 12)
    w1 = block.fc1.weight.detach()
    assert torch.allclose(factor @ factor.T, w1.T @ w1, atol=1e-4)
    rows = torch.randn(100, 12)
    assert partition_projection(block, "input", rows) is None
    assert torch.equal(partition_projection(block, "hidden", rows), factor)


@pytest.mark.parametrize("block, expected", [
    (Mlp(12, 48), "hidden"),  # a transformer MLP: 4x wider first layer
    (Mlp(12, 6), "input"),  # narrower first layer (VGG-16's head, 25088 -> 4096): no Gram is formed
    (nn.Sequential(nn.GELU()), "input"),  # no first Linear layer at all
])
def test_auto_partition_is_hidden_wherever_the_block_allows_it(block, expected):
    assert resolve_partition(block, "auto", 12) == expected
    assert resolve_partition(block, "input", 12) == "input"
    rows = torch.randn(40, 12)
    auto = partition_projection(block, "auto", rows)
    if expected == "hidden":
        assert torch.equal(auto, hidden_factor(block, 12))
    else:
        assert auto is None


def test_partition_rank_keeps_the_leading_principal_directions():
    torch.manual_seed(0)
    rows = torch.randn(2000, 10) * torch.tensor([5.0, 4.0, 3.0] + [0.1] * 7)  # three strong directions
    proj = partition_projection(Mlp(10, 40), "input", rows, rank=3)
    assert proj.shape == (10, 3)
    assert torch.allclose(proj.T @ proj, torch.eye(3), atol=1e-5)  # orthonormal
    assert float(proj[3:].abs().max()) < 0.05  # spans the first three axes
    assert partition_projection(Mlp(10, 40), "input", rows, rank=10) is None  # q = d: all of them
    hidden = partition_projection(Mlp(10, 40), "hidden", rows, rank=4)
    assert hidden.shape == (10, 4)


@pytest.mark.parametrize("block, partition, rank, match", [
    (nn.Sequential(nn.GELU()), "hidden", None, "first layer is a Linear"),
    (Mlp(12, 6), "hidden", None, "keep all 12 input directions"),  # W1 [6, 12]: a 6-dim hidden space can't separate
    (Mlp(12, 48), "voronoi", None, "partition must be one of"),
    (Mlp(12, 48), "input", 0, "--partition-rank must be >= 1"),
])
def test_unusable_partitions_are_refused_with_the_fix(block, partition, rank, match):
    with pytest.raises(TmlpError, match=match):
        partition_projection(block, partition, torch.randn(30, 12), rank)


def test_config_checks_the_partition_and_refuses_configs_without_it():
    with pytest.raises(TmlpError, match="partition must be one of"):
        TaylorConfig(partition="voronoi")
    with pytest.raises(TmlpError, match="--partition-rank must be a positive integer"):
        TaylorConfig(partition_rank=0)
    old = TaylorConfig(k=7).to_dict()
    del old["_data"]["partition"], old["_data"]["partition_rank"]
    with pytest.raises(TmlpError, match=r"partition', 'partition_rank'\] missing or unknown"):
        TaylorConfig.from_dict(old)
    new = TaylorConfig.from_dict(TaylorConfig(partition="hidden", partition_rank=16).to_dict())
    assert (new.partition, new.partition_rank) == ("hidden", 16)


@pytest.mark.parametrize("rank", [None, 4])
def test_partition_centres_are_the_means_of_their_cells(rank):
    """K-means in the partition's coordinates, mapped back to input space: each centre is (up to K-means' stopping
    tolerance) the mean of the input rows its cell serves, i.e. a proper expansion point in input space."""
    torch.manual_seed(0)
    block = Mlp(12, 48)
    rows = torch.randn(3000, 12)
    proj = partition_projection(block, "hidden", rows, rank)
    centres = centres_from_projected(kmeans(project(rows, proj), 10, seed=0, n_init=1), rows, proj)
    cell = nearest_centre(rows, centres, proj)
    means = torch.stack([rows[cell == i].mean(0) for i in range(10)])
    assert float((means - centres).norm(dim=1).max()) < 0.02 * float(rows.std(0).norm())
    # ...and not those of the Euclidean cells
    euclid = nearest_centre(rows, centres)
    assert float((euclid != cell).float().mean()) > 0.05


@pytest.mark.parametrize("rank", [None, 3])
def test_shared_block_assigns_through_the_projection(rank):
    torch.manual_seed(0)
    block = Mlp(12, 48).eval()
    rows = torch.randn(2000, 12)
    proj = partition_projection(block, "hidden", rows, rank)
    centres = centres_from_projected(kmeans(project(rows, proj), 6, seed=0, n_init=1), rows, proj)
    derivs = shared_block(block, rows, centres, TaylorConfig(k=6, basis="shared", rank=5), projection=proj)
    taylor = SharedTaylorMLP(centres, derivs, 1, proj)
    assert torch.equal(taylor.assign(rows), nearest_centre(rows, centres, proj))
    assert hasattr(taylor, "assign_projection") == (rank is not None)


@pytest.mark.parametrize("partition, rank", [("hidden", None), ("hidden", 4), ("input", 4)])
def test_partition_calibrates_and_exports_with_parity(trained_tiny_vit, digit_batches, tmp_path, partition, rank):
    fqns = ["blocks.1.mlp", "blocks.4.mlp"]
    model = copy.deepcopy(trained_tiny_vit)
    config = TaylorConfig(k=8, basis="shared", rank=16, fit="lstsq", partition=partition, partition_rank=rank)
    calibration = taylorize_(model, config, layers=fqns, batches=lambda: iter(digit_batches),
                             n_batches=len(digit_batches), progress=False)
    d_in = calibration[fqns[0]].centres.shape[1]
    assert all(calibration[f].projection.shape == (d_in, rank or d_in) for f in fqns)
    x = digit_batches[0]
    path = str(tmp_path / "partition.onnx")
    export_onnx(model, x[:2], path, {})
    graph = onnx.load(path).graph
    values = [onnx.numpy_helper.to_array(i) for i in graph.initializer]
    for fqn in fqns:  # the distances use C P (or C P Pᵀ), exported transposed, not the centres themselves
        block = model.get_submodule(fqn)
        for name in ("assign_weight",) + (("assign_projection",) if rank else ()):
            value = getattr(block, name).numpy()
            value = value.T if name == "assign_weight" else value
            assert any(v.shape == value.shape and np.allclose(v, value) for v in values), (fqn, name)
    ops = [n.op_type for n in graph.node]
    assert ops.count("ArgMin") == 2
    if rank:  # x P first: no [d_in, k] distance weight is left
        assert not any(v.shape == (d_in, config.k) for v in values)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=2e-4, rtol=1e-3)
