"""Static int8 (export/static_quant.py): QDQ graphs with the Taylor blocks left float, agreement with the float
model, the per-layer sensitivity report, and mixed precision under an acceptance test."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tmlp.data import to_tensor
from tmlp.errors import TmlpError
from tmlp.export import export_onnx
from tmlp.export.static_quant import (js_divergence, layer_sensitivity, mixed_precision, quantize_int8_static,
                                      weight_layers)
from tmlp.surgery import taylorize_
from tmlp.taylor import TaylorConfig

FQNS = ["blocks.1.mlp", "blocks.3.mlp"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained_tiny_vit_path, digits, digits_spec):
    """(original.onnx, tmlp.onnx with blocks 1 and 3 replaced, calibration images, probe images, labels, folder) of
    the trained tiny ViT on digits."""
    from tmlp.models import load_checkpoint

    out = tmp_path_factory.mktemp("static-int8")
    model = load_checkpoint(trained_tiny_vit_path)[0]
    calib = to_tensor(digits.train.x[:128], digits_spec)
    probe = to_tensor(digits.val.x[:160], digits_spec)
    original = str(out / "original.onnx")
    export_onnx(model, probe[:2], original, {})
    batches = [calib[i:i + 64] for i in range(0, 128, 64)]
    taylorize_(model, TaylorConfig(k=16, rank=8), layers=FQNS, batches=lambda: iter(batches), n_batches=2,
               progress=False)
    tmlp_path = str(out / "tmlp.onnx")
    export_onnx(model, probe[:2], tmlp_path, {})
    return original, tmlp_path, calib.numpy(), probe.numpy(), digits.val.y[:160], out


def _float_weight_layers(path):
    """Weight layers whose weight is not dequantized (left float)."""
    model = onnx.load(path)
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] not in dq}


def _logits(path, x):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_int8_is_a_qdq_graph_that_agrees_with_the_float_model(files, method):
    original, _, calib, probe, labels, out = files
    dst = str(out / f"original.{method}.onnx")
    quantize_int8_static(original, dst, calib, method)
    onnx.checker.check_model(dst)
    ops = [n.op_type for n in onnx.load(dst).graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    ref, q = _logits(original, probe), _logits(dst, probe)
    assert (ref.argmax(1) == q.argmax(1)).mean() >= 0.9
    assert abs((ref.argmax(1) == labels).mean() - (q.argmax(1) == labels).mean()) <= 0.05
    assert onnx.load(dst).metadata_props[-1].key.startswith("tmlp.")


def test_taylor_blocks_stay_float_and_the_rest_is_quantized(files):
    _, tmlp_path, calib, probe, _, out = files
    dst = str(out / "tmlp.int8-static.onnx")
    kept = quantize_int8_static(tmlp_path, dst, calib, "minmax", exclude_scopes=FQNS)
    assert kept and all(n for n in kept)
    model = onnx.load(dst)
    argmins = [n.name for n in model.graph.node if n.op_type == "ArgMin"]
    assert len(argmins) == 2 and set(argmins) <= set(kept)
    floats = _float_weight_layers(dst)
    taylor_matmuls = {n for n in kept if n in {m.name for m in model.graph.node if m.op_type == "MatMul"}}
    assert taylor_matmuls and taylor_matmuls <= floats  # the Taylor blocks' products stay float
    assert len(set(weight_layers(onnx.load(tmlp_path))) - floats) >= 4 * 4  # attention, the other MLPs: int8
    ref, q = _logits(tmlp_path, probe), _logits(dst, probe)
    assert (ref.argmax(1) == q.argmax(1)).mean() >= 0.9


def test_js_divergence_is_zero_for_equal_and_ln2_for_disjoint_distributions():
    p = np.array([[0.2, 0.8], [1.0, 0.0]])
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])) == pytest.approx(np.log(2))


def test_sensitivity_names_every_weight_layer_once_most_sensitive_first(files):
    original, _, calib, probe, _, out = files
    report = layer_sensitivity(original, calib, probe[:64], "minmax", str(out / "ranges.json"), str(out))
    layers = weight_layers(onnx.load(original))
    assert sorted(s.node for s in report) == sorted(layers) and len(layers) >= 6 * 4
    js = [s.js for s in report]
    assert js == sorted(js, reverse=True) and js[0] > 0 and min(js) >= 0
    assert os.path.isfile(out / "ranges.json")
    # each layer is named by the module it came from, as a user reads the model
    modules = {s.module for s in report}
    assert {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "head"} <= modules, modules


def test_mixed_precision_keeps_the_fewest_sensitive_layers_that_pass(files):
    original, _, calib, probe, _, out = files
    cache = str(out / "ranges-mixed.json")
    report = layer_sensitivity(original, calib, probe[:64], "minmax", cache, str(out))
    dst = str(out / "mixed.onnx")
    calls = []

    def accept(path):  # passes once the 3 most sensitive layers are float
        calls.append(path)
        return {s.node for s in report[:3]} <= _float_weight_layers(path)

    kept = mixed_precision(original, dst, report, accept, "minmax", cache, log=lambda s: None)
    assert kept == [s.node for s in report[:3]]
    assert accept(dst)
    with pytest.raises(TmlpError, match="even with all"):
        mixed_precision(original, dst, report, lambda path: False, "minmax", cache, log=lambda s: None)
