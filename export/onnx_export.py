"""torch -> ONNX, then metadata, ``onnx.checker`` (full check) and an onnxruntime parity check against the PyTorch
model. Files are written under a temporary name and renamed only when complete.

Opset 18 and above go through the dynamo exporter (torch.onnx.export(dynamo=True)); below 18, which the dynamo
exporter cannot write (it silently keeps 18), through the TorchScript exporter, which writes LayerNormalization and
Gelu in decomposed form (ReduceMean/Pow/Sqrt, Erf). ``max_ir_version`` lowers the IR version stamp for older
onnxruntime builds, never below what the opset needs."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from tmlp.errors import TmlpError
from tmlp.io import atomic_path

DEFAULT_OPSET = 20
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


@dataclass
class Parity:
    """onnxruntime vs PyTorch on the same inputs: max |diff|, max |diff| / max |torch|, top-1 agreement."""

    max_abs: float
    max_rel: float
    top1_agree: float
    n: int

    def __str__(self) -> str:
        return (f"max abs err {self.max_abs:.3e}, rel err {self.max_rel:.3e}, top-1 agreement "
                f"{100 * self.top1_agree:.2f}% on {self.n} inputs")


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace the model's metadata_props by ``metadata`` (sorted by key, for reproducible bytes)."""
    del model.metadata_props[:]
    for key in sorted(metadata):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(metadata[key])


DYNAMO_MIN_OPSET = 18
# The opsets an export can be written at (measured with torch 2.14, onnx 1.23, onnxruntime 1.32): timm's attention
# (scaled_dot_product_attention) exports from opset 14, the CIFAR VGG-16 (adaptive_max_pool2d) from 8; above 25
# torch.onnx's version converter has no adapter for Attention, and onnxruntime 1.32 runs up to 25.
MAX_OPSET = 25
MIN_OPSET = {"vgg16": (8, "its adaptive max pooling")}
DEFAULT_MIN_OPSET = (14, "timm's attention (scaled_dot_product_attention)")


def check_opset(opset: int, model_name: str) -> None:
    """Refuse, before anything is computed, an opset that ``model_name`` cannot be exported at."""
    low, why = MIN_OPSET.get(model_name, DEFAULT_MIN_OPSET)
    if not low <= opset <= MAX_OPSET:
        raise TmlpError(f"--opset {opset} is outside {low}..{MAX_OPSET}: {model_name} exports from opset {low} "
                        f"({why}) and onnxruntime runs up to {MAX_OPSET}; the default is {DEFAULT_OPSET}")


LARGE_BYTES = 2**31 - 2**24  # protobuf's 2 GiB limit, less a margin for the graph itself


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"  # per-node Python stack with the build machine's absolute paths


def drop_stack_traces(proto: onnx.ModelProto) -> None:
    """Remove torch.onnx's per-node stack traces (they hold the exporting machine's file paths, so the same export
    from two clones would differ in its bytes); the module scopes of each node stay."""
    def nodes(graph: onnx.GraphProto):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from nodes(sub)
    for node in [*nodes(proto.graph), *(n for f in proto.functions for n in f.node)]:
        kept = [(p.key, p.value) for p in node.metadata_props if p.key != STACK_TRACE_KEY]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            for key, value in kept:
                entry = node.metadata_props.add()
                entry.key, entry.value = key, value


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str, metadata: dict[str, str],
                opset: int = DEFAULT_OPSET, verbose: bool = False, max_ir_version: int | None = None) -> Counter:
    """Export ``model`` ([B, ...] -> [B, ...], batch dimension dynamic) to ``path`` with metadata at exactly
    ``opset``, check it with ``onnx.checker.check_model(full_check=True)``; returns the graph's op counts.

    Models whose tensors pass 2 GiB go to ONNX external data: one file ``<name>.data`` beside the model. Both files
    are written in a temporary folder beside ``path`` and moved into place data first, model last."""
    model = model.eval()
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if tensor_bytes >= LARGE_BYTES:
        return _export_large(model, example, path, metadata, opset, verbose)
    sink = io.StringIO()
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(sink) if not verbose else contextlib.nullcontext():
            try:
                proto = _dynamo_export(model, example, opset) if opset >= DYNAMO_MIN_OPSET else \
                    _torchscript_export(model, example, opset)
            except TmlpError:
                raise
            except Exception as err:  # torch.onnx's own error types differ between its two exporters
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                raise TmlpError(f"torch.onnx cannot export this model at opset {opset} ({first}); raise --opset "
                                f"(the default is {DEFAULT_OPSET})") from err
        written = default_opset(proto)
        if written != opset:
            raise TmlpError(f"the exporter wrote opset {written}, not the requested {opset}; pick --opset {written} "
                            "or another --device")
        if max_ir_version is not None and proto.ir_version > max_ir_version:
            needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
            if needed > max_ir_version:
                raise TmlpError(f"opset {opset} needs ONNX IR version {needed}, above the device's {max_ir_version}; "
                                "lower --opset")
            proto.ir_version = max(needed, max_ir_version)
        drop_stack_traces(proto)
        set_metadata(proto, metadata)
        proto.producer_name, proto.producer_version = "tmlp", metadata.get("tmlp.version", "")
        onnx.save_model(proto, tmp)
        onnx.checker.check_model(tmp, full_check=True)
    return op_counts(proto)


def _export_large(model: torch.nn.Module, example: torch.Tensor, path: str, metadata: dict[str, str], opset: int,
                  verbose: bool) -> Counter:
    """The > 2 GiB path: dynamo export saved with external data, checked by path, moved into place."""
    import shutil
    import tempfile

    if opset < DYNAMO_MIN_OPSET:
        raise TmlpError(f"a model over 2 GiB needs opset >= {DYNAMO_MIN_OPSET} (external data through the dynamo "
                        f"exporter), got {opset}; use --basis shared or a smaller --k for this device")
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    os.makedirs(folder, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) if not verbose else \
                contextlib.nullcontext():
            warnings.simplefilter("ignore")
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: batch},), optimize=True, verbose=False)
            for node in program.model.graph.all_nodes():
                node.metadata_props.pop(STACK_TRACE_KEY, None)
            program.model.metadata_props.clear()
            program.model.metadata_props.update({k: str(metadata[k]) for k in sorted(metadata)})
            program.model.producer_name, program.model.producer_version = "tmlp", metadata.get("tmlp.version", "")
            program.save(os.path.join(work, name), external_data=True)
        onnx.checker.check_model(os.path.join(work, name), full_check=True)
        data = [f for f in os.listdir(work) if f != name]
        for f in data:  # the data first: once the model stands under its final name, its data are complete
            os.replace(os.path.join(work, f), os.path.join(folder, f))
        os.replace(os.path.join(work, name), path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return op_counts(path)


def external_data_files(path: str) -> list[str]:
    """Paths of the external data files the model at ``path`` refers to (none for a self-contained model)."""
    model = onnx.load(path, load_external_data=False)
    names = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return [os.path.join(os.path.dirname(os.path.abspath(path)), n) for n in sorted(names)]


def _dynamo_export(model: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """torch.export + torch.onnx with a dynamic batch. torch.export treats a size-1 dimension as the constant 1 in
    some models (ConvNeXt's channels-first LayerNorm); a one-image example that trips on that is traced again as two
    images."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet_loggers("torch._guards", "torch.fx.experimental.symbolic_shapes", "torch._dynamo"):
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    except Exception as err:
        if example.shape[0] != 1 or not _mentions(err, "Constraints violated (batch)"):
            raise
        return _dynamo_export(model, torch.cat([example, example]), opset)
    if program is None:
        raise TmlpError("torch.onnx.export returned no program; upgrade torch (>= 2.6) for the dynamo exporter")
    return program.model_proto


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Silence torch's internal loggers while a trace is tried (its failure is raised, or retried, by the caller)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _mentions(err: BaseException | None, text: str) -> bool:
    """Whether ``err`` or an exception it was raised from says ``text``."""
    seen = 0
    while err is not None and seen < 16:
        if text in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _torchscript_export(model: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                      do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def op_counts(path_or_model: str | onnx.ModelProto) -> Counter:
    """How many nodes of each op type the main graph has."""
    model = onnx.load(path_or_model, load_external_data=False) if isinstance(path_or_model, str) else path_or_model
    return Counter(node.op_type for node in model.graph.node)


def parity(path: str, model: torch.nn.Module, inputs: torch.Tensor, batch: int = 32) -> Parity:
    """Run ``path`` with onnxruntime and ``model`` with PyTorch on ``inputs`` [N, C, H, W]; compare outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ours, theirs = [], []
    with torch.no_grad():
        for s in range(0, len(inputs), batch):
            x = inputs[s:s + batch]
            ours.append(session.run(None, {name: x.numpy()})[0])
            theirs.append(model(x).numpy())
    a, b = np.concatenate(ours), np.concatenate(theirs)
    diff = np.abs(a - b)
    return Parity(float(diff.max()), float(diff.max() / max(1e-12, np.abs(b).max())),
                  float((a.argmax(1) == b.argmax(1)).mean()), len(a))
