"""The README's quick start runs exactly as written (so the documentation cannot rot)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def bash_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end > 0 else None]
    return [ln for block in re.findall(r"```bash\n(.*?)```", body, re.S) for ln in block.strip().splitlines()]


def test_quick_start_runs_as_written(tmp_path):
    if shutil.which("bnfold") is None:
        pytest.skip("bnfold entry point not installed")
    lines = bash_blocks("Quick start")
    assert any(ln.startswith("bnfold fold") for ln in lines)
    for line in lines:
        cmd = line.replace("python ", f"{sys.executable} ", 1) if line.startswith("python ") else line
        p = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{line}\n{p.stdout}\n{p.stderr}"
    assert (tmp_path / "small_resnet_folded.onnx").exists() and (tmp_path / "fold_report.json").exists()
    assert "FOLDED | 9/9 BatchNorm folded, 0 skipped" in p.stdout + p.stderr


def test_python_api_example_runs(tmp_path):
    text = README.read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    setup = bash_blocks("Quick start")[0]
    subprocess.run(setup.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=tmp_path, check=True,
                   capture_output=True, timeout=300)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "9/9 BatchNorm folded" in p.stdout
