"""The ONNX paths of every command never import torch (it costs seconds and hundreds of MB per run): each command
runs in a fresh interpreter that reports, at exit, whether ``torch`` was ever imported."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from .helpers import G

PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("\\nTORCH-IMPORTED\\n" if "torch" in sys.modules else "\\nTORCH-FREE\\n"))
atexit.register(lambda: sys.stderr.write("\\nORT-IMPORTED\\n" if "onnxruntime" in sys.modules else "\\nORT-FREE\\n"))
from bnfold.cli.main import main
sys.argv = ["bnfold"] + sys.argv[1:]
main()
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("notorch")
    g = G()
    y = g.bn(g.conv(g.input("x", [1, 3, 8, 8]), 3, 8), 8)
    onnx.save(g.model([g.node("Relu", [y])]), d / "small.onnx")
    return d


@pytest.mark.parametrize("args", [
    ["inspect", "{d}/small.onnx"],
    ["fold", "{d}/small.onnx", "-o", "{d}/folded.onnx"],
    ["fold", "{d}/small.onnx", "-o", "{d}/folded_v.onnx", "--verify"],
    ["fold", "{d}/small.onnx", "--dry-run"],
    ["verify", "{d}/small.onnx", "{d}/small.onnx"],
    ["bench", "{d}/small.onnx", "{d}/small.onnx", "--opt-level", "off", "--warmup", "1", "--iters", "3",
     "--sessions", "3", "--session-time", "0"],
], ids=["inspect", "fold", "fold-verify", "dry-run", "verify", "bench"])
def test_onnx_commands_never_import_torch(small, args):
    argv = [a.format(d=small) for a in args]
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TORCH-FREE" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("args", [
    ["inspect", "{d}/small.onnx"],
    ["fold", "{d}/small.onnx", "-o", "{d}/folded_ort.onnx"],
    ["fold", "{d}/small.onnx", "--dry-run"],
], ids=["inspect", "fold", "dry-run"])
def test_fold_without_verify_never_imports_onnxruntime(small, args):
    """Only --verify runs the model: a plain fold does not pay ONNX Runtime's import (issue 20: start-up)."""
    argv = [a.format(d=small) for a in args]
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ORT-FREE" in proc.stderr, proc.stderr[-2000:]
