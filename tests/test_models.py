"""The model registry: every registered model builds, runs, finds its MLP blocks and round-trips a checkpoint."""
import hashlib

import pytest
import torch

from tmlp.models import MODELS, create_model, input_size, load_checkpoint, resolve_config, save_checkpoint
from tmlp.surgery import select_blocks

# Small overrides so that each model builds in well under a second; blocks each default filter must find.
SMALL = {"deit_small": ({"img_size": 32, "patch_size": 8}, 12), "deit_tiny": ({"img_size": 32, "patch_size": 8}, 12),
         "vgg16": ({"hidden": 64}, 1)}
# and a plain timm name, passed through to timm.create_model
SMALL["test_vit"] = ({"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10}, 6)


def test_every_registered_model_has_a_small_config_here():
    assert sorted(MODELS) == sorted(set(SMALL) - {"test_vit"}), "add the new model to SMALL"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_builds_runs_and_finds_its_blocks(name):
    overrides, n_blocks = SMALL[name]
    config = resolve_config(name, **overrides)
    torch.manual_seed(0)
    model = create_model(name, config).eval()
    chans, h, w = input_size(name, config)
    with torch.no_grad():
        out = model(torch.randn(2, chans, h, w))
    assert out.shape == (2, config["num_classes"])
    assert len(select_blocks(model)) == n_blocks


@pytest.mark.parametrize("name", sorted(SMALL))
def test_checkpoint_round_trips_with_reproducible_bytes(name, tmp_path):
    overrides, _ = SMALL[name]
    config = resolve_config(name, **overrides)
    torch.manual_seed(0)
    model = create_model(name, config).eval()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_checkpoint(a, model, name, config, {"dataset": "digits"})
    save_checkpoint(b, model, name, config, {"dataset": "digits"})
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert digest[0] == digest[1]  # the same model gives the same file (no temporary names inside)
    loaded, payload = load_checkpoint(a, expect_model=name)
    assert payload["dataset"] == "digits" and not list(tmp_path.glob(".*"))
    x = torch.randn(2, *input_size(name, config))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_large_checkpoint_is_split_into_shards_under_the_file_limit(tmp_path):
    """A checkpoint over ``max_file_mb`` keeps part of its weights in <stem>.part<i>.pt files (for a repository's
    file-size limit); loading merges them back, and a missing or foreign shard is a one-line error."""
    from tmlp.errors import TmlpError

    config = resolve_config("vgg16", hidden=512)  # ~16 MB of fp16 weights
    torch.manual_seed(0)
    model = create_model("vgg16", config).eval()
    path = tmp_path / "vgg16_cifar10_fp16.pt"
    save_checkpoint(path, model, "vgg16", config, half=True, max_file_mb=6)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0] == "vgg16_cifar10_fp16.part1.pt" and len(files) >= 3
    assert max(p.stat().st_size for p in tmp_path.iterdir()) < 6e6
    loaded, payload = load_checkpoint(path, expect_model="vgg16")
    assert "shards" not in payload
    x = torch.randn(2, *input_size("vgg16", config))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.half().float()(x), atol=1e-4)
    shard = tmp_path / "vgg16_cifar10_fp16.part1.pt"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(TmlpError, match="sha256 differs"):
        load_checkpoint(path)
    shard.unlink()
    with pytest.raises(TmlpError, match="is missing; copy it next to the checkpoint"):
        load_checkpoint(path)


def test_batch_norm_folding_keeps_the_vgg_function_and_removes_every_batch_norm():
    """VGG-16 in eval mode with trained-looking batch-norm statistics: folded into the convolutions, the outputs
    agree to float rounding and no BatchNorm2d is left (the exported graph has no BatchNormalization)."""
    from tmlp.surgery import fold_batch_norm_

    torch.manual_seed(0)
    vgg = create_model("vgg16", {"num_classes": 10, "hidden": 64}).eval()
    for m in vgg.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = vgg(x)
    assert fold_batch_norm_(vgg) == 13
    with torch.no_grad():
        out = vgg(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules())
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert fold_batch_norm_(vgg) == 0


def test_init_at_another_resolution_resamples_the_position_embeddings(tmp_path):
    from tmlp.errors import TmlpError
    from tmlp.train import load_initial_weights

    torch.manual_seed(0)
    small = create_model("test_vit", {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10})
    path = str(tmp_path / "small.pt")
    save_checkpoint(path, small, "test_vit", {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10})
    config = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10}  # 4x4 -> 7x7 patches
    large = create_model("test_vit", config)
    load_initial_weights(large, path, "test_vit", config)
    assert large.pos_embed.shape[1] == 1 + 49
    torch.testing.assert_close(large.pos_embed[:, 0], small.pos_embed[:, 0])  # the class token's entry is kept
    torch.testing.assert_close(large.patch_embed.proj.weight, small.patch_embed.proj.weight)
    assert torch.isfinite(large(torch.randn(2, 1, 28, 28))).all()
    same = create_model("test_vit", {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10})
    load_initial_weights(same, path, "test_vit", {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10})
    torch.testing.assert_close(same.pos_embed, small.pos_embed)
    with pytest.raises(TmlpError, match="holds a test_vit"):  # another patch size is another model
        load_initial_weights(create_model("test_vit", {**config, "patch_size": 7}), path, "test_vit",
                             {**config, "patch_size": 7})
