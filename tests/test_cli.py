"""The command line through click's runner and, once, through the installed entry point."""

from __future__ import annotations

import json
import shutil
import subprocess

import onnx
import pytest
from click.testing import CliRunner

from bnfold import __version__, count_bn
from bnfold.cli.main import main

from .helpers import G


@pytest.fixture
def model_path(tmp_path):
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    y = g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1], name="conv"), 4, name="bn_a")
    y = g.bn(g.node("Relu", [y]), 4, name="bn_b")
    p = tmp_path / "m.onnx"
    onnx.save(g.model([y]), p)
    return p


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_inspect_json(model_path):
    r = run("inspect", model_path, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["bn_total"], data["folded"], data["skipped"]) == (2, 1, 1)
    assert {e["bn"]: e["reason"] for e in data["entries"]} == {"bn_a": None, "bn_b": "no_foldable_neighbour"}


def test_inspect_table(model_path):
    r = run("inspect", model_path)
    assert r.exit_code == 0
    assert "bn_a" in r.output and "no_foldable_neighbour" in r.output and "PLAN | 1/2" in r.output


def test_fold_writes_model_and_report(model_path, tmp_path):
    out, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    r = run("fold", model_path, "-o", out, "--report", rep, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert json.loads(rep.read_text())["entries"] == data["entries"]
    for key in ("bn_total", "folded", "skipped", "entries"):
        assert key in data
    for e in data["entries"]:
        assert set(e) >= {"bn", "status", "into", "direction", "reason", "message"}
    assert count_bn(onnx.load(out)) == 1
    assert "FOLDED | 1/2 BatchNorm folded" in r.stderr


def test_fold_lower_standalone(model_path, tmp_path):
    out = tmp_path / "f.onnx"
    r = run("fold", model_path, "-o", out, "--lower-standalone", "-q")
    assert r.exit_code == 0
    assert count_bn(onnx.load(out)) == 0


def test_fold_dry_run_writes_nothing(model_path, tmp_path):
    out = tmp_path / "f.onnx"
    r = run("fold", model_path, "-o", out, "--dry-run")
    assert r.exit_code == 0 and not out.exists() and "PLAN |" in r.output


@pytest.mark.parametrize("case", ["missing", "garbage", "same_output", "no_output", "bad_stats"])
def test_bad_input_exits_2_with_one_line(model_path, tmp_path, case):
    out = tmp_path / "out.onnx"
    if case == "missing":
        args = ["fold", tmp_path / "nope.onnx", "-o", out]
    elif case == "garbage":
        (tmp_path / "g.onnx").write_bytes(b"\x00garbage\xff" * 10)
        args = ["fold", tmp_path / "g.onnx", "-o", out]
    elif case == "same_output":
        args = ["fold", model_path, "-o", model_path]
    elif case == "no_output":
        args = ["fold", model_path]
    else:
        m = onnx.load(model_path)
        var = next(t for t in m.graph.initializer if t.name == m.graph.node[1].input[4])
        arr = onnx.numpy_helper.to_array(var).copy()
        arr[0] = -5.0
        var.CopyFrom(onnx.numpy_helper.from_array(arr, var.name))
        onnx.save(m, tmp_path / "bad.onnx")
        args = ["fold", tmp_path / "bad.onnx", "-o", out]
    before = model_path.read_bytes()
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert not out.exists()
    assert model_path.read_bytes() == before
    if case != "no_output":  # click's own usage errors print a usage block
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.output, r.output
    if case == "bad_stats":
        assert "bn_a" in r.output and "var + eps <= 0" in r.output


def test_entry_point_installed(model_path, tmp_path):
    exe = shutil.which("bnfold")
    if exe is None:
        pytest.skip("bnfold entry point not on PATH (package not installed)")
    out = tmp_path / "f.onnx"
    p = subprocess.run([exe, "fold", str(model_path), "-o", str(out), "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["folded"] == 1
    p = subprocess.run([exe, "inspect", str(tmp_path / "missing.onnx")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "Traceback" not in p.stderr


def test_every_command_has_help_with_an_example():
    for name in main.commands:
        r = CliRunner().invoke(main, [name, "--help"])
        assert r.exit_code == 0, name
        assert "Example" in r.output, f"`bnfold {name} --help` shows no example"
        assert "-q, --quiet" in r.output and "--debug" in r.output, name
    assert {"inspect", "fold", "export", "verify", "bench", "train", "calibrate", "run", "demo"} <= set(main.commands)


def test_debug_shows_traceback(tmp_path):
    r = CliRunner().invoke(main, ["fold", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "x.onnx"), "--debug"])
    assert r.exit_code != 0 and r.exception is not None  # the exception propagates instead of a one-liner


def test_report_in_missing_folder_writes_nothing(model_path, tmp_path):
    out = tmp_path / "f.onnx"
    r = run("fold", model_path, "-o", out, "--report", tmp_path / "no" / "r.json")
    assert r.exit_code == 2 and not out.exists() and r.output.startswith("error:")


def test_internal_errors_exit_3(model_path, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr("bnfold.cli.main.fold_onnx_file", boom)
    r = run("fold", model_path, "-o", tmp_path / "f.onnx")
    assert r.exit_code == 3 and "internal error" in r.output and "simulated bug" in r.output


def test_fold_merges_branches_by_default_and_no_merge_keeps_them(tmp_path):
    g = G(seed=1)
    x = g.input("x", [1, 4, 6, 6])
    a = g.bn(g.conv(x, 4, 4, pads=[1, 1, 1, 1], bias=False, name="c3"), 4)
    b = g.bn(g.conv(x, 4, 4, k=1, bias=False, name="c1"), 4)
    y = g.node("Add", [g.node("Add", [a, b], name="add1"), g.bn(x, 4, name="bn_id")], name="add2")
    src = tmp_path / "repvgg.onnx"
    onnx.save(g.model([y]), src)
    merged, kept = tmp_path / "merged.onnx", tmp_path / "kept.onnx"
    r = run("fold", src, "-o", merged, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["branches_merged"] == 2
    assert [n.op_type for n in onnx.load(merged).graph.node] == ["Conv"]
    r = run("fold", src, "-o", kept, "--no-merge", "-q")
    assert r.exit_code == 0, r.output
    assert count_bn(onnx.load(kept)) == 1 and [n.op_type for n in onnx.load(kept).graph.node].count("Conv") == 2
    r = run("inspect", src)
    assert r.exit_code == 0 and "merged" in r.output and "2 branch sum(s) merged" in r.output
