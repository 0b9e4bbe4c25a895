"""Per-block (k, rank) planning under an accuracy budget: the budget holds, the model is left intact, lower ranks
are exact truncations, and the cost model counts what the block computes."""
import copy

import pytest
import torch

from tmlp.calibration.calibrate import calibrate
from tmlp.data import to_tensor
from tmlp.taylor.derivatives import SharedDerivatives
from tmlp.errors import TmlpError
from tmlp.plan import (BlockOption, assignment_width, candidate_choices, choose, held_out_tokens, logit_kl_with,
                       option_calibration, option_macs, plan_blocks, relative_error, replayed_prefix, truncate_rank)
from tmlp.surgery import replace_module, select_blocks
from tmlp.taylor import SharedTaylorMLP, TaylorConfig, build_taylor_block

KS, RANKS = (2, 6), (4, 16)


@pytest.fixture(scope="module")
def setup(trained_tiny_vit_path, digit_batches, digits, digits_spec):
    from tmlp.models import load_checkpoint

    model = load_checkpoint(trained_tiny_vit_path)[0]
    fqns = select_blocks(model)
    calibrations = {(k, 0): calibrate(model, fqns, lambda: iter(digit_batches), 4,
                                 TaylorConfig(k=k, order=1, basis="shared", rank=max(RANKS)), progress=False)
                    for k in KS}
    x, y = to_tensor(digits.val.x, digits_spec), torch.from_numpy(digits.val.y)
    tokens = held_out_tokens(model, fqns, [x[:64]])

    @torch.no_grad()
    def accuracy(m):
        return float((m(x).argmax(1) == y).float().mean())
    return model, calibrations, tokens, accuracy, x[:64]


def test_truncated_rank_is_the_lower_rank_projection(setup):
    _, calibrations, tokens, _, _ = setup
    fqn = next(iter(tokens))
    full = calibrations[6, 0][fqn]
    low = option_calibration(calibrations, fqn, BlockOption(6, 4)).derivatives
    assert low.u.shape[1] == low.v.shape[1] == 4 and low.s.shape == (6, 4, 4)
    torch.testing.assert_close(low.s, low.u.T @ (full.derivatives.u @ full.derivatives.s @ full.derivatives.v.T)
                               @ low.v, atol=1e-5, rtol=1e-4)  # S_c(r') = U'ᵀ J_c(r) V'
    block = build_taylor_block(full.centres, low, 1)
    assert isinstance(block, SharedTaylorMLP) and block.rank == 4
    # a rank at or above the calibrated one (a block narrower than the option's rank) is the calibration whole
    assert truncate_rank(full.derivatives, 64) is full.derivatives


def test_truncating_an_asymmetric_calibration_keeps_u_in_proportion():
    d = SharedDerivatives(value=torch.zeros(5, 20), u=torch.randn(20, 12), v=torch.randn(16, 8),
                          s=torch.randn(5, 12, 8), t=torch.randn(5, 12, 8))
    low = truncate_rank(d, 4)
    assert low.v.shape == (16, 4) and low.u.shape == (20, 6) and low.s.shape == low.t.shape == (5, 6, 4)
    assert torch.equal(low.s, d.s[:, :6, :4]) and torch.equal(low.u, d.u[:, :6])
    assert option_macs(BlockOption(10, 4), 16, 20, 1, rank_out=6) == 10 * 16 + 16 * 4 + 6 * 4 + 6 * 20


def test_more_centres_and_rank_lower_the_held_out_error(setup):
    _, calibrations, tokens, _, _ = setup
    fqn = next(iter(tokens))
    x, y = tokens[fqn]
    errs = {o: relative_error(build_taylor_block(option_calibration(calibrations, fqn, o).centres,
                                                 option_calibration(calibrations, fqn, o).derivatives, 1), x, y)
            for o in (BlockOption(2, 4), BlockOption(6, 16))}
    assert errs[BlockOption(6, 16)] < errs[BlockOption(2, 4)] and all(0 < e < 10 for e in errs.values())


def test_option_macs_count_distances_and_projections():
    assert option_macs(BlockOption(100, 32), 384, 384, 1) == 100 * 384 + 384 * 32 + 32 * 32 + 32 * 384
    assert option_macs(BlockOption(100, 32), 384, 384, 2) == 100 * 384 + 384 * 32 + 2 * 32 * 32 + 32 * 384
    assert option_macs(BlockOption(10), 512, 10, 1) == 10 * 512 + 512 * 10  # dense Jacobians
    # cells in q = 16 principal directions: the projection and the distances there, not k·d
    assert (option_macs(BlockOption(100, 32), 384, 384, 1, partition_rank=16)
            == 16 * (384 + 100) + 2 * 384 * 32 + 32 * 32)


def test_the_default_plan_offers_each_block_its_calibrated_form_alone():
    """Cheaper (k, rank) options save ~3% of an MLP in onnxruntime and double the error (bench/results/option-latency):
    by default the plan only decides which blocks to replace; --plan-k / --plan-rank offer more."""
    from tmlp.spec import PlanSpec
    from tmlp.stages import plan_options

    config = TaylorConfig(k=100, rank=32)
    assert plan_options(PlanSpec(), config, 10_000) == [BlockOption(100, 32)]
    assert plan_options(PlanSpec(k_choices=(25, 100), rank_choices=(8, 32)), config, 10_000) == [
        BlockOption(25, 8), BlockOption(25, 32), BlockOption(100, 8), BlockOption(100, 32)]
    assert plan_options(PlanSpec(), TaylorConfig(k=10, basis="dense"), 10_000) == [BlockOption(10, None)]
    block = build_taylor_block(torch.randn(4, 8), SharedDerivatives(torch.zeros(4, 8), torch.randn(8, 2),
                                                                    torch.randn(8, 2), torch.randn(4, 2, 2)),
                               1, torch.randn(8, 3))
    assert assignment_width(block) == 3
    assert assignment_width(build_taylor_block(torch.randn(4, 8), SharedDerivatives(
        torch.zeros(4, 8), torch.randn(8, 2), torch.randn(8, 2), torch.randn(4, 2, 2)), 1)) is None


def test_choose_trades_cost_against_sensitivity():
    a, b = BlockOption(2, 4), BlockOption(6, 16)
    sens = {"x": {a: 0.5, b: 0.1}, "y": {a: 0.3, b: 0.2}}
    macs = {"x": {None: 1000, a: 10, b: 50}, "y": {None: 1000, a: 10, b: 50}}
    assert choose(sens, macs, 0.0) == {"x": a, "y": a}  # cost only: the cheapest option everywhere
    assert choose(sens, macs, 0.3) == {"x": b, "y": a}  # x: 0.01 + 0.15 > 0.05 + 0.03; y: 0.10 < 0.11
    assert choose(sens, macs, 1e6) == {"x": None, "y": None}  # sensitivity only: keep the originals
    lams = [lam for lam, _ in candidate_choices(sens, macs)]
    choices = [c for _, c in candidate_choices(sens, macs)]
    assert lams == sorted(lams) and choices[0] == {"x": a, "y": a} and choices[-1] == {"x": None, "y": None}
    assert all(c1 != c2 for c1, c2 in zip(choices, choices[1:]))
    costs = [sum(macs[f][o] for f, o in c.items()) for c in choices]
    assert costs == sorted(costs)  # each step buys accuracy with MACs


@pytest.mark.parametrize("budget", [0.0, 0.02, 1.0])
def test_plan_stays_within_its_budget_and_leaves_the_model_intact(setup, budget):
    model, calibrations, tokens, accuracy, probe = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = [BlockOption(k, r) for k in KS for r in RANKS]
    plan = plan_blocks(model, calibrations, options, 1, accuracy, budget, tokens, probe)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert set(plan.choice) == set(tokens) and plan.baseline - plan.accuracy <= budget + 1e-9
    if budget >= 1.0:  # any model is within a 100-point budget: every block at its cheapest option
        cheapest = min(options, key=lambda o: option_macs(o, 64, 64, 1))
        assert plan.chosen == list(tokens) and set(plan.choice.values()) == {cheapest}
        assert len(plan.steps) == 1
    assert plan.mac_ratio() <= 1.0 and "| block | choice |" in plan.table() and "| λ" in plan.search_table()
    assert all(kl >= 0 for sens in plan.sensitivity.values() for kl in sens.values())
    # the plan's accuracy is what the model measures with the plan applied
    m = copy.deepcopy(model)
    for fqn, opt in plan.choice.items():
        if opt is not None:
            cal = option_calibration(calibrations, fqn, opt)
            replace_module(m, fqn, build_taylor_block(cal.centres, cal.derivatives, 1))
    assert accuracy(m) == pytest.approx(plan.accuracy)
    d = plan.to_dict()
    assert d["max_acc_drop_points"] == pytest.approx(100 * budget) and len(d["search"]) == len(plan.steps)
    if plan.chosen == list(tokens):  # the search keeping originals measures nothing costlier than this plan
        assert all(step.blocks == len(tokens) for step in plan.steps)


@pytest.mark.parametrize("budget", [0.0, 0.03])
def test_a_plan_on_readings_judges_every_choice_at_the_final_rate(setup, digits, digits_spec, budget):
    """evaluate() returning a Reading: every measured choice is a point of the rate, and the plan keeps the cheapest
    measured choice whose drop, judged at the final rate, fits (all originals when none does)."""
    from tmlp.drop_rate import read

    model, calibrations, tokens, _, probe = setup
    x, y = to_tensor(digits.val.x, digits_spec), torch.from_numpy(digits.val.y)
    with torch.no_grad():
        reference = model(x)
    plan = plan_blocks(model, calibrations, [BlockOption(k, 4) for k in KS], 1,
                       lambda m: read(reference, m(x), y), budget, tokens, probe)
    assert plan.rate is not None and len(plan.rate.points) == len(plan.steps) > 0
    assert all(step.reading is not None and step.distance > 0 for step in plan.steps)
    fits = [s for s in plan.steps if plan.predicted_drop(s) <= 100 * budget + 1e-9]
    if fits:
        best = min(fits, key=lambda s: s.mac_ratio)
        assert plan.mac_ratio() == pytest.approx(best.mac_ratio) and plan.predicted == plan.predicted_drop(best)
    else:
        assert plan.chosen == [] and plan.predicted == 0.0
    assert "judged drop" in plan.search_table()
    d = plan.to_dict()
    assert d["rate"]["points_per_unit_distance"] == plan.rate.rate >= 0
    assert [s["judged_drop_points"] for s in d["search"]] == [plan.predicted_drop(s) for s in plan.steps]


def test_replayed_prefix_gives_the_same_sensitivities_and_restores_the_model(setup):
    model, calibrations, tokens, _, probe = setup
    with torch.no_grad():
        reference = model(probe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = option_calibration(calibrations, "blocks.1.mlp", BlockOption(2, 4))
    block = build_taylor_block(cal.centres, cal.derivatives, 1)
    whole = logit_kl_with(model, "blocks.1.mlp", block, reference, probe)
    with replayed_prefix(model, "blocks.1.mlp", probe, reference) as replayed:
        assert replayed and type(model.blocks[0]).__name__ == "_Replay"
        assert logit_kl_with(model, "blocks.1.mlp", block, reference, probe) == pytest.approx(whole, rel=1e-5)
    assert type(model.blocks[0]).__name__ != "_Replay"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model(probe), reference)
    with replayed_prefix(model, "blocks.0.mlp", probe, reference) as replayed:  # nothing before block 0
        assert not replayed
    with replayed_prefix(model, "blocks.1.mlp", probe, reference + 1) as replayed:  # a mismatch: run whole
        assert not replayed and type(model.blocks[0]).__name__ != "_Replay"


def test_negative_budget_is_refused(setup):
    model, calibrations, tokens, accuracy, probe = setup
    with pytest.raises(TmlpError, match="max-acc-drop"):
        plan_blocks(model, calibrations, [BlockOption(2, 4)], 1, accuracy, -0.01, tokens, probe)


@pytest.mark.parametrize("budget", [0.0, 1.0])
def test_without_keeping_mlps_every_block_is_replaced(setup, budget):
    """keep_mlps off (--replace-all): no block keeps its MLP. A 100-point budget takes every block's cheapest
    option; a zero budget, which no all-replaced choice may meet, takes the least sensitive choice, measured."""
    model, calibrations, tokens, accuracy, probe = setup
    options = [BlockOption(k, r) for k in KS for r in RANKS]
    plan = plan_blocks(model, calibrations, options, 1, accuracy, budget, tokens, probe, keep_mlps=False)
    assert plan.chosen == list(tokens) and None not in plan.choice.values()
    assert all(step.blocks == len(tokens) for step in plan.steps)  # the search that keeps MLPs did not run
    if budget >= 1.0:
        cheapest = min(options, key=lambda o: option_macs(o, 64, 64, 1))
        assert set(plan.choice.values()) == {cheapest}
    elif plan.baseline - plan.accuracy > 1e-9:  # over budget: every block at its least sensitive option
        assert plan.choice == {f: min(s, key=lambda o: (s[o], o)) for f, s in plan.sensitivity.items()}
        assert plan.accuracy == pytest.approx(plan.steps[-1].accuracy)
