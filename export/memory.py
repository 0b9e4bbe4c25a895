"""Static estimate of an ONNX model's memory: weights, and the peak working memory of its activations.

The working-memory peak is the largest sum of live tensors over the graph's topological order (the analysis of the
MobileNetV2 paper, §5.1): a tensor is live from the node that produces it to the last node that reads it, graph
inputs from the start, graph outputs to the end. Shapes come from onnxruntime's symbolic shape inference with the
batch dimension fixed. Initializers and Constant outputs are the static part (weights).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    import torch

MIB = 1024 * 1024


@dataclass
class MemoryEstimate:
    """Bytes of weights and of the activation peak at ``batch``; ``peak_node`` is where the peak occurs and
    ``largest`` the biggest activation tensors (name, bytes, producing node)."""

    batch: int
    weights_bytes: int
    peak_activation_bytes: int
    peak_node: str
    largest: list[tuple[str, int, str]] = field(default_factory=list)
    unknown_shapes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.peak_activation_bytes

    def summary(self) -> str:
        return (f"weights {self.weights_bytes / MIB:.1f} MiB + peak activations {self.peak_activation_bytes / MIB:.1f}"
                f" MiB (at {self.peak_node}, batch {self.batch}) = {self.total_bytes / MIB:.1f} MiB")


def _dtype_size(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def _tensor_bytes(value: onnx.ValueInfoProto) -> int | None:
    t = value.type.tensor_type
    if not t.HasField("shape") or not all(d.HasField("dim_value") for d in t.shape.dim):
        return None
    return int(np.prod([d.dim_value for d in t.shape.dim], dtype=np.int64)) * _dtype_size(t.elem_type)


def infer_shapes(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of ``model`` with the first dimension of each graph input set to ``batch`` and every shape inferred."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    # On an incomplete inference onnxruntime saves its partial model as sym_shape_infer_temp.onnx (+ .data) in the
    # working folder and raises; run it in a scratch folder and fall back to onnx's own (partial) inference, whose
    # unknown shapes the estimate counts in ``unknown_shapes``.
    with tempfile.TemporaryDirectory(prefix="tmlp-shapes-") as scratch, contextlib.chdir(scratch):
        try:
            return SymbolicShapeInference.infer_shapes(fixed, auto_merge=True)
        except Exception:  # onnxruntime raises a bare Exception("Incomplete symbolic shape inference")
            return onnx.shape_inference.infer_shapes(fixed)


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        total += int(np.prod(init.dims, dtype=np.int64)) * _dtype_size(init.data_type)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    total += int(np.prod(attr.t.dims, dtype=np.int64)) * _dtype_size(attr.t.data_type)
    return total


def estimate_memory(model: str | onnx.ModelProto, batch: int = 1, top: int = 5) -> MemoryEstimate:
    """Weights and the activation peak of ``model`` (a path or a ModelProto) at ``batch`` (see module docstring)."""
    proto = onnx.load(model) if isinstance(model, str) else model
    inferred = infer_shapes(proto, batch)
    graph = inferred.graph
    sizes: dict[str, int] = {}
    unknown = 0
    for value in list(graph.value_info) + list(graph.output) + list(graph.input):
        b = _tensor_bytes(value)
        if b is None:
            unknown += 1
        else:
            sizes[value.name] = b
    static = {i.name for i in graph.initializer}
    static |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in static:
                last_use[name] = i
    end = len(graph.node)
    for out in graph.output:
        last_use[out.name] = end
    start = {v.name: 0 for v in graph.input if v.name not in static}
    start.update({o: i for o, i in producer.items() if o not in static})
    # sweep: +size at the producing step, -size after the last use (unused outputs die right after they are made)
    delta = np.zeros(end + 2, dtype=np.int64)
    for name, s in start.items():
        b = sizes.get(name, 0)
        delta[s] += b
        delta[max(s, last_use.get(name, s)) + 1] -= b
    live = np.cumsum(delta)[:end + 1]
    peak_step = int(live.argmax())
    peak_node = graph.node[min(peak_step, end - 1)].name or graph.node[min(peak_step, end - 1)].op_type
    largest = sorted(((n, sizes.get(n, 0), graph.node[s].name if s < end and n in producer else "input")
                      for n, s in start.items()), key=lambda t: -t[1])[:top]
    return MemoryEstimate(batch=batch, weights_bytes=initializer_bytes(proto), peak_activation_bytes=int(live.max()),
                          peak_node=peak_node, largest=largest, unknown_shapes=unknown)


def fit_memory(model: "torch.nn.Module", fqns: list[str], example: "torch.Tensor", budget_mb: float, batch: int,
               opset: int, max_ir: int | None, log=print) -> dict:
    """Choose how many row chunks the blocks ``fqns`` of ``model`` evaluate in (tmlp.export.chunking) so that the
    exported graph's estimated memory (weights + peak live activations at ``batch``) fits ``budget_mb`` MiB; wraps
    the blocks in place and returns the choice with its estimates."""
    from tmlp.errors import TmlpError
    from tmlp.export.chunking import chunk_rows_
    from tmlp.export.onnx_export import export_onnx

    tried = []
    with tempfile.TemporaryDirectory(prefix="tmlp-memory-") as tmp:
        chunks = 1
        while True:
            chunk_rows_(model, fqns, chunks)
            path = os.path.join(tmp, f"chunks{chunks}.onnx")
            export_onnx(model, example, path, {}, opset=opset, max_ir_version=max_ir)
            est = estimate_memory(path, batch)
            tried.append({"chunks": chunks, "weights_mib": est.weights_bytes / MIB,
                          "peak_activations_mib": est.peak_activation_bytes / MIB, "total_mib": est.total_bytes / MIB})
            log(f"memory estimate with the Taylor blocks in {chunks} chunk(s): {est.summary()}")
            if est.total_bytes <= budget_mb * MIB:
                return {"budget_mib": budget_mb, "batch": batch, "chunks": chunks, "estimates": tried}
            if est.weights_bytes > budget_mb * MIB:
                raise TmlpError(f"the weights alone take {est.weights_bytes / MIB:.1f} MiB, over --max-memory "
                                f"{budget_mb} MiB; lower --k / --rank or use --basis shared")
            if not fqns or chunks >= 256:
                raise TmlpError(f"cannot fit --max-memory {budget_mb} MiB at batch {batch}: {est.summary()} even with "
                                f"{chunks} chunk(s); the largest tensor is {est.largest[0][0]} "
                                f"({est.largest[0][1] / MIB:.1f} MiB); raise the budget or lower --memory-batch")
            chunks *= 2
