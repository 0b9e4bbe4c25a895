"""Choosing, per block, whether to replace it and with which k and rank, under an accuracy budget.

1. Every candidate option (k, rank) of every block is scored by its sensitivity: the KL divergence of the model's
   logits when that block alone is replaced by that option, on a probe set of validation images (its relative
   output error ``‖F̂(x) − F(x)‖ / ‖F(x)‖`` on held-out tokens is reported too, but it is a poor guide: late blocks
   have large relative errors and little effect on the logits). Each option is costed in multiply-accumulates per
   token (MACs, a latency proxy). Options up to rank 32 all cost 3–7% of the MLP in onnxruntime
   (bench/results/option-latency), so by default the export offers each block one option, the calibration's own k
   and rank, and the plan decides only which blocks to replace; ``--plan-k``/``--plan-rank`` offer more, and
   ``--plan-units`` offers hidden units kept exact beside the Taylor block (tmlp.taylor.exact), which cost
   2·m·d MACs per token and measure close to that share of the MLP's time (bench/results/exact-units).
2. One multiplier λ decides everything (the Lagrangian relaxation of "least MACs with summed KL under a budget"):
   each block takes the option minimising MACs/MLP-MACs + λ · KL, the original MLP costing 1 and 0. A binary
   search over the distinct choices λ produces finds the cheapest whose model keeps the validation accuracy within
   ``max_drop`` of the original's (about log2(number of choices) + 2 evaluations). It runs twice, with and without
   the original MLP as an option, and keeps the cheaper result; the second search measures only choices cheaper
   than the first's result. With ``keep_mlps`` off (``--replace-all``) only the first runs: every block replaced.
3. The export judges a choice by its drop *predicted* from its logit distance to the original, at one rate fitted
   over every choice measured (tmlp.drop_rate), not by its measured top-1 drop: on 2,500 images a drop reads
   within ±0.5 points, and keeping the cheapest choice whose reading fits keeps a lucky one.

The sensitivities cost one forward of the probe per block and option. Where the block sits inside an
``nn.Sequential`` (a ViT's ``blocks``), the children before it are replayed from a cached input instead of run
(``replayed_prefix``), checked once per block to reproduce the original logits.

Lower ranks come free from one calibration at the largest rank (the bases' columns are ordered by importance and
S_c = Uᵀ J_c V, so the first r' columns give exactly the rank-r' projection); each k needs its own K-means, and
each count of exact units its own tensors (fitted to F − E) on the same centres.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from tmlp.blocks import channel_dim
from tmlp.calibration.calibrate import BlockCalibration
from tmlp.calibration.record import stream_blocks
from tmlp.drop_rate import DropRate, Reading, logit_distance
from tmlp.errors import TmlpError
from tmlp.surgery import replace_module
from tmlp.taylor.derivatives import SharedDerivatives

__all__ = ["BlockOption", "Plan", "PlanStep", "assignment_width", "block_macs", "block_sensitivities", "candidate_choices", "choose", "held_out_tokens", "logit_kl", "logit_kl_with",
           "mlp_macs", "option_calibration", "option_macs", "plan_blocks", "relative_error", "replayed_prefix",
           "truncate_rank"]


@dataclass(frozen=True, order=True)
class BlockOption:
    """One way to replace a block: ``k`` centres, shared-basis ``rank`` (None: dense Jacobians) and ``units`` hidden
    units kept exact beside the Taylor block (tmlp.taylor.exact; 0: none)."""

    k: int
    rank: int | None = None
    units: int = 0

    @property
    def calibrated_as(self) -> tuple[int, int]:
        """(k, units): the key of the calibration this option comes from (ranks are truncations of one)."""
        return self.k, self.units

    def label(self) -> str:
        return (f"k={self.k}" + ("" if self.rank is None else f" r={self.rank}")
                + (f" +{self.units} units" if self.units else ""))


def truncate_rank(derivatives: SharedDerivatives, rank: int) -> SharedDerivatives:
    """The rank-``rank`` block contained in a higher-rank shared-basis calibration (first ``rank`` columns of V, and
    of U the same share of its columns: a calibration at r = 32, r_out = 48 truncated to 16 keeps 16 and 24).
    Exact for Taylor tensors; for least-squares fitted ones (--fit lstsq) the leading block approximates the rank-r
    fit (the planner measures every candidate it keeps, so its budget holds either way). A block calibrated narrower
    than ``rank`` (all of its input directions kept) is returned whole."""
    r_in, r_out = derivatives.v.shape[1], derivatives.u.shape[1]
    if rank >= r_in:
        return derivatives
    keep = min(r_out, max(1, round(rank * r_out / r_in)))
    return SharedDerivatives(derivatives.value, derivatives.u[:, :keep].contiguous(),
                             derivatives.v[:, :rank].contiguous(), derivatives.s[:, :keep, :rank].contiguous(),
                             None if derivatives.t is None else derivatives.t[:, :keep, :rank].contiguous())


def option_calibration(calibrations: dict[tuple[int, int], dict[str, BlockCalibration]], fqn: str,
                       option: BlockOption) -> BlockCalibration:
    """The calibration of block ``fqn`` for ``option``, from the calibrations per (k, exact units) (rank truncated
    if needed)."""
    cal = calibrations[option.calibrated_as][fqn]
    if option.rank is None or not isinstance(cal.derivatives, SharedDerivatives):
        return cal
    return replace(cal, derivatives=truncate_rank(cal.derivatives, option.rank))


def mlp_macs(block: nn.Module, d_in: int, d_out: int) -> int:
    """MACs per token of the original block: the sum over its Linear layers and 1x1 convolutions (d_in·d_out if it
    has none)."""
    layers = [m.weight for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(w.shape[0] * w.shape[1] for w in layers) if layers else d_in * d_out


def option_macs(option: BlockOption, d_in: int, d_out: int, order: int, rank_out: int | None = None,
                partition_rank: int | None = None) -> int:
    """MACs per token of a Taylor block: distances to k centres (in ``partition_rank`` q directions when the cells
    were found there: q·d_in for the projection + q·k, else k·d_in), then the first- (and second-) order terms
    (``rank_out`` U's rank when it differs from the option's rank)."""
    macs = option.k * d_in if partition_rank is None else partition_rank * (d_in + option.k)
    if option.rank is None:
        return macs + order * d_in * d_out
    r = option.rank
    r_out = r if rank_out is None else rank_out
    return macs + d_in * r + order * r_out * r + r_out * d_out


def block_macs(block: nn.Module, option: BlockOption, d_in: int, d_out: int, order: int) -> int:
    """MACs per token of a built block: ``option_macs`` of its Taylor part, plus m·(d_in + d_out) for the m hidden
    units a HybridTaylorMLP keeps exact (tmlp.taylor.exact)."""
    taylor, exact = getattr(block, "taylor", block), getattr(block, "exact", None)
    macs = option_macs(option, d_in, d_out, order, getattr(taylor, "rank_out", None), assignment_width(taylor))
    return macs + (0 if exact is None else exact.m * (d_in + d_out))


def assignment_width(block: nn.Module) -> int | None:
    """q, the width of the space a Taylor block assigns tokens to cells in (its ``assign_projection`` P [d_in, q]),
    or None when it measures distances in its input space."""
    projection = getattr(block, "assign_projection", None)
    return None if projection is None else int(projection.shape[1])


@torch.no_grad()
def held_out_tokens(model: nn.Module, fqns: list[str], batches: Iterable[torch.Tensor], max_tokens: int = 8192,
                    seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inputs [n, d_in] and outputs [n, d_out] of each block on ``batches`` (model inputs), at most ``max_tokens``
    rows per block sampled uniformly."""
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {f: [] for f in fqns}
    stream_blocks(model, fqns, batches, lambda fqn, x, y: seen[fqn].append((x.float(), y.float())))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for fqn, parts in seen.items():
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        if len(x) > max_tokens:
            keep = torch.randperm(len(x), generator=gen)[:max_tokens]
            x, y = x[keep], y[keep]
        out[fqn] = (x, y)
    return out


@torch.no_grad()
def relative_error(block: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """‖block(x) − y‖_F / ‖y‖_F over the rows of x [n, d_in], y [n, d_out]."""
    return float((block(x) - y).norm() / y.norm().clamp_min(1e-12))


logit_kl = logit_distance  # mean KL(softmax(reference) ‖ softmax(logits)) over the rows, in nats


@torch.no_grad()
def logit_kl_with(model: nn.Module, fqn: str, block: nn.Module, reference: torch.Tensor, probe: torch.Tensor
                  ) -> float:
    """``logit_kl(reference, model(probe))`` with block ``fqn`` of ``model`` alone replaced by ``block``; the
    original block is put back."""
    original = model.get_submodule(fqn)
    replace_module(model, fqn, block)
    try:
        return logit_kl(reference, model(probe))
    finally:
        replace_module(model, fqn, original)


class _Replay(nn.Module):
    """Stands in for the first child of an ``nn.Sequential``: ignores its input and returns ``value``, the cached
    input of a later child (the children in between become Identity)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.value


class _Captured(Exception):
    pass


def _sequential_position(model: nn.Module, fqn: str) -> tuple[nn.Sequential, int] | None:
    """The deepest ``nn.Sequential`` with ``fqn`` in (or as) one of its children, and that child's index."""
    parts = fqn.split(".")
    for depth in range(len(parts), 0, -1):
        parent = model.get_submodule(".".join(parts[:depth - 1]))
        if isinstance(parent, nn.Sequential) and parts[depth - 1].isdigit():
            return parent, int(parts[depth - 1])
    return None


@contextmanager
def replayed_prefix(model: nn.Module, fqn: str, probe: torch.Tensor, reference: torch.Tensor) -> Iterator[bool]:
    """Within the context, ``model(probe)`` skips the children of the ``nn.Sequential`` before the one holding
    ``fqn``: their output on ``probe`` is captured once and replayed. Yields True if it does (the replayed model
    reproduced ``reference``, the original logits on ``probe``), False if the model is left to run whole (no
    Sequential ancestor, the block first, a child called with more than one input, or a mismatch). The model is
    restored on exit. Only ``model(probe)`` may be called inside the context, and ``fqn``'s block may be swapped."""
    found = _sequential_position(model, fqn)
    if found is None or found[1] == 0:
        yield False
        return
    seq, index = found
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            captured.append(args[0])
        raise _Captured

    handle = seq[index].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(probe)
    except _Captured:
        pass
    finally:
        handle.remove()
    if len(captured) != 1:
        yield False
        return
    originals = [seq[i] for i in range(index)]
    seq[0] = _Replay(captured[0])
    for i in range(1, index):
        seq[i] = nn.Identity()
    try:
        with torch.no_grad():
            replayed = model(probe)
        ok = replayed.shape == reference.shape and torch.allclose(
            replayed, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
        if not ok:
            for i, module in enumerate(originals):
                seq[i] = module
        yield ok
    finally:
        for i, module in enumerate(originals):
            seq[i] = module


class PlanStep(NamedTuple):
    """One choice the plan's search measured: its λ, top-1 accuracy (fraction), blocks replaced and MAC ratio; with
    readings also its ``Reading`` on the choose split (tmlp.drop_rate)."""

    lam: float
    accuracy: float
    blocks: int
    mac_ratio: float
    reading: Reading | None = None

    @property
    def distance(self) -> float | None:
        return None if self.reading is None else self.reading.distance


@dataclass
class Plan:
    """Outcome of ``plan_blocks``. Accuracies are fractions; ``max_drop`` is a fraction (0.01 = one point)."""

    baseline: float
    max_drop: float
    errors: dict[str, dict[BlockOption, float]]  # held-out relative output error per block and option
    sensitivity: dict[str, dict[BlockOption, float]]  # logit KL with that block alone replaced by that option
    macs: dict[str, dict[BlockOption | None, int]]  # MACs per token per block and option (None: the original)
    choice: dict[str, BlockOption | None] = field(default_factory=dict)  # None: keep the original block
    accuracy: float | None = None
    steps: list[PlanStep] = field(default_factory=list)  # every choice the search measured
    rate: DropRate | None = None  # with readings: the drop per unit of logit distance, fitted over the steps
    predicted: float | None = None  # with readings: the chosen model's judged drop (points, DropRate.judge)
    # a fresh Taylor block of (fqn, option), from the plan's calibrations (the budget's back-off uses it)
    build_block: Callable[[str, BlockOption], nn.Module] | None = field(default=None, repr=False, compare=False)

    @property
    def chosen(self) -> list[str]:
        return [f for f, o in self.choice.items() if o is not None]

    def mac_ratio(self, choice: dict[str, BlockOption | None] | None = None) -> float:
        """MACs per token of all candidate blocks under the plan (or ``choice``) / with every block original."""
        choice = self.choice if choice is None else choice
        return sum(self.macs[f][o] for f, o in choice.items()) / sum(self.macs[f][None] for f in choice)

    def table(self) -> str:
        lines = ["| block | choice | logit KL alone | held-out rel. error | MACs/token vs MLP |",
                 "| --- | --- | --- | --- | --- |"]
        for fqn, opt in self.choice.items():
            if opt is None:
                lines.append(f"| {fqn} | original MLP | 0 | 0 | 1.00x |")
            else:
                lines.append(f"| {fqn} | {opt.label()} | {self.sensitivity[fqn][opt]:.2e} | "
                             f"{self.errors[fqn][opt]:.4f} | {self.macs[fqn][opt] / self.macs[fqn][None]:.3f}x |")
        return "\n".join(lines)

    def predicted_drop(self, step: PlanStep) -> float:
        """The drop (points) the plan judges ``step`` by: with readings, predicted from its logit distance at the
        fitted rate (``DropRate.judge``), else measured."""
        if self.rate is None or step.reading is None:
            return 100 * (self.baseline - step.accuracy)
        return self.rate.judge(step.reading)

    def settle(self, found: list[dict[str, BlockOption | None]], measured: dict[tuple, PlanStep]) -> None:
        """Take the cheapest of the choices ``found`` within the budget (the more accurate on a tie), with its
        measured accuracy (the original's when nothing was replaced) and, with a rate, its judged drop."""
        def accuracy_of(choice: dict[str, BlockOption | None]) -> float:
            step = measured.get(tuple(choice.items()))
            return self.baseline if step is None else step.accuracy

        self.choice = min(found, key=lambda c: (self.mac_ratio(c), -accuracy_of(c)))
        self.accuracy = accuracy_of(self.choice)
        if self.rate is not None:
            step = measured.get(tuple(self.choice.items()))
            self.predicted = 0.0 if step is None else self.predicted_drop(step)

    def search_table(self) -> str:
        rated = self.rate is not None
        lines = ["| λ (cost per nat of KL) | blocks replaced | MACs/token vs MLPs | accuracy | drop (points) | "
                 + ("logit distance | judged drop | " if rated else "") + "within budget |",
                 "| --- | --- | --- | --- | --- | " + ("--- | --- | " if rated else "") + "--- |"]
        for step in self.steps:
            judged = self.predicted_drop(step)
            lines.append(f"| {step.lam:.4g} | {step.blocks} | {step.mac_ratio:.3f}x | {100 * step.accuracy:.2f}% | "
                         f"{100 * (self.baseline - step.accuracy):+.2f} | "
                         + (f"{step.distance:.4f} | {judged:+.2f} | " if rated else "")
                         + f"{'yes' if judged <= 100 * self.max_drop + 1e-9 else 'no'} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "accuracy": self.accuracy, "max_acc_drop_points": 100 * self.max_drop,
                "mac_ratio": self.mac_ratio(),
                "choice": {f: None if o is None else {"k": o.k, "rank": o.rank, "units": o.units,
                                                      "rel_error": self.errors[f][o],
                                                      "logit_kl": self.sensitivity[f][o]}
                           for f, o in self.choice.items()},
                "options": {f: {o.label(): {"rel_error": e, "logit_kl": self.sensitivity[f][o],
                                            "mac_ratio": self.macs[f][o] / self.macs[f][None]}
                                for o, e in errs.items()} for f, errs in self.errors.items()},
                "search": [{"lambda": st.lam, "accuracy": st.accuracy, "blocks_replaced": st.blocks,
                            "mac_ratio": st.mac_ratio, "logit_distance": st.distance,
                            "judged_drop_points": self.predicted_drop(st)} for st in self.steps],
                "rate": None if self.rate is None else self.rate.to_dict(), "predicted_drop_points": self.predicted}


def choose(sensitivity: dict[str, dict[BlockOption, float]], macs: dict[str, dict[BlockOption | None, int]],
           lam: float, keep_original: bool = True) -> dict[str, BlockOption | None]:
    """Each block's option minimising (MACs / the MLP's MACs) + λ · sensitivity, the original MLP (None) costing 1
    and 0 (offered only if ``keep_original``); ties go to the lower sensitivity."""
    out: dict[str, BlockOption | None] = {}
    for fqn, sens in sensitivity.items():
        full = macs[fqn][None]
        scored = [(1.0, 0.0, None)] if keep_original else []
        scored += [(macs[fqn][o] / full + lam * e, e, o) for o, e in sens.items()]
        out[fqn] = min(scored, key=lambda t: (t[0], t[1]))[2]
    return out


def candidate_choices(sensitivity: dict[str, dict[BlockOption, float]],
                      macs: dict[str, dict[BlockOption | None, int]], keep_original: bool = True
                      ) -> list[tuple[float, dict]]:
    """The distinct choices ``choose`` makes as λ grows from 0 (every block at its cheapest option) to ∞ (every
    block original, or without ``keep_original`` every block at its least sensitive option), each with a λ that
    produces it: λ is probed between consecutive breakpoints (cost_a − cost_b) / (sens_b − sens_a) of every block."""
    breaks = set()
    for fqn, sens in sensitivity.items():
        full = macs[fqn][None]
        items = ([(1.0, 0.0)] if keep_original else []) + [(macs[fqn][o] / full, e) for o, e in sens.items()]
        for ca, sa in items:
            for cb, sb in items:
                if sb > sa and cb < ca:
                    breaks.add((ca - cb) / (sb - sa))
    points = sorted(breaks)
    probes = [0.0] + [(a + b) / 2 for a, b in zip(points, points[1:])] + ([2 * points[-1] + 1] if points else [])
    out: list[tuple[float, dict]] = []
    for lam in probes:
        choice = choose(sensitivity, macs, lam, keep_original)
        if not out or choice != out[-1][1]:
            out.append((lam, choice))
    return out


def plan_blocks(model: nn.Module, calibrations: dict[tuple[int, int], dict[str, BlockCalibration]],
                options: list[BlockOption], order: int, evaluate: Callable[[nn.Module], float | Reading],
                max_drop: float,
                tokens: dict[str, tuple[torch.Tensor, torch.Tensor]], probe: torch.Tensor,
                log: Callable[[str], None] | None = None, progress: bool = False, keep_mlps: bool = True) -> Plan:
    """Per-block (k, rank, units) choice under an accuracy budget (see module docstring). ``calibrations`` maps each
    (k, exact units) of ``options`` to the calibration of every candidate block; ``tokens`` holds each block's
    held-out inputs and outputs (``held_out_tokens``); ``probe`` [n, C, H, W] validation images for the logit-KL
    sensitivities; ``evaluate(model)``: its top-1 accuracy (the plan then judges a choice by its measured drop), or
    its ``Reading`` on the choose split (tmlp.drop_rate: the plan judges a choice by its drop predicted from its
    logit distance, at the rate fitted over every choice measured, and judges them all again at the end by the
    final rate). ``model`` is left unchanged. Without ``keep_mlps`` every block is replaced: the cheapest choice
    within the budget, or, when none is, the least sensitive one (for training to recover)."""
    if max_drop < 0:
        raise TmlpError(f"--max-acc-drop must be >= 0 points, got {100 * max_drop}")
    if not options:
        raise TmlpError("no (k, rank) option to plan with; pass at least one --k")
    fqns = list(tokens)
    originals = {f: model.get_submodule(f) for f in fqns}
    blocks = {(f, o): _build(calibrations, f, o, order, originals[f]) for f in fqns for o in options}
    errors, sensitivity, macs = block_sensitivities(model, blocks, options, order, tokens, probe, progress)
    first = evaluate(model)
    rated = isinstance(first, Reading)
    plan = Plan(baseline=first.original if rated else first, max_drop=max_drop, errors=errors,
                sensitivity=sensitivity, macs=macs, rate=DropRate("the plan's measured candidates") if rated else None,
                build_block=lambda f, o: _build(calibrations, f, o, order, originals[f]))

    def measure(lam: float, choice: dict[str, BlockOption | None]) -> PlanStep:
        try:
            for fqn, opt in choice.items():
                if opt is not None:
                    replace_module(model, fqn, blocks[fqn, opt])
            result = evaluate(model)
        finally:
            for fqn, module in originals.items():
                replace_module(model, fqn, module)
        n, ratio = sum(o is not None for o in choice.values()), plan.mac_ratio(choice)
        if not rated:
            return PlanStep(lam, result, n, ratio)
        plan.rate.add(result)
        return PlanStep(lam, result.accuracy, n, ratio, result)

    measured: dict[tuple, PlanStep] = {}

    def feasible(lam: float, choice: dict[str, BlockOption | None]) -> bool:
        if all(o is None for o in choice.values()):
            return True
        key = tuple(choice.items())
        if key not in measured:
            measured[key] = step = measure(lam, choice)
            plan.steps.append(step)
            if log:
                log(f"  λ = {lam:.4g}: {step.blocks} block(s) replaced, MACs {step.mac_ratio:.3f}x, accuracy "
                    f"{100 * step.accuracy:.2f}% ({100 * (plan.baseline - step.accuracy):+.2f} points)"
                    + (f", logit distance {step.distance:.4f}: judged {plan.predicted_drop(step):+.2f} points "
                       f"at {plan.rate.rate:.3g} points per unit" if rated else ""))
        return plan.predicted_drop(measured[key]) <= 100 * max_drop + 1e-9

    # Two searches: with the original MLP as an option, and with every block replaced (the Lagrangian path only
    # visits the lower convex hull of each block's (cost, KL) points, so "all blocks at a mid option" can be
    # missing from the first); the cheaper feasible result wins, so each search measures only choices cheaper than
    # the best found so far (the candidates' costs grow with λ: a prefix).
    found = [{f: None for f in fqns}] if keep_mlps else []
    for keep_original in (False, True) if keep_mlps else (False,):
        best = min((plan.mac_ratio(choice) for choice in found), default=math.inf)
        candidates = [c for c in candidate_choices(sensitivity, macs, keep_original)  # cheapest first
                      if plan.mac_ratio(c[1]) < best]
        index = smallest_feasible(len(candidates), lambda i: feasible(*candidates[i]))
        if index is not None:
            found.append(candidates[index][1])
    if rated:  # the rate moved with every measurement: judge every measured choice again by the final one
        found = found[:1] if keep_mlps else []
        found += [dict(key) for key, step in measured.items() if feasible(step.lam, dict(key))]
    if not found:  # every block replaced and none within the budget: the least sensitive choice (measured above)
        lam, choice = candidate_choices(sensitivity, macs, keep_original=False)[-1]
        feasible(lam, choice)
        found.append(choice)
    plan.settle(found, measured)
    return plan


def block_sensitivities(model: nn.Module, blocks: dict[tuple[str, BlockOption], nn.Module],
                        options: list[BlockOption], order: int, tokens: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        probe: torch.Tensor, progress: bool = False
                        ) -> tuple[dict[str, dict[BlockOption, float]], dict[str, dict[BlockOption, float]],
                                   dict[str, dict[BlockOption | None, int]]]:
    """Per block of ``tokens`` and option: the held-out relative output error, the logit KL on ``probe`` with that
    block alone replaced by ``blocks[fqn, option]``, and the MACs per token (None: the original block)."""
    model.eval()
    with torch.no_grad():
        reference = model(probe)
    errors: dict[str, dict[BlockOption, float]] = {f: {} for f in tokens}
    sensitivity: dict[str, dict[BlockOption, float]] = {f: {} for f in tokens}
    macs: dict[str, dict[BlockOption | None, int]] = {}
    for fqn in tqdm(list(tokens), desc=f"plan: sensitivity of {len(options)} options per block",
                    disable=not progress, leave=False):
        x, y = tokens[fqn]
        d_in, d_out = x.shape[1], y.shape[1]
        macs[fqn] = {None: mlp_macs(model.get_submodule(fqn), d_in, d_out)}
        with replayed_prefix(model, fqn, probe, reference):
            for opt in options:
                errors[fqn][opt] = relative_error(blocks[fqn, opt], x, y)
                macs[fqn][opt] = block_macs(blocks[fqn, opt], opt, d_in, d_out, order)
                sensitivity[fqn][opt] = logit_kl_with(model, fqn, blocks[fqn, opt], reference, probe)
    return errors, sensitivity, macs


def smallest_feasible(n: int, feasible: Callable[[int], bool]) -> int | None:
    """Smallest i in [0, n) with ``feasible(i)``, assuming feasibility is monotone in i; probes 0, then n − 1,
    then bisects. None if even n − 1 is infeasible."""
    if n == 0:
        return None
    if feasible(0):
        return 0
    if n == 1 or not feasible(n - 1):
        return None
    lo, hi = 1, n - 1  # hi feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _build(calibrations: dict[tuple[int, int], dict[str, BlockCalibration]], fqn: str, option: BlockOption,
           order: int, original: nn.Module) -> nn.Module:
    cal = option_calibration(calibrations, fqn, option)
    return cal.build(order, original, channel_dim(original))
