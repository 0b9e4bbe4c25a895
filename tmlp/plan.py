"""Choosing which blocks to replace under an accuracy budget, by measured sensitivity.

Each candidate block is replaced alone and the validation accuracy drop is measured (its sensitivity); then blocks
are added greedily from the least sensitive, each kept only if the model with every kept block replaced stays
within ``max_drop`` of the original's accuracy. Costs two evaluations per candidate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from tmlp.calibrate import BlockCalibration
from tmlp.errors import TmlpError
from tmlp.surgery import replace_module
from tmlp.taylor import build_taylor_block


@dataclass
class LayerPlan:
    """The outcome: accuracies are fractions, drops are in accuracy points (fractions of 1)."""

    baseline: float
    sensitivity: dict[str, float]  # fqn -> accuracy drop with that block alone replaced
    chosen: list[str] = field(default_factory=list)
    steps: list[tuple[str, float, bool]] = field(default_factory=list)  # (fqn, accuracy with it added, kept)

    def table(self) -> str:
        lines = ["| block | drop alone (points) | accuracy with it added | kept |", "| --- | --- | --- | --- |"]
        for fqn, acc, kept in self.steps:
            lines.append(f"| {fqn} | {100 * self.sensitivity[fqn]:+.2f} | {100 * acc:.2f}% | {'yes' if kept else 'no'} |")
        return "\n".join(lines)


def plan_layers(model: nn.Module, calibration: dict[str, BlockCalibration], order: int,
                evaluate: Callable[[nn.Module], float], max_drop: float) -> LayerPlan:
    """Greedy block selection (see module docstring); ``model`` is left unchanged. ``max_drop`` is a fraction
    (0.01 = one accuracy point)."""
    if max_drop < 0:
        raise TmlpError(f"--max-acc-drop must be >= 0 points, got {100 * max_drop}")
    originals = {fqn: model.get_submodule(fqn) for fqn in calibration}
    taylors = {fqn: build_taylor_block(c.centres, c.derivatives, order) for fqn, c in calibration.items()}
    plan = LayerPlan(baseline=evaluate(model), sensitivity={})
    try:
        for fqn in calibration:
            replace_module(model, fqn, taylors[fqn])
            plan.sensitivity[fqn] = plan.baseline - evaluate(model)
            replace_module(model, fqn, originals[fqn])
        for fqn in sorted(calibration, key=lambda f: plan.sensitivity[f]):
            replace_module(model, fqn, taylors[fqn])
            acc = evaluate(model)
            kept = plan.baseline - acc <= max_drop + 1e-12
            plan.steps.append((fqn, acc, kept))
            if kept:
                plan.chosen.append(fqn)
            else:
                replace_module(model, fqn, originals[fqn])
    finally:
        for fqn, module in originals.items():
            replace_module(model, fqn, module)
    order_in_model = list(calibration)
    plan.chosen.sort(key=order_in_model.index)
    return plan
