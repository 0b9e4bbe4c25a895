"""tmlp.blocks: MLP blocks found by type, their channel axis, the rows they map, and the blocks that are skipped."""
import pytest
import torch
from torch import nn

from tmlp.blocks import as_rows, channel_dim, is_mlp_block, rows_of, unsupported_reason
from tmlp.errors import TmlpError
from tmlp.export.chunking import RowChunks
from tmlp.surgery import candidate_blocks, select_blocks, skipped_blocks
from tmlp.taylor import TaylorMLP, block_derivatives


def test_family_members_are_found_whatever_their_name():
    from timm.layers import ConvMlp, GluMlp, Mlp, SwiGLU

    model = nn.Sequential()
    model.add_module("ffn", Mlp(8, 16))
    model.add_module("gated", nn.Sequential(GluMlp(8, 16), SwiGLU(8, 16)))
    model.add_module("conv", ConvMlp(8, 16))
    model.add_module("plain", nn.Linear(8, 8))
    assert candidate_blocks(model) == ["ffn", "gated.0", "gated.1", "conv"]
    assert not is_mlp_block(model.plain)
    assert [channel_dim(model.get_submodule(f)) for f in candidate_blocks(model)] == [-1, -1, -1, 1]


def test_blocks_that_mix_positions_are_skipped_with_a_reason():
    from timm.layers import GatedMlp, Mlp
    from timm.models.mlp_mixer import SpatialGatingUnit

    model = nn.Sequential()
    model.add_module("ok", Mlp(8, 16))
    model.add_module("gmlp", GatedMlp(8, 16, gate_layer=lambda h, **kw: SpatialGatingUnit(h, seq_len=4, **kw)))
    conv = Mlp(8, 16, use_conv=True)
    conv.fc1 = nn.Conv2d(8, 16, 3, padding=1)
    model.add_module("spatial", conv)
    assert select_blocks(model) == ["ok"]
    reasons = skipped_blocks(model)
    assert "SpatialGatingUnit" in reasons["gmlp"] and "kernel 3x3" in reasons["spatial"]
    assert unsupported_reason(model.ok) is None
    with pytest.raises(TmlpError, match="cannot be replaced: its convolution fc1"):
        select_blocks(model, layers=["spatial"])


def test_channels_first_taylor_block_is_the_rows_block_on_every_position():
    from timm.layers import ConvMlp

    torch.manual_seed(0)
    block = ConvMlp(6, 12).eval()
    x = torch.randn(2, 6, 5, 3)
    rows = rows_of(x, 1)
    assert rows.shape == (30, 6) and torch.allclose(as_rows(block)(rows), rows_of(block(x), 1), atol=1e-6)
    centres = rows[:4]
    taylor = TaylorMLP(centres, block_derivatives(as_rows(block), centres, 1), 1, channel_dim=1)
    y = taylor(x)
    assert y.shape == (2, 6, 5, 3)
    assert torch.allclose(rows_of(y, 1), taylor(rows), atol=1e-6)  # rows in, rows out: the same numbers
    assert torch.allclose(RowChunks(taylor, 3)(x), y, atol=1e-6)
    with pytest.raises(TmlpError, match="channel_dim must be -1"):
        TaylorMLP(centres, block_derivatives(as_rows(block), centres, 1), 1, channel_dim=2)


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, lambda: nn.GELU(approximate="tanh"), lambda: nn.ReLU(inplace=True)])
def test_closed_form_derivatives_for_other_activations_match_torch_func(act):
    from timm.layers import Mlp

    from tmlp.taylor.derivatives import func_derivatives, is_closed_form_mlp, mlp_derivatives

    torch.manual_seed(0)
    block = Mlp(8, 16, act_layer=act).eval()
    centres = torch.randn(5, 8)
    assert is_closed_form_mlp(block)
    closed, generic = mlp_derivatives(block, centres, 2), func_derivatives(block, centres, 2)
    assert torch.allclose(closed.jacobian, generic.jacobian, atol=1e-5)
    assert torch.allclose(closed.hessian_diag, generic.hessian_diag, atol=1e-5)
