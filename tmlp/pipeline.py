"""The whole export from one spec: it only chains the stages of ``tmlp.stages``.

    load -> select -> calibrate -> plan -> build -> reduce tokens (--token-keep) -> distil
         -> export (fit memory, export, verify) -> hold the budget (measure in onnxruntime, back off)
         -> save tmlp.pt -> report -> static int8 (--quantize static) -> publish -> manifest

It writes original.onnx, tmlp.onnx, tmlp.pt (the final model as a PyTorch module), val.npz (and with --quantize
static original.int8-static.onnx and tmlp.int8-static.onnx) and manifest.json (last) into one run folder.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from tmlp import stages
from tmlp.distributed import init, leave, lost_rank
from tmlp.io import check_can_write, signals_deferred, staging_folder
from tmlp.quantization import quantize_stage
from tmlp.spec import ExportSpec
from tmlp.taylor.exact import kept_units


@dataclass
class ExportResult:
    """Where the export went, the files it wrote ({name: path}) and the summary stored in manifest.json."""

    out_dir: str
    files: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)


def default_out_dir(model: str, dataset: str) -> str:
    slug = dataset.replace(":", "-").replace("/", "_").strip("_.-") or "data"
    return os.path.join("runs", f"{model}-{slug}")


def run_export(spec: ExportSpec, log=print, progress: bool = True) -> ExportResult:
    """Calibrate, plan, build and distil the T-MLP model, export original.onnx and tmlp.onnx, check them, hold the
    accuracy budget (backing off if needed), and move them with val.npz into ``spec.out_dir``, manifest.json last.
    Everything is written into a staging folder first: a failed export leaves the run folder as it was.

    Under torchrun every rank streams its share of the calibration and training images (calibration's token sample,
    least-squares sums and gradients are combined over the ranks, so the model is the one-process model up to
    summation order); rank 0 alone logs, then exports, measures and writes, while the other ranks return after the
    last collective stage with an empty ``files``."""
    started = time.time()
    w = init()  # torchrun: join the process group (one process: nothing to do)
    if not w.main:
        log, progress = (lambda message: None), False
    try:
        target = stages.resolve_target(spec, log)
        loaded = stages.load(spec, log, progress)
        out_dir = spec.out_dir or default_out_dir(spec.model, loaded.dataset)
        check_can_write(out_dir)
        selection = stages.select(loaded, spec, log)
        t0 = time.time()
        plan = None
        if spec.plan.max_acc_drop is not None:  # every k the plan may use, in one pass over the data
            calibrations = stages.calibrate_plan_options(loaded, selection, spec, log, progress)
            calib_seconds = time.time() - t0
            selection, calibration, plan = stages.plan_stage(loaded, selection, calibrations, spec, log, progress)
        else:
            calibration = stages.calibrate_selection(loaded, selection, spec.calibration, spec.source.calib_images,
                                                     log, progress)
            calib_seconds = time.time() - t0
        built = stages.build(loaded, selection, calibration, spec.calibration, spec.source, log,
                             rate=None if plan is None else plan.rate)
        built = stages.reduce_tokens(loaded, built, spec, log, progress)
        built = stages.distil(loaded, built, spec, log, progress)
    except RuntimeError as err:
        raise lost_rank(err, w) from None
    leave()  # the collective stages are done: rank 0 goes on alone
    if not w.main:
        return ExportResult(out_dir, {}, {})
    with staging_folder(out_dir) as staging:
        exported = stages.export_models(loaded, selection, built, spec, target, plan, staging, log)
        if spec.plan.max_acc_drop is not None:
            selection, built = stages.hold_budget(loaded, selection, built, spec, target, plan, staging, exported,
                                                  log)
        stages.save_model(built, selection, staging, exported)
        stages.report(loaded, spec, exported, log)
        exported.quantization = quantize_stage(loaded, spec, exported, staging,
                                                  kept_units(built.model, selection.fqns), log, progress)
        summary = stages.summarize(spec, loaded, selection, built, target, plan, exported,
                                   {"calibration_seconds": round(calib_seconds, 1),
                                    "export_seconds": round(time.time() - started, 1), "processes": w.size})
        with signals_deferred():  # the folder holds the earlier export or this one, never a mix
            files = stages.publish_run(staging, out_dir, exported)
            stages.write_manifest(out_dir, files, summary)
    return ExportResult(out_dir, files, summary)
