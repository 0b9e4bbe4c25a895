"""ONNX export of a T-MLP model: exact op types, checker, metadata, parity with PyTorch, int8 quantization."""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tmlp.export.onnx_export import export_onnx, op_counts, parity
from tmlp.export.quantize import quantize_int8_dynamic
from tmlp.surgery import taylorize_
from tmlp.taylor import TaylorConfig, TaylorMLP


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits, digits_spec):
    from tmlp.data import to_tensor
    from tmlp.models import create_model
    from conftest import TINY_VIT

    torch.manual_seed(0)
    model = create_model("test_vit", TINY_VIT).eval()
    batches = [to_tensor(digits.train.x[i:i + 64], digits_spec) for i in range(0, 256, 64)]
    taylorize_(model, TaylorConfig(k=16, order=2), filter_fn=lambda m, f: f.endswith(".mlp") and f != "blocks.5.mlp",
               batches=lambda: iter(batches), n_batches=4, progress=False)
    path = str(tmp_path_factory.mktemp("onnx") / "tmlp.onnx")
    ops = export_onnx(model, batches[0][:2], path, {"tmlp.k": "16", "tmlp.preprocessing": json.dumps(digits_spec)})
    return model, path, ops, to_tensor(digits.val.x[:100], digits_spec)


def test_each_taylor_block_is_argmin_gather_matmul(exported):
    _, path, ops, _ = exported
    assert ops == op_counts(path)
    assert ops["ArgMin"] == 5  # five replaced blocks, one assignment each
    assert ops["Gather"] >= 5 * 4  # a, J, centres and H gathered per block (order 2)
    assert ops["MatMul"] >= 5 * 3
    assert "GatherND" not in ops


def test_checker_and_metadata(exported):
    _, path, _, _ = exported
    onnx.checker.check_model(path, full_check=True)
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta["tmlp.k"] == "16" and json.loads(meta["tmlp.preprocessing"])["input_size"] == [16, 16]


def test_onnxruntime_matches_pytorch_on_real_digits(exported):
    model, path, _, x = exported
    check = parity(path, model, x)
    assert check.max_abs < 1e-4 and check.top1_agree == 1.0 and check.n == 100


def test_dynamic_batch(exported):
    model, path, _, x = exported
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 3, 17):
        out = session.run(None, {session.get_inputs()[0].name: x[:n].numpy()})[0]
        assert out.shape == (n, 10)


def test_int8_dynamic_quantization_keeps_metadata(exported, tmp_path):
    _, path, _, x = exported
    dst = str(tmp_path / "q.onnx")
    quantize_int8_dynamic(path, dst)
    ops = op_counts(dst)
    assert ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0) > 0
    meta = {p.key: p.value for p in onnx.load(dst).metadata_props}
    assert meta["tmlp.k"] == "16" and meta["tmlp.kind"].endswith("+int8")
    session = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, {session.get_inputs()[0].name: x[:4].numpy()})[0]).all()


def test_vgg16_classifier_head_becomes_a_dense_taylor_block(tmp_path, digits):
    """VGG-16: the whole classifier MLP (512 -> hidden -> hidden -> 10) is one Taylor block, via torch.func."""
    from tmlp.data import to_tensor
    from tmlp.models import create_model

    torch.manual_seed(0)
    model = create_model("vgg16", {"in_chans": 1, "hidden": 64}).eval()
    spec = digits.preprocessing((32, 32))
    x = to_tensor(digits.train.x[:128], spec)
    taylorize_(model, TaylorConfig(k=8, order=1, basis="dense", partition_rank=None),
               batches=lambda: iter([x[:64], x[64:]]), n_batches=2,
               progress=False)
    assert isinstance(model.classifier, TaylorMLP) and model.classifier.jacobian.shape == (8, 10, 512)
    path = str(tmp_path / "vgg.onnx")
    ops = export_onnx(model, x[:2], path, {"tmlp.k": "8"})
    assert ops["ArgMin"] == 1 and ops["Conv"] == 13
    assert parity(path, model, to_tensor(digits.val.x[:32], spec)).max_abs < 1e-4


def test_tmlp_plus_int8_quantizes_everything_but_the_taylor_blocks(exported, tmp_path):
    from tmlp.export.quantize import nodes_in_scopes

    model, path, _, x = exported
    scopes = [f"blocks.{i}.mlp" for i in range(5)]
    taylor_nodes = nodes_in_scopes(onnx.load(path), scopes)
    assert sum(1 for n in onnx.load(path).graph.node if n.name in taylor_nodes and n.op_type == "ArgMin") == 5
    dst = str(tmp_path / "tq.onnx")
    excluded = quantize_int8_dynamic(path, dst, exclude_scopes=scopes)
    assert excluded == taylor_nodes
    quantized = onnx.load(dst)
    names = {n.name: n.op_type for n in quantized.graph.node}
    original = {n.name: n.op_type for n in onnx.load(path).graph.node}
    assert all(names[n] == original[n] for n in taylor_nodes)  # the Taylor blocks are untouched (fp32)
    assert any(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in names.values())  # attention, blocks.5.mlp
    session = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert (out.argmax(1) == ref.argmax(1)).mean() > 0.9


def test_per_centre_tensors_in_int8_gather_int8_data(exported, tmp_path):
    """"T-MLP + int8 (per-centre tensors too)": the Taylor blocks' Gathers read int8 initializers, dequantized after
    the Gather, and the file shrinks by about 4x over those tensors."""
    model, path, _, x = exported
    dst = str(tmp_path / "all8.onnx")
    rest = str(tmp_path / "rest8.onnx")
    quantize_int8_dynamic(path, dst, op_types=["MatMul", "Gemm", "Gather"])
    quantize_int8_dynamic(path, rest, exclude_scopes=[f"blocks.{i}.mlp" for i in range(5)])
    quantized = onnx.load(dst)
    int8_inits = {i.name for i in quantized.graph.initializer if i.data_type in (onnx.TensorProto.INT8,
                                                                                  onnx.TensorProto.UINT8)}
    gathers = [n for n in quantized.graph.node if n.op_type == "Gather" and n.input[0] in int8_inits]
    assert len(gathers) >= 5  # at least the offset table of each of the 5 blocks
    consumers = {i for n in quantized.graph.node if n.op_type == "DequantizeLinear" for i in n.input}
    assert all(g.output[0] in consumers for g in gathers)
    assert os.path.getsize(dst) < os.path.getsize(rest)
    session = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert (out.argmax(1) == ref.argmax(1)).mean() > 0.9


def test_vgg16_classifier_head_with_the_default_config(tmp_path, digits):
    """The default (shared basis, rank 32) on a head with 10 outputs: U takes all 10 output directions."""
    from tmlp.data import to_tensor
    from tmlp.models import create_model
    from tmlp.taylor import SharedTaylorMLP

    torch.manual_seed(0)
    model = create_model("vgg16", {"in_chans": 1, "hidden": 64}).eval()
    spec = digits.preprocessing((32, 32))
    x = to_tensor(digits.train.x[:256], spec)
    taylorize_(model, TaylorConfig(k=8), batches=lambda: iter([x[:128], x[128:]]), n_batches=2, progress=False)
    head = model.classifier
    assert isinstance(head, SharedTaylorMLP) and head.ut.shape[0] == 10
    path = str(tmp_path / "vgg.onnx")
    assert export_onnx(model, x[:2], path, {"tmlp.k": "8"})["ArgMin"] == 1
    assert parity(path, model, to_tensor(digits.val.x[:32], spec)).max_abs < 1e-4
