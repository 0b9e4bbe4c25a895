"""The Pareto front's bookkeeping: which variants are on the front, and which wins under each accuracy budget (the
statement the README makes from pareto.json). The whole `tmlp bench --pareto` run is tested in test_pipeline."""
import pytest

from tmlp.pareto import fastest_within, pareto_front, replaced_mac_share

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


def test_the_baselines_get_the_replaced_blocks_share_not_one_diluted_by_the_kept_mlps():
    """The plan's mac_ratio averages over every candidate block, kept MLPs at 1.0 (stop 33's 9-of-12 export: 0.266);
    the baselines shrink only the replaced blocks, so they get those blocks' own share (there: 0.022)."""
    plan = {"mac_ratio": (1.0 + 0.02 + 0.04) / 3,
            "choice": {"blocks.0.mlp": None, "blocks.1.mlp": {"k": 25, "rank": 8},
                       "blocks.2.mlp": {"k": 100, "rank": 32}},
            "options": {"blocks.1.mlp": {"k=25 r=8": {"mac_ratio": 0.02}, "k=100 r=32": {"mac_ratio": 0.05}},
                        "blocks.2.mlp": {"k=25 r=8": {"mac_ratio": 0.01}, "k=100 r=32": {"mac_ratio": 0.04}}}}
    assert replaced_mac_share(plan) == pytest.approx(0.03)
    assert replaced_mac_share({"choice": {"a": {"k": 10, "rank": None}}, "options": {"a": {"k=10": {"mac_ratio": 0.3}}}}
                              ) == pytest.approx(0.3)  # dense Jacobians: no rank in the label
    assert replaced_mac_share({}) is None and replaced_mac_share({"choice": {"a": None}, "options": {}}) is None
