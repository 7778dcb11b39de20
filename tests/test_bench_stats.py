"""bench statistics against their own claims, by simulation: bounded memory and time for any number of rounds,
the A/A self-check's false-alarm rate at its stated level (independent comparisons, two-sided tests), the power
to name a 5% slowdown at a documented length, `underpowered` when only more sessions would help; and the CLI's
`--iters`/`--duration` meaning what their help says, with a plan and an estimate."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import onnx
import pytest

from bnfold.bench import (
    AA_LEVEL,
    AAResult,
    aa_check,
    judge,
    model_mb,
    order_stats,
    plan_sessions,
    ratio_ci,
    summarize,
)
from bnfold.bench import stats as bstats

from .helpers import G


def _sim(rng, n_models, sessions, rounds, *, session_sd=0.04, round_sd=0.05, effects=None):
    """Per-session samples of ``n_models`` timed side by side: a level per model and session (session_sd, log
    scale), a drift shared by the models within a round, per-run noise (round_sd), and a true log effect per
    model. Returns samples[i][k]."""
    effects = effects or [0.0] * n_models
    out = [[None] * sessions for _ in range(n_models)]
    for k in range(sessions):
        shared = rng.normal(0, 0.1, rounds)
        for i in range(n_models):
            out[i][k] = np.exp(effects[i] + rng.normal(0, session_sd) + shared + rng.normal(0, round_sd, rounds))
    return out


# ------------------------------------------------------------------------------------------------ cost
def test_statistics_of_a_huge_run_stay_small():
    """Six sessions of 2,000,000 rounds each (what a tiny model gives in a long --duration): the statistics
    allocate under 200 MB (the index-array bootstrap built 2,000 x sessions x rounds arrays: 190 GB here) and
    finish in seconds. tracemalloc sees numpy's buffers; the samples themselves are made before it starts."""
    rng = np.random.default_rng(0)
    a = [np.exp(rng.normal(0, 0.05, 2_000_000)) for _ in range(6)]
    b = [x * 1.03 for x in a]
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        st = summarize(a)
        rc = ratio_ci(b, a, block=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    took = time.perf_counter() - t0
    assert peak < 200e6, f"{peak / 1e6:.0f} MB"
    assert took < 60, took
    assert st["n"] == 12_000_000 and st["sessions"] == 6
    pooled = np.concatenate(a)
    assert st["p50_ms"] == pytest.approx(float(np.median(pooled)), rel=1e-12)
    assert st["p99_ms"] == pytest.approx(float(np.percentile(pooled, 99)), rel=1e-12)
    assert st["mean_ms"] == pytest.approx(float(pooled.mean()), rel=1e-9)
    assert rc["ratio"] == pytest.approx(1.03, rel=1e-9) and rc["ci95"][0] <= 1.03 <= rc["ci95"][1]


def test_chunked_order_statistics_are_exact(monkeypatch):
    """The chunked path (histogram narrowing) gives numpy's exact values, with ties, outliers and chunk edges."""
    monkeypatch.setattr(bstats, "EXACT", 40)
    monkeypatch.setattr(bstats, "CHUNK", 97)
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = np.concatenate([rng.lognormal(0, 1, rng.integers(1, 2000)), np.full(rng.integers(0, 300), 1.5),
                            rng.integers(0, 4, rng.integers(0, 500)).astype(float), [1e6]])
        ranks = sorted({0, x.size - 1, *rng.integers(0, x.size, 4).tolist()})
        assert order_stats(bstats._chunked(x), ranks) == [float(v) for v in np.sort(x)[ranks]]
    a = [rng.lognormal(0, 0.1, 500) for _ in range(4)]
    b = [rng.lognormal(0, 0.1, 500) for _ in range(4)]
    chunked = ratio_ci(a, b, block=4)
    monkeypatch.setattr(bstats, "EXACT", 1 << 18)
    assert ratio_ci(a, b, block=4) == chunked  # the chunked and the direct path agree to the last bit


# ------------------------------------------------------------------------------------------------ A/A
def _aa_run(rng, *, copies=4, repeats=10, sessions=6, rounds=10):
    comps = []
    for rep in range(repeats):
        x = _sim(rng, copies, sessions, rounds)
        for pos in range(1, copies, 2):  # disjoint pairs, as aa_check compares them
            rc = ratio_ci(x[pos], x[pos - 1], block=copies)
            ci = rc["ci95"]
            comps.append({"repeat": rep, "position": pos + 1, "ratio": rc["ratio"], "ci95": ci,
                          "excludes_1": bool(ci[0] > 1 or ci[1] < 1)})
    return AAResult(comps, [])


def test_aa_false_alarm_rate_at_its_level():
    """Under the null (every copy the same model, sessions that differ by 4%), 200 simulated self-checks of 20
    independent comparisons each: the intervals exclude 1 about 5% of the time and the check says FAILED in at
    most its level (1%) of them (binomial slack for 200 runs: at most 6 of 200)."""
    rng = np.random.default_rng(2)
    runs = [_aa_run(rng) for _ in range(200)]
    excluded = sum(r.excluded for r in runs) / sum(len(r.comparisons) for r in runs)
    failed = sum(not r.summary()["passed"] for r in runs)
    assert 0.03 <= excluded <= 0.07, excluded
    assert AA_LEVEL == 0.01 and failed <= 6, failed  # P(Binomial(200, 0.01) > 6) < 0.5%


def test_aa_check_compares_disjoint_pairs(tmp_path):
    """aa_check's comparisons share no baseline: #2 against #1 and #4 against #3 (not every copy against #1)."""
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    onnx.save(g.model([g.node("Relu", [g.bn(g.conv(x, 3, 4), 4)])]), tmp_path / "m.onnx")
    res = aa_check(str(tmp_path / "m.onnx"), copies=4, repeats=1, iters=8, warmup=1, opt_levels=("off",))
    assert [(c["position"], c["baseline"]) for c in res.comparisons] == [(2, 1), (4, 3)]
    assert res.summary()["comparisons"] == 2


# ------------------------------------------------------------------------------------------------ power
def test_a_five_percent_slowdown_is_named_at_the_documented_length():
    """README: `--iters 400` (20 sessions of 20 rounds) names a true 5% slowdown in >= 90% of runs when each
    model's session level varies by 4% (sd) and runs by 5%. 200 simulated runs; the old plan (at most 10
    sessions) plateaued near 30-40% at any number of rounds."""
    sessions, rounds = plan_sessions(2, 400)
    assert (sessions, rounds) == (20, 20)
    rng = np.random.default_rng(3)
    named = 0
    for _ in range(200):
        a, b = _sim(rng, 2, sessions, rounds, effects=[math.log(1.05), 0.0])
        rc = ratio_ci(a, b, block=2)
        named += judge(rc["ratio"], rc["ci95"], 0.02, rc["spread_halfwidth"]) == "slower"
    assert named >= 0.9 * 200, named


def test_underpowered_when_only_more_sessions_would_help():
    """Sessions 10% apart (sd) and 4 sessions of many rounds: no amount of rounds narrows the interval to 2%,
    so the verdict is 'underpowered', not 'no measurable difference'; with quiet sessions the same length
    decides."""
    rng = np.random.default_rng(4)
    a, b = _sim(rng, 2, 4, 400, session_sd=0.10)
    rc = ratio_ci(a, b, block=2)
    assert rc["spread_halfwidth"] > 0.02
    assert judge(rc["ratio"], rc["ci95"], 0.02, rc["spread_halfwidth"]) == "underpowered"
    a, b = _sim(rng, 2, 4, 400, session_sd=0.0, round_sd=0.02)
    rc = ratio_ci(a, b, block=2)
    assert rc["spread_halfwidth"] < 0.02
    assert judge(rc["ratio"], rc["ci95"], 0.02, rc["spread_halfwidth"]) == "none"


# ------------------------------------------------------------------------------------------------ model size
def test_model_size_counts_external_data(tmp_path):
    """bnfold writes tensors to `<model>.<12 hex>.data`; the size reported is the file plus its data."""
    from bnfold.onnx_io import save_model

    g = G()
    x = g.input("x", ["N", 3, 32, 32])
    model = g.model([g.bn(g.conv(x, 3, 64, k=5), 64)])
    save_model(model, tmp_path / "m.onnx", external_data=True)
    data = [p for p in tmp_path.iterdir() if p.name.endswith(".data")]
    assert data, "save_model wrote no external data"
    total = (tmp_path / "m.onnx").stat().st_size + sum(p.stat().st_size for p in data)
    assert model_mb(tmp_path / "m.onnx") == pytest.approx(total / 1e6)
    assert total > 2 * (tmp_path / "m.onnx").stat().st_size


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    onnx.save(g.model([g.node("Relu", [g.bn(g.conv(x, 3, 4), 4)])]), d / "tiny.onnx")
    return d / "tiny.onnx"


def _bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bnfold.cli.main", "bench", *map(str, args), "--json"],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def test_cli_iters_are_the_rounds_asked_for_with_a_plan(tiny):
    """`--iters 20` times 20 rounds (whole cycles: 24) per setting, in 4 sessions, and prints its plan with an
    estimate first; before, every session ran 0.5 s, so a tiny model got tens of thousands of rounds."""
    p = _bench(tiny, tiny, "--opt-level", "off", "--iters", "20", "--warmup", "2")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    cfg = out["config"]
    assert cfg["sessions"] == 4 and cfg["rounds_per_session"] == 6
    assert all(r["iters"] == 24 and r["rounds_per_session"] == [6] * 4 for r in out["results"])
    assert "plan: 1 setting(s) x 4 sessions x 6 rounds of 2 model(s), about" in p.stderr
    assert cfg["estimate_s"] > 0 and cfg["measured_s"] > 0


def test_cli_duration_is_the_time_asked_for(tiny):
    """`--duration 2` plans sessions and rounds from a trial session to fill about 2 s per setting, and sessions
    grow with it (more than the 3-10 of the old plan)."""
    p = _bench(tiny, tiny, "--opt-level", "off", "--duration", "2", "--warmup", "2")
    assert p.returncode == 0, p.stderr
    cfg = json.loads(p.stdout)["config"]
    assert cfg["duration_s"] == 2 and cfg["sessions"] >= 3
    assert 0.5 <= cfg["measured_s"] <= 6, cfg["measured_s"]  # a loaded machine stretches it; never 0.5 s x 10
    assert cfg["estimate_s"] == pytest.approx(2, rel=0.5)


def test_cli_weights_only_for_torch_specs(tiny, tmp_path):
    p = subprocess.run([sys.executable, "-m", "bnfold.cli.main", "bench", str(tiny), "--weights", str(tiny)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--weights is for PyTorch specs" in p.stderr


def test_cli_torch_runtime_uses_weights(tmp_path):
    """`bench SPEC --runtime torch --weights W` times the model with W loaded: a state dict that does not fit
    the spec is refused (exit 2), so the weights are really read."""
    torch = pytest.importorskip("torch")
    from bnfold.models import zoo

    model = zoo.create("mnist_mlp")
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    bad = tmp_path / "bad.pt"
    torch.save({"nope.weight": torch.zeros(3)}, bad)
    base = [sys.executable, "-m", "bnfold.cli.main", "bench", "mnist_mlp", "mnist_mlp@folded", "--runtime", "torch",
            "--iters", "9", "--warmup", "1"]
    p = subprocess.run(base + ["--weights", str(bad)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    p = subprocess.run(base + ["--weights", str(good)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "DONE | 2 measurement(s)" in p.stdout


def test_cli_run_benchmarks_the_rounds_asked_for_with_a_plan(tiny, tmp_path):
    """`run --iters 20` prints the bench's plan and times 20 rounds (24: whole cycles) per setting; before,
    report.json said tens of thousands (`iters: 68406` for mnist_mlp)."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "bnfold.cli.main", "run", str(tiny), "-o", str(out), "--iters", "20"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    assert "plan: 2 setting(s) x 4 sessions x 6 rounds of 2 model(s), about" in p.stdout
    bench = json.loads((out / "report.json").read_text())["bench"]
    assert bench["config"]["iters"] == 20 and bench["config"]["estimate_s"] > 0
    assert [r["iters"] for r in bench["results"]] == [24] * 4


def test_table_words_below_the_threshold_and_underpowered():
    """The table's verdict column says what the verdict line says: 'below 2%' for an interval that excludes 1
    with a ratio within --min-effect, 'underpowered' when the session spread keeps it undecidable (both were
    'no diff.')."""
    from rich.console import Console

    from bnfold.bench import BenchResult, BenchRun
    from bnfold.cli.render import bench_table

    def res(model, ratio, ci, spread=None, verdict="none"):
        return BenchResult(model=model, ep="cpu", opt_level="off", batch=1, p50_ms=1.0, p90_ms=1.1, p99_ms=1.2,
                           mean_ms=1.0, ci95_ms=[0.9, 1.1], throughput=1e3, session_ms=1.0, model_mb=0.1,
                           providers=["CPUExecutionProvider"], iters=24, threads=1, io_binding=False,
                           cuda_graph=False, ratio=ratio, ratio_ci95=ci, spread_halfwidth=spread, verdict=verdict)
    base = res("a.onnx", 1.0, [1.0, 1.0], verdict=None)
    run = BenchRun([base, res("b.onnx", 0.981, [0.974, 0.987], 0.001), res("c.onnx", 0.97, [0.85, 1.10], 0.06)],
                   [], {"cpu": "x", "cpu_count": 2, "onnxruntime": "1"},
                   {"sessions": 4, "rounds_per_session": 6, "min_session_s": 0, "warmup": 1, "threads": 1,
                    "min_effect": 0.02})
    con = Console(width=100, record=True)
    con.print(bench_table(run, 100))
    text = con.export_text()
    assert "below 2%" in text and "underpowered" in text and "no diff." not in text


@pytest.mark.parametrize("width", [60, 80, 100, 130])
def test_table_keeps_long_names_whole_and_numbers_on_their_row(width):
    """Names that do not fit beside the numbers are neither cut nor broken inside the table: rows get labels
    (#1, #2) and the title gives each label's whole name on one line; short names stay in the table."""
    from rich.console import Console

    from bnfold.bench import BenchResult, BenchRun
    from bnfold.cli.render import bench_table

    def res(model, ratio, ci, verdict="none"):
        return BenchResult(model=model, ep="cpu", opt_level="all", batch=1, p50_ms=1.234, p90_ms=1.3, p99_ms=1.4,
                           mean_ms=1.2, ci95_ms=[1.2, 1.3], throughput=1e3, session_ms=1.0, model_mb=0.1,
                           providers=["CPUExecutionProvider"], iters=24, threads=1, io_binding=False,
                           cuda_graph=False, ratio=ratio, ratio_ci95=ci, spread_halfwidth=0.001, verdict=verdict)

    def render(names):
        rows = [res(names[0], 1.0, [1.0, 1.0], verdict=None)] + [res(n, 0.95, [0.94, 0.96], "faster")
                                                                 for n in names[1:]]
        run = BenchRun(rows, [], {"cpu": "x", "cpu_count": 2, "onnxruntime": "1"},
                       {"sessions": 4, "rounds_per_session": 6, "min_session_s": 0, "warmup": 1, "threads": 1,
                        "min_effect": 0.02})
        con = Console(width=width, record=True)
        con.print(bench_table(run, width))
        return con.export_text(styles=False).splitlines()

    long = ["/models/a_very_long_model_name_for_the_original_network.onnx",
            "/models/a_very_long_model_name_for_the_original_network_folded.onnx"]
    lines = render(long)
    assert all(len(ln.rstrip()) <= width for ln in lines)
    for k, name in enumerate(long, 1):
        base = name.rsplit("/", 1)[1]
        legend = [i for i, ln in enumerate(lines) if ln.strip() in (f"#{k} {base}", f"#{k}")]
        assert len(legend) == 1  # the title's line for this label, the whole name on it or on the next line
        assert base in lines[legend[0]] or lines[legend[0] + 1].strip() == base
        assert sum(ln.strip().startswith(f"#{k} ") and base not in ln for ln in lines) == 1  # the row's label
    assert "…" not in "\n".join(lines)
    assert len([m for ln in lines for m in re.findall(r"(?<![\d.])0\.940-0\.960(?![\d.])", ln)]) == 1

    short = render(["a.onnx", "b.onnx"])
    assert not any(ln.strip().startswith("#1") for ln in short)
    assert any("a.onnx" in ln for ln in short) and any("b.onnx" in ln for ln in short)
