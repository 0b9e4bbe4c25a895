"""The front page: short, headline table early, no build history, and its Python example runs as written."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_is_a_front_page():
    lines = README.splitlines()
    assert len(lines) <= 200
    headline = next(i for i, line in enumerate(lines) if line.startswith("| variant | accuracy |"))
    assert headline < 80 and "ceiling" in README[:README.index("## The command line")]
    for doc in [README, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]:
        assert not re.search(r"\b(issue|session) \d+", doc, re.IGNORECASE)


def test_linked_documents_exist():
    for target in re.findall(r"\]\(([^)#]+)[^)]*\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_python_example_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    assert len(blocks) == 1
    (tmp_path / "example.py").write_text(blocks[0])
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SharedTaylorMLP" in out.stdout and "ArgMin x 6" in out.stdout
    assert (tmp_path / "tmlp_example.onnx").stat().st_size > 0
