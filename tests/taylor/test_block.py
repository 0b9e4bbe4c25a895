"""The Taylor block: exactness on affine blocks, nearest-centre assignment, configs and model surgery."""
import numpy as np
import pytest
import torch
from torch import nn

from tmlp.calibration.calibrate import BlockCalibration, nearest_centre_bruteforce
from tmlp.taylor.derivatives import block_derivatives
from tmlp.errors import TmlpError
from tmlp.surgery import select_blocks, taylorize_
from tmlp.taylor import SharedTaylorMLP, TaylorConfig, TaylorMLP


def test_order1_is_exact_on_a_linear_block():
    torch.manual_seed(0)
    block = nn.Linear(10, 7).eval()
    centres = torch.randn(5, 10)
    taylor = TaylorMLP(centres, block_derivatives(block, centres, 1), order=1)
    x = 3 * torch.randn(200, 10)
    with torch.no_grad():
        assert torch.allclose(taylor(x), block(x), atol=1e-5)


def test_order2_is_exact_on_a_separable_quadratic():
    class Quadratic(nn.Module):  # y_o = sum_j A[o, j] x_j^2 + B x: diagonal Hessian, exact at second order
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.randn(4, 6)), nn.Linear(6, 4)

        def forward(self, x):
            return (x * x) @ self.a.T + self.b(x)

    torch.manual_seed(1)
    block = Quadratic().eval()
    centres = torch.randn(3, 6)
    x = torch.randn(50, 6)
    second = TaylorMLP(centres, block_derivatives(block, centres, 2), order=2)
    first = TaylorMLP(centres, block_derivatives(block, centres, 1), order=1)
    with torch.no_grad():
        assert torch.allclose(second(x), block(x), atol=1e-4)
        assert (first(x) - block(x)).abs().max() > 0.1


def test_assignment_is_the_true_nearest_centre():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(50, 16, generator=g)
    x = torch.randn(1000, 16, generator=g) * 2
    taylor = TaylorMLP(centres, block_derivatives(nn.Linear(16, 4), centres, 0), order=0)
    assert np.array_equal(taylor.assign(x).numpy(), nearest_centre_bruteforce(x.numpy(), centres.numpy()))


def test_order0_returns_the_value_at_the_nearest_centre():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)).eval()
    centres = torch.randn(6, 8)
    taylor = TaylorMLP(centres, block_derivatives(block, centres, 0), order=0)
    with torch.no_grad():
        assert torch.allclose(taylor(centres + 1e-4), block(centres), atol=1e-6)


def test_keeps_leading_dimensions():
    centres = torch.randn(4, 8)
    taylor = TaylorMLP(centres, block_derivatives(nn.Linear(8, 5), centres, 1), order=1)
    assert taylor(torch.randn(2, 9, 8)).shape == (2, 9, 5)


@pytest.mark.parametrize("kwargs, message", [({"k": 0}, "positive integer"), ({"k": -3}, "positive integer"),
                                             ({"order": 3}, "0, 1 or 2"), ({"hessian": "dense"}, "hessian must be one of")])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(TmlpError, match=message):
        TaylorConfig(**kwargs)


def test_config_round_trips_and_refuses_other_versions():
    cfg = TaylorConfig(k=7, order=2)
    assert TaylorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TmlpError, match="calibrate again"):
        TaylorConfig.from_dict({**cfg.to_dict(), "_version": 99})


@pytest.mark.parametrize("config, kind", [(TaylorConfig(k=32), SharedTaylorMLP),
                                          (TaylorConfig(k=32, basis="dense", partition_rank=None), TaylorMLP)])
def test_taylorize_replaces_every_vit_mlp_and_keeps_outputs_close(tiny_vit, digit_batches, config, kind):
    """The default config (the CLI's: shared basis, least-squares fit) and the dense reference form."""
    reference = [tiny_vit(x) for x in digit_batches]
    cal = taylorize_(tiny_vit, config, batches=lambda: iter(digit_batches), n_batches=len(digit_batches),
                     progress=False)
    assert sorted(cal) == [f"blocks.{i}.mlp" for i in range(6)]
    assert all(isinstance(tiny_vit.blocks[i].mlp, kind) for i in range(6))
    with torch.no_grad():
        out = torch.cat([tiny_vit(x) for x in digit_batches])
    ref = torch.cat(reference).detach()
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert sqnr > 15, f"SQNR {sqnr:.1f} dB"  # a random-init ViT's MLPs are near-linear: first order is close


def test_taylorize_with_filter_and_per_block_configs(tiny_vit, digit_batches):
    config = {"blocks.0.mlp": TaylorConfig(k=4, order=0, basis="dense"), "_default": TaylorConfig(k=8, order=1)}
    taylorize_(tiny_vit, config, filter_fn=lambda m, fqn: fqn in ("blocks.0.mlp", "blocks.5.mlp"),
               batches=lambda: iter(digit_batches), n_batches=4, progress=False)
    assert tiny_vit.blocks[0].mlp.k == 4 and tiny_vit.blocks[0].mlp.order == 0
    assert tiny_vit.blocks[5].mlp.k == 8 and not isinstance(tiny_vit.blocks[3].mlp, TaylorMLP)


def test_unknown_layer_is_a_clear_error(tiny_vit):
    with pytest.raises(TmlpError, match="no block 'blocks.9.mlp'"):
        select_blocks(tiny_vit, layers=["blocks.9.mlp"])


def test_missing_calibration_is_a_clear_error(tiny_vit):
    with pytest.raises(TmlpError, match="needs calibration data"):
        taylorize_(tiny_vit, TaylorConfig(k=4))
    with pytest.raises(TmlpError, match="no calibration for block"):
        taylorize_(tiny_vit, TaylorConfig(k=4), calibration={"blocks.0.mlp": BlockCalibration(
            "blocks.0.mlp", torch.zeros(4, 64), block_derivatives(tiny_vit.blocks[0].mlp, torch.zeros(4, 64), 1), 4)})
