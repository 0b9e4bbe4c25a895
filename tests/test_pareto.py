"""The Pareto front's bookkeeping: which variants are on the front, and which wins under each accuracy budget (the
statement the README makes from pareto.json). The whole `tmlp bench --pareto` run is tested in test_pipeline."""
import pytest

from tmlp.pareto import fastest_within, pareto_front

ROWS = [  # the fp32 original first, as run_pareto orders them
    {"name": "fp32 original", "accuracy": 70.0, "p50_ms": 20.0},
    {"name": "T-MLP", "accuracy": 70.2, "p50_ms": 9.0},
    {"name": "T-MLP + int8", "accuracy": 69.6, "p50_ms": 4.0},
    {"name": "T-MLP + tokens + int8", "accuracy": 68.9, "p50_ms": 2.5},
    {"name": "pruned", "accuracy": 60.0, "p50_ms": 2.0},
]


def test_the_fastest_variant_is_named_for_each_budget():
    wins = fastest_within(ROWS, (0.0, 0.5, 1.0, 2.0, 20.0))
    assert [w["name"] for w in wins] == ["T-MLP", "T-MLP + int8", "T-MLP + int8", "T-MLP + tokens + int8",
                                         "pruned"]
    assert wins[1]["speedup_vs_fp32"] == pytest.approx(5.0) and wins[1]["accuracy_drop_points"] == pytest.approx(0.4)
    assert wins[0]["accuracy_drop_points"] == pytest.approx(-0.2)  # more accurate than the original: within 0


def test_the_front_holds_no_dominated_point():
    front = pareto_front([r["p50_ms"] for r in ROWS], [r["accuracy"] for r in ROWS])
    assert [ROWS[i]["name"] for i in front] == ["pruned", "T-MLP + tokens + int8", "T-MLP + int8", "T-MLP"]
