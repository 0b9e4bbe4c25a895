"""Block selection under an accuracy budget: the plan respects the budget it was given and leaves the model intact."""
import pytest
import torch

from tmlp.calibrate import calibrate
from tmlp.data import to_tensor
from tmlp.errors import TmlpError
from tmlp.plan import plan_layers
from tmlp.surgery import select_blocks
from tmlp.taylor import TaylorConfig


@pytest.fixture
def setup(trained_tiny_vit, digit_batches, digits, digits_spec):
    model = trained_tiny_vit
    fqns = select_blocks(model)
    calibration = calibrate(model, fqns, lambda: iter(digit_batches), 4, TaylorConfig(k=3, order=1),
                            progress=False)
    x, y = to_tensor(digits.val.x, digits_spec), torch.from_numpy(digits.val.y)

    @torch.no_grad()
    def accuracy(m):
        return float((m(x).argmax(1) == y).float().mean())
    return model, calibration, accuracy


@pytest.mark.parametrize("budget", [0.0, 0.02, 1.0])
def test_plan_stays_within_its_budget(setup, budget):
    model, calibration, accuracy = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_layers(model, calibration, 1, accuracy, budget)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model left as it was
    assert set(plan.chosen) <= set(calibration) and len(plan.steps) == len(calibration)
    drops = [plan.sensitivity[f] for f, _, _ in plan.steps]
    assert drops == sorted(drops)  # tried from the least sensitive
    kept_acc = [acc for _, acc, kept in plan.steps if kept]
    assert all(plan.baseline - a <= budget + 1e-9 for a in kept_acc)
    if budget >= 1.0:
        assert plan.chosen == list(calibration)
    assert "| block |" in plan.table()


def test_negative_budget_is_refused(setup):
    model, calibration, accuracy = setup
    with pytest.raises(TmlpError, match="max-acc-drop"):
        plan_layers(model, calibration, 1, accuracy, -0.01)
