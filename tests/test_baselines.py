"""The comparison compressors: exact at full size, smaller and close at partial size, exportable."""
import pytest
import torch
from timm.layers import Mlp
from torch import nn

from tmlp.baselines import low_rank_, low_rank_linear, prune_hidden_, rank_for_keep, tucker_conv, tucker_conv_
from tmlp.errors import TmlpError
from tmlp.models import create_model


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_pruning_at_full_keep_is_exact_and_half_keep_halves_the_hidden_layer(tiny_vit, digit_batches):
    x = digit_batches[0][:8]
    with torch.no_grad():
        want = tiny_vit(x)
    fqns = [f"blocks.{i}.mlp" for i in range(6)]
    record = prune_hidden_(tiny_vit, fqns, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(tiny_vit(x), want)
    hidden = record["blocks"]["blocks.0.mlp"]
    record = prune_hidden_(tiny_vit, fqns, 0.5)
    assert record["blocks"]["blocks.0.mlp"] == hidden // 2 and not record["skipped"]
    assert tiny_vit.blocks[0].mlp.fc1.out_features == tiny_vit.blocks[0].mlp.fc2.in_features == hidden // 2


def test_pruning_keeps_the_units_with_the_largest_score():
    torch.manual_seed(0)
    mlp = Mlp(8, 6, 8).eval()
    with torch.no_grad():
        mlp.fc2.weight[:, [1, 4]] *= 100  # units 1 and 4 matter most
    model = nn.Sequential(mlp)
    prune_hidden_(model, ["0"], 2 / 6)
    with torch.no_grad():
        kept = model[0].fc2.weight
        assert kept.abs().min() > 0
    assert model[0].fc1.out_features == 2


def test_gated_and_hidden_normalised_mlps_are_skipped_with_a_reason():
    from timm.layers import SwiGLU

    model = nn.ModuleDict({"glu": SwiGLU(8, 16), "normed": Mlp(8, 16, norm_layer=nn.LayerNorm)})
    record = prune_hidden_(model, ["glu", "normed"], 0.5)
    assert set(record["skipped"]) == {"glu", "normed"} and not record["blocks"]


def test_low_rank_matches_the_svd_and_is_exact_at_full_rank():
    torch.manual_seed(0)
    layer = nn.Linear(12, 20)
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(low_rank_linear(layer, 12)(x), layer(x), atol=1e-5, rtol=1e-5)
        s = torch.linalg.svdvals(layer.weight)
        approx = low_rank_linear(layer, 4)
        err = torch.linalg.matrix_norm(approx[1].weight @ approx[0].weight - layer.weight, 2)
    assert abs(err.item() - s[4].item()) < 1e-4  # Eckart–Young: the spectral error is the next singular value
    assert rank_for_keep(384, 1536, 0.25) == round(0.25 * 384 * 1536 / 1920)


def test_low_rank_keeps_the_share_of_multiply_adds(tiny_vit, digit_batches):
    before = _params(tiny_vit.blocks[0].mlp)
    record = low_rank_(tiny_vit, ["blocks.0.mlp"], 0.25)
    after = _params(tiny_vit.blocks[0].mlp)
    assert all(r is not None for r in record["blocks"]["blocks.0.mlp"])
    assert 0.2 < after / before < 0.32
    with torch.no_grad():
        assert torch.isfinite(tiny_vit(digit_batches[0][:4])).all()


def test_tucker_at_full_rank_is_exact_and_reduces_vgg_convolutions():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(tucker_conv(conv, 16, 8)(x), conv(x), atol=1e-5, rtol=1e-5)
    vgg = create_model("vgg16", {"img_size": 32, "hidden": 64, "num_classes": 10, "in_chans": 3}).eval()
    before = _params(vgg)
    record = tucker_conv_(vgg, 0.3, iterations=0)  # HOSVD alone: fast enough for CI
    assert len(record["layers"]) == 12  # 13 convolutions, the first left whole
    assert _params(vgg) < 0.5 * before
    with torch.no_grad():
        assert vgg(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5])
def test_keep_outside_0_1_is_refused(tiny_vit, keep):
    with pytest.raises(TmlpError, match="share of multiply-adds"):
        prune_hidden_(tiny_vit, ["blocks.0.mlp"], keep)
    with pytest.raises(TmlpError, match="share of multiply-adds"):
        low_rank_(tiny_vit, ["blocks.0.mlp"], keep)
