"""The exchange rate between how far a model's logits move from the original's and how much top-1 accuracy it loses.

A top-1 drop measured on 2,500 validation images has a standard error of 0.4-0.6 points, so a rule that keeps the
cheapest candidate whose measured drop fits the budget keeps a lucky reading: every selected export lost 0.7-1.0
points more on the report split than on the choose split that picked it (bench/results/plan-units/kl-vs-drop). The
logit distance of the same candidate is a smooth statistic: measured on the choose split it matches the report
split's within a few percent. So the export judges each candidate by its *predicted* drop,
``rate · distance`` (``DropRate.judge``: unless its measured drop exceeds that by more than two standard errors),
with one rate fitted (least squares through the origin) over every candidate it measured: the
fit is an average over candidates, none of them selected, so it carries no winner's curse. A model that was trained
(distillation, fine-tuning) gets its own rate, fitted over the checks of its training: training with the labels moves
the logits in ways that cost no accuracy, which changes the rate (bench/results/kl-rule).

The distance is ``logit_distance``: the mean over images of KL(original ‖ model) of the class probabilities, in nats
(the plan's own sensitivity measure). Over the 67 candidates of the CIFAR-10 DeiT-Small's plan paths it predicted the
report split's drop best of four statistics (mean KL, sqrt of the mean KL, the mean of each image's sqrt(KL), the
share of images whose class changed): RMSE 0.33 and 0.50 points against 0.44 and 0.70 for the choose split's own
top-1 drop (bench/results/kl-rule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["OVERRULE", "DropRate", "Reading", "logit_distance", "paired_standard_error", "read"]

OVERRULE = 2.0  # standard errors by which a measured drop must exceed the predicted one to overrule it


@torch.no_grad()
def logit_distance(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over the rows of two [n, classes] logit tensors of KL(softmax(reference) ‖ softmax(logits)), in nats."""
    p = torch.log_softmax(reference.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).clamp_min(0).mean())


@dataclass(frozen=True)
class Reading:
    """One model measured on a split against the original: its top-1 ``accuracy`` and the original's (fractions),
    its ``logit_distance`` from the original and the paired ``standard_error`` of its drop (points: the standard
    deviation of the per-image differences in correctness over sqrt(images))."""

    accuracy: float
    original: float
    distance: float
    standard_error: float = 0.0

    @property
    def drop(self) -> float:
        """The measured top-1 drop, in points."""
        return 100 * (self.original - self.accuracy)


def read(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> Reading:
    """The ``Reading`` of a model's [n, classes] ``logits`` against the original's ``reference`` on images whose
    classes are ``labels`` [n]."""
    original, model = (reference.argmax(1) == labels).numpy(), (logits.argmax(1) == labels).numpy()
    return Reading(float(model.mean()), float(original.mean()), logit_distance(reference, logits),
                   paired_standard_error(original, model))


def paired_standard_error(original: np.ndarray, tmlp: np.ndarray) -> float:
    """Standard error (points) of the accuracy drop ``original.mean() - tmlp.mean()`` measured on the same images
    (bool [N] each): the standard deviation of the per-image differences over sqrt(N). Only the images on which the
    two models disagree contribute: at 10% disagreement on 2,500 images it is 0.63 points."""
    n = len(original)
    if n < 2:
        return 0.0
    diff = original.astype(np.float64) - tmlp.astype(np.float64)
    return float(100 * diff.std(ddof=1) / np.sqrt(n))


@dataclass
class DropRate:
    """drop (points) ≈ ``rate`` · distance, the rate fitted through the origin over ``points`` (distance, measured
    drop in points), one per measured candidate. ``source`` says what the points are (the plan's candidates, a
    training's checks)."""

    source: str
    points: list[tuple[float, float]] = field(default_factory=list)

    def add(self, reading: Reading) -> "DropRate":
        self.points.append((reading.distance, reading.drop))
        return self

    @property
    def rate(self) -> float:
        """Points of drop per unit of distance, at least 0: moving away from the original is never predicted to
        gain accuracy (0 with no point or no distance yet)."""
        xx = sum(x * x for x, _ in self.points)
        return max(0.0, sum(x * y for x, y in self.points) / xx) if xx > 0 else 0.0

    @property
    def rate_standard_error(self) -> float:
        """The rate's least-squares standard error (inf with fewer than two points)."""
        n, xx = len(self.points), sum(x * x for x, _ in self.points)
        if n < 2 or xx <= 0:
            return math.inf
        residual = sum((y - self.rate * x) ** 2 for x, y in self.points)
        return math.sqrt(residual / (n - 1) / xx)

    def predict(self, distance: float) -> float:
        """The predicted drop, in points, of a model ``distance`` from the original."""
        return self.rate * distance

    def judge(self, reading: Reading) -> float:
        """The drop (points) a model is judged by: its predicted drop, unless its measured drop exceeds that by more
        than ``OVERRULE`` standard errors — a fit of few points, or a model unlike those it was fitted on (another
        runtime, another training), can predict far too little, and the measurement then says so."""
        return max(self.predict(reading.distance), reading.drop - OVERRULE * reading.standard_error)

    def to_dict(self) -> dict[str, Any]:
        se = self.rate_standard_error
        return {"source": self.source, "points_per_unit_distance": self.rate,
                "standard_error": None if math.isinf(se) else se,
                "distance": "mean over images of KL(original || model) of the class probabilities, nats",
                "points": [{"distance": x, "drop_points": y} for x, y in self.points]}
