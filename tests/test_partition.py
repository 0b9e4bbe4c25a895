"""Partitions of a block's input space (--partition): metric nearest centre, K-means in the metric, export."""
import copy

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import torch
from timm.layers import Mlp
from torch import nn

from tmlp.calibrate import kmeans, shared_block
from tmlp.errors import TmlpError
from tmlp.export.onnx_export import export_onnx
from tmlp.partition import from_metric_space, nearest_centre, partition_metric, to_metric_space
from tmlp.surgery import taylorize_
from tmlp.taylor import SharedTaylorMLP, TaylorConfig


def _random_metric(d: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(3 * d, d, generator=torch.Generator().manual_seed(seed))
    return a.T @ a


def test_metric_nearest_centre_is_the_brute_force_argmin():
    torch.manual_seed(0)
    x, centres, metric = torch.randn(500, 8), torch.randn(20, 8), _random_metric(8)
    diff = (x[:, None, :] - centres[None]).double()
    brute = torch.einsum("nki,ij,nkj->nk", diff, metric.double(), diff).argmin(1)
    assert torch.equal(nearest_centre(x, centres, metric, chunk=64), brute)
    assert torch.equal(nearest_centre(x, centres), ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1))


def test_metric_space_maps_back_exactly():
    rows, metric = torch.randn(50, 8), _random_metric(8, seed=1)
    mapped = to_metric_space(rows, metric)
    assert torch.allclose(from_metric_space(mapped, metric), rows, atol=1e-4)
    diff = rows[:1] - rows[1:2]  # Euclidean distance there = M-distance here
    assert torch.allclose((mapped[0] - mapped[1]).norm() ** 2, (diff @ metric @ diff.T).squeeze(), rtol=1e-4)


def test_hidden_metric_is_the_first_layers_gram():
    block = Mlp(12, 48)
    metric = partition_metric(block, "hidden", 12)
    w1 = block.fc1.weight.detach()
    assert torch.allclose(metric, w1.T @ w1, atol=1e-5)
    assert partition_metric(block, "input", 12) is None


@pytest.mark.parametrize("block, partition, match", [
    (nn.Sequential(nn.GELU()), "hidden", "first layer is a Linear"),
    (Mlp(12, 6), "hidden", "keep all 12 input directions"),  # W1 [6, 12]: a 6-dim hidden space can't separate
    (Mlp(12, 48), "voronoi", "partition must be one of"),
])
def test_unusable_partitions_are_refused_with_the_fix(block, partition, match):
    with pytest.raises(TmlpError, match=match):
        partition_metric(block, partition, 12)


def test_config_checks_the_partition_and_reads_configs_written_before_it():
    with pytest.raises(TmlpError, match="partition must be one of"):
        TaylorConfig(partition="voronoi")
    old = TaylorConfig(k=7).to_dict()
    del old["_data"]["partition"]
    assert TaylorConfig.from_dict(old).partition == "input"
    assert TaylorConfig.from_dict(TaylorConfig(partition="hidden").to_dict()).partition == "hidden"


def test_hidden_partition_centres_are_the_means_of_their_cells():
    """K-means in W₁x, mapped back to input space: each centre is (up to K-means' stopping tolerance) the mean of
    the input rows its metric cell serves, i.e. a proper expansion point in input space."""
    torch.manual_seed(0)
    block = Mlp(12, 48)
    rows = torch.randn(3000, 12)
    metric = partition_metric(block, "hidden", 12)
    centres = from_metric_space(kmeans(to_metric_space(rows, metric), 10, seed=0, n_init=1), metric)
    cell = nearest_centre(rows, centres, metric)
    means = torch.stack([rows[cell == i].mean(0) for i in range(10)])
    assert float((means - centres).norm(dim=1).max()) < 0.02 * float(rows.std(0).norm())
    # ...and not those of the Euclidean cells
    euclid = nearest_centre(rows, centres)
    assert float((euclid != cell).float().mean()) > 0.05


def test_shared_block_in_a_metric_assigns_through_the_metric():
    torch.manual_seed(0)
    block = Mlp(12, 48).eval()
    rows = torch.randn(2000, 12)
    metric = partition_metric(block, "hidden", 12)
    centres = from_metric_space(kmeans(to_metric_space(rows, metric), 6, seed=0, n_init=1), metric)
    derivs = shared_block(block, rows, centres, TaylorConfig(k=6, basis="shared", rank=5), metric=metric)
    taylor = SharedTaylorMLP(centres, derivs, 1, metric)
    assert torch.equal(taylor.assign(rows), nearest_centre(rows, centres, metric))


def test_hidden_partition_calibrates_and_exports_with_parity(trained_tiny_vit, digit_batches, tmp_path):
    fqns = ["blocks.1.mlp", "blocks.4.mlp"]
    model = copy.deepcopy(trained_tiny_vit)
    config = TaylorConfig(k=8, basis="shared", rank=16, fit="lstsq", partition="hidden")
    calibration = taylorize_(model, config, layers=fqns, batches=lambda: iter(digit_batches),
                             n_batches=len(digit_batches), progress=False)
    assert all(calibration[f].metric is not None for f in fqns)
    x = digit_batches[0]
    path = str(tmp_path / "hidden.onnx")
    export_onnx(model, x[:2], path, {})
    graph = onnx.load(path).graph
    values = [onnx.numpy_helper.to_array(i) for i in graph.initializer]
    for fqn in fqns:  # the distances use C M (exported transposed), not the centres themselves
        weight_t = model.get_submodule(fqn).assign_weight.T.numpy()
        assert any(v.shape == weight_t.shape and np.allclose(v, weight_t) for v in values), fqn
    assert [n.op_type for n in graph.node].count("ArgMin") == 2
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=2e-4, rtol=1e-3)
