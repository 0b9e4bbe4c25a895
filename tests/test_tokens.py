"""Token reduction: exact when it keeps everything, the schedule it promises, plain ONNX ops and parity, and it
composes with Taylor blocks."""
import copy

import numpy as np
import onnx
import pytest
import torch

from tmlp.errors import TmlpError
from tmlp.tokens import (TokenReduction, TopKTokenBlock, apply_token_reduction_, default_layers, fused_token,
                         token_schedule)


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


def test_the_fused_token_is_the_weighted_mean_of_the_dropped_tokens_even_when_they_get_no_attention():
    """A trained class token can give the dropped patches 1e-6 of its attention: the fused token is still their
    attention-weighted mean to float32 precision (summed over the dropped tokens, not all minus kept)."""
    g = torch.Generator().manual_seed(0)
    patches = 20 * torch.randn(3, 64, 32, generator=g)
    weight = torch.rand(3, 64, generator=g)
    index = weight.topk(45, dim=1).indices
    dropped = torch.ones(3, 64, dtype=torch.bool)
    dropped[torch.arange(3).unsqueeze(1), index] = False
    weight = torch.where(dropped, weight * 1e-6, weight)  # the dropped patches get ~1e-6 of the attention
    w64 = weight.double() * dropped
    want = (w64.unsqueeze(-1) * patches.double()).sum(1) / w64.sum(1, keepdim=True)
    got = fused_token(patches, weight, index).double()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_parity_holds_when_the_class_token_attends_sharply(tiny_vit, digit_batches, tmp_path):
    """Peaked class attention (scaled-up logits) leaves almost nothing to the dropped tokens; PyTorch and onnxruntime
    still agree, so rounding noise is not amplified into the fused token."""
    import onnxruntime as ort

    from tmlp.export.onnx_export import export_onnx

    for block in tiny_vit.blocks:
        block.attn.scale = block.attn.scale * 400  # the dropped patches get ~1e-6..1e-4 of the attention
    apply_token_reduction_(tiny_vit, TokenReduction(keep=0.6))
    x = digit_batches[0][:16]
    path = str(tmp_path / "sharp.onnx")
    export_onnx(tiny_vit, x, path, {})
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = tiny_vit(x).numpy()
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


def _labelled(batches, digits):
    y = torch.from_numpy(digits.train.y[:sum(len(b) for b in batches)]).long()
    out, start = [], 0
    for b in batches:
        out.append((b, y[start:start + len(b)]))
        start += len(b)
    return out


def test_an_untrained_learned_policy_ranks_as_the_attention_policy(trained_tiny_vit, digit_batches):
    x = digit_batches[0][:8]
    attention = copy.deepcopy(trained_tiny_vit)
    apply_token_reduction_(attention, TokenReduction(keep=0.5))
    record = apply_token_reduction_(trained_tiny_vit, TokenReduction(keep=0.5, policy="learned"))
    assert record["policy"] == "learned"
    with torch.no_grad():  # the scorers' last layer starts at zero
        torch.testing.assert_close(trained_tiny_vit(x), attention(x), atol=1e-5, rtol=1e-5)
    assert any(k.endswith("scorer.fc2.weight") for k in trained_tiny_vit.state_dict())


def test_training_the_learned_policy_moves_only_the_scorers_and_lowers_its_loss(trained_tiny_vit, digit_batches,
                                                                               digits, tmp_path):
    from tmlp.tokens import train_token_scorers_

    teacher = copy.deepcopy(trained_tiny_vit)
    apply_token_reduction_(trained_tiny_vit, TokenReduction(keep=0.4, policy="learned"))
    before = {k: v.clone() for k, v in trained_tiny_vit.state_dict().items()}
    data = _labelled(digit_batches, digits)
    losses = train_token_scorers_(trained_tiny_vit, teacher, lambda: iter(data), len(data), epochs=3, lr=3e-3,
                                  progress=False)
    after = trained_tiny_vit.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".scorer." in k for k in moved)  # nothing but the score predictors trained
    assert losses[-1] < 0.8 * losses[0]  # the rankings moved towards the last block's attention
    assert all(p.requires_grad for p in teacher.parameters())  # flags restored on both models
    assert all(b.index is None for b in trained_tiny_vit.blocks if isinstance(b, TopKTokenBlock))
    # the trained policy is the same TopK + GatherElements graph, with parity
    import onnxruntime as ort

    from tmlp.export.onnx_export import export_onnx

    x = digit_batches[0][:8]
    path = str(tmp_path / "learned.onnx")
    export_onnx(trained_tiny_vit.eval(), x, path, {})
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"TopK", "GatherElements"} <= ops and not {"ScatterElements", "ScatterND"} & ops
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = trained_tiny_vit(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4 * (1 + np.abs(want).max()), rtol=1e-4)


def test_a_learned_policy_needs_scorers_and_a_known_name(tiny_vit, digit_batches):
    from tmlp.tokens import train_token_scorers_

    with pytest.raises(TmlpError, match="--token-policy"):
        TokenReduction(policy="random")
    apply_token_reduction_(tiny_vit, TokenReduction(keep=0.5))
    with pytest.raises(TmlpError, match="no learned token policy"):
        train_token_scorers_(tiny_vit, tiny_vit, lambda: iter([]), 0)
