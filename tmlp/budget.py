"""The accuracy budget, held on the model that is shipped: the exported tmlp.onnx, run by onnxruntime.

The plan stage chooses blocks and options from PyTorch measurements, before distillation and with some headroom;
distillation changes the model again; onnxruntime computes in its own order. So the export measures the final file
on the choose split of the validation images against original.onnx, and while it loses more than the budget it
backs off, one move at a time: the move that buys the most logit KL (of a block alone, from the plan) per
multiply-add it adds — a replaced block taking a less sensitive option (freshly calibrated, untrained; more exact
units, a larger k or rank) or its original MLP back (``next_move``) — first in PyTorch until the PyTorch drop holds,
then the file is exported and measured again.
After whole-model fine-tuning the block goes straight back to its MLP (a fresh option would be untrained, and the
rest of the network had adapted to the Taylor block); ``--recover-images`` fine-tunes briefly after each move. A model
that cannot hold the budget is never written (the export runs in a staging folder). With ``--replace-all`` no MLP
comes back: the moves are swaps to safer options only.

Every drop is judged as the plan judges it: predicted from the model's logit distance to the original at a fitted
rate (tmlp.drop_rate; the plan's rate, or for a trained model the rate fitted over its training's checks), each
back-off step adding its own point to the fit. The report split, never used for a choice, is measured last
(``report``), with a quick latency check of both files.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from tmlp.data import ImageSplit
from tmlp.drop_rate import DropRate, Reading, paired_standard_error
from tmlp.errors import TmlpError
from tmlp.plan import BlockOption, Plan
from tmlp.runtime.run import input_shape, make_session, preprocess, time_batches
from tmlp.surgery import replace_module

__all__ = ["BudgetCheck", "back_off", "next_move", "ort_accuracy", "ort_correct", "ort_logits", "paired_standard_error",
           "quick_speedup", "restore_block"]


def ort_logits(path: str, split: ImageSplit, preprocessing: dict[str, Any], batch: int = 64,
               threads: int | None = None) -> np.ndarray:
    """[N, classes] float32 logits of ONNX model ``path`` in onnxruntime on every image of ``split``, preprocessed by
    the device runner's own code."""
    session = make_session(path, threads=threads or torch.get_num_threads(), manifest=False)
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: preprocess(split.images(np.arange(start, min(len(split), start + batch))),
                                               preprocessing)})[0] for start in range(0, len(split), batch)]
    return np.concatenate(out).astype(np.float32)


def ort_correct(path: str, split: ImageSplit, preprocessing: dict[str, Any], batch: int = 64,
                threads: int | None = None) -> np.ndarray:
    """Whether ONNX model ``path`` in onnxruntime classifies each image of ``split`` right: bool [N]."""
    return ort_logits(path, split, preprocessing, batch, threads).argmax(axis=1) == np.asarray(split.y)


def ort_accuracy(path: str, split: ImageSplit, preprocessing: dict[str, Any], batch: int = 64,
                 threads: int | None = None) -> float:
    """Top-1 accuracy (fraction) of ONNX model ``path`` in onnxruntime on ``split`` (``ort_correct``'s mean)."""
    return float(ort_correct(path, split, preprocessing, batch, threads).mean()) if len(split) else 0.0


def quick_speedup(original: str, tmlp: str, runs: int = 30, warmup: int = 5) -> dict[str, float]:
    """A quick batch-1, 1-thread latency check of both files (median ms, interleaved in rounds of 5 runs) and the
    T-MLP model's speed-up. An expectation printed at export time; ``tmlp bench`` measures properly."""
    sessions = {key: make_session(path, threads=1, manifest=False) for key, path in (("original", original),
                                                                                   ("tmlp", tmlp))}
    feeds = {}
    for key, session in sessions.items():
        name, shape = input_shape(session, 1)
        feeds[key] = (name, [np.random.default_rng(0).standard_normal(shape).astype(np.float32)])
        time_batches(session, name, feeds[key][1], warmup, 0)
    times: dict[str, list[float]] = {"original": [], "tmlp": []}
    for _ in range(max(1, runs // 5)):
        for key, session in sessions.items():
            times[key] += time_batches(session, feeds[key][0], feeds[key][1], 0, 5)
    median = {key: float(np.median(t)) for key, t in times.items()}
    return {"original_ms": median["original"], "tmlp_ms": median["tmlp"],
            "speedup": median["original"] / max(median["tmlp"], 1e-9), "runs": len(times["tmlp"])}


def next_move(plan: Plan | None, fqns: list[str], keep_mlps: bool = True,
              swaps: bool = True) -> tuple[str, BlockOption | None] | None:
    """The budget's next move among the replaced blocks ``fqns``: the one that buys the most logit KL (of that
    block alone, from the plan) per multiply-add it adds back, continuing the plan's own trade (MACs + λ · KL).
    A move takes a block to any option with a lower KL than its current one (freshly calibrated: only with ``swaps``
    and a plan that can build blocks; one that also costs no more is taken first) or gives it its original MLP back
    (None: KL 0; not without ``keep_mlps``). With one option per block this gives the most sensitive block its MLP
    back; with exact units offered (--plan-units) a block gains units before any MLP comes back where that buys
    more. Without a plan the last block goes back to its MLP; None: no move is left. Without ``swaps`` (the model
    was fine-tuned whole: a freshly calibrated option would be untrained) only MLPs come back."""
    if plan is None:
        return (fqns[-1], None) if keep_mlps else None
    can_swap = plan.build_block is not None and (swaps or not keep_mlps)
    best: tuple[float, float, str, BlockOption | None] | None = None
    for fqn in fqns:
        current = plan.choice[fqn]
        kl_now, macs = plan.sensitivity[fqn][current], plan.macs[fqn]
        moves: list[tuple[BlockOption | None, float]] = [(None, 0.0)] if keep_mlps else []
        if can_swap:
            moves += [(o, kl) for o, kl in plan.sensitivity[fqn].items() if kl < kl_now]
        for option, kl in moves:
            added = macs[option] - macs[current]
            gain = (kl_now - kl) / added if added > 0 else math.inf
            key = (gain, kl_now - kl)
            if best is None or key > best[:2]:
                best = (*key, fqn, option)
    return None if best is None else (best[2], best[3])


def restore_block(model: torch.nn.Module, original: torch.nn.Module, fqn: str) -> None:
    """Put a copy of ``original``'s block ``fqn`` back into ``model`` in place of its Taylor block."""
    replace_module(model, fqn, copy.deepcopy(original.get_submodule(fqn)))


@dataclass
class BudgetCheck:
    """The budget loop's record: the budget (points), the original file's per-image results on the choose split, the
    ``margin`` (in standard errors of the measured drop) the drop must leave, the ``rate`` that predicts a drop from
    the logit distance (tmlp.drop_rate; None: judge the measured drop) and one step per measured T-MLP file (blocks
    replaced, accuracy, drop and its paired standard error in points, logit distance and predicted drop). The budget
    holds when the judged drop (predicted, else measured) + margin × standard error <= budget: a file is not passed
    on a lucky reading of 2,500 images."""

    max_acc_drop: float
    original_correct: np.ndarray
    margin: float = 0.0
    rate: DropRate | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def original(self) -> float:
        return float(self.original_correct.mean())

    @property
    def accuracy(self) -> float:
        return self.steps[-1]["accuracy"]

    @property
    def drop(self) -> float:
        """The last measured drop, in points."""
        return self.steps[-1]["drop_points"]

    @property
    def standard_error(self) -> float:
        """The last measured drop's paired standard error, in points."""
        return self.steps[-1]["standard_error_points"]

    @property
    def judged(self) -> float:
        """The drop the last step is judged by, in points: predicted from its logit distance (``DropRate.judge``),
        else measured."""
        step = self.steps[-1]
        if self.rate is None or step["distance"] is None:
            return self.drop
        return self.rate.judge(Reading(step["accuracy"], self.original, step["distance"],
                                       step["standard_error_points"]))

    def holds(self) -> bool:
        return bool(self.judged + self.margin * self.standard_error <= self.max_acc_drop + 1e-9)

    def measure(self, fqns: list[str], correct: np.ndarray, seconds: float, distance: float | None = None) -> None:
        accuracy = float(correct.mean())
        self.steps.append({"blocks": list(fqns), "accuracy": accuracy,
                           "drop_points": 100 * (self.original - accuracy),
                           "standard_error_points": paired_standard_error(self.original_correct, correct),
                           "distance": distance, "seconds": round(seconds, 1)})
        self.steps[-1]["predicted_drop_points"] = None if self.rate is None or distance is None else self.judged

    def to_dict(self) -> dict[str, Any]:
        return {"max_acc_drop": self.max_acc_drop, "margin_standard_errors": self.margin, "split": "choose",
                "images": len(self.original_correct), "original": self.original, "tmlp": self.accuracy,
                "drop_points": self.drop, "standard_error_points": self.standard_error,
                "judged_drop_points": self.judged, "judged_by": "measured drop" if self.rate is None else
                "drop predicted from the logit distance", "rate": None if self.rate is None else self.rate.to_dict(),
                "holds": self.holds(),
                "backed_off": [f for f in self.steps[0]["blocks"] if f not in self.steps[-1]["blocks"]],
                "steps": self.steps}


def back_off(model: torch.nn.Module, original: torch.nn.Module, fqns: list[str], plan: Plan | None,
             pytorch_drop: Callable[[torch.nn.Module], float], max_drop: float,
             log: Callable[[str], None], keep_mlps: bool = True, swaps: bool = True,
             recover: Callable[[torch.nn.Module], None] | None = None) -> list[str]:
    """Make ``next_move`` until the PyTorch drop (points, as judged: ``pytorch_drop`` may predict it from the logit
    distance) is within ``max_drop``, at least one move; returns the
    blocks still replaced (``plan.choice`` follows the moves). Raises when none is left (without ``keep_mlps``:
    when every block holds its least sensitive option). Without ``swaps`` (the model was fine-tuned whole) blocks
    go straight back to their MLP; ``recover(model)``, if given, trains the model briefly after each move."""
    fqns = list(fqns)
    while fqns:
        move = next_move(plan, fqns, keep_mlps, swaps=swaps)
        if move is None:
            raise TmlpError(f"no T-MLP model with every block replaced holds --max-acc-drop {max_drop:g} points on "
                            "the choose split, even with every block at its least sensitive option; nothing was "
                            "written. Raise --max-acc-drop, offer larger --plan-k / --plan-rank, or drop "
                            "--replace-all to let blocks keep their MLP")
        fqn, option = move
        if option is None:
            restore_block(model, original, fqn)
            fqns.remove(fqn)
            what = "is its original MLP again"
        else:
            replace_module(model, fqn, plan.build_block(fqn, option))
            what = f"takes a less sensitive option, {option.label()}"
        if plan is not None:
            plan.choice[fqn] = option
        if recover is not None and fqns:
            recover(model)
        drop = pytorch_drop(model)
        log(f"  backing off: {fqn} {what}; {len(fqns)} block(s) replaced, PyTorch drop on the choose split "
            f"{drop:+.2f} points (as judged)")
        if fqns and drop <= max_drop + 1e-9:  # points from fractions of images: 100 * (0.53 - 0.52) is 1.0000000000000009
            return fqns
    raise TmlpError(f"no T-MLP model holds --max-acc-drop {max_drop:g} points on the choose split, even with one "
                    "block replaced at its least sensitive option; nothing was written. Raise --max-acc-drop, or let "
                    "distillation train longer (--distill-images, --check-images)")
