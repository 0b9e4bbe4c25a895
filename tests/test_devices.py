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
    """The emulated-board check: build the arm64 Python (cached), run runtime/run.py under qemu-aarch64 with the
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


def _export_for(device, ckpt, out):
    return CliRunner().invoke(main, ["export", "--model", "test_vit", "--checkpoint", ckpt, "--k", "8",
                                     "--calib-images", "256", "--eval-images", "64", "--device", device,
                                     "--out", str(out)])


@pytest.fixture(scope="module")
def nano_export(trained_tiny_vit_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("nano")
    result = _export_for("jetson-nano", trained_tiny_vit_path, out)
    assert result.exit_code == 0, result.output
    return out


def test_jetson_nano_export_fits_onnxruntime_1_11(nano_export):
    """PyPI has no onnxruntime 1.11 for Python 3.11, so the profile's limits are checked on the file: opset 16,
    IR <= 8, no op newer than opset 16 (LayerNormalization is 17, Gelu 20), and the checker passes at that opset."""
    for name in ("original.onnx", "tmlp.onnx"):
        model = onnx.load(nano_export / name)
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 16)] and model.ir_version <= 8
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"LayerNormalization", "Gelu"} and "ReduceMean" in ops
        onnx.checker.check_model(model, full_check=True)
        assert {p.key: p.value for p in model.metadata_props}["tmlp.device"] == "jetson-nano"
    assert "ArgMin" in {n.op_type for n in onnx.load(nano_export / "tmlp.onnx").graph.node}
    manifest = json.load(open(nano_export / "manifest.json"))
    assert manifest["device"]["name"] == "jetson-nano" and manifest["opset"] == 16
    assert manifest["parity"]["tmlp.onnx"]["max_abs"] < 1e-4  # host onnxruntime vs PyTorch


def test_jetson_nano_export_quantizes_outside_the_taylor_blocks(nano_export, tmp_path):
    """The TorchScript exporter writes no name scopes; the Taylor blocks are found by node name instead."""
    from tmlp.export.quantize import nodes_in_scopes, quantize_int8_dynamic

    layers = json.load(open(nano_export / "manifest.json"))["layers"]
    model = onnx.load(nano_export / "tmlp.onnx")
    inside = nodes_in_scopes(model, layers)
    assert sum(1 for n in model.graph.node if n.name in inside and n.op_type == "ArgMin") == len(layers)
    assert quantize_int8_dynamic(str(nano_export / "tmlp.onnx"), str(tmp_path / "q.onnx"), exclude_scopes=layers)


def test_jetson_orin_nano_export_loads_in_onnxruntime_1_18(trained_tiny_vit_path, tmp_path):
    """Loads the profile's export with the onnxruntime the profile names (1.18, from PyPI) in a fresh venv."""
    import subprocess
    import sys
    import venv

    out = tmp_path / "orin"
    result = _export_for("jetson-orin-nano", trained_tiny_vit_path, out)
    assert result.exit_code == 0, result.output
    env_dir = tmp_path / "ort118"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "onnxruntime==1.18.*", "numpy<2"],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            "for f in sys.argv[1:]:\n"
            "    s = ort.InferenceSession(f, providers=['CPUExecutionProvider'])\n"
            "    y = s.run(None, {s.get_inputs()[0].name: np.zeros((2, 1, 16, 16), np.float32)})[0]\n"
            "    print(ort.__version__, y.shape)\n")
    run = subprocess.run([python, "-c", code, str(out / "original.onnx"), str(out / "tmlp.onnx")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["1.18.1", "(2,", "10)"] * 2
    assert sys.version_info >= (3, 11)


@pytest.mark.parametrize("base, change, reason", [
    ("jetson-nano", {"max_ir_version": 3}, "opset 16 needs ONNX IR version 8, above the device's 3"),
    ("rpi4", {"unsupported_ops": ["ArgMin"]}, "device custom cannot run op(s) ArgMin"),
], ids=["ir-too-old", "unsupported-op"])
def test_an_export_that_cannot_meet_a_profile_says_why(trained_tiny_vit_path, tmp_path, base, change, reason):
    board = {**load_profile(base).to_dict(), "name": "custom", **change}
    profile = tmp_path / "custom.toml"
    profile.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in board.items()))
    result = _export_for(str(profile), trained_tiny_vit_path, tmp_path / "out")
    assert result.exit_code == 2 and f"cannot export for device custom: {reason}" in result.output
    assert not (tmp_path / "out" / "tmlp.onnx").exists() and not (tmp_path / "out" / "manifest.json").exists()


def test_a_30_second_soak_of_a_tmlp_model_shows_no_rss_growth(small_tmlp, tmp_path):
    """runtime/run.py --duration 30: inferences back to back, RSS sampled twice a second; no growth beyond noise."""
    import subprocess
    import sys

    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, runtime_run.__file__, small_tmlp, "--duration", "30", "--batch", "4",
                           "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    soak = json.load(open(out))
    assert soak["seconds"] >= 29 and soak["inferences"] > 100 and len(soak["rss_mb"]) >= 50
    assert not soak["grew"] and abs(soak["growth_mb"]) < 2.0
    assert "no growth beyond noise" in proc.stdout
