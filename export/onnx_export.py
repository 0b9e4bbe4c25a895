"""torch -> ONNX with the dynamo exporter, then metadata, ``onnx.checker`` (full check) and an onnxruntime parity
check against the PyTorch model. Files are written under a temporary name and renamed only when complete."""
from __future__ import annotations

import contextlib
import io
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


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str, metadata: dict[str, str],
                opset: int = DEFAULT_OPSET, verbose: bool = False) -> Counter:
    """Export ``model`` ([B, C, H, W] -> [B, classes], batch dimension dynamic) to ``path`` with metadata, check it
    with ``onnx.checker.check_model(full_check=True)``; returns the graph's op counts."""
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    sink = io.StringIO()
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(sink) if not verbose else contextlib.nullcontext():
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: batch},), optimize=True, verbose=False)
        if program is None:
            raise TmlpError("torch.onnx.export returned no program; upgrade torch (>= 2.6) for the dynamo exporter")
        proto = program.model_proto
        set_metadata(proto, metadata)
        proto.producer_name, proto.producer_version = "tmlp", metadata.get("tmlp.version", "")
        _save(proto, tmp)
        onnx.checker.check_model(tmp, full_check=True)
    return op_counts(proto)


def _save(proto: onnx.ModelProto, path: str) -> None:
    """Save inline below 2 GiB, else with one external data file beside the model."""
    if proto.ByteSize() < 2**31 - 2**20:
        onnx.save_model(proto, path)
    else:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data", size_threshold=1024)


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
