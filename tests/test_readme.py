"""The README's examples run exactly as written (so the documentation cannot rot).

Shell lines in the Quick start and Commands sections run in a temporary folder through the installed entry
point; lines that need a file the user brings (torchvision weights) are skipped. The Python API blocks run in
the same folder."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def section(name: str) -> str:
    text = README.read_text()
    start = text.index(f"## {name}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def blocks(name: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section(name), re.S)


def shell(line: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = line.replace("python ", f"{sys.executable} ", 1) if line.startswith("python ") else line
    return subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    if shutil.which("bnfold") is None:
        pytest.skip("bnfold entry point not installed")
    return tmp_path_factory.mktemp("readme")


def test_quick_start_runs_as_written(workdir):
    lines = [ln for b in blocks("Quick start", "bash") for ln in b.strip().splitlines()
             if not ln.startswith("pip ")]  # the package is installed already
    assert any(ln.startswith("bnfold fold") for ln in lines) and any(ln.startswith("bnfold demo") for ln in lines)
    said = ""
    for line in lines:
        p = shell(line, workdir)
        assert p.returncode == 0, f"{line}\n{p.stdout}\n{p.stderr}"
        said += p.stdout + p.stderr
    assert (workdir / "small_resnet_folded.onnx").exists() and (workdir / "fold_report.json").exists()
    verdict = re.search(r"`(FOLDED \| [^`]*)`", section("Quick start")).group(1)
    assert verdict in said


def test_command_examples_run(workdir):
    lines = [ln.split("  #")[0].strip() for b in blocks("Commands", "bash") for ln in b.strip().splitlines()]
    ran = 0
    for line in lines:
        if "torchvision" in line:
            continue  # needs torchvision and its weights file
        p = shell(line, workdir)
        assert p.returncode == 0, f"{line}\n{p.stdout}\n{p.stderr}"
        ran += 1
    assert ran >= 2


def test_python_api_examples_run(workdir):
    test_quick_start_runs_as_written(workdir)  # the examples use the quick start's model
    code = blocks("Python API", "python")
    assert len(code) >= 2
    for snippet in code:
        p = subprocess.run([sys.executable, "-c", snippet], cwd=workdir, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, f"{snippet}\n{p.stderr}"
        for expected in re.findall(r"# (\d+/\d+ BatchNorm folded[^\n]*|\['[^\n]*'\]|PASSED|\d+)$", snippet, re.M):
            assert expected in p.stdout, (expected, p.stdout)
