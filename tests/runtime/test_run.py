"""runtime/run.py: stdlib + numpy + onnxruntime only, preprocessing equal to torch's, measurements and errors."""
import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tmlp.runtime import run

RUN_PY = os.path.join(os.path.dirname(__file__), "..", "..", "runtime", "run.py")
ALLOWED = {"numpy", "onnxruntime", "onnx", "__future__"}


def test_imports_only_numpy_onnxruntime_and_the_standard_library():
    tree = ast.parse(open(RUN_PY).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0])
    assert names - ALLOWED <= set(sys.stdlib_module_names), names - ALLOWED - set(sys.stdlib_module_names)
    assert "tmlp" not in names and "torch" not in names


@pytest.mark.parametrize("size", [(16, 16), (32, 24), (5, 7)])
def test_bilinear_resize_matches_torch(size):
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    ours = run.resize_bilinear(x, *size)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=size,
                                          mode="bilinear", align_corners=False, antialias=False)
    assert np.allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-3)


def test_preprocess_normalises_to_nchw():
    x = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    out = run.preprocess(x, {"input_size": [4, 4], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    assert out.shape == (2, 3, 4, 4) and out.dtype == np.float32 and np.allclose(out, 2.0)


def test_percentiles():
    p = run.percentiles(list(range(1, 101)))
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1) and p["min"] == 1


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, digits, digits_spec):
    """A tiny exported classifier with preprocessing metadata, and raw digits in an .npz."""
    from tmlp.export.onnx_export import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 32), torch.nn.GELU(), torch.nn.Linear(32, 10))
    folder = tmp_path_factory.mktemp("rt")
    path = str(folder / "m.onnx")
    export_onnx(net, torch.zeros(2, 1, 16, 16), path, {"tmlp.preprocessing": json.dumps(digits_spec)})
    data = str(folder / "val.npz")
    np.savez(data, x=digits.val.x[:50], y=digits.val.y[:50])
    return path, data, net


def test_plain_file_run_reports_latency_memory_accuracy(small_model, tmp_path, digits, digits_spec):
    path, data, net = small_model
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", RUN_PY, path, "--data", data, "--runs", "20", "--warmup", "2",
                           "--json", str(out)], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "p50" in proc.stdout and "peak RSS" in proc.stdout and "accuracy" in proc.stdout
    m = json.loads(out.read_text())
    with torch.no_grad():
        from tmlp.data import to_tensor
        expected = (net(to_tensor(digits.val.x[:50], digits_spec)).argmax(1).numpy() == digits.val.y[:50]).mean()
    assert m["accuracy"] == pytest.approx(expected) and m["n_eval"] == 50
    assert m["latency_ms"]["p50"] > 0 and m["runs"] == 20 and m["peak_rss_delta_mb"] is not None


def test_random_inputs_without_data(small_model):
    m = run.measure(small_model[0], runs=5, warmup=1, batch=4)
    assert m.accuracy is None and m.batch == 4 and m.inputs == "random"


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _truncated(d, source):
    data = open(source, "rb").read()
    return _write(d / "cut.onnx", data[:len(data) // 2])


def _newer_ir(d, source):
    import onnx

    model = onnx.load(source)
    model.ir_version = 99
    path = str(d / "ir99.onnx")
    onnx.save(model, path)
    return path


LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a21\nsize 39250482\n"


@pytest.mark.parametrize("make, message", [
    (lambda d, m: str(d / "missing.onnx"), "does not exist"),
    (lambda d, m: _write(d / "empty.onnx", b""), "is empty"),
    (lambda d, m: _write(d / "trunc.onnx", b"\x08\x07garbage"), "cannot load"),
    (lambda d, m: _truncated(d, m), "truncated or not an ONNX model; copy it again"),
    (lambda d, m: _write(d / "lfs.onnx", LFS), "is a Git LFS pointer, not the model; run `git lfs pull`"),
    (lambda d, m: _newer_ir(d, m), "IR version is newer than this onnxruntime reads; upgrade onnxruntime or export"),
], ids=["missing", "empty", "garbage", "truncated", "lfs-pointer", "newer-ir"])
def test_bad_model_files_give_one_line_errors(tmp_path, small_model, make, message):
    proc = subprocess.run([sys.executable, RUN_PY, make(tmp_path, small_model[0])], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_model_that_differs_from_its_manifest_is_refused(small_model, tmp_path):
    import shutil

    board = tmp_path / "copy"
    board.mkdir()
    model = board / "tmlp.onnx"
    shutil.copy(small_model[0], model)
    good = {"sha256": run.file_sha256(str(model)), "bytes": model.stat().st_size}
    (board / "manifest.json").write_text(json.dumps({"files": {"tmlp.onnx": good}}))
    assert run.measure(str(model), runs=1, warmup=0).runs == 1  # matches: runs
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte altered
    model.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, RUN_PY, str(model)], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not match manifest.json" in proc.stderr and "copy it again" in proc.stderr
    proc = subprocess.run([sys.executable, RUN_PY, str(model), "--no-manifest", "--runs", "1"], capture_output=True,
                          text=True)
    assert "does not match" not in proc.stderr


def test_inputs_of_the_wrong_shape_are_refused(small_model, tmp_path):
    bad = str(tmp_path / "rgb.npz")
    np.savez(bad, x=np.zeros((4, 16, 16, 3), np.uint8), y=np.zeros(4, int))
    with pytest.raises(run.RunError, match="images have 3 channels, the model expects 1"):
        run.measure(small_model[0], bad, runs=1, warmup=0)
    short = str(tmp_path / "labels.npz")
    np.savez(short, x=np.zeros((4, 16, 16, 1), np.uint8), y=np.zeros(3, int))
    with pytest.raises(run.RunError, match=r"y must be integer labels \[N=4\]"):
        run.measure(small_model[0], short, runs=1, warmup=0)


def test_labels_out_of_range_are_refused(small_model, tmp_path):
    path, _, _ = small_model
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, x=np.zeros((4, 8, 8, 1), np.uint8), y=np.array([0, 1, 2, 99]))
    with pytest.raises(run.RunError, match="labels go up to 99"):
        run.measure(path, bad, runs=1, warmup=0)


def test_wrong_image_dtype_is_refused(small_model, tmp_path):
    bad = str(tmp_path / "f.npz")
    np.savez(bad, x=np.zeros((4, 8, 8, 1), np.float32), y=np.zeros(4, int))
    with pytest.raises(run.RunError, match="x must be uint8"):
        run.measure(small_model[0], bad, runs=1, warmup=0)


@pytest.mark.skipif(os.environ.get("TMLP_SKIP_VENV_TEST") == "1", reason="TMLP_SKIP_VENV_TEST=1")
def test_runs_in_a_venv_with_only_onnxruntime_and_numpy(small_model, tmp_path):
    """What a board has: a fresh virtual environment with onnxruntime and numpy, and run.py copied alone."""
    import shutil

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    install = subprocess.run([py, "-m", "pip", "install", "-q", "onnxruntime", "numpy"], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    have = subprocess.run([py, "-c", "import torch"], capture_output=True)
    assert have.returncode != 0  # nothing but onnxruntime, numpy and their dependencies
    board = tmp_path / "board"
    board.mkdir()
    shutil.copy(RUN_PY, board / "run.py")
    shutil.copy(small_model[0], board / "model.onnx")
    shutil.copy(small_model[1], board / "val.npz")
    proc = subprocess.run([py, "run.py", "model.onnx", "--data", "val.npz", "--runs", "5"], cwd=board,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "p50" in proc.stdout


def test_interleaved_bench_times_models_in_turns_on_real_images(small_model, tmp_path):
    """bench/interleaved.py: one session per model, rounds of turns, speed-ups against the first and --vs."""
    import shutil

    path, _data, _net = small_model
    other = os.path.join(os.path.dirname(path), "m2.onnx")
    shutil.copy(path, other)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = str(tmp_path / "inter")
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "interleaved.py"), path, other, "--vs", other,
                           "--rounds", "3", "--runs", "2", "--warmup", "1", "--out", out],
                          capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr
    result = json.load(open(os.path.join(out, "interleaved.json")))
    assert [r["model"] for r in result["rows"]] == [path, other]
    assert all(len(r["round_p50_ms"]) == 3 and r["p50_ms"] > 0 for r in result["rows"])
    assert result["rows"][0]["speedup"][path] == 1.0 and result["rows"][1]["speedup"][other] == 1.0
    bad = subprocess.run([sys.executable, os.path.join(root, "bench", "interleaved.py"), path, "--vs", other],
                         capture_output=True, text=True, cwd=root)
    assert bad.returncode != 0 and "is not among the models" in bad.stderr


def test_a_provider_this_onnxruntime_lacks_is_refused_naming_the_ones_it_has(small_model, tmp_path):
    """run.py reports the provider that ran: one this onnxruntime lacks is an error (exit 2, one line naming the
    available ones) unless --allow-fallback, after which the report says it fell back."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    path, data, _ = small_model
    proc = subprocess.run([sys.executable, RUN_PY, path, "--provider", "cuda", "--runs", "2"], capture_output=True,
                          text=True, cwd=str(tmp_path))
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "--provider cuda" in err and "CPUExecutionProvider" in err and "--allow-fallback" in err
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, RUN_PY, path, "--provider", "cuda", "--allow-fallback", "--runs", "2",
                           "--json", str(out)], capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "CPUExecutionProvider (asked for CUDAExecutionProvider, not available: fell back)" in proc.stdout
    m = json.loads(out.read_text())
    assert m["provider"] == "CPUExecutionProvider" and m["requested_provider"] == "CUDAExecutionProvider"
    with pytest.raises(run.RunError, match="has no nosuchExecutionProvider"):
        run.session_providers("nosuchExecutionProvider")
