"""Command-line fuzzing: every option of every `tmlp` command and of `runtime/run.py`, fed boundary and hostile values
(0, -1, huge numbers, nan, non-numbers, empty strings, paths that are a file, a folder or missing), alone and in
random combinations (hypothesis, derandomized). Each invocation either works or exits 2 with one line on stderr that
names the option — never a traceback — and leaves no new file or folder behind.

"Works" means it got past every check to the heavy back-end (calibration, a training epoch, a timed measurement, a
download, the emulator), which is replaced here by a stub that stops the command; the back-ends have their own
tests."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmlp.cli import main as tmlp_main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "runtime"))
import run as runtime_run  # noqa: E402

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                derandomize=True)
INTS = ("0", "-1", "99999999999999999999", "abc", "", "1.5")
FLOATS = ("0", "-1", "1e309", "nan", "abc", "")
WORDS = ("0", "-1", "nan", "abc", "")
PATHS = ("", "@file", "@folder", "@missing")  # placeholders, made real per test in a temporary folder


class Reached(BaseException):
    """Raised by the stubbed heavy back-ends: the command got past every check."""


def _stop(*args, **kwargs):
    raise Reached()


@dataclass(frozen=True)
class Case:
    """One hostile value for one option (``param`` None: a positional argument named ``names[0]``)."""
    command: tuple[str, ...]
    names: tuple[str, ...]  # the option's spellings, or the argument's name
    value: str
    positional: bool = False

    def __str__(self) -> str:
        return f"{' '.join(self.command)} {self.names[0]}={self.value!r}"


def _values(param: click.Parameter) -> tuple[str, ...]:
    kind = param.type
    if isinstance(kind, click.Choice):
        return ("", "bogus", str(kind.choices[0]))
    if isinstance(kind, (click.types.IntParamType, click.IntRange)):
        return INTS
    if isinstance(kind, (click.types.FloatParamType, click.FloatRange)):
        return FLOATS
    if isinstance(kind, (click.types.StringParamType, click.Path)):
        return PATHS + ("-1",)
    return WORDS  # tmlp's own types (a number or a word, like --distill-epochs auto)


def _commands(group: click.Group = tmlp_main, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, path + (name,))
        else:
            yield path + (name,), command


def _cases() -> list[Case]:
    cases = []
    for path, command in _commands():
        for param in command.params:
            if isinstance(param, click.Option) and (param.is_flag or param.name == "help"):
                continue
            names = tuple(param.opts) if isinstance(param, click.Option) else (param.name,)
            for value in _values(param):
                cases.append(Case(path, names, value, positional=isinstance(param, click.Argument)))
    return cases


CASES = _cases()


def test_every_command_and_option_is_covered():
    covered = {c.command for c in CASES}
    assert {("export",), ("train",), ("bench",), ("data", "download"), ("models", "show"), ("models", "fp16-copy"),
            ("devices", "show"), ("devices", "check")} <= covered
    assert len({(c.command, c.names) for c in CASES}) > 80  # every option with a value, not a sample


# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_tiny_vit_path):
    """A folder with a checkpoint, a run folder with a manifest (for bench), a device report, a small ONNX model, a
    plain file and an empty folder: the valid defaults each command starts from."""
    root = tmp_path_factory.mktemp("fuzz-world")
    (root / "plain.txt").write_text("not what any option expects\n")
    (root / "empty").mkdir()
    run = root / "run"
    run.mkdir()
    from tmlp.measure import VARIANTS

    for _, name, _, what in VARIANTS:
        if what != "static":
            (run / name).write_bytes(b"\0")
    (run / "manifest.json").write_text(json.dumps({"layers": [], "files": {}}))
    from tmlp.export.onnx_export import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))
    model = str(root / "m.onnx")
    export_onnx(net, torch.zeros(2, 1, 4, 4), model, {})
    np.savez(root / "inputs.npz", input=np.zeros((2, 1, 4, 4), np.float32))
    return {"root": root, "checkpoint": trained_tiny_vit_path, "run": str(run), "model": model,
            "inputs": str(root / "inputs.npz")}


def _base_args(command: tuple[str, ...], w, out: str) -> list[str]:
    """Valid arguments that the fuzzed option is added to (a later option overrides an earlier one)."""
    return {
        ("export",): ["--model", "test_vit", "--checkpoint", w["checkpoint"], "--out", out],
        ("train",): ["--model", "test_vit", "--img-size", "16", "--patch-size", "4", "--path", out],
        ("bench",): ["--run", w["run"]],
        ("data", "download"): ["--dataset", "cifar10", "--dir", out],
        ("models", "show"): ["test_vit"],
        ("models", "fp16-copy"): [w["checkpoint"], out + ".pt"],
        ("models", "list"): [],
        ("devices", "show"): ["rpi4"],
        ("devices", "check"): ["rpi4", w["model"]],
        ("devices", "list"): [],
    }[command]


def _real(value: str, w, tmp) -> str:
    return {"@file": str(w["root"] / "plain.txt"), "@folder": str(w["root"] / "empty"),
            "@missing": str(tmp / "missing" / "deeper")}.get(value, value)


def _tree(*roots) -> set[str]:
    found = set()
    for root in roots:
        for folder, dirs, files in os.walk(root):
            found.update(os.path.join(folder, n) for n in dirs + files)
    return found


@pytest.fixture
def stubs(monkeypatch):
    """Replace every heavy back-end by ``_stop`` (after the checks that come before it)."""
    import torchvision.datasets.utils

    import tmlp.devcheck
    import tmlp.measure
    import tmlp.stages
    import tmlp.train

    monkeypatch.setattr(tmlp.stages, "calibrate_selection", _stop)
    monkeypatch.setattr(tmlp.stages, "calibrate_plan_options", _stop)
    monkeypatch.setattr(tmlp.train, "train_epoch", _stop)
    monkeypatch.setattr(tmlp.measure, "measure_in_subprocess", _stop)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", _stop)
    monkeypatch.setattr(tmlp.devcheck, "ensure_arm_python", _stop)
    monkeypatch.setattr(runtime_run, "time_batches", _stop)
    monkeypatch.setattr(runtime_run, "soak", _stop)


def _invoke_tmlp(args: list[str]) -> tuple[int | None, str, BaseException | None]:
    try:
        result = CliRunner().invoke(tmlp_main, args, prog_name="tmlp")
    except Reached as reached:  # a BaseException, so that no `except Exception` turns it into an error message
        return None, "", reached
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.stderr, exc


def _check(label: str, code, err: str, exc, names: tuple[str, ...], values: list[str], new: set[str],
           allowed: set[str]) -> None:
    assert exc is None or isinstance(exc, Reached), f"{label}: traceback {type(exc).__name__}: {exc}"
    if exc is None:
        assert code in (0, 2), f"{label}: exit {code}: {err}"
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{label}: not one line:\n{err}"
        line = lines[0].lower()
        hints = [n.lower().lstrip("-") for n in names] + [v.lower() for v in values if len(v) > 1] + \
            [repr(v).lower() for v in values]
        assert any(h and h in line for h in hints), f"{label}: the error does not name {names}: {line}"
    left = {p for p in new if not any(p == a or a.startswith(p + os.sep) for a in allowed)}  # outputs, parents
    assert not left, f"{label}: left behind {sorted(left)}"


def _run_tmlp(case_args: list[tuple[tuple[str, ...], str, bool]], command, world, tmp) -> None:
    out = str(tmp / "out")
    args = list(command) + _base_args(command, world, out)
    names, values, allowed = [], [], set()
    for opt_names, value, positional in case_args:
        real = _real(value, world, tmp)
        if positional:  # replace the positional argument of the base (its position: the argument's index)
            index = [p.name for p in _command(command).params if isinstance(p, click.Argument)].index(opt_names[0])
            args[len(command) + index] = real
        else:
            args += [opt_names[0], real]
        names += opt_names
        values.append(real)
    before = _tree(world["root"], tmp)
    with contextlib.chdir(tmp):
        code, err, exc = _invoke_tmlp(args)
    if code == 0 and command == ("models", "fp16-copy"):
        allowed.add(os.path.join(tmp, args[3]))  # DST, written on success
    _check(" ".join(args), code, err, exc, tuple(names), values, _tree(world["root"], tmp) - before, allowed)


def _command(path: tuple[str, ...]) -> click.Command:
    command = tmlp_main
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("command", sorted({c.command for c in CASES}), ids=" ".join)
def test_each_option_alone(command, world, stubs, tmp_path):
    """Every hostile value of every option of ``command``, one at a time, on top of valid arguments."""
    failures = []
    for i, case in enumerate(c for c in CASES if c.command == command):
        tmp = tmp_path / str(i)
        tmp.mkdir()
        try:
            _run_tmlp([(case.names, case.value, case.positional)], command, world, tmp)
        except AssertionError as failure:
            failures.append(str(failure).splitlines()[0])
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_random_combinations(data, world, stubs, tmp_path_factory):
    """Two or three hostile values at once (the first refused value must still be named)."""
    command = data.draw(st.sampled_from(sorted({c.command for c in CASES})))
    options = [c for c in CASES if c.command == command and not c.positional]
    if not options:
        return
    picked = data.draw(st.lists(st.sampled_from(options), min_size=2, max_size=3, unique_by=lambda c: c.names))
    tmp = tmp_path_factory.mktemp("combo")
    _run_tmlp([(c.names, c.value, False) for c in picked], command, world, tmp)


# ---------------------------------------------------------------------------------------------------------------------
def _run_py_options() -> list[tuple[str, tuple[str, ...]]]:
    """(option, hostile values) of runtime/run.py, from its parser."""
    parser = runtime_run.build_parser()
    cases = []
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        kind = action.type
        values = INTS if kind in (int,) or getattr(kind, "kind", None) is int else \
            FLOATS if kind in (float,) or getattr(kind, "kind", None) is float else PATHS + ("-1",)
        cases += [(action.option_strings[0], v) for v in values]
    return cases


RUN_PY_CASES = _run_py_options()


def _invoke_run_py(args: list[str]) -> tuple[int, str, BaseException | None]:
    err, out = io.StringIO(), io.StringIO()
    code, exc = 0, None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = runtime_run.main(args)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except (Exception, Reached) as raised:  # noqa: BLE001  (reported by _check)
            exc = raised
    return code, err.getvalue(), exc


def test_run_py_every_option(world, stubs, tmp_path):
    assert len(RUN_PY_CASES) > 40
    failures = []
    for i, (option, value) in enumerate(RUN_PY_CASES + [("model", v) for v in PATHS]):
        tmp = tmp_path / str(i)
        tmp.mkdir()
        real = _real(value, world, tmp)
        args = [real] if option == "model" else [world["model"], option, real]
        if option == "--dump-outputs":
            args += ["--inputs", world["inputs"]]
        before = _tree(world["root"], tmp)
        with contextlib.chdir(tmp):
            code, err, exc = _invoke_run_py(args)
        allowed = {os.path.join(tmp, real)} if code == 0 and option in ("--json", "--report", "--dump-outputs") else set()
        try:
            _check(f"run.py {' '.join(args)}", code, err, exc, (option,), [real], _tree(world["root"], tmp) - before,
                   allowed)
        except AssertionError as failure:
            failures.append(str(failure).splitlines()[0])
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
