"""Every timm family with MLP blocks, at a tiny size with random weights: its blocks are found by type, replaced,
exported, checked, and onnxruntime agrees with PyTorch; runtime/run.py runs the model."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tmlp.blocks import block_table, channel_dim
from tmlp.export.onnx_export import export_onnx, op_counts
from tmlp.surgery import select_blocks, skipped_blocks, taylorize_
from tmlp.taylor import SharedTaylorMLP, TaylorConfig

RUN_PY = os.path.join(os.path.dirname(__file__), "..", "runtime", "run.py")


def _timm(name, **kwargs):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return build


def _mixer(**kwargs):
    def build():
        from timm.models.mlp_mixer import MlpMixer

        return MlpMixer(num_classes=10, img_size=32, patch_size=8, embed_dim=32, num_blocks=2, **kwargs)
    return build


def _poolformer():
    from timm.models.metaformer import GroupNorm1, MetaFormer

    return MetaFormer(num_classes=10, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), mlp_act=nn.GELU,
                      norm_layers=GroupNorm1, use_mlp_head=False, downsample_norm=None)


def _resmlp():
    from timm.models.mlp_mixer import Affine, ResBlock

    return _mixer(block_layer=ResBlock, norm_layer=Affine, mlp_ratio=4)()


VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
# family: (builder, input side, blocks found, of them channels-first, the MLP class)
FAMILIES = {
    "vit": (_timm("vit_tiny_patch16_224", **VIT), 32, 2, 0, "Mlp"),
    "deit": (_timm("deit_tiny_patch16_224", **VIT), 32, 2, 0, "Mlp"),
    "swin": (_timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=2, embed_dim=16,
                   depths=(1, 1), num_heads=(1, 2)), 32, 2, 0, "Mlp"),
    "convnext": (_timm("convnext_atto", dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), 64, 4, 4, "Mlp"),
    "mlp_mixer": (_mixer(), 32, 4, 0, "Mlp"),  # token mixing (transposed) and channel MLPs
    "resmlp": (_resmlp, 32, 2, 0, "Mlp"),
    "poolformer": (_poolformer, 32, 4, 4, "Mlp"),
    "mobilevit": (_timm("mobilevit_xxs"), 64, 9, 0, "Mlp"),
    "efficientformer": (_timm("efficientformer_l1", embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 2), num_vit=1),
                        224, 5, 4, "ConvMlpWithNorm"),
    "cait": (_timm("cait_xxs24_224", depth_token_only=1, **VIT), 32, 3, 0, "Mlp"),
    "eva": (_timm("eva02_tiny_patch14_224", img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2), 28, 2,
            0, "GluMlp"),
}
CONFIG = TaylorConfig(k=4, rank=4, partition_rank=4)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_found_replaced_exported_and_matches_onnxruntime(family, run_folder):
    build, side, n_blocks, n_channels_first, kind = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    fqns = select_blocks(model)
    assert len(fqns) == n_blocks and not skipped_blocks(model)
    assert sum(channel_dim(model.get_submodule(f)) == 1 for f in fqns) == n_channels_first
    infos, total = block_table(model, torch.zeros(1, 3, side, side), fqns)
    assert kind in {i.kind for i in infos} and 0 < sum(i.share for i in infos) < 1 and total > 0

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 3, side, side, generator=gen) for _ in range(2)]
    x = torch.randn(4, 3, side, side, generator=gen)
    taylorize_(model, CONFIG, batches=lambda: iter(batches), n_batches=2, progress=False)
    assert sum(isinstance(m, SharedTaylorMLP) for m in model.modules()) == n_blocks

    path = str(run_folder / f"{family}.onnx")
    ops = export_onnx(model, x[:1], path, {"tmlp.family": family})
    onnx.checker.check_model(path, full_check=True)
    assert ops == op_counts(path) and ops["ArgMin"] == n_blocks and ops["Gather"] >= 2 * n_blocks
    assert ops["MatMul"] >= 3 * n_blocks
    if n_channels_first:
        assert ops["Transpose"] >= 2 * n_channels_first  # into rows and back, around each channels-first block

    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    scale = max(float(np.abs(want).max()), 1e-6)
    assert np.abs(got - want).max() / scale <= 1e-4, family

    proc = subprocess.run([sys.executable, RUN_PY, path, "--runs", "2", "--warmup", "1", "--no-manifest", "--json",
                           str(run_folder / f"{family}.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-400:]
    measured = json.loads((run_folder / f"{family}.json").read_text())
    assert measured["latency_ms"]["p50"] > 0


@pytest.mark.parametrize("name, expected", [("deit_tiny_patch16_224", {"img_size": 32}),
                                            ("convnext_atto", {"input_size": [32, 32]})])
def test_smallest_input_a_family_runs_at(name, expected):
    from tmlp.models import create_model, input_size, smallest_input_config

    config = smallest_input_config(name, in_chans=1, num_classes=10)
    assert config == {"in_chans": 1, "num_classes": 10, **expected}
    assert input_size(name, config) == (1, 32, 32)
    with torch.no_grad():
        assert create_model(name, config).eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


def test_export_of_any_timm_name_trains_its_embedded_default(tmp_path, monkeypatch):
    """`tmlp export --model NAME` with no checkpoint: a timm model outside the registry is trained on digits at
    the smallest input it runs at (one epoch here), then exported with parity."""
    from click.testing import CliRunner

    from tmlp import stages
    from tmlp.cli import main

    monkeypatch.setitem(stages.GENERIC_EMBEDDED_RECIPE, "epochs", 1)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["export", "--model", "test_vit", "--k", "8", "--rank", "8", "--no-finetune",
                                       "--calib-images", "64", "--eval-images", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output[-600:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_config"] == {"in_chans": 1, "num_classes": 10, "img_size": 32}
    assert len(manifest["layers"]) == 6 and manifest["parity"]["tmlp.onnx"]["top1_agree"] == 1.0
