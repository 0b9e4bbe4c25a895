"""The rate that turns a model's logit distance from the original into a predicted top-1 drop: the distance, the
reading, the least-squares fit through the origin, and the measurement that overrules a prediction."""
import math

import numpy as np
import pytest
import torch

from tmlp.budget import BudgetCheck, paired_standard_error
from tmlp.drop_rate import OVERRULE, DropRate, Reading, logit_distance, read


def test_logit_distance_is_the_mean_kl_of_the_class_probabilities():
    reference = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    logits = torch.tensor([[1.0, 0.5, -1.0], [0.5, 0.5, 0.0]])
    p, q = torch.log_softmax(reference, 1), torch.log_softmax(logits, 1)
    kl = (p.exp() * (p - q)).sum(1)
    assert logit_distance(reference, logits) == pytest.approx(float(kl.mean()), rel=1e-6)
    assert logit_distance(reference, reference) == 0.0
    assert logit_distance(reference, reference + 3.0) == pytest.approx(0.0, abs=1e-7)  # a shift changes nothing


def test_a_reading_counts_accuracies_and_the_paired_standard_error():
    labels = torch.tensor([0, 1, 2, 0])
    reference = torch.eye(3)[[0, 1, 2, 1]] * 5  # right on the first three
    logits = torch.eye(3)[[0, 2, 2, 0]] * 5  # loses image 1, wins image 3
    r = read(reference, logits, labels)
    assert (r.accuracy, r.original, r.drop) == (0.75, 0.75, 0.0)
    assert r.standard_error == pytest.approx(100 * np.std([0, 1, 0, -1], ddof=1) / 2)
    assert r.distance > 0


def test_the_rate_is_fitted_through_the_origin_and_never_negative():
    rate = DropRate("test")
    assert rate.rate == 0.0 and math.isinf(rate.rate_standard_error)
    rate.add(Reading(0.70, 0.71, 0.1)).add(Reading(0.688, 0.71, 0.2))  # drops 1.0 and 2.2 points
    assert rate.rate == pytest.approx((0.1 * 1.0 + 0.2 * 2.2) / (0.01 + 0.04))
    assert rate.predict(0.15) == pytest.approx(0.15 * rate.rate)
    assert 0 < rate.rate_standard_error < 1
    assert DropRate("gains", [(0.1, -1.0)]).rate == 0.0  # farther from the original never predicts a gain
    record = rate.to_dict()
    assert record["points_per_unit_distance"] == rate.rate and len(record["points"]) == 2


def test_a_measured_drop_far_above_the_prediction_overrules_it():
    rate = DropRate("test", [(0.1, 1.0)])  # 10 points per unit
    near = Reading(accuracy=0.69, original=0.71, distance=0.1, standard_error=0.6)  # measured 2.0, predicted 1.0
    far = Reading(accuracy=0.65, original=0.71, distance=0.1, standard_error=0.6)  # measured 6.0
    assert rate.judge(near) == pytest.approx(1.0)  # within two standard errors: the prediction stands
    assert rate.judge(far) == pytest.approx(6.0 - OVERRULE * 0.6)


def test_the_budget_check_judges_the_predicted_drop():
    """Measured 1.6 points on 1,000 images, predicted 0.5: the budget of 1 point holds on the prediction; a rate
    that predicts 1.5 breaks it, and without a rate the measured drop decides."""
    original = np.zeros(1000, dtype=bool)
    original[:800] = True
    tmlp = original.copy()
    tmlp[:16] = False  # 1.6 points lost on 16 disagreements: standard error 0.40, not enough to overrule 0.5
    for rate, holds in ((DropRate("low", [(0.1, 0.5)]), True), (DropRate("high", [(0.1, 1.5)]), False),
                        (None, False)):
        check = BudgetCheck(1.0, original, rate=rate)
        check.measure(["a"], tmlp, 1.0, distance=0.1)
        se = paired_standard_error(original, tmlp)
        assert check.drop == pytest.approx(1.6) and check.holds() == holds
        assert check.judged == pytest.approx(1.6 if rate is None else max(rate.predict(0.1), 1.6 - OVERRULE * se))
        record = check.to_dict()
        assert record["judged_drop_points"] == check.judged
        assert record["steps"][0]["predicted_drop_points"] == (None if rate is None else check.judged)
