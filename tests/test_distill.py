"""Distillation: only the Taylor parameters move, the KL to the original drops, and the result exports."""
import copy
import math

import pytest
import torch

from tmlp.distill import distill_, mean_kl, taylor_blocks
from tmlp.errors import TmlpError
from tmlp.surgery import taylorize_
from tmlp.taylor import TaylorConfig


@pytest.mark.parametrize("config", [TaylorConfig(k=4, order=1), TaylorConfig(k=4, order=1, basis="shared", rank=8)],
                         ids=["dense", "shared"])
def test_distillation_lowers_the_kl_and_touches_only_taylor_tensors(trained_tiny_vit, digit_batches, config):
    tiny_vit = trained_tiny_vit
    teacher = copy.deepcopy(tiny_vit)
    taylorize_(tiny_vit, config, batches=lambda: iter(digit_batches), n_batches=4, progress=False)
    frozen = {k: v.clone() for k, v in tiny_vit.state_dict().items() if ".mlp." not in k}
    centres = [b.centres.clone() for b in taylor_blocks(tiny_vit)]
    before = mean_kl(tiny_vit, teacher, digit_batches)
    losses = distill_(tiny_vit, teacher, lambda: iter(digit_batches), 4, epochs=3, lr=1e-4, progress=False)
    after = mean_kl(tiny_vit, teacher, digit_batches)
    assert len(losses) == 3 and after < 0.8 * before, (before, after)
    assert all(torch.equal(v, tiny_vit.state_dict()[k]) for k, v in frozen.items())
    assert all(torch.equal(c, b.centres) for c, b in zip(centres, taylor_blocks(tiny_vit)))
    assert not any(p.requires_grad for b in taylor_blocks(tiny_vit) for p in b.parameters())  # back to buffers


def test_distilling_a_model_without_taylor_blocks_is_an_error(tiny_vit, digit_batches):
    with pytest.raises(TmlpError, match="no Taylor blocks"):
        distill_(tiny_vit, tiny_vit, lambda: iter(digit_batches), 4, epochs=1)


def test_the_cosine_schedule_ends_at_zero_and_constant_keeps_the_rate(trained_tiny_vit, digit_batches):
    seen = {}
    for schedule in ("cosine", "constant"):
        student, teacher = copy.deepcopy(trained_tiny_vit), copy.deepcopy(trained_tiny_vit)
        taylorize_(student, TaylorConfig(k=4, basis="shared", rank=8), batches=lambda: iter(digit_batches),
                   n_batches=4, progress=False)
        rates = []
        original_step = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            rates.append(self.param_groups[0]["lr"])
            return original_step(self, *args, **kwargs)

        torch.optim.AdamW.step = step
        try:
            distill_(student, teacher, lambda: iter(digit_batches), 4, epochs=2, lr=1e-3, progress=False,
                     schedule=schedule)
        finally:
            torch.optim.AdamW.step = original_step
        seen[schedule] = rates
    assert len(seen["cosine"]) == 8 and seen["cosine"][0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(seen["cosine"], seen["cosine"][1:]))  # decays every step
    assert seen["cosine"][-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert seen["constant"] == [pytest.approx(1e-3)] * 8


def test_an_unknown_schedule_is_refused(tiny_vit, digit_batches):
    taylorize_(tiny_vit, TaylorConfig(k=4), batches=lambda: iter(digit_batches), n_batches=4, progress=False)
    with pytest.raises(TmlpError, match="unknown distillation schedule 'step'"):
        distill_(tiny_vit, tiny_vit, lambda: iter(digit_batches), 4, epochs=1, schedule="step")
