"""Token reduction: exact when it keeps everything, the schedule it promises, plain ONNX ops and parity, and it
composes with Taylor blocks."""
import copy

import numpy as np
import onnx
import pytest
import torch

from tmlp.errors import TmlpError
from tmlp.tokens import TokenReduction, TopKTokenBlock, apply_token_reduction_, default_layers, token_schedule


def test_keeping_every_token_changes_nothing(tiny_vit, digit_batches):
    x = digit_batches[0][:8]
    with torch.no_grad():
        want = tiny_vit(x)
        apply_token_reduction_(tiny_vit, TokenReduction(keep=1.0, fuse=False))
        torch.testing.assert_close(tiny_vit(x), want, atol=1e-5, rtol=1e-5)


def test_the_schedule_and_the_token_counts_it_promises(tiny_vit, digit_batches):
    assert default_layers(12) == (3, 6, 9) and default_layers(6) == (2, 3, 4)
    cfg = TokenReduction(keep=0.5)
    seen = token_schedule(16, 6, cfg)
    assert seen == [16, 16, 16, 9, 5, 3]  # 16 -> 8 + fused -> round(4.5) = 4 + fused -> round(2.5) = 2 + fused
    record = apply_token_reduction_(tiny_vit, cfg)
    assert record["patch_tokens_per_block"] == seen
    counts = []
    for block in tiny_vit.blocks:
        block.register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
    with torch.no_grad():
        tiny_vit(digit_batches[0][:2])
    assert counts == [17, 17, 10, 6, 4, 4]  # the class token + the patches each block hands on
    assert sorted(tiny_vit.state_dict()) == sorted(copy.deepcopy(tiny_vit).state_dict())  # same keys as timm's


def test_reduced_model_exports_to_plain_onnx_with_parity(tiny_vit, digit_batches, tmp_path):
    import onnxruntime as ort

    from tmlp.export.onnx_export import export_onnx

    apply_token_reduction_(tiny_vit, TokenReduction(keep=0.6))
    x = digit_batches[0][:8]
    path = str(tmp_path / "reduced.onnx")
    export_onnx(tiny_vit, x, path, {})
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"TopK", "GatherElements"} <= ops and not {"ScatterElements", "ScatterND"} & ops
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (x, x[:1]):
        got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        with torch.no_grad():
            want = tiny_vit(batch).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4 * (1 + np.abs(want).max()), rtol=1e-4)


def test_composes_with_taylor_blocks(trained_tiny_vit, digit_batches):
    """Taylor blocks of the reduced blocks see the kept tokens: the block paths stay blocks.<i>.mlp."""
    from tmlp.spec import TaylorConfig
    from tmlp.surgery import taylorize_

    fqns = [f"blocks.{i}.mlp" for i in range(6)]
    apply_token_reduction_(trained_tiny_vit, TokenReduction(keep=0.75))
    assert isinstance(trained_tiny_vit.blocks[2], TopKTokenBlock)
    calibration = taylorize_(trained_tiny_vit, TaylorConfig(k=8), layers=fqns, batches=lambda: digit_batches,
                             n_batches=len(digit_batches), progress=False)
    assert set(calibration) == set(fqns)
    assert type(trained_tiny_vit.blocks[2].mlp).__name__ != "Mlp"
    with torch.no_grad():
        assert torch.isfinite(trained_tiny_vit(digit_batches[0][:4])).all()


@pytest.mark.parametrize("keep", [0.0, 1.5])
def test_bad_keep_shares_and_layers_are_refused(tiny_vit, keep):
    with pytest.raises(TmlpError, match="--token-keep"):
        TokenReduction(keep=keep)
    with pytest.raises(TmlpError, match="--token-layers"):
        apply_token_reduction_(tiny_vit, TokenReduction(layers=(99,)))
