"""Static int8 with onnxruntime's quantization tools (file in, file out): QDQ format, int8 weights per channel,
uint8 activations whose ranges are calibrated once on training images (MinMax, Entropy or Percentile) and cached,
a per-layer sensitivity report, and mixed precision that keeps the most sensitive layers in float.

- ``quantize_int8_static(src, dst, images, method)``: the weight layers of ``src`` (but ``keep_float`` and the nodes
  inside ``exclude_scopes``, the Taylor blocks) with QuantizeLinear/DequantizeLinear pairs: MatMul/Gemm weights with
  float outputs for transformers, every quantizable op for CNNs (``static_layout``).
- ``layer_sensitivity(src, images, probe, method)``: per weight layer (MatMul/Gemm/Conv with a constant weight), the
  Jensen–Shannon divergence between the float model's class probabilities and those of the model with that layer
  alone quantized, on ``probe`` images [N, C, H, W] (nats; 0 = no change).
- ``mixed_precision(...)``: the fewest most sensitive layers kept in float so that ``accept(path)`` holds.

Activations are calibrated once per (model, images, method) into a ranges file (``cache``) that every later call
reuses: a sensitivity sweep quantizes the model once per layer without running calibration again.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from tmlp.errors import TmlpError
from tmlp.export.onnx_export import set_metadata
from tmlp.export.quantize import node_modules, nodes_in_scopes
from tmlp.io import atomic_path

__all__ = ["CALIBRATION_METHODS", "LayerSensitivity", "js_divergence", "layer_sensitivity", "mixed_precision",
           "quantize_int8_static", "static_layout", "weight_layers"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    if name not in CALIBRATION_METHODS:
        raise TmlpError(f"--quant-calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {name!r}")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


class _Batches:
    """onnxruntime's CalibrationDataReader over preprocessed images [N, C, H, W] float32, ``batch`` at a time."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 16):
        self.input_name, self.images, self.batch, self.pos = input_name, images, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.images):
            return None
        x = self.images[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}

    def rewind(self) -> None:
        self.pos = 0

    def __len__(self) -> int:
        return len(self.images)


def weight_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes whose weight is a constant: MatMul/Gemm/Conv with an initializer input, in graph order."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in WEIGHT_OPS and any(i in constants for i in n.input[1:2])]


def static_layout(model: onnx.ModelProto) -> str:
    """The QDQ layout for ``model``: "matmul" (only the MatMul/Gemm nodes with a constant weight, their outputs
    left float, so onnxruntime runs each as one MatMulIntegerToFloat; a ViT's patch-embedding convolution stays
    float) when most weight layers are MatMul/Gemm; "all" (every op type onnxruntime quantizes, QLinearConv
    chains) when most are convolutions (CNNs). On the CIFAR DeiT-Small T-MLP "matmul" ran at 1.03x the speed of
    dynamic int8, "all" at 0.76x (bench/results/static-int8)."""
    op_type = {n.name: n.op_type for n in model.graph.node}
    layers = weight_layers(model)
    convs = sum(op_type[n] == "Conv" for n in layers)
    return "all" if 2 * convs > len(layers) else "matmul"


LAYOUT_OPTIONS = {"matmul": ({"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]}, ["MatMul", "Gemm"]),
                  "all": ({}, None)}


def quantize_int8_static(src: str, dst: str, images: np.ndarray | None, method: str = "minmax",
                         keep_float: list[str] | None = None, exclude_scopes: list[str] | None = None,
                         only: list[str] | None = None, cache: str | None = None, op_types: list[str] | None = None,
                         extra_options: dict | None = None, layout: str = "auto") -> list[str]:
    """Static QDQ quantization of ``src`` into ``dst``: int8 per-channel weights, uint8 activations calibrated on
    ``images`` [N, C, H, W] float32 (preprocessed as the model takes them) with ``method``. Nodes in ``keep_float``
    or inside the module paths ``exclude_scopes`` stay float; ``only``: quantize just these nodes. ``layout``
    "matmul", "all" or "auto" (``static_layout``); ``op_types`` / ``extra_options`` override the layout's op types
    and add onnxruntime options. ``cache``: a ranges file written on the first call and read by later ones
    (``images`` may then be None). Keeps ``src``'s metadata, marks tmlp.kind; returns the names of the nodes left
    float by ``exclude_scopes`` and ``keep_float``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    source = onnx.load(src, load_external_data=False)
    excluded = nodes_in_scopes(source, exclude_scopes) if exclude_scopes else []
    if exclude_scopes and not excluded:
        raise TmlpError(f"no node of {src} lies in {exclude_scopes[:3]}...: the exporter wrote no name scopes")
    excluded = sorted(set(excluded) | set(keep_float or []))
    if images is None and not (cache and os.path.isfile(cache)):
        raise TmlpError("static quantization needs calibration images or a ranges cache")
    if layout == "auto":
        layout = static_layout(source)
    if layout not in LAYOUT_OPTIONS:
        raise TmlpError(f"static int8 layout must be auto, matmul or all, got {layout!r}")
    layout_options, layout_ops = LAYOUT_OPTIONS[layout]
    if layout == "matmul" and only is None:  # the weight MatMul/Gemm nodes alone, not activation-by-activation ones
        op_type = {n.name: n.op_type for n in source.graph.node}
        only = [n for n in weight_layers(source) if op_type[n] in layout_ops and n not in excluded]
    reader = None if images is None else _Batches(source.graph.input[0].name, images)
    logging.getLogger("root").setLevel(logging.ERROR)
    with atomic_path(dst) as tmp, contextlib.redirect_stdout(io.StringIO()):
        quantize_static(src, tmp, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=_method(method), nodes_to_exclude=excluded, nodes_to_quantize=only,
                        op_types_to_quantize=op_types or layout_ops, calibration_cache_path=cache,
                        extra_options={"CalibPercentile": 99.999, **layout_options, **(extra_options or {})})
        model = onnx.load(tmp)
        meta = {p.key: p.value for p in source.metadata_props}
        meta["tmlp.kind"] = meta.get("tmlp.kind", "original") + "+int8-static"
        what = "MatMul/Gemm weights, float outputs" if layout == "matmul" else "every quantizable op"
        meta["tmlp.quantization"] = (f"static QDQ, int8 per-channel weights, uint8 activations ({method}); "
                                     f"layout {layout}: {what}")
        set_metadata(model, meta)
        onnx.save_model(model, tmp)
    return excluded


def _probabilities(path: str, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Softmax of the logits of ``path`` on ``images`` [N, C, H, W], float64 [N, classes]."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Mean Jensen–Shannon divergence (nats, in [0, ln 2]) between the rows of two probability arrays [N, C]."""
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(a > 0, a * (np.log(np.maximum(a, 1e-300)) - np.log(np.maximum(b, 1e-300))), 0.0).sum(1)
    return float(np.mean(0.5 * kl(p, m) + 0.5 * kl(q, m)))


@dataclass(frozen=True)
class LayerSensitivity:
    """One weight layer's sensitivity: its node name and op type, and the JS divergence (nats) of the model's class
    probabilities with that layer alone quantized; ``module`` is the PyTorch module the node came from."""

    node: str
    op_type: str
    js: float
    module: str = ""


def layer_sensitivity(src: str, images: np.ndarray, probe: np.ndarray, method: str, cache: str, work_dir: str,
                      exclude_scopes: list[str] | None = None, progress: bool = False) -> list[LayerSensitivity]:
    """Every weight layer of ``src`` (outside ``exclude_scopes``) quantized alone, most sensitive first: the JS
    divergence of its class probabilities on ``probe`` [N, C, H, W] from the float model's. The ranges are
    calibrated on ``images`` once (``cache``)."""
    from tqdm import tqdm

    model = onnx.load(src, load_external_data=False)
    skip = set(nodes_in_scopes(model, exclude_scopes)) if exclude_scopes else set()
    op_type, module = {n.name: n.op_type for n in model.graph.node}, node_modules(model)
    layers = [n for n in weight_layers(model) if n not in skip]
    reference = _probabilities(src, probe)
    out = []
    path = os.path.join(work_dir, "one-layer.int8-static.onnx")
    for i, node in enumerate(tqdm(layers, desc="int8 sensitivity per layer", disable=not progress, leave=False)):
        quantize_int8_static(src, path, images if i == 0 else None, method, only=[node], cache=cache)
        out.append(LayerSensitivity(node, op_type[node], js_divergence(reference, _probabilities(path, probe)),
                                    module[node]))
    if os.path.isfile(path):
        os.unlink(path)
    return sorted(out, key=lambda s: -s.js)


def mixed_precision(src: str, dst: str, sensitivity: list[LayerSensitivity], accept: Callable[[str], bool],
                    method: str, cache: str, exclude_scopes: list[str] | None = None, log: Callable[[str], None] = print
                    ) -> list[str]:
    """Quantize ``src`` into ``dst`` keeping the fewest most sensitive layers in float such that ``accept(dst)``
    holds: all quantized first, then the top 1, 2, 4, ... of ``sensitivity`` kept float (the smallest count that
    holds is then found between the last two tried). Returns the layers kept float; raises when even keeping every
    weight layer float does not hold."""
    ranked = [s.node for s in sensitivity]
    written = [-1]  # how many layers the file at dst keeps float

    def holds(m: int) -> bool:
        quantize_int8_static(src, dst, None, method, keep_float=ranked[:m], exclude_scopes=exclude_scopes,
                             cache=cache)
        written[0] = m
        ok = accept(dst)
        log(f"  static int8 with the {m} most sensitive layer(s) kept float: {'holds' if ok else 'broken'}")
        return ok

    if holds(0):
        return []
    low, high = 0, 1
    while not holds(high):
        if high >= len(ranked):
            raise TmlpError(f"static int8 breaks the budget even with all {len(ranked)} weight layers kept float "
                            "(the quantized activations alone cost too much); raise --max-acc-drop or use dynamic "
                            "int8 (tmlp bench measures it)")
        low, high = high, min(2 * high, len(ranked))
    while high - low > 1:  # holds(high), not holds(low)
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid
    if written[0] != high:
        holds(high)  # dst holds the chosen model
    return ranked[:high]
