"""torch -> ONNX for T-MLP models: export, graph checks, parity, metadata, token chunking, memory and int8.

The names below are the public surface (imported on first use, so that importing a submodule stays light).
"""
from __future__ import annotations

import importlib
from typing import Any

_API = {name: "tmlp.export.onnx_export" for name in ("export_onnx", "op_counts", "parity", "set_metadata",
                                                     "drop_stack_traces")}
_API.update({name: "tmlp.export.quantize" for name in ("quantize_int8_dynamic",)})
_API.update({name: "tmlp.export.memory" for name in ("MIB", "estimate_memory", "fit_memory")})
_API.update({name: "tmlp.export.chunking" for name in ("chunk_rows_",)})
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tmlp.export' has no attribute {name!r}")
