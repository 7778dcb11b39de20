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


RICH_PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("\\nRICH-IMPORTED\\n" if "rich" in sys.modules else "\\nRICH-FREE\\n"))
from bnfold.cli.main import main
sys.argv = ["bnfold"] + sys.argv[1:]
main()
"""


def test_a_quiet_fold_to_a_pipe_prints_its_line_without_rich(small):
    """rich costs ~25 ms of start-up: a line of text to a pipe (or file) is written as rich would write it
    there (no styles), and rich is imported only for a table, a progress bar or a terminal."""
    assert "RICH-FREE" in RICH_PROBE
    argv = ["fold", f"{small}/small.onnx", "-o", f"{small}/folded_q.onnx", "-q"]
    proc = subprocess.run([sys.executable, "-c", RICH_PROBE, *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RICH-FREE" in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.startswith("FOLDED | 1/1 BatchNorm folded"), proc.stdout
    onnx.checker.check_model(onnx.load(f"{small}/folded_q.onnx"), full_check=True)
    # the same command with its table: rich prints it
    argv = ["fold", f"{small}/small.onnx", "-o", f"{small}/folded_t.onnx"]
    proc = subprocess.run([sys.executable, "-c", RICH_PROBE, *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "RICH-IMPORTED" in proc.stderr, proc.stderr[-2000:]


def test_plain_and_rich_lines_are_the_same_text():
    """What the plain path writes for strings and styled pieces is what rich writes to a non-terminal, control
    characters escaped either way."""
    import io

    from bnfold.cli.common import SafeConsole, styled

    pieces = [styled("error:", "bold red"), "node 'a\x1b[31mb\tc' is \u202ebad\u202c", styled("x\ny", "dim")]
    plain, rich = io.StringIO(), io.StringIO()
    old = sys.stdout
    try:
        sys.stdout = plain
        SafeConsole().print(*pieces)
        sys.stdout = rich
        con = SafeConsole()
        con.rich.print(*pieces)  # (a console whose rich part exists prints through rich)
    finally:
        sys.stdout = old
    assert plain.getvalue() == rich.getvalue()
    assert "\x1b" not in plain.getvalue() and "\\x1b" in plain.getvalue() and "\u202e" not in plain.getvalue()
