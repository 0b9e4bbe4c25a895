"""Under torchrun (2 local processes, gloo): training sees the same batches as one process and writes one set of
files; a rerun resumes. (Calibration and distillation under torchrun: next.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

ARGS = ["train", "--model", "test_vit", "--dataset", "digits", "--img-size", "16", "--patch-size", "4", "--epoch", "2",
        "--optimizer", "adamw", "--lr", "1e-3", "--batch_size", "32", "--augment", "none", "--eval-every", "1",
        "--threads", "1"]


def _torchrun(args, n=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m", "tmlp",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _log(folder):
    return [json.loads(line) for line in open(folder / "train_log.jsonl")]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_training_under_torchrun_matches_one_process_and_writes_one_checkpoint(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "tmlp", *ARGS, "--path", str(one)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _torchrun(ARGS + ["--path", str(two)])
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
