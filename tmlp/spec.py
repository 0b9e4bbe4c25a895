"""The export spec: every choice an export makes, frozen, versioned, validated once, and the only place defaults live.

``ExportSpec`` has one section per stage::

    ExportSpec(model="deit_small",
               source=SourceSpec(checkpoint=None, dataset=None, calib_images=5000, eval_images=10000),
               blocks=BlocksSpec(layers="all", block_k={}),
               calibration=TaylorConfig(k=100, order=1, basis="shared", rank=32, fit="auto", partition_rank=16, ...),
               plan=PlanSpec(max_acc_drop=None),
               distill=DistillSpec(epochs=0),
               target=TargetSpec(device=None, opset=20, max_memory_mb=None),
               out_dir=None)

The CLI builds it from its flags (``ExportSpec.from_flags``), Python users build it directly, and the manifest
stores ``to_dict()``; ``from_dict`` refuses a spec of another version instead of filling in defaults. This module
imports no torch, so ``tmlp --help`` stays fast.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from tmlp.errors import TmlpError

BASES = ("shared", "dense")
BASIS_SOURCES = ("data", "jacobian")
FITS = ("auto", "taylor", "lstsq")
PARTITIONS = ("auto", "input", "hidden")
HESSIANS = ("diag", "full")
DISTILL_SCHEDULES = ("constant", "cosine")
AVERAGE_IMAGES = 30720  # training images of averaged auto fine-tuning (bench/results/finetune-selection)
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
DISTILL_AUGMENTS = ("none", "auto", "crop_flip", "crop")
DROP_JUDGES = ("predicted", "measured")  # how the budget judges a drop (tmlp.drop_rate)


def _positive_int(value: Any, what: str, fix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TmlpError(f"{what} must be a positive integer, got {value!r}{fix}")


def _one_of(value: Any, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise TmlpError(f"{what} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class TaylorConfig:
    """How to replace one block (the calibration section of the spec; ``taylorize_`` takes it per block).

    ``k`` expansion points (K-means centres of the block's inputs); Taylor ``order`` 0, 1 or 2 (``hessian`` "diag";
    "full" is refused with its storage figure); K-means ``seed``, ``n_init`` and ``max_tokens`` rows kept per block
    (None: max(20000, 20 k)). ``basis`` "shared" factors J_c ≈ U S_c Vᵀ with V of rank ``rank`` and U of rank
    ``rank_out`` (None: ``rank``, at most the block's output width), chosen from ``basis_source`` ("data" or "jacobian"); "dense" stores a Jacobian per
    centre. ``fit`` "lstsq" refits the per-centre tensors to the block's outputs (ridge ``fit_ridge`` towards the
    Taylor values), "taylor" keeps the derivatives, "auto" is lstsq for the shared basis and taylor for dense.
    ``partition`` "input" serves a token from its nearest centre, "hidden" measures the distance through the block's
    first Linear layer, "auto" is hidden wherever that layer keeps all the block's input directions and input
    elsewhere (tmlp.taylor.partition.resolve_partition); ``partition_rank`` q finds cells and assigns tokens in q
    principal directions (None: all). ``exact_units`` m keeps the m hidden units a piecewise-linear block serves worst
    exact beside the Taylor block, which is calibrated on the rest (tmlp.taylor.exact; two-layer MLPs only)."""

    VERSION: ClassVar[int] = 2
    k: int = 100
    order: int = 1
    hessian: str = "diag"
    seed: int = 0
    n_init: int = 1
    max_tokens: int | None = None
    basis: str = "shared"
    rank: int = 32
    rank_out: int | None = None
    basis_source: str = "data"
    fit: str = "auto"
    fit_ridge: float = 1e-2
    partition: str = "input"
    partition_rank: int | None = 16
    exact_units: int = 0

    def __post_init__(self) -> None:
        _positive_int(self.k, "--k", " (expansion points per block)")
        if self.order not in (0, 1, 2):
            raise TmlpError(f"Taylor order must be 0, 1 or 2, got {self.order!r}; use 2 for the diagonal Hessian")
        _one_of(self.hessian, HESSIANS, "hessian")
        _one_of(self.basis, BASES, "basis")
        _one_of(self.basis_source, BASIS_SOURCES, "basis source")
        _one_of(self.fit, FITS, "fit")
        _one_of(self.partition, PARTITIONS, "partition")
        if self.basis == "shared" and (self.order == 0 or self.rank < 1):
            raise TmlpError(f"a shared basis needs order 1 or 2 and rank >= 1, got order {self.order}, rank "
                            f"{self.rank}; order 0 (no Jacobian to share) takes --basis dense")
        if self.rank_out is not None:
            _positive_int(self.rank_out, "--rank-out", " (or none for the same as --rank)")
        if self.partition_rank is not None:
            _positive_int(self.partition_rank, "--partition-rank", " (or none for all input dimensions)")
        if self.fit == "auto":  # the least-squares fit needs the shared basis; dense Jacobians keep the Taylor values
            object.__setattr__(self, "fit", "lstsq" if self.basis == "shared" else "taylor")
        if self.fit == "lstsq" and self.basis != "shared":
            raise TmlpError("--fit lstsq fits shared-basis blocks; use --basis shared, or --fit taylor with dense "
                            "Jacobians")
        if self.fit_ridge < 0:
            raise TmlpError(f"--fit-ridge must be >= 0, got {self.fit_ridge}")
        if not isinstance(self.exact_units, int) or self.exact_units < 0:
            raise TmlpError(f"--exact-units must be an integer >= 0 (hidden units kept exact per block), got "
                            f"{self.exact_units!r}")
        if self.max_tokens is None:
            object.__setattr__(self, "max_tokens", max(20000, 20 * self.k))
        if self.n_init < 1 or self.max_tokens < self.k:
            raise TmlpError(f"n_init must be >= 1 and max_tokens >= k ({self.k}), got {self.n_init}, "
                            f"{self.max_tokens}")

    @property
    def output_rank(self) -> int:
        """The rank of U: ``rank_out``, or ``rank`` when no separate output rank is given (calibration caps it at
        the block's output width)."""
        return self.rank if self.rank_out is None else self.rank_out

    def replace(self, **changes: Any) -> "TaylorConfig":
        """A copy with ``changes``; ``max_tokens`` is derived again from the new k unless given."""
        if "k" in changes and "max_tokens" not in changes:
            changes["max_tokens"] = None
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line for logs: 'shared basis rank 32 (data), least-squares fit (ridge 0.01), ...'."""
        ranks = f"rank {self.rank}" if self.rank_out is None else f"rank {self.rank} in, {self.rank_out} out"
        form = f"shared basis {ranks} ({self.basis_source})" if self.basis == "shared" else "dense Jacobians"
        if self.fit == "lstsq":
            form += f", least-squares fit (ridge {self.fit_ridge})"
        if self.partition != "input" or self.partition_rank:
            name = "hidden (input where the first layer narrows)" if self.partition == "auto" else self.partition
            form += f", {name} partition" + (
                f" in {self.partition_rank} principal directions" if self.partition_rank else "")
        if self.exact_units:
            form += f", {self.exact_units} exact hidden units"
        return form

    def to_dict(self) -> dict[str, Any]:
        return {"_type": "TaylorConfig", "_version": self.VERSION, "_data": asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaylorConfig":
        return cls(**_versioned_data(d, cls, "calibrate again"))


def _versioned_data(d: dict[str, Any], cls: type, fix: str) -> dict[str, Any]:
    """The ``_data`` of a ``{"_type", "_version", "_data"}`` dict written by ``cls``, checked: same type, same
    version, exactly ``cls``'s fields."""
    if not isinstance(d, dict) or d.get("_type") != cls.__name__ or d.get("_version") != cls.VERSION:
        got = (d.get("_type"), d.get("_version")) if isinstance(d, dict) else type(d).__name__
        raise TmlpError(f"cannot read {cls.__name__} {got}; this tmlp reads {cls.__name__} v{cls.VERSION}: {fix}")
    names = {f.name for f in fields(cls)}
    data = d.get("_data", {})
    if set(data) != names:
        odd = sorted(set(data) ^ names)
        raise TmlpError(f"{cls.__name__} v{cls.VERSION} with fields {odd} missing or unknown: {fix}")
    return data


@dataclass(frozen=True)
class SourceSpec:
    """Where the model and its data come from. No ``checkpoint`` and not ``pretrained``: the embedded default (the
    model trained on digits once and cached). ``dataset`` None: the checkpoint's own data set."""

    checkpoint: str | None = None
    pretrained: bool = False
    dataset: str | None = None
    data_root: str | None = None
    calib_images: int = 5000  # training images streamed through the model for calibration
    eval_images: int = 10000  # validation images used at all (the first ones of the split)
    choose_fraction: float = 0.5  # of those, the share that choices are made on; the rest is the report split

    def __post_init__(self) -> None:
        _positive_int(self.calib_images, "--calib-images")
        _positive_int(self.eval_images, "--eval-images")
        if not 0.0 < self.choose_fraction < 1.0:
            raise TmlpError(f"--choose-fraction must be between 0 and 1 (the share of validation images choices "
                            f"are made on), got {self.choose_fraction}")


@dataclass(frozen=True)
class BlocksSpec:
    """Which blocks to replace: ``layers`` "all", block indices "0,3" or module names; ``block_k`` a per-block k
    ("0=400,blocks.5.mlp=200"), resolved against the model's blocks by the select stage."""

    layers: str = "all"
    block_k: str | None = None


@dataclass(frozen=True)
class PlanSpec:
    """The accuracy budget: ``max_acc_drop`` points of top-1 accuracy the final T-MLP model (distilled, in
    onnxruntime, on the choose split) may lose against the original. The plan stage chooses per block whether to
    replace it and with which k, rank and exact hidden units (``k_choices``/``rank_choices``/``unit_choices``; None:
    the calibration's own k, rank and exact units alone, so the plan decides only which blocks to replace),
    allowing ``headroom`` points more before distillation when distillation runs (it wins them back, or the export
    backs off until the budget holds). None: no budget; every selected block is replaced as the
    calibration section says (what ``tmlp export`` does when form flags such as --k or --layers are given).
    ``replace_all``: under the budget every selected block is replaced; the plan chooses only k and rank, the
    back-off only moves blocks to safer options, and the export fails rather than give an MLP back. ``margin``: the
    budget holds when the judged drop plus ``margin`` paired standard errors fits (0: the drop alone). ``judge``:
    a drop is judged "predicted" from the model's logit distance at a fitted rate (tmlp.drop_rate), or "measured"
    (its top-1 drop on the choose split)."""

    max_acc_drop: float | None = 1.0
    k_choices: tuple[int, ...] | None = None
    rank_choices: tuple[int, ...] | None = None
    unit_choices: tuple[int, ...] | None = None  # exact hidden units per block (tmlp.taylor.exact); 0: none
    headroom: float = 2.0
    replace_all: bool = False
    margin: float = 0.0  # standard errors of the measured drop it must leave below the budget (tmlp.budget)
    judge: str = "predicted"  # a drop is judged "predicted" from the logit distance (tmlp.drop_rate) or "measured"

    def __post_init__(self) -> None:
        if self.max_acc_drop is not None and self.max_acc_drop < 0:
            raise TmlpError(f"--max-acc-drop must be >= 0 points, got {self.max_acc_drop}")
        if self.replace_all and self.max_acc_drop is None:
            raise TmlpError("--replace-all chooses k and rank under the accuracy budget; without a budget every "
                            "selected block is replaced anyway: drop --replace-all or give --max-acc-drop")
        if self.headroom < 0:
            raise TmlpError(f"--headroom must be >= 0 points, got {self.headroom}")
        if self.margin < 0:
            raise TmlpError(f"--budget-margin must be >= 0 standard errors, got {self.margin}")
        if self.judge not in DROP_JUDGES:
            raise TmlpError(f"--judge-drop must be one of {', '.join(DROP_JUDGES)}, got {self.judge!r}")
        for what, values in (("--plan-k", self.k_choices), ("--plan-rank", self.rank_choices)):
            if values is not None and (not values or min(values) < 1):
                raise TmlpError(f"{what} takes comma-separated positive integers like 25,50,100, got {values!r}")
        if self.unit_choices is not None and (not self.unit_choices or min(self.unit_choices) < 0):
            raise TmlpError("--plan-units takes comma-separated hidden-unit counts >= 0 like 0,64,256, got "
                            f"{self.unit_choices!r}")


@dataclass(frozen=True)
class DistillSpec:
    """Training after calibration. ``epochs`` None ("auto"): only when the budget needs it (the T-MLP model loses
    more than the budget on the choose split), streaming up to one pass over the training images (``images`` None:
    all of them) and checking the choose-split accuracy every ``check_images`` images, stopping when it has not
    improved for ``patience`` checks in a row or reaches the original's (the best weights are kept). ``epochs`` N:
    exactly N passes over ``images`` (None: the calibration images), no checks; 0: none. With ``finetune`` every
    weight of the network is trained with the Taylor blocks in place (``lr`` for the Taylor tensors, ``finetune_lr``
    for the rest; loss KL to the original's logits +
    ``label_weight`` × cross-entropy; tmlp.finetune); without it logit distillation of the Taylor tensors alone.
    ``precision`` "bf16" runs the training steps' forward passes under bf16 autocast (the checks stay fp32); "auto"
    does where the CPU multiplies bf16 natively (tmlp.train.native_bf16). ``average`` (auto fine-tuning only):
    train over ``images`` (None: ``AVERAGE_IMAGES``) without stopping early, average the weights at every check and
    keep the average whose choose-split KL to the original is lowest (SWA-style)."""

    epochs: int | None = None
    lr: float = 1e-3
    train_basis: bool = False
    schedule: str = "constant"
    images: int | None = None
    finetune: bool = True
    finetune_lr: float = 2e-5
    label_weight: float = 0.5
    check_images: int = 5000
    patience: int = 2
    recover_images: int = 0  # after whole-model fine-tuning: images of fine-tuning after each MLP the budget gives back
    precision: str = "auto"  # bf16 autocast of the training steps where the CPU has native bf16 matmuls, else fp32
    augment: str = "none"  # random crops/flips of the training images (tmlp.data.augment_batch); "auto": the data set's
    average: bool = False  # auto fine-tuning: no early stop; the running mean of the weights at the checks, lowest KL kept

    def __post_init__(self) -> None:
        if (self.epochs is not None and self.epochs < 0) or self.lr <= 0:
            raise TmlpError(f"--distill-epochs must be >= 0 (or auto) and --distill-lr > 0, got {self.epochs}, "
                            f"{self.lr}")
        _positive_int(self.check_images, "--check-images")
        _positive_int(self.patience, "--check-patience")
        if self.recover_images < 0:
            raise TmlpError(f"--recover-images must be >= 0 (0: none), got {self.recover_images}")
        _one_of(self.schedule, DISTILL_SCHEDULES, "distillation schedule")
        _one_of(self.precision, TRAIN_PRECISIONS, "--train-precision")
        _one_of(self.augment, DISTILL_AUGMENTS, "--distill-augment")
        if self.images is not None:
            _positive_int(self.images, "--distill-images", " (or none for the calibration images)")
        if self.finetune_lr < 0 or self.label_weight < 0:
            raise TmlpError(f"--finetune-lr and the label weight must be >= 0, got {self.finetune_lr}, "
                            f"{self.label_weight}")
        if self.finetune and self.train_basis:
            raise TmlpError("--finetune keeps the shared bases fixed; drop --distill-basis, or pass --no-finetune to "
                            "distil the Taylor tensors (and bases) alone")


@dataclass(frozen=True)
class TargetSpec:
    """What the ONNX files must fit: a board profile (``device``, caps opset and IR version), the ``opset``, and a
    memory budget in MiB at ``memory_batch`` images (None: no budget)."""

    device: str | None = None
    opset: int = 20
    max_memory_mb: float | None = None
    memory_batch: int = 1

    def __post_init__(self) -> None:
        _positive_int(self.opset, "--opset")
        if self.max_memory_mb is not None and self.max_memory_mb <= 0:
            raise TmlpError(f"--max-memory must be > 0 MiB, got {self.max_memory_mb}")
        _positive_int(self.memory_batch, "--memory-batch")


QUANTIZE_MODES = ("none", "static")
QUANT_CALIBRATIONS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantizeSpec:
    """Static int8 files beside the float ones. ``mode`` "static": original.int8-static.onnx and
    tmlp.int8-static.onnx, onnxruntime QDQ with int8 per-channel weights and uint8 activations whose ranges come from
    ``images`` training images (``calibration``: minmax, entropy or percentile); the Taylor blocks stay float. Under
    an accuracy budget (plan.max_acc_drop) tmlp.int8-static.onnx must hold it against the float original on the
    choose split: the layers whose quantization moves the logits most (Jensen–Shannon divergence, one layer at a
    time) stay float until it does. "none": no static int8 (``tmlp bench`` still measures dynamic int8)."""

    mode: str = "none"
    calibration: str = "minmax"
    images: int = 256

    def __post_init__(self) -> None:
        _one_of(self.mode, QUANTIZE_MODES, "--quantize mode")
        _one_of(self.calibration, QUANT_CALIBRATIONS, "--quant-calibration method")
        _positive_int(self.images, "--quant-images", " (training images the int8 ranges are calibrated on)")


TOKEN_POLICIES = ("attention", "learned")  # how token reduction ranks tokens (tmlp.tokens)


@dataclass(frozen=True)
class TokensSpec:
    """Token reduction of the T-MLP model (tmlp.tokens; ViTs with a class token): after the attention of ``layers``
    (block indices; empty: EViT's 4th, 7th and 10th of 12, scaled to the depth) keep the ``keep`` share of the patch
    tokens ranked highest, plus one fused token of the rest (``fuse``). ``keep`` None: off. ``policy`` "attention"
    ranks by the class token's attention (training-free); "learned" adds a score predictor per reducing block,
    trained on ``policy_images`` training images against the original's logits before distillation. The reduction
    is applied after the Taylor blocks are built and before distillation, so distillation and the accuracy budget
    see it; original.onnx stays the unreduced reference."""

    keep: float | None = None
    layers: tuple[int, ...] = ()
    fuse: bool = True
    policy: str = "attention"
    policy_images: int = 10000

    def __post_init__(self) -> None:
        if self.keep is not None and not (isinstance(self.keep, (int, float)) and 0 < self.keep <= 1):
            raise TmlpError(f"--token-keep must be in (0, 1], the share of patch tokens kept, got {self.keep!r}")
        if any(not isinstance(i, int) or i < 0 for i in self.layers):
            raise TmlpError(f"--token-layers takes block indices >= 0 like 3,6,9, got {self.layers!r}")
        _one_of(self.policy, TOKEN_POLICIES, "--token-policy")
        _positive_int(self.policy_images, "--token-policy-images")


NO_BUDGET = "none"  # --max-acc-drop none: no accuracy budget

SECTIONS: dict[str, type] = {"source": SourceSpec, "blocks": BlocksSpec, "calibration": TaylorConfig,
                             "plan": PlanSpec, "distill": DistillSpec, "target": TargetSpec,
                             "quantize": QuantizeSpec, "tokens": TokensSpec}


@dataclass(frozen=True)
class ExportSpec:
    """One export, complete: the model name, a section per stage, and the output folder (None:
    runs/<model>-<dataset>)."""

    VERSION: ClassVar[int] = 11
    model: str
    source: SourceSpec = field(default_factory=SourceSpec)
    blocks: BlocksSpec = field(default_factory=BlocksSpec)
    calibration: TaylorConfig = field(default_factory=TaylorConfig)
    plan: PlanSpec = field(default_factory=PlanSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    target: TargetSpec = field(default_factory=TargetSpec)
    quantize: QuantizeSpec = field(default_factory=QuantizeSpec)
    tokens: TokensSpec = field(default_factory=TokensSpec)
    out_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise TmlpError(f"--model must name a model, got {self.model!r}")
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TmlpError(f"ExportSpec.{name} must be a {cls.__name__}, got {type(getattr(self, name))}")

    @classmethod
    def from_flags(cls, model: str, flags: dict[str, Any]) -> "ExportSpec":
        """The spec from CLI flags named ``section__field`` (``out_dir`` alone); None means "not given": the
        field keeps its default here, the only place defaults live. A form flag (a calibration or blocks field)
        without --max-acc-drop (or --replace-all) turns the budget off: the user gets the form asked for. --max-acc-drop none
        (``NO_BUDGET``) turns it off too."""
        given: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        out_dir = flags.pop("out_dir", None)
        for key, value in flags.items():
            section, _, name = key.partition("__")
            if section not in SECTIONS or not name:
                raise KeyError(f"flag {key!r} names no spec field")
            if value is not None:
                given[section][name] = value
        if "max_acc_drop" not in given["plan"] and not given["plan"].get("replace_all") and (
                given["calibration"] or given["blocks"]):
            given["plan"]["max_acc_drop"] = None
        if {"schedule", "train_basis"} & set(given["distill"]) and "finetune" not in given["distill"]:
            given["distill"]["finetune"] = False  # a distillation option asks for distillation
        if given["plan"].get("max_acc_drop") == NO_BUDGET:
            given["plan"]["max_acc_drop"] = None
        return cls(model=model, out_dir=out_dir, **{s: SECTIONS[s](**v) for s, v in given.items()})

    @property
    def form_fixed(self) -> bool:
        """True when no budget chooses the form: every selected block is replaced as the calibration says."""
        return self.plan.max_acc_drop is None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"model": self.model, "out_dir": self.out_dir}
        for name in SECTIONS:
            section = getattr(self, name)
            data[name] = section.to_dict() if isinstance(section, TaylorConfig) else asdict(section)
        return {"_type": "ExportSpec", "_version": self.VERSION, "_data": data}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportSpec":
        fix = "export again with this tmlp (tmlp export), or install the tmlp version that wrote it"
        data = dict(_versioned_data(d, cls, fix))
        sections = {}
        for name, section_cls in SECTIONS.items():
            raw = data.pop(name)
            if section_cls is TaylorConfig:
                sections[name] = TaylorConfig.from_dict(raw)
            else:
                sections[name] = section_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        return cls(**data, **sections)


def default_of(path: str) -> Any:
    """The default of spec field ``section.field`` (for --help texts)."""
    section, _, name = path.partition(".")
    return {f.name: f.default for f in fields(SECTIONS[section])}[name]


def parse_int_list(text: str | None, flag: str, allow_zero: bool = False) -> tuple[int, ...] | None:
    """'25,50,100' -> (25, 50, 100); None stays None. ``allow_zero``: 0 allowed (indices, unit counts)."""
    if text is None:
        return None
    kind = "integers >= 0 like 0,3,6" if allow_zero else "positive integers like 25,50,100"
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise TmlpError(f"{flag} takes comma-separated {kind}, got {text!r}") from None
    if not values or values[0] < (0 if allow_zero else 1):
        raise TmlpError(f"{flag} takes comma-separated {kind}, got {text!r}")
    return values
