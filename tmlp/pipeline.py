"""The whole export from one spec: it only chains the stages of ``tmlp.stages``.

    load -> select -> calibrate -> plan -> build -> distil -> fit memory -> export and verify -> manifest

It writes original.onnx, tmlp.onnx, val.npz and manifest.json (last) into one run folder.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tmlp import stages
from tmlp.data import to_tensor
from tmlp.io import check_can_write, ensure_writable_dir
from tmlp.spec import ExportSpec


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
    """Calibrate, build the T-MLP model, export original.onnx and tmlp.onnx, check them, and write val.npz and
    manifest.json (last) into ``spec.out_dir``."""
    started = time.time()
    target = stages.resolve_target(spec, log)
    loaded = stages.load(spec, log, progress)
    out_dir = spec.out_dir or default_out_dir(spec.model, loaded.dataset)
    check_can_write(out_dir)
    selection = stages.select(loaded, spec)
    t0 = time.time()
    calibration = stages.calibrate_selection(loaded, selection, spec.calibration, spec.source.calib_images, log,
                                             progress)
    calib_seconds = time.time() - t0
    plan = None
    if spec.plan.max_acc_drop is not None:
        selection, calibration, plan = stages.plan_stage(loaded, selection, calibration, spec, log, progress)
    built = stages.build(loaded, selection, calibration, spec.calibration, spec.source.eval_images, log)
    built = stages.distil(loaded, built, spec, log, progress)

    val_x = loaded.data.val.images(np.arange(built.n_val))
    example, parity_inputs = to_tensor(val_x[:2], loaded.spec), to_tensor(val_x[:64], loaded.spec)
    common = stages.common_metadata(loaded, spec.model, target.profile.name if target.profile else None)
    meta_tmlp = stages.tmlp_metadata(common, spec.calibration, selection.fqns, spec, selection.block_k, plan)
    memory = None
    if spec.target.max_memory_mb is not None:
        from tmlp.export.memory import fit_memory

        memory = fit_memory(built.model, selection.fqns, example, spec.target.max_memory_mb, spec.target.memory_batch,
                            target.opset, target.max_ir, log)
        meta_tmlp["tmlp.chunks"] = str(memory["chunks"])

    ensure_writable_dir(out_dir)
    stages.clear_run_folder(out_dir)
    files, parity = {}, {}
    for name, net, meta in (("original.onnx", loaded.model, {**common, "tmlp.kind": "original"}),
                            ("tmlp.onnx", built.model, meta_tmlp)):
        done = stages.export_verified(net, os.path.join(out_dir, name), meta, example, parity_inputs, target, log)
        if name == "tmlp.onnx":
            ops = done["ops"]
            log(f"  Taylor blocks in the graph: ArgMin x{ops.get('ArgMin', 0)}, Gather x{ops.get('Gather', 0)}, "
                f"MatMul x{ops.get('MatMul', 0)}")
        files.update({os.path.basename(p): p for p in done["files"]})
        parity[name] = vars(done["parity"])
    files["val.npz"] = stages.write_val_images(out_dir, val_x, loaded.data.val.y[:built.n_val])
    summary = {"spec": spec.to_dict(), "model": spec.model, "model_config": loaded.payload["config"],
               "dataset": loaded.dataset, "checkpoint": loaded.checkpoint, "checkpoint_sha256": loaded.source_sha256,
               "taylor_config": spec.calibration.to_dict(), "layers": selection.fqns, "block_k": selection.block_k,
               "preprocessing": loaded.spec, "pytorch_val_accuracy": {"original": built.accuracy_original,
                                                                      "tmlp": built.accuracy},
               "n_val": built.n_val, "calibration_seconds": round(calib_seconds, 1),
               "distillation": built.distillation, "layer_plan": None if plan is None else plan.to_dict(),
               "device": None if target.profile is None else target.profile.to_dict(), "opset": target.opset,
               "memory": memory, "parity": parity, "versions": stages.versions(),
               "export_seconds": round(time.time() - started, 1)}
    stages.write_manifest(out_dir, files, summary)
    return ExportResult(out_dir, files, summary)
