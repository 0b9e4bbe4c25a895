"""Device profiles, the host-vs-board comparison with its near-tie rule, and the emulated Raspberry Pi check."""
import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from tmlp.cli import main
from tmlp.devcheck import add_argmin_outputs, compare
from tmlp.devices import DeviceProfile, load_profile, parse_profile, profile_names
from tmlp.errors import TmlpError
from tmlp.runtime import run as runtime_run

BOARDS = {"rpi4": "cortex-a72", "rpi5": "cortex-a76", "jetson-orin-nano": "cortex-a76", "jetson-nano": "cortex-a57"}


def test_the_four_boards_and_the_host_have_profiles():
    assert set(BOARDS) | {"x86-64-host"} <= set(profile_names())
    for name, cpu in BOARDS.items():
        p = load_profile(name)
        assert p.arch == "aarch64" and p.qemu_cpu == cpu and p.cores >= 4 and p.memory_mb >= 4096
        assert p.providers[-1] == "CPUExecutionProvider"  # CPU is always the fallback
    nano = load_profile("jetson-nano")
    assert (nano.onnxruntime, nano.max_opset, nano.max_ir_version) == ("1.11", 16, 8)
    assert "TensorrtExecutionProvider" in load_profile("jetson-orin-nano").providers
    assert load_profile("x86-64-host").qemu_cpu is None


def test_profile_errors_name_the_field_and_the_fix(tmp_path):
    good = load_profile("rpi4").to_dict()
    with pytest.raises(TmlpError, match="lacks max_opset"):
        parse_profile({k: v for k, v in good.items() if k != "max_opset"}, "x.toml")
    with pytest.raises(TmlpError, match="unknown field"):
        parse_profile({**good, "gpu": "yes"}, "x.toml")
    with pytest.raises(TmlpError, match="cores must be a positive integer"):
        parse_profile({**good, "cores": 0}, "x.toml")
    with pytest.raises(TmlpError, match="unknown device 'pi9'; known: .*rpi4"):
        load_profile("pi9")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(TmlpError, match="not valid TOML"):
        load_profile(str(bad))
    custom = tmp_path / "board.toml"
    custom.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {**good, "name": "board"}.items()))
    assert isinstance(load_profile(str(custom)), DeviceProfile) and load_profile(str(custom)).name == "board"


def test_devices_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(main, ["devices", "list"])
    assert listed.exit_code == 0 and all(name in listed.output for name in BOARDS)
    shown = runner.invoke(main, ["devices", "show", "jetson-nano"])
    assert shown.exit_code == 0 and json.loads(shown.output)["max_opset"] == 16
    unknown = runner.invoke(main, ["devices", "show", "pi9"])
    assert unknown.exit_code == 2 and "unknown device 'pi9'" in unknown.output


def _scores_and_index(scores):
    return scores, scores.argmin(-1)


def test_near_tie_rule_accepts_only_near_ties():
    rng = np.random.default_rng(0)
    n, tokens, k = 4, 3, 5
    scores = rng.standard_normal((n * tokens, k)).astype(np.float32)
    logits = rng.standard_normal((n, 10)).astype(np.float32)
    names, pairs = ["logits", "s", "i"], [("s", "i")]
    host = [logits, scores, scores.argmin(-1)]
    same = compare(host, [logits.copy(), scores.copy(), scores.argmin(-1)], names, 1, pairs, n)
    assert same.passed and same.argmin_mismatches == 0 and same.max_abs_diff["logits"] == 0
    # token 7 (input 2): make its two best centres tie within 1e-7, and let the board pick the other one
    tied = scores.copy()
    best = int(tied[7].argmin())
    other = (best + 1) % k
    tied[7, other] = tied[7, best] + 1e-7
    board_index = tied.argmin(-1)
    board_index[7] = other
    board_logits = logits.copy()
    board_logits[2] += 0.5  # the flip changes that input's output: exempt
    ok = compare([logits, tied, tied.argmin(-1)], [board_logits, tied, board_index], names, 1, pairs, n)
    assert ok.passed and ok.argmin_mismatches == 1 and ok.near_ties == 1 and ok.exempt_inputs == 1
    # a flip between clearly different centres fails
    board_index[7] = int(tied[7].argmax())
    far = compare([logits, tied, tied.argmin(-1)], [board_logits, tied, board_index], names, 1, pairs, n)
    assert not far.passed and "without a near tie" in far.reasons[0]
    # outputs beyond the tolerance fail
    off = compare(host, [logits + 1e-2, scores, scores.argmin(-1)], names, 1, pairs, n)
    assert not off.passed and "differs by" in off.reasons[0]


@pytest.fixture(scope="module")
def small_tmlp(tmp_path_factory, digits, digits_spec):
    """A small T-MLP model (test_vit, 2 Taylor blocks, k=8, shared basis) with val.npz beside it."""
    from conftest import TINY_VIT
    from tmlp.data import to_tensor
    from tmlp.export.onnx_export import export_onnx
    from tmlp.models import create_model
    from tmlp.surgery import taylorize_
    from tmlp.taylor import TaylorConfig

    torch.manual_seed(0)
    model = create_model("test_vit", TINY_VIT).eval()
    batches = [to_tensor(digits.train.x[i:i + 64], digits_spec) for i in range(0, 256, 64)]
    taylorize_(model, TaylorConfig(k=8, basis="shared", rank=16), layers=["blocks.0.mlp", "blocks.3.mlp"],
               batches=lambda: iter(batches), n_batches=4, progress=False)
    folder = tmp_path_factory.mktemp("small")
    path = str(folder / "tmlp.onnx")
    export_onnx(model, batches[0][:2], path, {"tmlp.preprocessing": json.dumps(digits_spec)})
    np.savez(folder / "val.npz", x=digits.val.x[:32], y=digits.val.y[:32])
    return path


def test_argmin_outputs_and_dump_round_trip(small_tmlp, tmp_path):
    debug = str(tmp_path / "debug.onnx")
    own, pairs = add_argmin_outputs(small_tmlp, debug)
    assert own == [o.name for o in onnx.load(small_tmlp).graph.output] and len(pairs) == 2
    x = np.random.default_rng(0).standard_normal((5, 1, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    names = runtime_run.dump_outputs(debug, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), batch=2)
    assert names[:1] == own and len(names) == 1 + 2 * 2
    with np.load(tmp_path / "out.npz") as out:
        assert out["out0"].shape == (5, 10)
        assert out["out2"].shape == (5 * 17,) and out["out1"].shape == (5 * 17, 8)  # 17 tokens per image, k = 8
        np.testing.assert_array_equal(out["out1"].argmin(-1), out["out2"])


def test_emulated_raspberry_pi_4_computes_what_the_host_does(small_tmlp):
    """The CI check of issue 4: build the arm64 Python (cached), run runtime/run.py under qemu-aarch64 with the
    Cortex-A72, and compare with the host."""
    result = CliRunner().invoke(main, ["devices", "check", "rpi4", small_tmlp, "--n", "8"])
    assert result.exit_code == 0, result.output
    assert "machine aarch64, CPU Arm Cortex-A72" in result.output and "verdict     PASS" in result.output
    assert "under emulation (NOT the device's speed" in result.output


def test_check_refuses_a_board_without_emulation(small_tmlp):
    result = CliRunner().invoke(main, ["devices", "check", "x86-64-host", small_tmlp])
    assert result.exit_code == 2 and "no qemu CPU model" in result.output
    missing = CliRunner().invoke(main, ["devices", "check", "rpi4", os.path.join("nowhere", "m.onnx")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
