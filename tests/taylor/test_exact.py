"""Exact hidden units beside a Taylor block (``--exact-units``): scores, calibration on F − E, the hybrid's error,
ONNX parity and op types, cost, refusals."""
import numpy as np
import pytest
import torch
from timm.layers import Mlp
from torch import nn

from tmlp.calibration.calibrate import calibrate, centres_and_tensors, kmeans
from tmlp.errors import TmlpError
from tmlp.export.onnx_export import export_onnx, op_counts, parity
from tmlp.export.quantize import quantize_int8_dynamic
from tmlp.plan import BlockOption, block_macs, option_macs
from tmlp.surgery import taylorize_
from tmlp.taylor import SharedTaylorMLP, TaylorConfig, nearest_centre
from tmlp.taylor.exact import (ExactUnits, HybridTaylorMLP, WithoutUnits, choose_units, float_scopes, mlp_layers,
                               unit_scores)


def _block(d=16, h=48, seed=0) -> Mlp:
    torch.manual_seed(seed)
    return Mlp(d, h).eval()


def test_a_unit_that_stays_linear_scores_nothing_and_one_that_bends_scores():
    block = _block(d=4, h=2)
    with torch.no_grad():
        block.fc1.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        block.fc1.bias.copy_(torch.tensor([50.0, 0.0]))  # unit 0: pre-activation ~50, GELU is the identity there
    rows = torch.randn(3000, 4)
    scores = unit_scores(block, rows, torch.zeros(3000, dtype=torch.long), 1)
    assert scores[0] < 1e-9 < 1e-3 < scores[1]
    assert choose_units(block, rows, torch.zeros(3000, dtype=torch.long), 1, 1).tolist() == [1]


def test_the_exact_units_and_the_rest_add_up_to_the_block():
    block = _block()
    exact = ExactUnits(block, torch.tensor([3, 7, 11]))
    x = torch.randn(100, 16)
    with torch.no_grad():
        assert torch.allclose(WithoutUnits(block, exact)(x) + exact(x), block(x), atol=1e-5)
        assert torch.allclose(ExactUnits(block, torch.arange(48))(x) + block.fc2.bias, block(x), atol=1e-5)


def test_exact_units_lower_the_held_out_error_and_all_units_make_the_block_exact():
    block, rows, test = _block(), torch.randn(4000, 16) * 1.5, torch.randn(1000, 16) * 1.5
    with torch.no_grad():
        ref = block(test)
    errors = {}
    for m in (0, 16, 48):
        cal = centres_and_tensors(block, "mlp", rows, TaylorConfig(k=8, rank=16, partition_rank=None,
                                                                    exact_units=m))
        assert (cal.units is None) == (m == 0) and (m == 0 or len(cal.units) == m)
        built = cal.build(1, block)
        assert isinstance(built, HybridTaylorMLP if m else SharedTaylorMLP)
        with torch.no_grad():
            errors[m] = float((built(test) - ref).norm() / ref.norm())
    assert errors[16] < 0.8 * errors[0] and errors[48] < 1e-4, errors


def test_calibrate_and_taylorize_keep_the_units_and_fit_the_rest(trained_tiny_vit, digit_batches):
    model = trained_tiny_vit
    config = TaylorConfig(k=8, rank=8, exact_units=32)
    cal = calibrate(model, ["blocks.1.mlp"], lambda: iter(digit_batches), len(digit_batches), config, progress=False)
    units = cal["blocks.1.mlp"].units
    assert units is not None and len(units) == 32 and bool((units[1:] > units[:-1]).all())
    original = model.blocks[1].mlp
    taylorize_(model, config, calibration=cal, layers=["blocks.1.mlp"])
    hybrid = model.blocks[1].mlp
    assert isinstance(hybrid, HybridTaylorMLP) and hybrid.exact.m == 32
    x = torch.randn(50, original.fc1.in_features)
    with torch.no_grad():
        assert torch.allclose(hybrid.exact(x), ExactUnits(original, units)(x))
    assert "32 exact hidden units" in config.describe()


def test_the_hybrid_block_exports_with_parity_and_its_units_as_matmuls(tmp_path):
    block, rows = _block(), torch.randn(3000, 16) * 1.5
    cal = centres_and_tensors(block, "mlp", rows, TaylorConfig(k=8, rank=8, exact_units=12))
    model = nn.Sequential(nn.Linear(16, 16), cal.build(1, block)).eval()
    path = str(tmp_path / "hybrid.onnx")
    ops = export_onnx(model, torch.randn(2, 16), path, {})
    # one ArgMin and two Gathers for the Taylor block; the exact units: two more MatMuls and the GELU
    assert ops["ArgMin"] == 1 and ops["Gather"] == 2 and ops["MatMul"] >= 5
    assert ops.get("Gelu", 0) + ops.get("Erf", 0) == 1, dict(ops)
    result = parity(path, model, torch.randn(64, 16))
    assert result.max_abs < 1e-4
    # int8 of the rest of the model: the Taylor part stays float, the exact units' weights turn int8
    excluded = quantize_int8_dynamic(path, str(tmp_path / "hybrid.int8.onnx"), op_types=["MatMul", "Gemm"],
                                     exclude_scopes=float_scopes({"1": 12}))
    int8 = op_counts(str(tmp_path / "hybrid.int8.onnx"))
    # the first Linear and the units' two MatMuls in int8; the Taylor part's four MatMuls (assignment, V, S_c, Uᵀ) float
    assert excluded and (int8["MatMulInteger"], int8["MatMul"], int8["ArgMin"]) == (3, 4, 1), dict(int8)
    assert float_scopes({"blocks.1.mlp": 0, "blocks.2.mlp": 64}) == ["blocks.1.mlp", "blocks.2.mlp.taylor"]


def test_the_plan_costs_the_exact_units():
    block, rows = _block(), torch.randn(2000, 16)
    cal = centres_and_tensors(block, "mlp", rows, TaylorConfig(k=8, rank=8, partition_rank=None, exact_units=10))
    option = BlockOption(k=8, rank=8)
    plain = option_macs(option, 16, 16, 1)
    assert block_macs(cal.build(1, block), option, 16, 16, 1) == plain + 10 * (16 + 16)
    assert block_macs(cal.build(1, block).taylor, option, 16, 16, 1) == plain


def test_exact_units_are_refused_where_they_cannot_be():
    rows = torch.randn(500, 16)
    cells = nearest_centre(rows, kmeans(rows, 4, seed=0, n_init=1), None)
    with pytest.raises(TmlpError, match="between 0 and the block's 48 hidden units, got 49"):
        choose_units(_block(), rows, cells, 4, 49)
    with pytest.raises(TmlpError, match="--exact-units needs a Linear-activation-Linear MLP"):
        mlp_layers(nn.Conv2d(16, 16, 1))
    with pytest.raises(TmlpError, match="--exact-units must be an integer >= 0"):
        TaylorConfig(exact_units=-1)
    assert [type(m) for m in mlp_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 4)))] \
        == [nn.Linear, nn.ReLU, nn.Linear]
    assert np.isclose(TaylorConfig.from_dict(TaylorConfig(exact_units=5).to_dict()).exact_units, 5)
