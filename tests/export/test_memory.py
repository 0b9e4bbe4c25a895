"""The static memory estimate (live tensors over the topological order), token chunking in the Taylor blocks, and the
memory figures runtime/run.py reports."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from tmlp.export.memory import estimate_memory
from tmlp.runtime import run as runtime_run


def _chain(path, n_gathers: int, k=4, d=32):
    """x [n, d, 1] -> n_gathers x (Gather J[k, d, d] by c, MatMul): one gathered [n, d, d] tensor live at a time."""
    table = nh.from_array(np.random.default_rng(0).random((k, d, d), dtype=np.float32), "J")
    nodes, prev = [], "x"
    for i in range(n_gathers):
        nodes += [h.make_node("Gather", ["J", "c"], [f"Jc{i}"]), h.make_node("MatMul", [f"Jc{i}", prev], [f"y{i}"])]
        prev = f"y{i}"
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, ["n", d, 1]),
                                          h.make_tensor_value_info("c", T.INT64, ["n"])],
                         [h.make_tensor_value_info(prev, T.FLOAT, ["n", d, 1])], [table])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    return k * d * d * 4


def test_estimate_counts_weights_and_the_largest_live_set(tmp_path):
    path = str(tmp_path / "chain.onnx")
    weights = _chain(path, 3)
    est = estimate_memory(path, batch=10)
    n, d = 10, 32
    # at each MatMul: its gathered input [n, d, d], its other input and its output [n, d, 1], and the index c
    assert est.weights_bytes == weights
    assert est.peak_activation_bytes == n * d * d * 4 + 2 * n * d * 4 + n * 8
    assert est.largest[0][1] == n * d * d * 4 and est.unknown_shapes == 0
    assert estimate_memory(path, batch=20).peak_activation_bytes == 2 * est.peak_activation_bytes
    assert "MiB" in est.summary()


@pytest.fixture(scope="module")
def dense_model(digits, digits_spec):
    from conftest import TINY_VIT
    from tmlp.data import to_tensor
    from tmlp.models import create_model
    from tmlp.surgery import taylorize_
    from tmlp.taylor import TaylorConfig

    torch.manual_seed(0)
    model = create_model("test_vit", TINY_VIT).eval()
    batches = [to_tensor(digits.train.x[i:i + 64], digits_spec) for i in range(0, 256, 64)]
    taylorize_(model, TaylorConfig(k=8, basis="dense"), batches=lambda: iter(batches), n_batches=4, progress=False)
    return model, to_tensor(digits.val.x[:40], digits_spec)


@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_chunked_taylor_blocks_are_exact_for_every_batch(dense_model, chunks, tmp_path):
    from tmlp.export.chunking import chunk_rows_
    from tmlp.export.onnx_export import export_onnx
    from tmlp.taylor import TaylorMLP

    model, x = dense_model
    fqns = [f for f, m in model.named_modules() if isinstance(m, TaylorMLP)]
    with torch.no_grad():
        ref = model(x)
        wrappers = chunk_rows_(model, fqns, chunks)
        chunked = model(x)
    path = str(tmp_path / "c.onnx")
    try:
        export_onnx(model, x[:2], path, {})
        est_chunked = estimate_memory(path, 16)
    finally:
        for w in wrappers:
            w.chunks = 1
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-5)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 2, 3, 5, 17, 40):  # every remainder of n tokens-rows by the chunk count
        out = session.run(None, {"image": x[:n].numpy()})[0]
        np.testing.assert_allclose(out, ref[:n].numpy(), atol=1e-4, rtol=1e-4)
    whole = str(tmp_path / "w.onnx")
    export_onnx(model, x[:2], whole, {})
    assert est_chunked.peak_activation_bytes < estimate_memory(whole, 16).peak_activation_bytes


def test_run_py_reports_weights_static_and_activation_memory(tmp_path):
    path = str(tmp_path / "chain.onnx")
    weights = _chain(path, 2)
    assert runtime_run.weights_bytes(path) == weights  # the protobuf reader agrees with onnx
    model = onnx.load(path)
    assert runtime_run.weights_bytes(path) == sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer)
    assert runtime_run.weights_bytes(str(tmp_path / "missing.onnx")) is None


def test_max_memory_export_fits_the_estimate(trained_tiny_vit_path, tmp_path):
    from click.testing import CliRunner

    from tmlp.cli import main

    out = tmp_path / "fit"
    args = ["export", "--model", "test_vit", "--checkpoint", trained_tiny_vit_path, "--k", "8", "--basis", "dense",
            "--calib-images", "256", "--eval-images", "64", "--memory-batch", "64", "--out", str(out)]
    result = CliRunner().invoke(main, args + ["--max-memory", "5"])
    assert result.exit_code == 0, result.output
    memory = json.load(open(out / "manifest.json"))["memory"]
    assert memory["chunks"] > 1 and memory["estimates"][-1]["total_mib"] <= 5
    assert memory["estimates"][0]["total_mib"] > 5  # it did not fit whole
    meta = {p.key: p.value for p in onnx.load(out / "tmlp.onnx").metadata_props}
    assert meta["tmlp.chunks"] == str(memory["chunks"])
    tiny = CliRunner().invoke(main, args[:-2] + ["--out", str(tmp_path / "no"), "--max-memory", "0.1"])
    assert tiny.exit_code == 2 and "the weights alone take" in tiny.output


def test_device_report_and_side_by_side_comparison(tmp_path):
    """runtime/run.py --report writes everything a board comparison needs; tmlp bench --compare prints reports side
    by side; bad report files get one-line errors."""
    import subprocess
    import sys

    from click.testing import CliRunner

    from tmlp.cli import main

    single = str(tmp_path / "single.onnx")
    graph = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"])], "g",
                         [h.make_tensor_value_info("x", T.FLOAT, ["n", 8])], [h.make_tensor_value_info("y", T.FLOAT,
                                                                                                          ["n", 4])],
                         [nh.from_array(np.ones((8, 4), np.float32), "W")])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), single)
    reports = []
    for label in ("board-a", "board-b"):
        out = tmp_path / f"{label}.json"
        proc = subprocess.run([sys.executable, runtime_run.__file__, single, "--runs", "5", "--warmup", "1",
                               "--report", str(out), "--label", label], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        report = json.load(open(out))
        assert report["format"] == "tmlp-device-report" and report["label"] == label
        assert report["weights_mb"] == pytest.approx(8 * 4 * 4 / 2**20)
        assert report["peak_rss_delta_no_arena_mb"] is not None and report["static_rss_mb"] is not None
        assert set(report["latency_ms"]) >= {"p50", "p90", "p99"} and report["machine"]["onnxruntime"]
        reports.append(str(out))
    shown = CliRunner().invoke(main, ["bench", "--compare", *reports])
    assert shown.exit_code == 0, shown.output
    assert "| board | board-a | board-b |" in shown.output and "| latency p50 ms |" in shown.output
    (tmp_path / "bad.json").write_text("{}")
    bad = CliRunner().invoke(main, ["bench", "--compare", str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and "not a device report" in bad.output
    stray = CliRunner().invoke(main, ["bench", reports[0]])
    assert stray.exit_code == 2 and "use --compare" in stray.output


def test_run_py_reads_the_chunk_count_and_turns_buffer_reuse_off(tmp_path):
    """A token-chunked model says so in its metadata; runtime/run.py reads it (without onnx) and disables
    onnxruntime's buffer reuse, which would otherwise keep every chunk's gathered tensor alive."""
    path = str(tmp_path / "chain.onnx")
    _chain(path, 1)
    model = onnx.load(path)
    entry = model.metadata_props.add()
    entry.key, entry.value = "tmlp.chunks", "4"
    onnx.save(model, path)
    assert runtime_run.read_metadata(path) == {"tmlp.chunks": "4"}
    assert runtime_run.read_metadata(str(tmp_path / "missing.onnx")) == {}
    session = runtime_run.make_session(path)
    assert session.get_modelmeta().custom_metadata_map["tmlp.chunks"] == "4"
