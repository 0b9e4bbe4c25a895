"""Calibration: record the inputs the blocks to replace see, cluster them, compute the per-centre tensors.

- ``record``: run a model and hand each selected block's inputs and outputs to a callback (``stream_blocks``).
- ``calibrate``: K-means centres, the per-centre tensors (dense or shared basis), the least-squares fit, the cache.

The names below are the public surface (imported on first use).
"""
from __future__ import annotations

import importlib
from typing import Any

_API = {name: "tmlp.calibration.calibrate" for name in (
    "BlockCalibration", "calibrate", "calibrate_many", "collect_inputs", "fit_least_squares", "kmeans",
    "partition_kmeans", "shared_block")}
_API.update({name: "tmlp.calibration.record" for name in ("block_rows", "get_module", "stream_blocks", "tokens_per_image")})
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tmlp.calibration' has no attribute {name!r}")
