"""The benchmark itself: plan (a trial session per setting gives the time estimate), measure, summarize; and the
A/A self-check built on it."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnfold.bench.measure import (
    OrtRunner,
    ProviderUnavailable,
    Setting,
    TorchRunner,
    _loadavg,
    _threads,
    environment,
    measure,
    model_mb,
    plan_duration,
    plan_sessions,
    probe,
    williams_orders,
)
from bnfold.bench.report import AAResult, BenchResult, BenchRun, setting_name
from bnfold.bench.stats import MIN_EFFECT, judge, ratio_ci, summarize
from bnfold.errors import BnfoldError

log = logging.getLogger(__name__)


@dataclass
class BenchPlan:
    """What a benchmark will do: per setting, ``sessions`` fresh sessions of ``rounds`` rounds (every model
    once a round), and the seconds that should take (from one trial session per setting, already run)."""
    settings: list[Setting]
    models: int
    sessions: int
    rounds: int
    estimate_s: float
    per_setting_s: list[float] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    duration_s: float | None = None

    def describe(self) -> str:
        what = (f"{len(self.settings)} setting(s) x {self.sessions} sessions x {self.rounds} rounds of "
                f"{self.models} model(s)")
        over = ""
        if self.duration_s is not None and self.estimate_s > 1.2 * self.duration_s * len(self.settings):
            over = f" (more than the {self.duration_s:g} s per setting asked: the minimum is 3 sessions of one cycle)"
        return f"{what}, about {_seconds(self.estimate_s)}{over}"


@dataclass
class BenchProgress:
    """A progress event: ``done`` of ``total`` sessions (over all settings), seconds since measuring began, and
    seconds left (the plan's estimate, corrected by the pace so far)."""
    done: int
    total: int
    elapsed_s: float
    left_s: float
    setting: Setting


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def _factories(models, s: Setting, runtime: str, input_shapes, compile_mode):
    if runtime == "ort":
        return [(lambda m=m: OrtRunner(str(m), s, input_shapes)) for m in models]
    return [(lambda label=label, mod=mod, shape=shape: TorchRunner(copy.deepcopy(mod), label, s, shape, compile_mode))
            for label, mod, shape in models]


def _skippable(exc: Exception) -> bool:
    return isinstance(exc, ProviderUnavailable) or "is not in this onnxruntime build" in str(exc)


def bench(models: list, *, eps=("cpu",), opt_levels=("all",), batches=(1,), warmup: int = 10, iters: int = 100,
          sessions: int | None = None, duration_s: float | None = None, threads: int | None = None,
          spin: bool = False, io_binding: bool | None = None, cuda_graph: bool = False, input_shapes=None,
          runtime: str = "ort", compile_mode: str | None = None, ep_options: dict | None = None,
          labels: list[str] | None = None, min_effect: float = MIN_EFFECT, min_session_s: float = 0.0,
          on_plan=None, progress=None) -> BenchRun:
    """Time ``models`` (ONNX paths for ``runtime="ort"``; ``(label, nn.Module, input_shape)`` for ``"torch"``)
    side by side for every (ep, opt level, batch) setting, in fresh sessions of balanced order: ``iters`` timed
    rounds per setting in all (:func:`plan_sessions`), or about ``duration_s`` seconds per setting, set-up
    included (:func:`plan_duration`); ``sessions`` fixes the session count. A trial session per setting comes
    first: it skips settings whose provider cannot run, and times the set-up and a round for the plan, which
    ``on_plan(BenchPlan)`` receives before measuring; ``progress(BenchProgress)`` after every session.
    ``io_binding`` defaults to on for GPU providers. ``ep_options`` are provider options for the GPU providers
    (CUDA: ``prefer_nhwc``, ``cudnn_conv_algo_search``, ``use_tf32``...); the CPU provider gets none. ``spin``
    lets ORT's intra-op threads busy-wait between runs. ``threads``: intra-op threads; ``None`` is 1 on the CPU
    provider (ORT) and the runtime's choice elsewhere, 0 the runtime's choice everywhere. A session lasts at
    least ``min_session_s`` seconds (more rounds when the models are fast; 0: exactly the planned rounds).
    Every model gets its ratio to the first, judged with ``min_effect``."""
    if runtime == "torch" and (cuda_graph or io_binding or tuple(opt_levels) != ("all",)):
        raise BnfoldError("--cuda-graph, --io-binding and --opt-level are ONNX Runtime settings: they do not apply "
                          "to --runtime torch (use --compile for torch.compile)")
    if not models:
        raise BnfoldError("no model to benchmark")
    if labels is not None and len(labels) != len(models):
        raise ValueError("one label per model")
    if duration_s is not None and not duration_s > 0:
        raise BnfoldError(f"--duration {duration_s}: a positive number of seconds is needed")
    if labels is None and runtime == "ort" and len({str(m) for m in models}) < len(models):
        labels = [f"{m}#{i + 1}" for i, m in enumerate(models)]  # the same file twice: tell the copies apart
    n_sessions, rounds = plan_sessions(len(models), iters, sessions) if duration_s is None else (0, 0)
    load_start = _loadavg()
    settings = []
    for ep in eps:
        for level in (opt_levels if runtime == "ort" else ["eager" if not compile_mode else "compiled"]):
            for b in batches:
                iob = (ep != "cpu") if io_binding is None else io_binding
                settings.append(Setting(ep, level, b, _threads(threads, ep, runtime), iob, cuda_graph,
                                        dict(ep_options or {}) if ep != "cpu" else {}, spin))
    # trial sessions: what runs here, and what a session costs (the process's first session pays the runtime's
    # one-time start-up, which no later session does: that one is made first, untimed)
    skipped, runnable, probes = [], [], []
    warm = False
    for s in settings:
        try:
            factories = _factories(models, s, runtime, input_shapes, compile_mode)
            if not warm:
                factories[0]()
                warm = True
            probes.append(probe(factories, warmup=warmup))
            runnable.append(s)
        except (ProviderUnavailable, BnfoldError) as exc:
            if not _skippable(exc):
                raise
            skipped.append({"ep": s.ep, "opt_level": s.opt_level, "batch": s.batch, "reason": str(exc)})
            log.info("skipping %s: %s", s.ep, exc)
    if not runnable:
        raise BnfoldError("no requested provider can run here: " + "; ".join(f"{s['ep']}: {s['reason']}" for s in skipped))
    if duration_s is not None:  # plan from the slowest setting, so that none runs over
        slowest = max(probes, key=lambda p: p.session_s(0, warmup) + p.round_s * 100)
        n_sessions, rounds = plan_duration(len(models), duration_s, slowest, warmup=warmup, sessions=sessions,
                                           min_session_s=min_session_s)
    per_setting = [n_sessions * p.session_s(rounds, warmup, min_session_s) for p in probes]
    plan = BenchPlan(runnable, len(models), n_sessions, rounds, sum(per_setting), per_setting, skipped, duration_s)
    log.info("plan: %s", plan.describe())
    if on_plan:
        on_plan(plan)
    results = []
    block = len(williams_orders(len(models)))
    t_start = time.perf_counter()
    total = n_sessions * len(runnable)
    for j, s in enumerate(runnable):
        planned_before = sum(per_setting[:j])

        def tick(k, n, j=j, s=s, planned_before=planned_before):
            if progress is None:
                return
            done = j * n_sessions + k + 1
            elapsed = time.perf_counter() - t_start
            planned_done = planned_before + per_setting[j] * (k + 1) / n_sessions
            pace = elapsed / planned_done if planned_done > 0 else 1.0
            progress(BenchProgress(done, total, elapsed, max(0.0, (plan.estimate_s - planned_done) * pace), s))
        got = measure(_factories(models, s, runtime, input_shapes, compile_mode), sessions=n_sessions,
                      rounds=rounds, warmup=warmup, min_session_s=min_session_s, on_session=tick)
        results += _results(got, s, labels, runtime, min_effect, block)
    config = {"runtime": runtime, "eps": list(eps), "opt_levels": list(opt_levels), "batches": list(batches),
              "warmup": warmup, "iters": iters if duration_s is None else None, "sessions": n_sessions,
              "rounds_per_session": rounds, "min_session_s": min_session_s, "duration_s": duration_s,
              "estimate_s": round(plan.estimate_s, 2), "measured_s": round(time.perf_counter() - t_start, 2),
              "threads": _threads(threads, "cpu", runtime) if "cpu" in eps else threads, "spin": spin,
              "io_binding": io_binding, "cuda_graph": cuda_graph, "compile": compile_mode,
              "ep_options": dict(ep_options or {}), "min_effect": min_effect,
              "load_start": load_start, "load_end": _loadavg(),
              "order": "per session: fresh sessions of every model, created in the order of a Williams-design row; "
                       "rounds run every model once, rows cycled (each model equally often in each position and "
                       "after each other model)",
              "interval": "two-stage: one estimate per session (median latency; for ratios the median per-round log "
                          "ratio per balanced-order stratum, averaged), Student's t over the sessions' estimates "
                          "(S-1 degrees of freedom); one session: order-statistic interval of its rounds",
              "timing": "wall clock (perf_counter) on CPU, IO binding + synchronize on GPU, CUDA events for torch "
                        "on GPU"}
    return BenchRun(results, skipped, environment(), config)


def _results(got, s: Setting, labels, runtime: str, min_effect: float, block: int) -> list[BenchResult]:
    out = []
    sizes: dict[str, float | None] = {}
    for i, t in enumerate(got.samples):
        st = summarize(t)
        path = got.labels[i]
        if runtime == "ort" and path not in sizes:
            sizes[path] = model_mb(path)
        res = BenchResult(model=labels[i] if labels else got.labels[i], ep=s.ep, opt_level=s.opt_level,
                          batch=s.batch, p50_ms=st["p50_ms"], p90_ms=st["p90_ms"], p99_ms=st["p99_ms"],
                          mean_ms=st["mean_ms"], ci95_ms=st["ci95_ms"], throughput=s.batch * 1e3 / st["mean_ms"],
                          session_ms=float(np.median(got.session_ms[i])),
                          model_mb=sizes.get(path) if runtime == "ort" else None,
                          providers=got.providers[i], iters=st["n"], threads=s.threads,
                          io_binding=s.io_binding and runtime == "ort", cuda_graph=s.cuda_graph,
                          std_ms=st["std_ms"], min_ms=st["min_ms"], ep_options=s.ep_options,
                          sessions=st["sessions"], rounds_per_session=[len(x) for x in t],
                          session_p50_ms=st["session_p50_ms"], session_spread=st["session_spread"],
                          samples_ms=[list(x) for x in t])
        if i == 0:
            res.ratio, res.ratio_ci95 = 1.0, [1.0, 1.0]
        else:
            rc = ratio_ci(t, got.samples[0], block=block)
            res.ratio, res.ratio_ci95, res.session_ratios = rc["ratio"], rc["ci95"], rc["session_ratios"]
            res.within_ci95, res.spread_halfwidth = rc["within_ci95"], rc["spread_halfwidth"]
            res.verdict = judge(res.ratio, res.ratio_ci95, min_effect, res.spread_halfwidth)
        out.append(res)
    return out


def aa_check(model, *, copies: int = 4, repeats: int = 3, progress=None, **bench_kwargs) -> AAResult:
    """Benchmark ``model`` against ``copies - 1`` copies of itself, ``repeats`` times (each a separate
    :func:`bench` call, fresh sessions). Every ratio's true value is 1. The comparisons are disjoint pairs
    (#2/#1, #4/#3, ...; an odd last copy is timed but not compared), so that no two comparisons share a
    baseline and the tests of :class:`AAResult` may treat them as independent."""
    if copies < 2:
        raise BnfoldError("--aa needs at least 2 copies")
    comps, runs = [], []
    name = Path(str(model[0] if isinstance(model, tuple) else model)).name
    block = len(williams_orders(copies))
    for rep in range(repeats):
        if progress:
            progress(rep, repeats)
        run = bench([model] * copies, labels=[f"{name}#{i + 1}" for i in range(copies)], **bench_kwargs)
        runs.append(run.to_dict())
        for start in range(0, len(run.results), copies):
            group = run.results[start:start + copies]
            for pos in range(1, copies, 2):
                rc = ratio_ci(group[pos].samples_ms, group[pos - 1].samples_ms, block=block)
                ci = rc["ci95"]
                comps.append({"repeat": rep, "setting": setting_name(group[pos]), "position": pos + 1,
                              "baseline": pos, "ratio": rc["ratio"], "ci95": ci,
                              "excludes_1": bool(ci[0] > 1 or ci[1] < 1)})
    return AAResult(comps, runs)
