"""`tmlp bench --pareto`: every compressor and sensible composition on one accuracy–latency–size front.

From a run folder written by ``tmlp export`` (its spec and files), build each variant as an ONNX file under
``DIR/pareto/`` — the float original, onnxruntime dynamic and static int8, T-MLP, token reduction, hidden-unit
pruning and low-rank MLPs (ViTs; Tucker-2 convolutions for CNNs) at the T-MLP's MLP multiply-add share, each with
a short distillation fine-tune, and their compositions (T-MLP + static int8 + token reduction among them) — then
measure them all with ``runtime/run.py`` in fresh processes, interleaved, on the run's report split (val.npz), and
write ``DIR/pareto.json``, ``DIR/pareto.md`` and ``DIR/pareto.png``.

    variant = (name, methods, how it is built); built once, cached by file: a second run measures again only
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from tmlp.errors import TmlpError
from tmlp.io import write_json, write_text
from tmlp.measure import exact_units
from tmlp.taylor.exact import float_scopes

__all__ = ["BUDGETS", "ParetoOptions", "Variant", "fastest_within", "pareto_front", "plot_pareto", "replaced_mac_share",
           "run_pareto"]

Log = Callable[[str], None]
FOLDER = "pareto"


@dataclass(frozen=True)
class ParetoOptions:
    """How the variants are built: ``token_keep`` the share of patch tokens token reduction keeps; ``finetune_images``
    the training images of the pruned/low-rank/Tucker variants' distillation fine-tune (0: none); ``mlp_keep`` the
    shares of MLP multiply-adds pruning and low rank keep, one pair of variants each (empty: the T-MLP's own)."""

    token_keep: float = 0.7
    finetune_images: int = 5000
    mlp_keep: tuple[float, ...] = ()


@dataclass
class Variant:
    """One point of the front: ``onnx`` relative to the run folder; ``methods`` the compressors it composes."""

    name: str
    methods: tuple[str, ...]
    onnx: str
    notes: dict[str, Any] = field(default_factory=dict)


BUDGETS = (0.0, 0.5, 1.0, 2.0)  # accuracy budgets (points below the fp32 original) the winners are named for


def fastest_within(variants: list[dict[str, Any]], budgets: tuple[float, ...] = BUDGETS) -> list[dict[str, Any]]:
    """For each budget (points of accuracy the variant may lose against the first, the fp32 original), the fastest
    variant within it (p50): ``{"budget_points", "name", "speedup_vs_fp32", "accuracy_drop_points"}``."""
    base = variants[0]
    out = []
    for budget in budgets:
        within = [v for v in variants if base["accuracy"] - v["accuracy"] <= budget + 1e-9]
        best = min(within, key=lambda v: (v["p50_ms"], -v["accuracy"]))
        out.append({"budget_points": budget, "name": best["name"],
                    "speedup_vs_fp32": base["p50_ms"] / best["p50_ms"],
                    "accuracy_drop_points": base["accuracy"] - best["accuracy"]})
    return out


def pareto_front(latency: list[float], accuracy: list[float]) -> list[int]:
    """Indices of the points no other point beats on both (lower latency, higher accuracy), by latency."""
    order = sorted(range(len(latency)), key=lambda i: (latency[i], -accuracy[i]))
    front, best = [], -float("inf")
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return front


class _Builder:
    """Builds the variants of one run folder (the model and data loaded once, on first need)."""

    def __init__(self, run_dir: str, manifest: dict[str, Any], log: Log, progress: bool, token_keep: float,
                 finetune_images: int, mlp_keep: tuple[float, ...]):
        from tmlp.spec import ExportSpec

        self.run_dir, self.manifest, self.log, self.progress = run_dir, manifest, log, progress
        self.spec = ExportSpec.from_dict(manifest["spec"])
        self.token_keep, self.finetune_images, self.mlp_keep_given = token_keep, finetune_images, mlp_keep
        self._loaded = None
        os.makedirs(os.path.join(run_dir, FOLDER), exist_ok=True)

    def path(self, rel: str) -> str:
        return os.path.join(self.run_dir, rel)

    @property
    def loaded(self):
        if self._loaded is None:
            from tmlp import stages

            checkpoint = self.spec.source.checkpoint
            if checkpoint and not os.path.isfile(checkpoint):
                raise TmlpError(f"the run's checkpoint {checkpoint!r} is not here; run tmlp bench --pareto from the "
                                "folder the export ran in")
            self._loaded = stages.load(self.spec, self.log, self.progress)
        return self._loaded

    @property
    def has_class_token(self) -> bool:
        return int(getattr(self.loaded.model, "num_prefix_tokens", 0) or 0) >= 1 and hasattr(self.loaded.model,
                                                                                                 "blocks")

    def mlp_keeps(self) -> tuple[float, ...]:
        """The shares of MLP multiply-adds the baselines keep in the blocks T-MLP replaced: those asked for, else the
        Taylor blocks' own (``replaced_mac_share`` of the plan, or of the export's form)."""
        if self.mlp_keep_given:
            return tuple(self.mlp_keep_given)
        return (self._taylor_share(),)

    def _taylor_share(self) -> float:
        share = replaced_mac_share(self.manifest.get("layer_plan") or {})
        if share is not None:
            return share
        from tmlp.plan import BlockOption, mlp_macs, option_macs

        cfg = self.spec.calibration
        ratios = []
        for fqn in self.manifest["layers"]:
            block = self.loaded.model.get_submodule(fqn)
            fc1, fc2 = getattr(block, "fc1", None), getattr(block, "fc2", None)
            if fc1 is None or fc2 is None:
                continue
            d_in, d_out = fc1.weight.shape[1], fc2.weight.shape[0]
            option = BlockOption(cfg.k, cfg.rank if cfg.basis == "shared" else None)
            q = cfg.partition_rank if cfg.partition_rank and cfg.partition_rank < d_in else None
            macs = option_macs(option, d_in, d_out, cfg.order, partition_rank=q) + cfg.exact_units * (d_in + d_out)
            ratios.append(macs / mlp_macs(block, d_in, d_out))
        return float(np.mean(ratios)) if ratios else 0.25

    def export(self, net: torch.nn.Module, rel: str, kind: str) -> str:
        """Export PyTorch ``net`` to ``rel`` (checker and parity as every export), unless it is already there."""
        from tmlp import stages

        path = self.path(rel)
        if os.path.isfile(path):
            return rel
        target = stages.resolve_target(self.spec, lambda s: None)
        example, parity_inputs = stages.parity_examples(self.loaded, self.spec)
        meta = {**stages.common_metadata(self.loaded, self.spec.model, None), "tmlp.kind": kind}
        stages.export_verified(net.eval(), path, meta, example, parity_inputs, target, self.log)
        return rel

    def quantized(self, src_rel: str, how: str, taylor: list[str] | None) -> str:
        """``src_rel`` in int8: onnxruntime dynamic (MatMul/Gemm weights) or static QDQ; Taylor blocks stay float."""
        stem = src_rel[:-len(".onnx")]
        units = exact_units(self.manifest)
        scopes = float_scopes({f: units.get(f, 0) for f in taylor}) if taylor else None
        rel = f"{stem}.int8{'-static' if how == 'static' else ''}.onnx"
        if os.path.isfile(self.path(rel)):
            return rel
        if how == "dynamic":
            from tmlp.export.quantize import quantize_int8_dynamic

            quantize_int8_dynamic(self.path(src_rel), self.path(rel), op_types=["MatMul", "Gemm"],
                                  exclude_scopes=scopes)
        else:
            from tmlp.export.static_quant import quantize_int8_static
            from tmlp.quantization import calibration_images

            images = calibration_images(self.loaded, self.spec.quantize.images)
            quantize_int8_static(self.path(src_rel), self.path(rel), images, self.spec.quantize.calibration,
                                 exclude_scopes=scopes)
        return rel

    def finetuned(self, net: torch.nn.Module) -> torch.nn.Module:
        """A short distillation fine-tune of every weight of ``net`` against the original (one pass over
        ``finetune_images`` training images; tmlp.finetune)."""
        from tmlp.finetune import Recipe, finetune_

        if self.finetune_images <= 0:
            return net
        gen, n_batches = self.loaded.labelled_batches("train", self.finetune_images, 64)
        finetune_(net, self.loaded.model, gen, n_batches, epochs=1, recipe=Recipe(lr_taylor=1e-3, lr_model=1e-4),
                  progress=self.progress, require_taylor=False)
        return net

    def tmlp_with_tokens(self, policy: str = "attention") -> tuple[str, list[str]]:
        """T-MLP + token reduction and the Taylor blocks' module paths. From the run's final model (tmlp.pt): token
        reduction (``--token-keep``, ``policy``; the learned policy's scorers trained first), then one fine-tuning
        pass over ``finetune_images`` training images with the export's recipe, into pareto/. A run folder without
        tmlp.pt (an older export) runs the export again with tokens instead, into pareto/tmlp-tokens[-policy]/."""
        from tmlp import stages

        suffix = "" if policy == "attention" else f"-{policy}"
        if not os.path.isfile(self.path(stages.MODEL_FILE)):
            return self._export_again_with_tokens(policy, suffix)
        rel = os.path.join(FOLDER, f"tmlp-tokens-{self.token_keep:g}{suffix}.onnx")
        if not os.path.isfile(self.path(rel)):  # built once: a second run reuses the file
            net, _ = stages.load_tmlp_model(self.run_dir)
            from tmlp.finetune import Recipe, finetune_
            from tmlp.tokens import TokenReduction, apply_token_reduction_, train_token_scorers_

            apply_token_reduction_(net, TokenReduction(keep=self.token_keep, policy=policy))
            if policy == "learned":
                gen, n_batches = self.loaded.labelled_batches("train", max(1, self.finetune_images), 64)
                train_token_scorers_(net, self.loaded.model, gen, n_batches, progress=self.progress)
            if self.finetune_images > 0:
                d = self.spec.distill
                self.log(f"T-MLP + tokens {self.token_keep:g}{suffix}: fine-tuning on {self.finetune_images} "
                         "training images")
                gen, n_batches = self.loaded.labelled_batches("train", self.finetune_images, 64)
                finetune_(net, self.loaded.model, gen, n_batches, epochs=1, recipe=Recipe.of(d),
                          progress=self.progress)
            self.export(net, rel, "tmlp+tokens")
        return rel, list(self.manifest["layers"])

    def _export_again_with_tokens(self, policy: str, suffix: str) -> tuple[str, list[str]]:
        from tmlp.pipeline import run_export
        from tmlp.spec import TokensSpec

        folder = os.path.join(FOLDER, "tmlp-tokens" + suffix)
        rel = os.path.join(folder, "tmlp.onnx")
        if not os.path.isfile(self.path(rel)):
            learned = {"policy_images": max(1, self.finetune_images)} if policy == "learned" else {}
            tokens = TokensSpec(keep=self.token_keep, policy=policy, **learned)
            run_export(dataclasses.replace(self.spec, tokens=tokens, out_dir=self.path(folder)), log=self.log,
                       progress=self.progress)
        return rel, json.load(open(self.path(os.path.join(folder, "manifest.json"))))["layers"]

    def learned_tokens(self) -> str:
        """The original with the learned token policy (scorers trained on ``finetune_images`` training images)."""
        from tmlp.tokens import TokenReduction, apply_token_reduction_, train_token_scorers_

        rel = os.path.join(FOLDER, f"tokens-{self.token_keep:g}-learned.onnx")
        if not os.path.isfile(self.path(rel)):
            net = copy.deepcopy(self.loaded.model)
            apply_token_reduction_(net, TokenReduction(keep=self.token_keep, policy="learned"))
            gen, n_batches = self.loaded.labelled_batches("train", max(1, self.finetune_images), 64)
            train_token_scorers_(net, self.loaded.model, gen, n_batches, progress=self.progress)
            self.export(net, rel, "tokens")
        return rel


def replaced_mac_share(plan: dict) -> float | None:
    """Mean multiply-adds per token of the blocks a plan (a manifest's ``layer_plan``) replaced, as a share of their
    MLPs' (the MLPs it kept do not count: the baselines shrink the same blocks T-MLP replaced); None without a plan
    or with nothing replaced."""
    from tmlp.plan import BlockOption

    choice, options = plan.get("choice") or {}, plan.get("options") or {}
    ratios = [options[fqn][BlockOption(c["k"], c.get("rank"), c.get("units", 0)).label()]["mac_ratio"]
              for fqn, c in choice.items() if c]
    return float(np.mean(ratios)) if ratios else None


def _variants(b: _Builder) -> list[Variant]:
    """Build every variant (or reuse the file from an earlier run); the list in the order they are timed."""
    from tmlp.baselines import low_rank_, prune_hidden_, tucker_conv_
    from tmlp.tokens import TokenReduction, apply_token_reduction_

    taylor = b.manifest.get("layers") or []
    out = [Variant("fp32 original", (), "original.onnx"), Variant("T-MLP", ("tmlp",), "tmlp.onnx")]
    for how in ("dynamic", "static"):
        out.append(Variant(f"int8 {how}", (f"int8-{how}",), b.quantized("original.onnx", how, None)))
        out.append(Variant(f"T-MLP + int8 {how}", ("tmlp", f"int8-{how}"), b.quantized("tmlp.onnx", how, taylor)))
    keeps = b.mlp_keeps()
    b.log("baselines keep " + ", ".join(f"{100 * k:.1f}%" for k in keeps) + " of the MLP multiply-adds"
          + ("" if b.mlp_keep_given else " (the T-MLP's share)"))
    if b.has_class_token:
        net = copy.deepcopy(b.loaded.model)
        schedule = apply_token_reduction_(net, TokenReduction(keep=b.token_keep))
        rel = b.export(net, os.path.join(FOLDER, f"tokens-{b.token_keep:g}.onnx"), "tokens")
        out.append(Variant(f"tokens {b.token_keep:g}", ("tokens",), rel, {"schedule": schedule}))
        out.append(Variant(f"tokens {b.token_keep:g} + int8 dynamic", ("tokens", "int8-dynamic"),
                           b.quantized(rel, "dynamic", None)))
        rel = b.learned_tokens()
        out.append(Variant(f"tokens {b.token_keep:g} learned", ("tokens-learned",), rel))
        out.append(Variant(f"tokens {b.token_keep:g} learned + int8 dynamic", ("tokens-learned", "int8-dynamic"),
                           b.quantized(rel, "dynamic", None)))
        for policy, method, label in (("attention", "tokens", ""), ("learned", "tokens-learned", " learned")):
            try:
                rel, mlp_layers = b.tmlp_with_tokens(policy)
            except TmlpError as err:
                b.log(f"T-MLP + tokens{label} skipped: {err}")
                continue
            out.append(Variant(f"T-MLP + tokens {b.token_keep:g}{label}", ("tmlp", method), rel))
            for how in ("dynamic", "static"):
                out.append(Variant(f"T-MLP + tokens {b.token_keep:g}{label} + int8 {how}",
                                   ("tmlp", method, f"int8-{how}"), b.quantized(rel, how, mlp_layers)))
    for method, fn in (("prune", prune_hidden_), ("low-rank", low_rank_)):
        for keep in keeps:
            rel = os.path.join(FOLDER, f"{method}-{keep:.3f}.onnx")
            if not os.path.isfile(b.path(rel)):
                net = copy.deepcopy(b.loaded.model)
                record = fn(net, taylor, keep)
                if not record["blocks"]:
                    b.log(f"{method} skipped: no block it can shrink ({record['skipped']})")
                    break
                b.log(f"{method}: {len(record['blocks'])} MLP block(s) at {100 * keep:.1f}% of their multiply-adds; "
                      f"fine-tuning on {b.finetune_images} training images")
                b.export(b.finetuned(net), rel, method)
            name = f"{method} MLPs" + (f" {100 * keep:.3g}%" if len(keeps) > 1 else "")
            notes = {"mlp_keep": keep}
            out.append(Variant(name, (method,), rel, notes))
            out.append(Variant(f"{name} + int8 dynamic", (method, "int8-dynamic"), b.quantized(rel, "dynamic", None),
                               notes))
    if not b.has_class_token:
        rel = os.path.join(FOLDER, "tucker-0.5.onnx")
        if not os.path.isfile(b.path(rel)):
            net = copy.deepcopy(b.loaded.model)
            record = tucker_conv_(net, 0.5)
            if record["layers"]:
                b.export(b.finetuned(net), rel, "tucker")
        if os.path.isfile(b.path(rel)):
            out.append(Variant("Tucker convs 0.5", ("tucker",), rel))
            out.append(Variant("Tucker convs 0.5 + int8 dynamic", ("tucker", "int8-dynamic"),
                               b.quantized(rel, "dynamic", None)))
    return out


def run_pareto(run_dir: str, provider: str = "cpu", threads: int = 1, warmup: int = 10, runs: int = 50,
               batch: int = 1, repeats: int = 3, fallback: bool = False, options: ParetoOptions = ParetoOptions(),
               log: Log = print, progress: bool = True) -> dict[str, Any]:
    """Build and measure every variant of ``run_dir``; write pareto.json, pareto.md and pareto.png there."""
    from tmlp.measure import measure_in_subprocess, ran_on
    from tmlp.runtime import run as runtime_run

    manifest_path = os.path.join(run_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise TmlpError(f"{run_dir!r} has no manifest.json; pass a folder written by `tmlp export`")
    manifest = json.load(open(manifest_path))
    if "spec" not in manifest:
        raise TmlpError(f"{manifest_path} has no export spec (written by an older tmlp); export again")
    try:  # a provider this onnxruntime lacks is refused before anything is built
        runtime_run.session_providers(provider, fallback)
    except runtime_run.RunError as err:
        raise TmlpError(str(err)) from None
    builder = _Builder(run_dir, manifest, log, progress, options.token_keep, options.finetune_images,
                       options.mlp_keep)
    variants = _variants(builder)
    data = os.path.join(run_dir, "val.npz")
    measured: list[list[dict[str, Any]]] = [[] for _ in variants]
    for rep in range(repeats):
        for i, v in enumerate(variants):
            log(f"measuring {v.name} [{rep + 1}/{repeats}] ({v.onnx})")
            measured[i].append(measure_in_subprocess(builder.path(v.onnx), data, provider, threads, warmup, runs,
                                                     batch, accuracy=rep == 0, fallback=fallback))
    rows = []
    for v, reps in zip(variants, measured):
        first = reps[0]
        rows.append({"name": v.name, "methods": list(v.methods), "onnx": v.onnx, "accuracy": 100 * first["accuracy"],
                     "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in reps),
                     "p90_ms": statistics.median(r["latency_ms"]["p90"] for r in reps),
                     "file_mb": first["file_bytes"] / 2**20,
                     "peak_rss_mib": statistics.median(r["peak_rss_delta_mb"] for r in reps
                                                       if r.get("peak_rss_delta_mb") is not None)
                     if any(r.get("peak_rss_delta_mb") is not None for r in reps) else None,
                     "p50_ms_each_repeat": [r["latency_ms"]["p50"] for r in reps], **v.notes})
    base = rows[0]
    for row in rows:
        row["speedup_vs_fp32"] = base["p50_ms"] / row["p50_ms"]
        row["accuracy_drop_points"] = base["accuracy"] - row["accuracy"]
    front = pareto_front([r["p50_ms"] for r in rows], [r["accuracy"] for r in rows])
    for i, row in enumerate(rows):
        row["on_front"] = i in front
    result = {"run": run_dir, "model": manifest.get("model"), "dataset": manifest.get("dataset"),
              "n_eval": measured[0][0].get("n_eval"), "provider": ran_on([{"provider": m[0]["provider"]}
                                                                           for m in measured]),
              "threads": threads, "batch": batch, "runs": runs, "repeats": repeats,
              "token_keep": options.token_keep, "mlp_keep": list(builder.mlp_keeps()),
              "finetune_images": options.finetune_images,
              "machine": measured[0][0].get("machine"), "variants": rows, "fastest_within": fastest_within(rows)}
    result["markdown"] = format_pareto(result)
    write_json(os.path.join(run_dir, "pareto.json"), {k: v for k, v in result.items() if k != "markdown"})
    write_text(os.path.join(run_dir, "pareto.md"), result["markdown"] + "\n")
    plot_pareto(result, os.path.join(run_dir, "pareto.png"))
    return result


def format_pareto(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} on {result['dataset']} ({result['n_eval']} report-split images), onnxruntime "
             f"{result['provider']}, {result['threads']} thread(s), batch {result['batch']}, medians of "
             f"{result['repeats']} interleaved repeats; * on the accuracy–latency front", "",
             "| variant | accuracy | drop (points) | p50 ms | p90 ms | speed-up | file MB | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["variants"]:
        rss = "–" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.1f}"
        lines.append(f"| {'*' if r['on_front'] else ''}{r['name']} | {r['accuracy']:.2f}% | "
                     f"{r['accuracy_drop_points']:+.2f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['speedup_vs_fp32']:.2f}x | {r['file_mb']:.1f} | {rss} |")
    lines += ["", "| accuracy budget (points below fp32) | fastest variant within it | speed-up | drop (points) |",
              "|---|---|---|---|"]
    lines += [f"| {w['budget_points']:g} | {w['name']} | {w['speedup_vs_fp32']:.2f}x | "
              f"{w['accuracy_drop_points']:+.2f} |" for w in result.get("fastest_within") or fastest_within(
                  result["variants"])]
    return "\n".join(lines)


def plot_pareto(result: dict[str, Any], path: str, span_points: float = 3.0) -> str | None:
    """Accuracy vs p50 latency, one numbered point per variant (the numbers listed beside the plot with accuracy
    and speed-up, the front in bold), the front drawn; the y axis spans ``span_points`` below the fp32 original and
    variants below that sit on the bottom edge as down-triangles. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    rows = result["variants"]
    base = rows[0]
    top = max(r["accuracy"] for r in rows)
    floor = min(min(r["accuracy"] for r in rows), base["accuracy"] - span_points)
    floor = max(floor, base["accuracy"] - span_points)
    fig, (ax, side) = plt.subplots(1, 2, figsize=(13, 6.5), dpi=120, gridspec_kw={"width_ratios": [2.0, 1.2]})
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["p50_ms"])
    ax.plot([r["p50_ms"] for r in front], [max(r["accuracy"], floor) for r in front], "-", color="tab:green", lw=2,
            zorder=1,
            label="front (no variant faster and more accurate)")
    for i, r in enumerate(rows, 1):
        colour = "tab:red" if "tmlp" in r["methods"] else "tab:blue"
        below = r["accuracy"] < floor
        y = floor if below else r["accuracy"]
        ax.scatter(r["p50_ms"], y, s=70 if r["on_front"] else 35, color=colour, zorder=2, marker="v" if below else "o",
                   edgecolor="black" if r["on_front"] else "none", clip_on=False)
        ax.annotate(str(i), (r["p50_ms"], y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                    fontweight="bold" if r["on_front"] else "normal")
    ax.axhline(base["accuracy"] - 1.0, color="grey", ls=":", lw=1, label="1 point below the fp32 original")
    ax.scatter([], [], color="tab:red", label="with T-MLP")
    ax.scatter([], [], color="tab:blue", label="without T-MLP")
    ax.scatter([], [], color="grey", marker="v", label=f"more than {span_points:g} points below (drawn at the edge)")
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # "2", not "2 × 10^0"
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_ylim(floor - 0.15, top + 0.4)
    ax.set_xlabel(f"p50 latency, ms (log scale; batch {result['batch']}, {result['threads']} thread(s))")
    ax.set_ylabel("top-1 accuracy on the report split, %")
    ax.set_title(f"{result['model']} on {result['dataset']}: accuracy vs latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8, frameon=False)
    side.axis("off")
    side.text(0.0, 1.0, "  #  accuracy  speed-up  variant (bold: on the front)", fontsize=8.5, family="monospace",
              fontweight="bold", va="top", transform=side.transAxes)
    step = min(0.045, 0.95 / max(1, len(rows)))
    for k, r in enumerate(rows):
        line = f"{k + 1:>3}  {r['accuracy']:6.2f}%  {r['speedup_vs_fp32']:6.2f}x  {r['name']}"
        side.text(0.0, 0.955 - k * step, line, fontsize=8, family="monospace", va="top",
                  fontweight="bold" if r["on_front"] else "normal", transform=side.transAxes)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
