"""Under torchrun (2 local processes, gloo): training sees the same batches as one process and writes one set of
files, a rerun resumes; an export (calibration, least squares, fine-tuning) writes the model one process writes;
a rank that dies fails the run, leaves nothing half-written, and a rerun works."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

FAULTY = os.path.join(os.path.dirname(__file__), "helpers", "faulty_tmlp.py")

ARGS = ["train", "--model", "test_vit", "--dataset", "digits", "--img-size", "16", "--patch-size", "4", "--epoch", "2",
        "--optimizer", "adamw", "--lr", "1e-3", "--batch_size", "32", "--augment", "none", "--eval-every", "1",
        "--threads", "1"]


def _torchrun(args, n=2, script=None, env=None):
    entry = [script] if script else ["-m", "tmlp"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *entry, *args]
    return subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _log(folder):
    return [json.loads(line) for line in open(folder / "train_log.jsonl")]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_training_under_torchrun_matches_one_process_and_survives_a_dead_rank(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "tmlp", *ARGS, "--path", str(one)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # rank 1 dies at the end of the first epoch: the run fails, torchrun names the rank, only whole files remain
    dead = _torchrun(ARGS + ["--path", str(two)], script=FAULTY, env={"TMLP_DIE_IN": "training"})
    assert dead.returncode != 0 and "rank      : 1" in dead.stderr and "exitcode  : 3" in dead.stderr
    assert set(os.listdir(two) if two.exists() else []) <= {"last.pt", "best.pt", "train_log.jsonl"}
    proc = _torchrun(ARGS + ["--path", str(two)])  # the rerun starts cleanly (or resumes from a whole last.pt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best validation accuracy") == 1  # rank 0 alone reports
    assert sorted(os.listdir(two)) == ["best.pt", "last.pt", "train_log.jsonl"]
    single, ddp = _log(one), _log(two)
    assert [r["epoch"] for r in ddp] == [1, 2]
    for a, b in zip(single, ddp):  # each step saw the same 32 images, split over the two ranks
        assert a["val_acc"] == b["val_acc"]
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * a["train_loss"]
    again = _torchrun(ARGS + ["--path", str(two)])
    assert again.returncode == 0 and "resuming" in again.stdout + again.stderr, again.stderr[-2000:]
    assert len(_log(two)) == 2


def _logits(run_dir):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from runtime.run import load_images, make_session, preprocess, read_metadata

    x, _ = load_images(str(run_dir / "val.npz"))
    path = str(run_dir / "tmlp.onnx")
    session = make_session(path)
    feed = preprocess(x, json.loads(read_metadata(path)["tmlp.preprocessing"]))
    return session.run(None, {session.get_inputs()[0].name: feed})[0]


# fp32 fine-tuning: under bf16 autocast each rank's share of a batch rounds differently (docs/distributed.md)
EXPORT = ["export", "--model", "test_vit", "--k", "16", "--distill-epochs", "1", "--calib-images", "600",
          "--train-precision", "fp32"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_export_under_torchrun_writes_the_one_process_model_and_survives_a_dead_rank(tmp_path,
                                                                                   trained_tiny_vit_path):
    args = EXPORT + ["--checkpoint", trained_tiny_vit_path]
    one, two = tmp_path / "one", tmp_path / "two"
    cache = {"TMLP_CACHE": str(tmp_path / "cache2")}  # not the one-process run's: this one calibrates itself
    # rank 1 dies in calibration: the export fails, torchrun names the rank, nothing is written
    dead = _torchrun(args + ["--out", str(two)], script=FAULTY, env={"TMLP_DIE_IN": "calibration", **cache})
    assert dead.returncode != 0 and "rank      : 1" in dead.stderr and "exitcode  : 3" in dead.stderr
    assert sorted(os.listdir(tmp_path)) in ([], ["cache2"])  # no run folder, no staging folder
    proc = _torchrun(args + ["--out", str(two)], env=cache)  # the rerun starts cleanly
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done in") == 1  # rank 0 alone reports and writes
    proc = subprocess.run([sys.executable, "-m", "tmlp", *args, "--out", str(one)], capture_output=True, text=True,
                          env={**os.environ, "TMLP_CACHE": str(tmp_path / "cache1")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    manifest = json.load(open(two / "manifest.json"))
    assert manifest["processes"] == 2 and manifest["distillation"]["images_seen"] == 600
    a, b = _logits(one), _logits(two)
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(a)  # calibration + fine-tuning, summed in another order
    assert (a.argmax(1) == b.argmax(1)).all()
