"""``tmlp devices check NAME model.onnx``: run runtime/run.py on an emulated board and compare with the host.

Both sides run the same model on the same preprocessed inputs. The model is first given extra outputs: the scores
and the index of every ArgMin (the Taylor blocks' nearest-centre choice), so that the comparison can apply the
near-tie rule: an ArgMin index may differ from the host's only where the host's scores of the two centres lie
within ``tie_eps`` (relative) of each other; such tokens are reported, and the images they belong to are exempt
from the output tolerance. Everything else must agree within ``rtol`` (relative to the output's largest value).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx

from tmlp.devices import DeviceProfile
from tmlp.emulate import ArmPython, ensure_arm_python, write_cpuinfo
from tmlp.errors import TmlpError
from tmlp.runtime import run as runtime_run


@dataclass
class CheckResult:
    """The verdict and what it rests on. ``platform`` is what the emulated Python reported."""

    device: str
    passed: bool
    n_inputs: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # per model output
    argmin_mismatches: int = 0  # tokens whose nearest centre differs from the host's
    near_ties: int = 0  # of which within tie_eps (accepted)
    exempt_inputs: int = 0  # inputs exempt from the output tolerance because of an accepted near tie
    platform: dict[str, Any] = field(default_factory=dict)
    emulated_latency_ms: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def report(self) -> str:
        p = self.platform
        lines = [f"device      {self.device} (emulated: qemu-user, CPU {p.get('qemu_cpu')})",
                 f"platform    machine {p.get('machine')}, CPU {p.get('cpu')}, {p.get('cores')} cores, Python "
                 f"{p.get('python')}, onnxruntime {p.get('onnxruntime')}, numpy {p.get('numpy')}",
                 f"inputs      {self.n_inputs} (identical on host and board)"]
        for name, diff in self.max_abs_diff.items():
            lines.append(f"output      {name}: max |board - host| = {diff:.3e}")
        lines.append(f"argmin      {self.argmin_mismatches} token(s) chose another centre than on the host, "
                     f"{self.near_ties} of them near ties (accepted); {self.exempt_inputs} input(s) exempt")
        if self.emulated_latency_ms:
            lat = self.emulated_latency_ms
            lines.append(f"timing      p50 {lat['p50']:.1f} ms under emulation (NOT the device's speed: qemu "
                         "translates every instruction)")
        lines.append(f"verdict     {'PASS' if self.passed else 'FAIL'}" +
                     ("" if self.passed else ": " + "; ".join(self.reasons)))
        return "\n".join(lines)


def add_argmin_outputs(src: str, dst: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Copy ``src`` to ``dst`` with the input scores and output index of every ArgMin as extra graph outputs;
    returns (the model's own output names, [(scores, index)] per ArgMin)."""
    model = onnx.load(src)
    own = [o.name for o in model.graph.output]
    pairs = [(n.input[0], n.output[0]) for n in model.graph.node if n.op_type == "ArgMin"]
    existing = set(own)
    for scores, index in pairs:
        for name, dtype in ((scores, onnx.TensorProto.FLOAT), (index, onnx.TensorProto.INT64)):
            if name not in existing:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
                existing.add(name)
    onnx.save_model(model, dst)
    return own, pairs


def make_inputs(model_path: str, data: str | None, n: int, seed: int = 0) -> np.ndarray:
    """Preprocessed model inputs [n, C, H, W]: the first ``n`` images of ``data`` (an .npz of raw images, prepared
    as the model's metadata says), else seeded standard-normal tensors of the model's input shape."""
    session = runtime_run.make_session(model_path)
    name, shape = runtime_run.input_shape(session, n)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if data is not None:
        images, _ = runtime_run.load_images(data)
        if runtime_run.PREPROCESSING_KEY not in meta:
            raise TmlpError(f"{model_path} has no preprocessing metadata; check it without --data")
        x = runtime_run.preprocess(images[:n], json.loads(meta[runtime_run.PREPROCESSING_KEY]))
        if list(x.shape[1:]) != shape[1:]:
            raise TmlpError(f"images prepare to {list(x.shape[1:])}, the model takes {shape[1:]}")
        return x
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def compare(host: list[np.ndarray], board: list[np.ndarray], names: list[str], n_own: int,
            pairs: list[tuple[str, str]], n_inputs: int, rtol: float = 1e-4, tie_eps: float = 1e-5
            ) -> CheckResult:
    """Apply the tolerance and the near-tie rule to outputs saved in graph-output order ``names``."""
    result = CheckResult(device="", passed=True, n_inputs=n_inputs)
    by_name = {n: i for i, n in enumerate(names)}
    exempt = np.zeros(n_inputs, dtype=bool)
    for scores_name, index_name in pairs:
        s, hi, bi = host[by_name[scores_name]], host[by_name[index_name]], board[by_name[index_name]]
        s, hi, bi = s.reshape(-1, s.shape[-1]), hi.reshape(-1), bi.reshape(-1)
        bad = np.nonzero(hi != bi)[0]
        result.argmin_mismatches += len(bad)
        if len(bad):
            rows = np.arange(len(s))[bad]
            gap = np.abs(s[rows, hi[bad]] - s[rows, bi[bad]])
            scale = np.maximum(1.0, np.abs(s[rows]).max(axis=1))
            tie = gap <= tie_eps * scale
            result.near_ties += int(tie.sum())
            if not tie.all():
                result.passed = False
                result.reasons.append(f"{int((~tie).sum())} token(s) of {index_name} chose another centre without a "
                                      f"near tie (largest score gap {float((gap / scale).max()):.2e} relative)")
            per_input = len(s) // n_inputs if len(s) % n_inputs == 0 else None
            if per_input:
                exempt[rows[tie] // per_input] = True
            elif tie.any():
                exempt[:] = True
    result.exempt_inputs = int(exempt.sum())
    for i in range(n_own):
        h, b = host[i], board[i]
        if h.shape != b.shape:
            result.passed = False
            result.reasons.append(f"output {names[i]} has shape {list(b.shape)} on the board, {list(h.shape)} here")
            continue
        keep = ~exempt if h.ndim and len(h) == n_inputs else slice(None)
        diff = float(np.abs(h[keep] - b[keep]).max()) if np.size(h[keep]) else 0.0
        result.max_abs_diff[names[i]] = diff
        limit = rtol * max(1.0, float(np.abs(h).max()))
        if diff > limit:
            result.passed = False
            result.reasons.append(f"output {names[i]} differs by {diff:.3e} > {limit:.3e}")
    return result


def check_device(profile: DeviceProfile, model: str, data: str | None = None, n: int = 16,
                 env: ArmPython | None = None, log: Callable[[str], None] = print) -> CheckResult:
    """Run ``model`` on the emulated ``profile`` and on the host; compare (see the module docstring)."""
    if profile.qemu_cpu is None or profile.arch != "aarch64":
        raise TmlpError(f"device {profile.name} has no qemu CPU model ({profile.arch}); emulated checks cover "
                        "aarch64 boards (rpi4, rpi5, jetson-orin-nano, jetson-nano)")
    if not os.path.isfile(model):
        raise TmlpError(f"model file {model!r} does not exist; pass the path of an .onnx file")
    env = env or ensure_arm_python(log=log)
    write_cpuinfo(env.rootfs, profile.qemu_cpu, profile.cores)
    with tempfile.TemporaryDirectory(prefix="tmlp-check-") as tmp:
        debug = os.path.join(tmp, "model.onnx")
        own, pairs = add_argmin_outputs(model, debug)
        x = make_inputs(model, data, n)
        inputs = os.path.join(tmp, "inputs.npz")
        np.savez(inputs, input=x)
        host_out = os.path.join(tmp, "host.npz")
        names = runtime_run.dump_outputs(debug, inputs, host_out)
        board_out, measured = os.path.join(tmp, "board.npz"), os.path.join(tmp, "board.json")
        log(f"running runtime/run.py under qemu-aarch64 (CPU {profile.qemu_cpu}) on {len(x)} input(s)")
        cmd = env.command(runtime_run.__file__, debug, "--inputs", inputs, "--dump-outputs", board_out,
                          "--warmup", "1", "--runs", "3", "--json", measured)
        proc = subprocess.run(cmd, env=env.env(profile.qemu_cpu), capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(board_out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise TmlpError(f"the emulated run failed: {tail[-1] if tail else 'exit ' + str(proc.returncode)}")
        with np.load(host_out) as h, np.load(board_out) as b:
            host = [h[f"out{i}"] for i in range(len(names))]
            board = [b[f"out{i}"] for i in range(len(names))]
        result = compare(host, board, names, len(own), pairs, len(x))
        with open(measured) as f:
            m = json.load(f)
    result.device = profile.name
    result.platform = {**m["machine"], "qemu_cpu": profile.qemu_cpu}
    result.emulated_latency_ms = m["latency_ms"]
    return result
