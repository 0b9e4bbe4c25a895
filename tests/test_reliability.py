"""Artifacts are atomic and reproducible: the same export writes the same bytes, an export killed at any point
leaves no partial file under a final name, and a full disk leaves nothing behind."""
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

FINAL = ("original.onnx", "tmlp.onnx", "tmlp.pt", "val.npz", "manifest.json")


def _export_cmd(ckpt: str, out) -> list[str]:
    return [sys.executable, "-m", "tmlp.cli", "export", "--model", "test_vit", "--checkpoint", ckpt, "--k", "8",
            "--calib-images", "256", "--eval-images", "64", "--out", str(out)]


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_the_same_export_writes_the_same_bytes(trained_tiny_vit_path, tmp_path):
    """Two exports from empty calibration caches (K-means and all) give byte-identical ONNX files and val.npz."""
    outs = []
    for i in range(2):
        env = {**os.environ, "TMLP_CACHE": str(tmp_path / f"cache{i}")}
        out = tmp_path / f"run{i}"
        proc = subprocess.run(_export_cmd(trained_tiny_vit_path, out), capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "calibration cache hit" not in proc.stdout + proc.stderr
        outs.append(out)
    for name in ("original.onnx", "tmlp.onnx", "tmlp.pt", "val.npz"):
        assert _sha(outs[0] / name) == _sha(outs[1] / name), name
    manifests = [json.load(open(o / "manifest.json")) for o in outs]
    assert manifests[0]["files"] == manifests[1]["files"]  # sha256 and size of every file
    for name in ("original.onnx", "tmlp.onnx"):
        meta = {p.key for p in onnx.load(outs[0] / name, load_external_data=False).metadata_props}
        assert not any("time" in k or "date" in k for k in meta)  # no timestamps in the model


def _check_complete(folder) -> list[str]:
    """Every file under a final name is whole: ONNX files load and pass the checker, val.npz loads, and a manifest
    lists exactly matching files. Returns the final names present."""
    present = [n for n in FINAL if (folder / n).exists()]
    for name in present:
        if name.endswith(".onnx"):
            onnx.checker.check_model(onnx.load(folder / name), full_check=True)
        elif name == "val.npz":
            with np.load(folder / name) as z:
                assert len(z["x"]) == len(z["y"]) > 0
        elif name.endswith(".pt"):
            import torch
            assert torch.load(folder / name, weights_only=False)["format"] == "tmlp.model"
        else:
            manifest = json.load(open(folder / name))
            for listed, entry in manifest["files"].items():
                assert _sha(folder / listed) == entry["sha256"] and os.path.getsize(folder / listed) == entry["bytes"]
    return present


def test_an_export_killed_at_random_points_leaves_no_partial_file(trained_tiny_vit_path, tmp_path):
    start = time.time()
    subprocess.run(_export_cmd(trained_tiny_vit_path, tmp_path / "whole"), check=True, capture_output=True)
    duration = time.time() - start  # a full export, calibration cached from here on
    rng = random.Random(0)
    for i, fraction in enumerate(sorted(rng.uniform(0.3, 1.0) for _ in range(6))):
        out = tmp_path / f"killed{i}"
        proc = subprocess.Popen(_export_cmd(trained_tiny_vit_path, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(fraction * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            present = _check_complete(out)
            if "manifest.json" in present:  # written last: everything else is there
                assert set(present) == set(FINAL)
    assert _check_complete(tmp_path / "whole") == list(FINAL)


@pytest.fixture(scope="module")
def earlier_export(trained_tiny_vit_path, tmp_path_factory):
    """A whole export (--k 8) and how long it took, calibration cached from here on."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    start = time.time()
    subprocess.run(_export_cmd(trained_tiny_vit_path, out), check=True, capture_output=True)
    return out, time.time() - start


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_export_interrupted_at_random_points_leaves_the_earlier_export_whole(trained_tiny_vit_path, tmp_path,
                                                                                earlier_export, signum):
    """Ctrl-C or SIGTERM at a random point of an export into a folder that holds an earlier one (--k 6 over --k 8),
    or into a new folder two levels down: the folder then holds the earlier export or the new one, whole (manifest
    hashes match), never a mix; no staging folder or temporary file is left; a new folder that got nothing is not
    left behind either."""
    import shutil

    shutil.copytree(earlier_export[0], tmp_path / "run")
    earlier = json.load(open(tmp_path / "run" / "manifest.json"))["files"]
    rng = random.Random(int(signum))
    for i, fraction in enumerate(sorted(rng.uniform(0.2, 1.0) for _ in range(3))):
        fresh = tmp_path / f"new{i}" / "deeper" / "run"
        into_earlier = i % 2 == 0
        cmd = _export_cmd(trained_tiny_vit_path, tmp_path / "run" if into_earlier else fresh)
        cmd[cmd.index("--k") + 1] = "6"
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(fraction * earlier_export[1])
        proc.send_signal(signum)
        _, err = proc.communicate()
        # 0: done before the signal; -signum: it came while the finished process shut down (Python's own handlers
        # are gone by then); else the command unwound and said so
        if proc.returncode not in (0, -signum):
            assert proc.returncode == (130 if signum == signal.SIGINT else 143), err[-500:]
            assert err.strip().splitlines()[-1].startswith(("interrupted;", "terminated;")), err[-500:]
        assert _check_complete(tmp_path / "run") == list(FINAL)
        now = json.load(open(tmp_path / "run" / "manifest.json"))["files"]
        assert now == earlier or into_earlier  # only the export into it may have replaced it, whole
        earlier = now
        if fresh.exists():
            assert _check_complete(fresh) == list(FINAL)
        else:
            assert not (tmp_path / f"new{i}").exists()
        leftovers = [p for p in tmp_path.rglob(".*") if "staging" in p.name or p.name.endswith(".tmp")]
        assert not leftovers, leftovers


def test_a_disk_that_fills_up_mid_write_leaves_nothing(monkeypatch, tmp_path):
    """ENOSPC in the middle of writing an artifact: the error propagates and neither the final name nor the
    temporary file remains."""
    import tmlp.io as tio

    target = tmp_path / "out" / "big.json"
    real_dump = json.dump

    def full_disk(obj, f, **kw):
        f.write("{\"partial\": ")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(json, "dump", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tio.write_json(target, {"a": 1})
    monkeypatch.setattr(json, "dump", real_dump)
    assert os.listdir(tmp_path / "out") == []


def test_a_model_past_2_gib_goes_to_one_external_data_file_and_runs(tmp_path):
    """Dense Jacobians with k = 1000 at d = 740 are 2.2 GB: the export writes model + one .data file beside it
    (nothing else left in the folder), the checker passes, and onnxruntime loads and runs it from there."""
    import gc

    import onnxruntime as ort
    import torch

    from tmlp.taylor.derivatives import BlockDerivatives
    from tmlp.export.onnx_export import export_onnx, external_data_files
    from tmlp.runtime import run as runtime_run
    from tmlp.taylor import TaylorMLP

    k, d = 1000, 740
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(k, d, generator=g)
    block = TaylorMLP(centres, BlockDerivatives(value=torch.randn(k, d, generator=g),
                                                jacobian=torch.randn(k, d, d, generator=g) * 0.01), 1)
    assert block.jacobian.numel() * 4 > 2**31
    x = torch.cat([centres[:3] + 0.01, torch.randn(3, d, generator=g)])
    with torch.no_grad():
        want = block(x).numpy()
    path = tmp_path / "out" / "big.onnx"
    ops = export_onnx(block, x[:2], str(path), {"tmlp.kind": "tmlp"})
    del block
    gc.collect()
    assert ops["ArgMin"] == 1 and sorted(os.listdir(path.parent)) == ["big.onnx", "big.onnx.data"]
    assert external_data_files(str(path)) == [str(path) + ".data"]
    assert os.path.getsize(path) < 2**20 and os.path.getsize(str(path) + ".data") > 2**31
    assert runtime_run.model_bytes(str(path)) == os.path.getsize(path) + os.path.getsize(str(path) + ".data")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
    del session
    gc.collect()
