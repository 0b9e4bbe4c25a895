"""The static int8 stage (tmlp/quantization.py) through `tmlp export --quantize static` and `tmlp bench`: both int8
files written and recorded in the manifest, the Taylor blocks left float, and under a budget the T-MLP int8 file
holds it against the float original (the most sensitive layers stay float when it would not)."""
import json
import os

import onnx
import pytest
from click.testing import CliRunner

from tmlp.cli import main

QUICK = ["--calib-images", "256", "--eval-images", "200", "--quant-images", "64"]


def _export(checkpoint, out, *extra):
    result = CliRunner().invoke(main, ["export", "--model", "test_vit", "--checkpoint", checkpoint, "--out", str(out),
                                       *QUICK, *extra])
    assert result.exit_code == 0, result.output + str(result.exception)
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f), result.output


@pytest.fixture(scope="module")
def static_run(trained_tiny_vit_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "run"
    return out, *_export(trained_tiny_vit_path, out, "--k", "16", "--quantize", "static",
                         "--quant-calibration", "percentile")


def test_export_writes_both_static_int8_files_with_the_taylor_blocks_float(static_run):
    out, manifest, log = static_run
    for name in ("original.int8-static.onnx", "tmlp.int8-static.onnx"):
        assert name in manifest["files"], manifest["files"].keys()
        onnx.checker.check_model(str(out / name))
    q = manifest["quantization"]
    assert q["mode"] == "static" and q["calibration"] == "percentile" and q["images"] == 64
    assert manifest["spec"]["_data"]["quantize"] == {"mode": "static", "calibration": "percentile", "images": 64}
    for info in q["files"].values():
        assert 0.5 < info["report_accuracy"] <= 1.0 and info["layers_kept_float"] == []  # no budget: plain int8
    model = onnx.load(str(out / "tmlp.int8-static.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("ArgMin") == 6 and ops.count("QuantizeLinear") >= 13  # qkv and proj of 6 blocks, the head
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["tmlp.kind"].endswith("+int8-static") and "uint8 activations (percentile)" in meta["tmlp.quantization"]
    assert "layout matmul" in meta["tmlp.quantization"]
    # the layout that measured at least as fast as dynamic int8: onnxruntime runs each weight MatMul as one
    # MatMulIntegerToFloat (float output), not QuantizeLinear -> QLinearMatMul -> DequantizeLinear
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(out.parent / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(out / "tmlp.int8-static.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert optimized.count("MatMulIntegerToFloat") == 12 and "QLinearMatMul" not in optimized  # qkv, proj x 6
    assert "static int8" in log and "tmlp.int8-static.onnx:" in log


def test_bench_measures_the_static_files_beside_dynamic_int8(static_run):
    out, _, _ = static_run
    result = CliRunner().invoke(main, ["bench", "--run", str(out), "--runs", "3", "--warmup", "1", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    with open(out / "bench.json") as f:
        rows = {r["file"]: r for r in json.load(f)["rows"]}
    assert {"original.int8-static.onnx", "tmlp.int8-static.onnx", "original.int8.onnx", "tmlp.int8.onnx"} <= set(rows)
    assert rows["tmlp.int8-static.onnx"]["accuracy"] > 0.5
    assert "T-MLP + static int8" in (out / "bench.md").read_text()


def _float_weight_layers(path):
    model = onnx.load(path)
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    constants = {t.name for t in model.graph.initializer}
    return {n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] in constants and n.input[1] not in dq}


def test_under_a_budget_the_static_file_keeps_the_most_sensitive_layers_float(trained_tiny_vit_path, tmp_path,
                                                                              monkeypatch):
    """When static int8 breaks the budget on the choose split, the stage ranks the layers by Jensen-Shannon
    divergence and keeps the fewest most sensitive float until it holds. Here onnxruntime's accuracy of the T-MLP
    int8 file is made to collapse unless at least 2 layers beyond the Taylor blocks' stay float."""
    import tmlp.quantization as stage

    real, seen = stage.ort_accuracy, []

    def accuracy(path, split, spec, *args, **kwargs):
        acc = real(path, split, spec, *args, **kwargs)
        if path.endswith("tmlp.int8-static.onnx") and len(split) < 150:  # the choose split, not the report split
            floats = len(_float_weight_layers(path))
            seen.append(floats)
            return acc if floats >= min(seen) + 2 else 0.0
        return acc
    monkeypatch.setattr(stage, "ort_accuracy", accuracy)
    manifest, log = _export(trained_tiny_vit_path, tmp_path / "run", "--k", "16", "--layers", "1,3",
                            "--max-acc-drop", "50", "--quantize", "static")
    q = manifest["quantization"]
    kept = q["files"]["tmlp.int8-static.onnx"]["layers_kept_float"]
    assert len(kept) == 2 and kept == [s["node"] for s in q["sensitivity"][:2]]
    js = [s["js"] for s in q["sensitivity"]]
    assert js == sorted(js, reverse=True) and len(js) >= 20
    assert q["files"]["original.int8-static.onnx"]["layers_kept_float"] == []
    assert set(kept) <= _float_weight_layers(str(tmp_path / "run" / "tmlp.int8-static.onnx"))
    assert "breaks the 50-point budget" in log and "most sensitive:" in log
