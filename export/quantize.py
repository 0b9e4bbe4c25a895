"""int8 baselines with onnxruntime's quantization tools (file in, file out)."""
from __future__ import annotations

import contextlib
import io
import logging
import os

import onnx

from tmlp.export.onnx_export import set_metadata
from tmlp.io import atomic_path


def quantize_int8_dynamic(src: str, dst: str, op_types: list[str] | None = None) -> None:
    """onnxruntime dynamic quantization of ``src`` into ``dst``: int8 weights (per channel) for MatMul/Gemm (or
    ``op_types``), activations quantized at run time. Keeps ``src``'s metadata_props and marks tmlp.kind."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("root").setLevel(logging.ERROR)
    with atomic_path(dst) as tmp, contextlib.redirect_stdout(io.StringIO()):
        quantize_dynamic(src, tmp, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=op_types or ["MatMul", "Gemm"])
        model = onnx.load(tmp)
        meta = {p.key: p.value for p in onnx.load(src, load_external_data=False).metadata_props}
        meta["tmlp.kind"] = meta.get("tmlp.kind", "original") + "+int8"
        set_metadata(model, meta)
        onnx.save_model(model, tmp)
    if not os.path.isfile(dst):
        raise RuntimeError(f"quantization did not write {dst}")
