"""tmlp: replace the MLP blocks of a trained network by Taylor expansions and deploy them with onnxruntime.

The public API (imported on first use, so that ``import tmlp`` and ``tmlp --help`` stay fast)::

    tmlp.TaylorConfig, tmlp.ExportSpec            # what to build (tmlp.spec: the only place defaults live)
    tmlp.taylorize_(model, config, filter_fn)     # surgery in place, calibrating on batches=
    tmlp.calibrate(model, fqns, batches, n, cfg)  # calibration alone
    tmlp.export_onnx(model, example, path, meta)  # torch -> ONNX, checked
    tmlp.run_export(spec)                         # the whole export, as `tmlp export` runs it
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {"TaylorConfig": "tmlp.spec", "ExportSpec": "tmlp.spec", "SourceSpec": "tmlp.spec", "BlocksSpec": "tmlp.spec",
        "PlanSpec": "tmlp.spec", "DistillSpec": "tmlp.spec", "TargetSpec": "tmlp.spec", "QuantizeSpec": "tmlp.spec",
        "TmlpError": "tmlp.errors",
        "taylorize_": "tmlp.surgery", "calibrate": "tmlp.calibration.calibrate", "TaylorMLP": "tmlp.taylor.block",
        "SharedTaylorMLP": "tmlp.taylor.block", "export_onnx": "tmlp.export.onnx_export",
        "run_export": "tmlp.pipeline", "ExportResult": "tmlp.pipeline"}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tmlp' has no attribute {name!r}")
