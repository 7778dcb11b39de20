"""`bnfold demo` and `bnfold run` through the installed entry point: every file, JSON consistent with the
markdown, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

FILES = ("original.onnx", "folded.onnx", "report.json", "report.md", "latency.png")


def bnfold(*args, cwd=None):
    exe = shutil.which("bnfold")
    if exe is None:
        pytest.skip("bnfold entry point not installed")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def check_outdir(out):
    for f in FILES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    fold, ver, bench = report["fold"], report["verify"], report["bench"]
    assert f"{fold['folded']} of {fold['bn_total']} BatchNorm folded" in md
    for e in fold["entries"]:
        assert (e.get("layer") or e["bn"]) in md
        if e["status"] == "skipped":
            assert e["reason"] in md
    assert ver["verdict"] in md
    for name, s in ver["outputs"].items():
        assert name in md and f"{s['max_abs']:.3g}" in md
    for r in bench["results"]:
        assert f"{r['p50_ms']:.3f}" in md
    assert ("**PASSED**" in md) == report["passed"]
    return report, md


def test_demo(tmp_path):
    out = tmp_path / "demo"
    p = bnfold("demo", "-o", out, "--epochs", "1")
    assert p.returncode == 0, p.stderr
    report, md = check_outdir(out)
    assert report["passed"] and report["fold"]["folded"] == report["fold"]["bn_total"] == 9
    assert report["verify"]["accuracy"]["delta"] == 0 and report["training"]["calibration"]["method"] == "algorithm2"
    assert {r["opt_level"] for r in report["bench"]["results"]} == {"off", "all"}
    assert (p.stdout + p.stderr).strip().splitlines()[-1].startswith("PASSED | 9/9 BatchNorm folded")


def test_run_zoo_model_with_calibration(tmp_path):
    out = tmp_path / "run"
    p = bnfold("run", "mnist_mlp", "-o", out, "--calibrate-data", "digits", "--data", "digits", "--iters", "10",
               "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["calibration"]["method"] == "algorithm2" and report["calibration"]["samples"] == 1438  # digits: train's training split
    check_outdir(out)


def test_run_onnx_file(tmp_path):
    p = bnfold("export", "preact_resnet", "--no-fold", "-o", tmp_path / "m.onnx")
    assert p.returncode == 0, p.stderr
    out = tmp_path / "run"
    p = bnfold("run", tmp_path / "m.onnx", "-o", out, "--iters", "10", "--batch", "1,2")
    assert p.returncode == 0, p.stderr
    report, md = check_outdir(out)
    assert report["fold"]["skipped"] == 3 and "no_foldable_neighbour" in md
    assert {r["batch"] for r in report["bench"]["results"]} == {1, 2}


@pytest.mark.parametrize("case", ["missing", "calibrate_onnx"])
def test_run_bad_input_exit_2(tmp_path, case):
    if case == "missing":
        p = bnfold("run", tmp_path / "nope.onnx", "-o", tmp_path / "o")
    else:
        bnfold("export", "mlp_bn", "--no-fold", "-o", tmp_path / "m.onnx")
        p = bnfold("run", tmp_path / "m.onnx", "-o", tmp_path / "o", "--calibrate-data", "digits")
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "o" / "report.json").exists()
