"""bench: the statistics against known samples, the interleaving, the JSON schema, a run on a small model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold import fold_model
from bnfold.bench import bench, interleave, ratio_ci, summarize
from bnfold.cli.main import main

from .helpers import G


def test_summarize_known_samples():
    x = np.arange(1, 101, dtype=float)  # 1..100
    st = summarize(x)
    assert st["p50_ms"] == 50.5 and st["mean_ms"] == 50.5
    assert st["p90_ms"] == pytest.approx(90.1) and st["p99_ms"] == pytest.approx(99.01)
    lo, hi = st["ci95_ms"]
    assert lo < 50.5 < hi and 40 < lo and hi < 61  # the median of 100 uniform values: about +-10
    const = summarize([2.0] * 30)
    assert const["ci95_ms"] == [2.0, 2.0] and const["p99_ms"] == 2.0


def test_bootstrap_interval_shrinks_with_more_samples():
    rng = np.random.default_rng(0)
    small = summarize(rng.normal(10, 1, 20))["ci95_ms"]
    large = summarize(rng.normal(10, 1, 2000))["ci95_ms"]
    assert (large[1] - large[0]) < (small[1] - small[0]) / 4
    assert large[0] < 10 < large[1]


def test_ratio_ci_paired():
    rng = np.random.default_rng(1)
    drift = np.linspace(1, 3, 200)  # strong machine drift, shared by both models (interleaved)
    a = 2.0 * drift * rng.uniform(0.99, 1.01, 200)
    b = drift * rng.uniform(0.99, 1.01, 200)
    rc = ratio_ci(a, b)
    assert rc["ratio"] == pytest.approx(2.0, rel=0.02)
    assert rc["ci95"][0] <= rc["ratio"] <= rc["ci95"][1]


def test_interleave_rotates_and_alternates():
    calls = []

    def runner(name):
        def run():
            calls.append(name)
            return 1.0
        return run
    times = interleave([runner("A"), runner("B"), runner("C")], 3)
    assert calls == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]
    assert [len(t) for t in times] == [3, 3, 3]


def test_interleave_duration_has_a_floor_of_rounds():
    times = interleave([lambda: 0.0], 1000, duration_s=0.0, min_rounds=5)
    assert len(times[0]) == 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    g = G()
    x = g.input("x", ["N", 3, 16, 16])
    y = g.node("Relu", [g.bn(g.conv(x, 3, 8, pads=[1, 1, 1, 1]), 8)])
    y = g.bn(g.conv(y, 8, 8, pads=[1, 1, 1, 1]), 8)
    m = g.model([y])
    onnx.save(m, d / "orig.onnx")
    onnx.save(fold_model(m)[0], d / "folded.onnx")
    return d


def test_bench_small_model(models):
    run = bench([models / "orig.onnx", models / "folded.onnx"], opt_levels=("off", "all"), batches=(1, 2),
                warmup=2, iters=15)
    assert len(run.results) == 8
    first = run.results[0]
    assert first.ratio == 1.0 and first.providers == ["CPUExecutionProvider"]
    for r in run.results:
        assert r.p50_ms > 0 and r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.ci95_ms[0] <= r.p50_ms <= r.ci95_ms[1]
        assert r.throughput == pytest.approx(r.batch * 1e3 / r.mean_ms)
        assert r.iters == 15 and r.model_mb > 0 and r.session_ms > 0
    assert {(r.opt_level, r.batch) for r in run.results} == {("off", 1), ("off", 2), ("all", 1), ("all", 2)}
    assert run.env["onnxruntime"] and run.env["cpu"]


def test_cli_json_schema_and_plot(models, tmp_path):
    png = tmp_path / "p.png"
    r = CliRunner().invoke(main, ["bench", str(models / "orig.onnx"), str(models / "folded.onnx"), "--opt-level",
                                  "off", "--iters", "10", "--warmup", "1", "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) >= {"results", "env", "config", "skipped"}
    for res in data["results"]:
        assert set(res) >= {"model", "ep", "opt_level", "batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "ci95_ms",
                            "throughput", "ratio", "ratio_ci95", "session_ms", "model_mb", "providers"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "DONE | 2 measurement(s)" in r.stderr


def test_cli_unavailable_provider_only_is_exit_2(models):
    from bnfold.runtime import provider_works
    if provider_works("tensorrt"):
        pytest.skip("TensorRT really runs here")
    r = CliRunner().invoke(main, ["bench", str(models / "orig.onnx"), "--ep", "tensorrt", "--iters", "3"])
    assert r.exit_code == 2 and r.output.startswith("error:")


def test_cli_missing_provider_is_skipped_when_another_runs(models):
    r = CliRunner().invoke(main, ["bench", str(models / "orig.onnx"), "--ep", "cpu,tensorrt", "--iters", "3",
                                  "--warmup", "0", "--json"])
    from bnfold.runtime import provider_works
    if provider_works("tensorrt"):
        pytest.skip("TensorRT really runs here")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [s["ep"] for s in data["skipped"]] == ["tensorrt"] and data["results"][0]["ep"] == "cpu"


def test_cli_torch_runtime_variants():
    r = CliRunner().invoke(main, ["bench", "mlp_bn", "mlp_bn@folded", "mlp_bn@nobn", "--runtime", "torch",
                                  "--iters", "5", "--warmup", "1", "--batch", "4", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [x["model"] for x in data["results"]] == ["mlp_bn", "mlp_bn@folded", "mlp_bn@nobn"]
    assert data["results"][0]["providers"] == ["torch-cpu-eager"]


def test_torch_runtime_rejects_ort_settings():
    r = CliRunner().invoke(main, ["bench", "mlp_bn", "--runtime", "torch", "--opt-level", "off", "--iters", "2"])
    assert r.exit_code == 2 and "ONNX Runtime settings" in r.output
    r = CliRunner().invoke(main, ["bench", "mlp_bn", "--runtime", "torch", "--ep", "tensorrt", "--iters", "2"])
    assert r.exit_code == 2 and "cpu or cuda" in r.output
