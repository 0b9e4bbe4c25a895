"""The shape of the code: short functions, no import cycles, a CLI that answers without torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tmlp", "export")
MAX_LINES, MAX_PARAMS = 80, 12


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _is_click_command(node: ast.FunctionDef) -> bool:
    """Decorated with ``@<group>.command(...)``/``@click.command``/``@<x>.group``: its parameters are its options."""
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr in ("command", "group"):
            return True
    return False


def _functions():
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_click_command(node):
                yield path.relative_to(ROOT), node


def test_no_function_is_longer_than_80_lines():
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions() if node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, "split these into smaller functions:\n" + "\n".join(long)


def test_no_function_takes_more_than_12_parameters():
    def count(a: ast.arguments) -> int:
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
        return len([n for n in names if n not in ("self", "cls")])
    wide = [f"{path}:{node.lineno} {node.name} ({count(node.args)} parameters)"
            for path, node in _functions() if count(node.args) > MAX_PARAMS]
    assert not wide, "group these parameters into a spec or dataclass:\n" + "\n".join(wide)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "export":  # installed as tmlp.export
        parts = ["tmlp"] + parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(path: Path, known: set[str]) -> set[str]:
    """Modules of the project that ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def test_no_import_cycles():
    """Not even through imports inside functions (data -> download -> data was one)."""
    modules = {_module_name(p): p for p in _sources()}
    graph = {name: _project_imports(path, set(modules)) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(dep):] + [name, dep]))
            if dep not in state:
                visit(dep, stack + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("args", [["--help"], ["devices", "list"], ["export", "--help"], ["train", "--help"]])
def test_cli_answers_without_importing_torch(args):
    code = ("import sys\nfrom tmlp.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'timm') if m in sys.modules)\n"
            "print('IMPORTED', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout, out.stdout[-500:]


def _all_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_taylor_math_knows_nothing_of_onnx():
    for folder in ("taylor", "calibration"):
        for path in (ROOT / "tmlp" / folder).rglob("*.py"):
            bad = {m for m in _all_imports(path) if m.split(".")[0] in ("onnx", "onnxruntime", "onnxscript", "export")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_model_registry_knows_nothing_of_tmlp():
    path = ROOT / "tmlp" / "models.py"
    bad = {m for m in _all_imports(path) if m.startswith(("tmlp.taylor", "tmlp.surgery", "tmlp.calibration"))}
    assert not bad and "taylor" not in path.read_text().lower(), sorted(bad)


def test_bench_scripts_use_only_the_public_api():
    """Every ``from tmlp.X import name`` in bench/ names something in ``tmlp.X.__all__`` (a module of tmlp.runtime
    aside): the scripts are written against what a library user gets, not against internals."""
    import importlib

    bad = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tmlp":
                module = importlib.import_module(node.module)
                public = set(getattr(module, "__all__", ()))
                for alias in node.names:
                    if alias.name not in public and not (node.module == "tmlp.runtime" and alias.name == "run"):
                        bad.append(f"{path.name}: {node.module}.{alias.name}")
    assert not bad, "not public (add to that module's __all__ or use the public name):\n" + "\n".join(bad)
