"""The command line: --help everywhere, and bad input gives one line on stderr, exit 2, and writes nothing."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from tmlp.cli import main
from tmlp.models import create_model, save_checkpoint
from conftest import TINY_VIT

COMMANDS = [[], ["train"], ["export"], ["bench"], ["data"], ["data", "download"], ["models"], ["models", "list"],
            ["models", "show"], ["devices"], ["devices", "list"], ["devices", "show"], ["devices", "check"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "tmlp")
def test_help(command):
    result = CliRunner().invoke(main, command + ["--help"], prog_name="tmlp")
    assert result.exit_code == 0 and result.output.startswith(f"Usage: tmlp {' '.join(command)}".rstrip())
    assert "Options:" in result.output and "--help" in result.output


def _run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.stderr.strip(), result.output


def _assert_one_line_error(code, err, expected, out_dir=None):
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and expected in err, err
    if out_dir is not None:
        assert not os.path.exists(out_dir) or not os.listdir(out_dir)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "tiny.pt")
    save_checkpoint(path, create_model("test_vit", TINY_VIT), "test_vit", TINY_VIT, {"dataset": "digits"})
    return path


def test_unknown_model(tmp_path):
    out = str(tmp_path / "out")
    _assert_one_line_error(*_run(["export", "--model", "resnet9000", "--out", out])[:2], "unknown model", out)


def test_missing_checkpoint(tmp_path):
    out = str(tmp_path / "out")
    code, err, _ = _run(["export", "--model", "test_vit", "--checkpoint", str(tmp_path / "nope.pt"), "--out", out])
    _assert_one_line_error(code, err, "does not exist", out)


def test_truncated_checkpoint(tmp_path, checkpoint):
    data = open(checkpoint, "rb").read()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    out = str(tmp_path / "out")
    code, err, _ = _run(["export", "--model", "test_vit", "--checkpoint", str(bad), "--out", out])
    _assert_one_line_error(code, err, "corrupt or truncated", out)


def test_wrong_architecture_checkpoint(tmp_path):
    path = str(tmp_path / "wrong.pt")
    other = create_model("test_vit", {**TINY_VIT, "num_classes": 3})
    save_checkpoint(path, other, "test_vit", TINY_VIT)  # weights of a 3-class head under a 10-class config
    out = str(tmp_path / "out")
    code, err, _ = _run(["export", "--model", "test_vit", "--checkpoint", path, "--out", out])
    _assert_one_line_error(code, err, "does not fit", out)


def test_checkpoint_of_another_model(tmp_path, checkpoint):
    out = str(tmp_path / "out")
    code, err, _ = _run(["export", "--model", "deit_small", "--checkpoint", checkpoint, "--out", out])
    _assert_one_line_error(code, err, "holds a test_vit", out)


def test_k_larger_than_tokens(tmp_path, checkpoint):
    out = str(tmp_path / "out")
    code, err, _ = _run(["export", "--model", "test_vit", "--checkpoint", checkpoint, "--k", "100000",
                         "--calib-images", "10", "--out", out])
    _assert_one_line_error(code, err, "k = 100000 expansion points", out)


@pytest.mark.parametrize("args, expected", [(["--k", "0"], "--k must be a positive"),
                                            (["--order", "3"], "not in the range"),
                                            (["--layers", "7"], "does not exist"),
                                            (["--layers", "blocks.0.attn_typo"], "no block"),
                                            (["--block-k", "0=lots"], "is not BLOCK=K"),
                                            (["--block-k", "9=40"], "--block-k block index 9 does not exist"),
                                            (["--layers", "1,2", "--block-k", "0=40"], "not among the blocks"),
                                            (["--block-k", "0=40", "--max-acc-drop", "1"], "give one of them"),
                                            (["--block-k", "0=100000", "--calib-images", "10"],
                                             "k = 100000 expansion points")])
def test_bad_export_options(tmp_path, checkpoint, args, expected):
    out = str(tmp_path / "out")
    code, err, output = _run(["export", "--model", "test_vit", "--checkpoint", checkpoint, "--out", out] + args)
    assert code == 2 and expected in (err + output), err + output
    assert not os.path.exists(out) or not os.listdir(out)


@pytest.mark.parametrize("opset", ["5", "13", "26", "99"])
def test_an_opset_outside_what_the_model_exports_at_is_refused_up_front(tmp_path, checkpoint, opset):
    """Checked before loading or calibrating: one line naming the range (timm's attention from 14, onnxruntime up
    to 25), exit 2, no folder."""
    out = str(tmp_path / "out")
    code, err, _ = _run(["export", "--model", "test_vit", "--checkpoint", checkpoint, "--k", "4", "--opset", opset,
                         "--out", out])
    _assert_one_line_error(code, err, f"--opset {opset} is outside 14..25", out)
    assert not os.path.exists(out)


def test_nan_weights_are_reported_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    model = create_model("test_vit", TINY_VIT)
    with torch.no_grad():
        model.blocks[0].norm1.weight[0] = float("nan")  # NaN reaches blocks.0.mlp's inputs
    path = str(tmp_path / "nan.pt")
    save_checkpoint(path, model, "test_vit", TINY_VIT, {"dataset": "digits"})
    out = str(tmp_path / "out")
    code, err, _ = _run(["export", "--model", "test_vit", "--checkpoint", path, "--k", "8", "--out", out])
    _assert_one_line_error(code, err.split("\r")[-1], "received NaN or Inf activations", out)  # after the progress bar


def test_full_hessian_is_refused_with_its_size(tmp_path, checkpoint):
    out = str(tmp_path / "out")
    code, err, _ = _run(["export", "--model", "test_vit", "--checkpoint", checkpoint, "--order", "2", "--hessian",
                         "full", "--basis", "dense", "--out", out])
    _assert_one_line_error(code, err, "full Hessian needs k*d_out*d_in^2 = 100*64*64^2 floats = 105 MB per block", out)


def test_unknown_dataset(tmp_path, checkpoint):
    out = str(tmp_path / "out")
    code, err, _ = _run(["export", "--model", "test_vit", "--checkpoint", checkpoint, "--dataset", "mnist", "--out",
                         out])
    _assert_one_line_error(code, err, "unknown data set 'mnist'", out)


def test_unwritable_output(tmp_path, checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err, _ = _run(["export", "--model", "test_vit", "--checkpoint", checkpoint, "--out", str(blocker / "out")])
    _assert_one_line_error(code, err, "cannot be created")


def test_bench_without_a_run(tmp_path):
    code, err, _ = _run(["bench", "--run", str(tmp_path)])
    _assert_one_line_error(code, err, "no manifest.json")


def test_models_show_lists_blocks_with_their_share_of_the_work():
    code, _, out = _run(["models", "show", "deit_tiny"])
    assert code == 0 and "12 replaceable MLP blocks of 12" in out and "blocks.11.mlp" in out
    code, _, out = _run(["models", "show", "deit_tiny", "--json"])
    shown = json.loads(out)
    assert code == 0 and shown["replaceable_blocks"][-1] == "blocks.11.mlp" and shown["model_macs"] > 0
    assert 0.6 < sum(b["share"] for b in shown["blocks"]) < 0.7  # DeiT's MLPs: about 65% of its multiply-adds
    assert shown["blocks"][0]["input_shape"] == [1, 197, 192] and shown["blocks"][0]["d_in"] == 192


def test_pretrained_without_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without network access sees, without the retries
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = str(tmp_path / "out")
    code, err, _ = _run(["export", "--model", "deit_tiny", "--pretrained", "--dataset", "digits", "--out", out])
    _assert_one_line_error(code, err, "cannot fetch pretrained weights", out)
