"""The static int8 stage of an export (``--quantize static``): original.int8-static.onnx and tmlp.int8-static.onnx
beside the float files, in the staging folder, with mixed precision under the accuracy budget.

    calibrate activation ranges on training images (once per file, cached) -> quantize (Taylor blocks float)
    -> under a budget: measure tmlp.int8-static.onnx on the choose split against the float original; while it
       loses more than the budget, keep the most sensitive layers float (export/static_quant.mixed_precision)
    -> both files' accuracy on the report split (recorded in the manifest)
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import numpy as np

from tmlp.taylor.exact import float_scopes
from tmlp.budget import ort_accuracy
from tmlp.runtime.run import preprocess

__all__ = ["STATIC_FILES", "calibration_images", "quantize_stage"]

Log = Callable[[str], None]
STATIC_FILES = {"original.onnx": "original.int8-static.onnx", "tmlp.onnx": "tmlp.int8-static.onnx"}


def calibration_images(loaded: Any, images: int) -> np.ndarray:
    """The first ``images`` training images [N, C, H, W] float32, preprocessed as the device runner does."""
    train = loaded.data.train
    return preprocess(train.images(np.arange(min(images, len(train)))), loaded.spec)


def quantize_stage(loaded: Any, spec: Any, exported: Any, staging: str, units: dict[str, int], log: Log = print,
                   progress: bool = True) -> dict[str, Any] | None:
    """Write the static int8 files of ``spec.quantize`` into ``staging`` (adding them to ``exported.files``) and
    return their record for the manifest; None when ``spec.quantize.mode`` is "none". ``units``: {replaced block:
    hidden units it keeps exact} (tmlp.taylor.exact.kept_units), whose Taylor parts stay float."""
    from tmlp.export.static_quant import quantize_int8_static

    q = spec.quantize
    if q.mode == "none":
        return None
    calib = calibration_images(loaded, q.images)
    splits = loaded.val_splits(spec.source)
    budget = spec.plan.max_acc_drop
    record: dict[str, Any] = {"mode": q.mode, "calibration": q.calibration, "images": len(calib), "files": {}}
    log(f"static int8 (onnxruntime QDQ: int8 per-channel weights, uint8 activations, {q.calibration} ranges on "
        f"{len(calib)} training images; Taylor blocks stay float)")
    with tempfile.TemporaryDirectory(prefix="tmlp-int8-") as work:
        for src_name, dst_name in STATIC_FILES.items():
            src, dst = exported.files[src_name], os.path.join(staging, dst_name)
            cache = os.path.join(work, f"ranges-{src_name}.json")
            scopes = float_scopes(units) if src_name == "tmlp.onnx" and units else None
            quantize_int8_static(src, dst, calib, q.calibration, exclude_scopes=scopes, cache=cache)
            kept: list[str] = []
            if budget is not None and src_name == "tmlp.onnx":
                kept, ranking = hold_int8_budget(src, dst, loaded, spec, exported, calib, cache, scopes, work, log,
                                                 progress)
                if ranking:
                    record["sensitivity"] = [{"node": s.node, "module": s.module, "op_type": s.op_type, "js": s.js}
                                          for s in ranking]
            record["files"][dst_name] = {"from": src_name, "layers_kept_float": kept,
                                         "report_accuracy": ort_accuracy(dst, splits.report, loaded.spec)}
            exported.files[dst_name] = dst
    for dst_name, info in record["files"].items():
        log(f"  {dst_name}: {100 * info['report_accuracy']:.2f}% on the report split ({len(splits.report)} "
            f"images)" + (f", {len(info['layers_kept_float'])} layer(s) kept float" if info["layers_kept_float"]
                          else ""))
    return record


def hold_int8_budget(src: str, dst: str, loaded: Any, spec: Any, exported: Any, calib: np.ndarray, cache: str,
                     scopes: list[str] | None, work: str, log: Log, progress: bool) -> tuple[list[str], list]:
    """Keep the fewest most sensitive layers of ``src`` float in ``dst`` so that it loses at most the budget against
    the float original on the choose split; returns those layers ([] when plain int8 holds) and the per-layer
    sensitivity ranking ([] when it was not needed)."""
    from tmlp.export.static_quant import layer_sensitivity, mixed_precision

    choose = loaded.val_splits(spec.source).choose
    budget = spec.plan.max_acc_drop
    original = (exported.budget or {}).get("original")
    if original is None:
        original = ort_accuracy(exported.files["original.onnx"], choose, loaded.spec)

    def accept(path: str) -> bool:
        return 100 * (original - ort_accuracy(path, choose, loaded.spec)) <= budget + 1e-9

    if accept(dst):
        log(f"  tmlp.int8-static.onnx holds the {budget:g}-point budget on the choose split with every layer int8")
        return [], []
    probe = preprocess(choose.images(np.arange(min(256, len(choose)))), loaded.spec)
    log(f"  tmlp.int8-static.onnx breaks the {budget:g}-point budget: measuring each layer's int8 sensitivity")
    ranking = layer_sensitivity(src, calib, probe, spec.quantize.calibration, cache, work, scopes, progress)
    log("  most sensitive: " + ", ".join(f"{s.module or s.node} ({s.js:.2e})" for s in ranking[:5]))
    return mixed_precision(src, dst, ranking, accept, spec.quantize.calibration, cache, scopes, log), ranking
