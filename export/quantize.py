"""int8 with onnxruntime's quantization tools (file in, file out): the int8 baseline of the original model, and
"T-MLP + int8", where every MatMul/Gemm outside the Taylor blocks is quantized and the Taylor blocks stay fp32."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os

import onnx

from tmlp.export.onnx_export import set_metadata
from tmlp.io import atomic_path

__all__ = ["NAME_SCOPES", "node_modules", "nodes_in_scopes", "quantize_int8_dynamic"]

NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata written by torch.onnx's dynamo exporter


def nodes_in_scopes(model: onnx.ModelProto, scopes: list[str]) -> list[str]:
    """Names of the nodes that the exporter placed inside any of the module paths ``scopes`` (e.g. "blocks.0.mlp"):
    read from each node's name-scope metadata (dynamo exporter), else from its name (TorchScript exporter:
    "/blocks/blocks.0/mlp/ArgMin")."""
    wanted = set(scopes)
    return [node.name for node in model.graph.node if wanted & set(_node_scopes(node))]


def node_modules(model: onnx.ModelProto) -> dict[str, str]:
    """Each node's innermost enclosing module path (e.g. "blocks.3.attn.qkv"; "" at the top level), read as
    ``nodes_in_scopes`` reads scopes: a report can then name a layer by the module it came from."""
    return {node.name: (_node_scopes(node) or [""])[-1] for node in model.graph.node}


def _node_scopes(node: onnx.NodeProto) -> list[str]:
    """Module paths enclosing ``node``, outermost first: its name-scope metadata (dynamo exporter, whose last entry
    is the op's own and is dropped), else parsed from its name (TorchScript exporter)."""
    found = [_parse_scopes(p.value) for p in node.metadata_props if p.key == NAME_SCOPES]
    return found[0][:-1] if found else _scopes_from_name(node.name)


def _scopes_from_name(name: str) -> list[str]:
    """Module paths enclosing a TorchScript-exported node: "/blocks/blocks.0/mlp/fc1/MatMul" -> ["blocks",
    "blocks.0", "blocks.0.mlp", "blocks.0.mlp.fc1"]."""
    path: list[str] = []
    out = []
    for part in name.split("/")[1:-1]:
        if path and part.startswith(".".join(path) + "."):
            path = part.split(".")
        else:
            path.append(part)
        out.append(".".join(path))
    return out


def _parse_scopes(value: str) -> list[str]:
    try:
        return [str(s) for s in json.loads(value.replace("'", '"'))]
    except (ValueError, TypeError):
        return []


def quantize_int8_dynamic(src: str, dst: str, op_types: list[str] | None = None,
                          exclude_scopes: list[str] | None = None) -> list[str]:
    """onnxruntime dynamic quantization of ``src`` into ``dst``: int8 weights (per channel) for MatMul/Gemm (or
    ``op_types``), activations quantized at run time; nodes inside the module paths ``exclude_scopes`` stay fp32.
    Keeps ``src``'s metadata_props, marks tmlp.kind, and returns the names of the excluded nodes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = onnx.load(src, load_external_data=False)
    excluded = nodes_in_scopes(source, exclude_scopes) if exclude_scopes else []
    if exclude_scopes and not excluded:
        raise RuntimeError(f"no node of {src} lies in {exclude_scopes[:3]}...: the exporter wrote no name scopes")
    logging.getLogger("root").setLevel(logging.ERROR)
    with atomic_path(dst) as tmp, contextlib.redirect_stdout(io.StringIO()):
        quantize_dynamic(src, tmp, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=op_types or ["MatMul", "Gemm"], nodes_to_exclude=excluded)
        model = onnx.load(tmp)
        meta = {p.key: p.value for p in source.metadata_props}
        meta["tmlp.kind"] = meta.get("tmlp.kind", "original") + "+int8"
        set_metadata(model, meta)
        onnx.save_model(model, tmp)
    if not os.path.isfile(dst):
        raise RuntimeError(f"quantization did not write {dst}")
    return excluded
