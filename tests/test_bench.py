"""bench: the statistics against synthetic data with known truth (session effects, shared drift, position
effects), the balanced order, the verdicts, the JSON schema, the table at 80 columns, a run on a small model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold import fold_model
from bnfold.bench import (
    AAResult,
    bench,
    binomial_tail,
    describe,
    judge,
    machine_flags,
    measure,
    plan_sessions,
    ratio_ci,
    sign_test,
    summarize,
    t975,
    williams_orders,
)
from bnfold.cli.main import main
from bnfold.pipeline import headline

from .helpers import G


# ------------------------------------------------------------------------------------------------ statistics
def test_summarize_known_samples():
    x = np.arange(1, 101, dtype=float)  # 1..100, one session
    st = summarize(x)
    assert st["p50_ms"] == 50.5 and st["mean_ms"] == 50.5 and st["sessions"] == 1
    assert st["p90_ms"] == pytest.approx(90.1) and st["p99_ms"] == pytest.approx(99.01)
    lo, hi = st["ci95_ms"]
    assert (lo, hi) == (40, 61)  # order statistics 40 and 61 of 100: the distribution-free 95% interval
    const = summarize([[2.0] * 30, [2.0] * 30, [2.0] * 30])
    assert const["ci95_ms"] == pytest.approx([2.0, 2.0]) and const["session_spread"] == 0


def test_t_quantiles():
    assert t975(1) == pytest.approx(12.706) and t975(9) == pytest.approx(2.262)
    assert t975(60) == pytest.approx(2.000, abs=2e-3) and t975(10 ** 6) == pytest.approx(1.96, abs=1e-3)


def test_median_interval_sees_the_sessions():
    """Three sessions whose levels differ by 10%: the pooled bootstrap (one session) is far narrower than the
    hierarchical one, which must cover the spread of the session levels."""
    rng = np.random.default_rng(0)
    sessions = [lvl * rng.uniform(0.99, 1.01, 200) for lvl in (1.0, 1.1, 1.2)]
    pooled = summarize(np.concatenate(sessions))["ci95_ms"]
    hier = summarize(sessions)
    assert hier["sessions"] == 3 and hier["session_spread"] == pytest.approx(0.2, abs=0.01)
    assert hier["ci95_ms"][0] <= 1.0 and hier["ci95_ms"][1] >= 1.2
    assert (hier["ci95_ms"][1] - hier["ci95_ms"][0]) > 5 * (pooled[1] - pooled[0])


def test_ratio_ci_paired():
    """Strong drift shared by both models inside every round (they run side by side): pairing by round
    removes it, so the interval is tight (an unpaired bootstrap of the same data spans tens of percent)."""
    rng = np.random.default_rng(1)
    a, b = [], []
    for _ in range(4):
        drift = np.linspace(1, 3, 100) * rng.uniform(0.8, 1.2)
        a.append(2.0 * drift * rng.uniform(0.99, 1.01, 100))
        b.append(drift * rng.uniform(0.99, 1.01, 100))
    rc = ratio_ci(a, b, block=2)
    assert rc["ratio"] == pytest.approx(2.0, rel=0.005)
    assert rc["ci95"][0] <= rc["ratio"] <= rc["ci95"][1]
    assert rc["ci95"][1] / rc["ci95"][0] < 1.01
    shuffled = [rng.permutation(x) for x in b]  # the same numbers, pairing destroyed
    wide = ratio_ci(a, shuffled, block=2)
    assert wide["ci95"][1] / wide["ci95"][0] > 1.1


def _simulate(rng, sessions, rounds, session_sd, round_sd, position=0.0):
    """Two identical models timed side by side: per-session offsets of each model, a drift shared in a round,
    per-run noise, and (optionally) a penalty for running first in a round (ABBA order)."""
    a, b = [], []
    for k in range(sessions):
        shared = rng.normal(0, 0.1, rounds)
        a_first = (np.arange(rounds) + k) % 2 == 0
        a.append(np.exp(shared + rng.normal(0, session_sd) + rng.normal(0, round_sd, rounds) + position * a_first))
        b.append(np.exp(shared + rng.normal(0, session_sd) + rng.normal(0, round_sd, rounds) + position * ~a_first))
    return a, b


def _exclusion_rate(method, n_sim=80, seed=0, **kw):
    rng = np.random.default_rng(seed)
    out = 0
    for _ in range(n_sim):
        a, b = _simulate(rng, **kw)
        if method == "hierarchical":
            ci = ratio_ci(a, b, block=2)["ci95"]
        else:  # every round of every session pooled into one: the method bench used before sessions
            ci = ratio_ci(np.concatenate(a), np.concatenate(b), block=2)["ci95"]
        out += ci[0] > 1 or ci[1] < 1
    return out / n_sim


def test_ratio_coverage_with_a_session_effect():
    """A known session effect (each session of each model 4% off at random) and true ratio 1: intervals from
    rounds alone exclude 1 most of the time; the hierarchical ones about 5% of the time."""
    kw = dict(sessions=6, rounds=20, session_sd=0.04, round_sd=0.05)
    naive = _exclusion_rate("naive", **kw)
    hier = _exclusion_rate("hierarchical", **kw)
    assert naive > 0.25, naive
    assert hier <= 0.1, hier


def test_ratio_cancels_position_effects_and_preempted_runs():
    """Running first in a round costs 20% (the orders alternate, ABBA) and one run in ten is preempted (10x).
    Rounds of one order form a stratum and a stratum's median ignores the preempted runs: the estimate is 1
    and the interval tight around it (a per-round median straddles the two positions)."""
    rng = np.random.default_rng(3)
    a, b = _simulate(rng, sessions=6, rounds=40, session_sd=0.0, round_sd=0.02, position=0.2)
    for x in a + b:
        x[rng.random(x.size) < 0.1] *= 10
    rc = ratio_ci(a, b, block=2)
    assert rc["ratio"] == pytest.approx(1.0, abs=0.01) and rc["ci95"][0] < 1 < rc["ci95"][1]
    assert rc["ci95"][1] / rc["ci95"][0] < 1.04


def test_ratio_ci_rejects_unpaired_input():
    with pytest.raises(ValueError, match="paired sessions"):
        ratio_ci([[1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="same number of rounds"):
        ratio_ci([[1.0, 1.0]], [[1.0]])


# ------------------------------------------------------------------------------------------------ order
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_williams_orders_are_balanced(n):
    rows = williams_orders(n)
    assert len(rows) == (n if n % 2 == 0 or n == 1 else 2 * n)
    position = np.zeros((n, n), int)
    after = np.zeros((n, n), int)
    for row in rows:
        assert sorted(row) == list(range(n))
        for p, i in enumerate(row):
            position[i, p] += 1
        for x, y in zip(row, row[1:]):
            after[x, y] += 1
    assert (position == position[0, 0]).all()
    off = after[~np.eye(n, dtype=bool)]
    assert n == 1 or (off == off[0]).all() and np.trace(after) == 0


class _Clock:
    """Fake runners sharing one clock: a run costs 1.5 when it is first in its round, else 1.0."""

    def __init__(self, n):
        self.n, self.calls, self.created, self.runs = n, 0, [], []

    def factory(self, i):
        def make():
            self.created.append(i)
            clock = self

            class Runner:
                label, session_ms, providers = f"m{i}", 1.0, ["fake"]

                def __call__(self):
                    first = clock.calls % clock.n == 0
                    clock.calls += 1
                    clock.runs.append(i)
                    return 1.5 if first else 1.0
            return Runner()
        return make


def test_measure_fresh_sessions_balanced_positions():
    n, sessions = 4, 4
    clock = _Clock(n)
    got = measure([clock.factory(i) for i in range(n)], sessions=sessions, rounds=8, warmup=0)
    assert len(clock.created) == n * sessions  # a fresh runner per model and session
    firsts = [clock.created[k * n] for k in range(sessions)]
    assert sorted(firsts) == list(range(n))  # every model created first once
    rounds = [clock.runs[j:j + n] for j in range(0, len(clock.runs), n)]
    assert len(rounds) == sessions * 8
    for pos in (0, n - 1):
        counts = np.bincount([r[pos] for r in rounds], minlength=n)
        assert (counts == counts[0]).all(), counts  # each model equally often first and last
    assert all(len(s) == 8 for m in got.samples for s in m)
    for i in range(1, n):  # the first-in-round penalty falls on every model alike
        rc = ratio_ci(got.samples[i], got.samples[0], block=n)
        assert rc["ratio"] == pytest.approx(1.0)


def test_measure_min_session_time_and_whole_cycles():
    clock = _Clock(3)
    got = measure([clock.factory(i) for i in range(3)], sessions=3, rounds=1, warmup=0, min_session_s=0.01)
    for s in got.samples[0]:
        assert len(s) % 6 == 0 and len(s) >= 6  # whole cycles of the 6-row design for 3 models


def test_plan_sessions():
    """--iters is the rounds per setting in all: about sqrt(iters) sessions, no cap (more rounds, more
    sessions), whole cycles; the old plan capped sessions at 10 and ran every session for 0.5 s."""
    assert plan_sessions(2, 100) == (10, 10)
    assert plan_sessions(2, 20) == (4, 6)
    assert plan_sessions(4, 15)[0] >= 3
    s, r = plan_sessions(3, 200)
    assert s >= 3 and r % 6 == 0
    s, r = plan_sessions(2, 10_000)
    assert s == 100 and s * r == 10_000
    from bnfold.errors import BnfoldError
    with pytest.raises(BnfoldError, match="at least 3"):
        plan_sessions(2, 100, sessions=2)


# ------------------------------------------------------------------------------------------------ verdicts
def test_judge_needs_interval_and_size():
    assert judge(0.90, [0.85, 0.95]) == "faster"
    assert judge(1.10, [1.05, 1.15]) == "slower"
    assert judge(0.99, [0.985, 0.995]) == "none"  # excludes 1 but within 2%
    assert judge(0.90, [0.80, 1.01]) == "none"  # big but the interval holds 1
    assert judge(0.99, [0.985, 0.995], min_effect=0.005) == "faster"
    assert describe(0.994, [0.962, 1.027]) == "no measurable difference (ratio 0.994, interval [0.962, 1.027])"
    assert describe(0.9, [0.85, 0.95]).startswith("10.0% faster (ratio 0.900")
    # an interval that excludes 1 but a ratio within --min-effect: said as such, not "no measurable difference"
    assert describe(0.981, [0.974, 0.987]) == ("1.9% faster, below the 2% you asked for (ratio 0.981, interval "
                                               "[0.974, 0.987])")
    assert describe(1.015, [1.004, 1.026], 0.05).startswith("1.5% slower, below the 5% you asked for")
    # the session spread alone keeps the interval wider than --min-effect: underpowered, with the sessions needed
    assert judge(0.97, [0.90, 1.05], spread_halfwidth=0.06) == "underpowered"
    assert judge(0.97, [0.90, 1.05], spread_halfwidth=0.01) == "none"
    assert judge(0.90, [0.85, 0.95], spread_halfwidth=0.06) == "faster"  # a named difference stands
    text = describe(0.97, [0.90, 1.05], spread_halfwidth=0.06, sessions=8)
    assert text.startswith("underpowered (ratio 0.970 [0.900, 1.050])") and "+-6.0%" in text
    need = int(re.search(r"about (\d+) sessions", text).group(1))
    assert 50 < need < 120  # sd = ln(1.06) sqrt(8) / t(7); t(S-1) sd / sqrt(S) <= ln(1.02) from about 80 on


def _res(spread, ratio, ci, within, session_ratios, spread_h=0.0):
    return {"model": "b.onnx", "ep": "cpu", "opt_level": "all", "batch": 1, "session_spread": spread, "ratio": ratio,
            "ratio_ci95": ci, "within_ci95": within, "session_ratios": session_ratios, "spread_halfwidth": spread_h,
            "verdict": judge(ratio, ci, 0.02, spread_h)}


def test_machine_flags():
    """'sessions disagree' only when the session spread changes the conclusion: session medians 45% apart with a
    ratio every session agrees on is no reason to doubt it (the old rule flagged any spread above 10%)."""
    base = {"model": "a.onnx", "ep": "cpu", "opt_level": "all", "batch": 1, "session_spread": 0.45, "ratio": 1.0,
            "verdict": None}
    agree = _res(0.45, 0.90, [0.88, 0.92], [0.89, 0.91], [0.89, 0.90, 0.91])
    run = {"env": {"cpu_count": 2, "loadavg": [1.0, 1, 1]}, "config": {"load_start": [3.5, 2, 1]},
           "results": [base, agree]}
    assert machine_flags(run) == ["machine loaded (load average 3.5 on 2 cores)"]
    changed = _res(0.45, 0.95, [0.85, 1.06], [0.94, 0.96], [0.86, 0.97, 1.04], spread_h=0.01)
    quiet = {"env": {"cpu_count": 2}, "config": {"load_start": [0.5, 0, 0]}, "results": [base, changed]}
    flags = machine_flags(quiet)
    assert len(flags) == 1 and flags[0].startswith("sessions disagree: b.onnx cpu opt all batch 1 would read 5.0% "
                                                   "faster from the rounds alone") and "0.860-1.040" in flags[0]
    quiet["results"] = [base, agree]
    assert machine_flags(quiet) == []


def _report(comparisons, flags=()):
    return {"fold": {"folded": 9, "bn_total": 9},
            "verify": {"passed": True, "outputs": {"y": {"max_abs": 3e-6}},
                       "accuracy": {"reference": 0.94, "candidate": 0.94, "delta": 0.0}},
            "latency": {"comparisons": comparisons, "flags": list(flags)}}


def _comp(setting, ratio, ci):
    return {"setting": setting, "ratio": ratio, "ci95": ci, "verdict": judge(ratio, ci), "text": describe(ratio, ci)}


def test_headline_names_only_supported_differences():
    line = headline(_report([_comp("cpu opt off batch 1", 0.94, [0.91, 0.97]),
                             _comp("cpu opt all batch 1", 1.73, [0.8, 2.1])], ["machine loaded (load average 3.1 on 2 cores)"]))
    assert line.startswith("9/9 BatchNorm folded; outputs equal") and "accuracy equal" in line
    assert "cpu opt off batch 1 6.0% faster" in line
    assert "cpu opt all batch 1 no measurable difference (ratio 1.730, interval [0.800, 2.100])" in line
    assert "slower" not in line and line.endswith("machine loaded (load average 3.1 on 2 cores)")


# ------------------------------------------------------------------------------------------------ A/A
def _aa(ratios, excluded):
    comps = [{"position": 2 + i % 3, "ratio": r, "ci95": [r - 0.05, r + 0.05], "excludes_1": i < excluded}
             for i, r in enumerate(ratios)]
    runs = [{"config": {"load_start": [1.0]}, "env": {"cpu_count": 2}, "results": [{"session_spread": 0.05}]}]
    return AAResult(comps, runs)


def test_aa_verdict():
    rng = np.random.default_rng(0)
    fair = _aa(list(1 + rng.normal(0, 0.01, 24)), excluded=1)
    assert fair.summary()["passed"] and fair.verdict().startswith("PASSED | A/A: 1 of 24 independent")
    too_many = _aa(list(1 + rng.normal(0, 0.01, 24)), excluded=6)
    assert not too_many.summary()["passed"] and too_many.verdict().startswith("FAILED")
    assert "intervals too narrow" in too_many.verdict()
    # intervals far too wide never exclude 1: the two-sided test fails them once there are enough comparisons
    # (0 of 120: P = 0.95^120 = 0.2%); the old one-sided test passed 0 exclusions whatever their number
    too_wide = _aa(list(1 + rng.normal(0, 0.01, 120)), excluded=0)
    assert not too_wide.summary()["passed"] and "intervals too wide" in too_wide.verdict()
    assert _aa(list(1 + rng.normal(0, 0.01, 120)), excluded=6).summary()["passed"]
    biased = _aa([0.99 + 0.001 * rng.random() for _ in range(24)], excluded=0)  # the second-listed always faster
    s = biased.summary()
    assert not s["passed"] and not s["median_within_0.5%"]
    assert binomial_tail(0, 10, 0.05) == pytest.approx(1.0) and binomial_tail(2, 2, 0.5) == pytest.approx(0.25)
    assert sign_test([1.01] * 10) == pytest.approx(2 / 1024)


# ------------------------------------------------------------------------------------------------ real runs
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
                warmup=2, iters=12, sessions=3, min_session_s=0)
    assert len(run.results) == 8 and run.config["sessions"] == 3
    first = run.results[0]
    assert first.ratio == 1.0 and first.providers == ["CPUExecutionProvider"] and first.verdict is None
    for r in run.results:
        assert r.p50_ms > 0 and r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.ci95_ms[0] <= r.p50_ms <= r.ci95_ms[1]
        assert r.throughput == pytest.approx(r.batch * 1e3 / r.mean_ms)
        assert r.sessions == 3 and len(r.samples_ms) == 3 and r.iters == sum(map(len, r.samples_ms))
        assert r.model_mb > 0 and r.session_ms > 0
    second = run.results[1]
    assert second.verdict in ("faster", "slower", "none", "underpowered") and len(second.session_ratios) == 3
    assert [len(s) for s in second.samples_ms] == [len(s) for s in first.samples_ms]  # paired by round
    assert {(r.opt_level, r.batch) for r in run.results} == {("off", 1), ("off", 2), ("all", 1), ("all", 2)}
    assert run.env["onnxruntime"] and run.env["cpu"] and run.config["spin"] is False
    assert run.config["threads"] == 1 and all(r.threads == 1 for r in run.results)  # CPU default: one thread


def test_thread_defaults():
    from bnfold.bench import _threads
    assert _threads(None, "cpu", "ort") == 1 and _threads(0, "cpu", "ort") is None and _threads(4, "cpu", "ort") == 4
    assert _threads(None, "cuda", "ort") is None and _threads(None, "cpu", "torch") is None


def test_cli_json_schema_and_plot(models, tmp_path):
    png = tmp_path / "p.png"
    r = CliRunner().invoke(main, ["bench", str(models / "orig.onnx"), str(models / "folded.onnx"), "--opt-level",
                                  "off", "--iters", "12", "--warmup", "1", "--session-time", "0", "--json",
                                  "--plot", str(png)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) >= {"results", "env", "config", "skipped", "flags"}
    for res in data["results"]:
        assert set(res) >= {"model", "ep", "opt_level", "batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "ci95_ms",
                            "throughput", "ratio", "ratio_ci95", "session_ms", "model_mb", "providers", "sessions",
                            "samples_ms", "session_p50_ms", "verdict"}
        assert len(res["samples_ms"]) == res["sessions"] >= 3  # raw samples, per session
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = r.stderr.strip().splitlines()[-1]
    assert done.startswith("DONE | 2 measurement(s)")
    assert any(w in done for w in ("no measurable difference", "faster", "slower", "underpowered"))


@pytest.mark.parametrize("columns", ["80", "60"])
def test_cli_table_legible_when_narrow_and_piped(models, tmp_path, columns):
    """Piped (not a terminal) at COLUMNS=80 or less: no line is wider, and every number is whole on its row."""
    long = tmp_path / "a_rather_long_model_file_name_for_the_table.onnx"
    long.write_bytes((models / "orig.onnx").read_bytes())
    p = subprocess.run([sys.executable, "-m", "bnfold.cli.main", "bench", str(long), str(models / "folded.onnx"),
                        "--iters", "12", "--warmup", "1", "--session-time", "0"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": columns}, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert all(len(ln) <= int(columns) for ln in lines[:-1])  # the DONE line is one line, never wrapped
    assert "…" not in p.stdout  # nothing cut short
    assert len([ln for ln in lines if "cpu all 1" in ln]) == 2
    ratio_ci = re.findall(r"(?<![\d.])\d\.\d{3}-\d\.\d{3}(?![\d.])", p.stdout)
    assert ratio_ci  # the folded model's ratio interval, whole (a p50 interval of 1-10 ms has the same form)
    # and both p50 intervals, in the table (the DONE line may quote the session ratios' range too)
    assert len(re.findall(r"(?<![\d.])\d+\.\d+-\d+\.\d+(?![\d.])", "\n".join(lines[:-1]))) == 3
    assert lines[-1].startswith("DONE | ")


def test_cli_aa_self_check(models):
    r = CliRunner().invoke(main, ["bench", "--aa", str(models / "orig.onnx"), "--aa-copies", "2", "--aa-repeats",
                                  "2", "--iters", "8", "--warmup", "1", "--session-time", "0", "--json"])
    assert r.exit_code in (0, 1), r.output
    data = json.loads(r.stdout)
    assert data["summary"]["comparisons"] == 2 and len(data["runs"]) == 2
    assert r.stderr.strip().splitlines()[-1].split(" | ")[1].startswith("A/A: ")
    r = CliRunner().invoke(main, ["bench", "--aa", str(models / "orig.onnx"), str(models / "folded.onnx")])
    assert r.exit_code == 2 and "--aa takes one model" in r.output


def test_cli_unavailable_provider_only_is_exit_2(models):
    from bnfold.runtime import provider_works
    if provider_works("tensorrt"):
        pytest.skip("TensorRT really runs here")
    r = CliRunner().invoke(main, ["bench", str(models / "orig.onnx"), "--ep", "tensorrt", "--iters", "3"])
    assert r.exit_code == 2 and r.output.startswith("error:")


def test_cli_missing_provider_in_a_list_is_exit_2_naming_it(models):
    """One policy in every command (issue 22): a provider asked for by name must run; --ep auto takes what runs."""
    r = CliRunner().invoke(main, ["bench", str(models / "orig.onnx"), "--ep", "cpu,tensorrt", "--iters", "3",
                                  "--warmup", "0", "--session-time", "0", "--json"])
    from bnfold.runtime import provider_works
    if provider_works("tensorrt"):
        pytest.skip("TensorRT really runs here")
    assert r.exit_code == 2 and "--ep tensorrt" in r.output and "--ep auto" in r.output, r.output
    assert r.stdout == ""


def test_cli_torch_runtime_variants():
    r = CliRunner().invoke(main, ["bench", "mlp_bn", "mlp_bn@folded", "mlp_bn@nobn", "--runtime", "torch",
                                  "--iters", "6", "--warmup", "1", "--batch", "4", "--session-time", "0", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [x["model"] for x in data["results"]] == ["mlp_bn", "mlp_bn@folded", "mlp_bn@nobn"]
    assert data["results"][0]["providers"] == ["torch-cpu-eager"]


def test_torch_runtime_rejects_ort_settings():
    r = CliRunner().invoke(main, ["bench", "mlp_bn", "--runtime", "torch", "--opt-level", "off", "--iters", "2"])
    assert r.exit_code == 2 and "ONNX Runtime settings" in r.output
    r = CliRunner().invoke(main, ["bench", "mlp_bn", "--runtime", "torch", "--ep", "tensorrt", "--iters", "2"])
    assert r.exit_code == 2 and "cpu or cuda" in r.output
