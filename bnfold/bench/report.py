"""Results of a benchmark and what they say: result records, the comparisons and their verdicts in words, the
machine flags, the A/A self-check's tests, and the plot. No measuring and no numerics here (see
:mod:`bnfold.bench.measure` and :mod:`bnfold.bench.stats`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bnfold.bench.stats import MIN_EFFECT, binomial_two_sided, describe, judge, sign_test
from bnfold.errors import BnfoldError

#: the A/A self-check's level: the probability that it reports FAILED when the intervals are right (all its
#: tests together, Bonferroni)
AA_LEVEL = 0.01


@dataclass
class BenchResult:
    model: str
    ep: str
    opt_level: str
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    ci95_ms: list[float]
    throughput: float
    session_ms: float
    model_mb: float | None
    providers: list[str]
    iters: int
    threads: int | None
    io_binding: bool
    cuda_graph: bool
    std_ms: float = 0.0
    min_ms: float = 0.0
    ratio: float | None = None
    ratio_ci95: list[float] | None = None
    ep_options: dict = field(default_factory=dict)
    #: number of sessions, rounds in each, per-session medians and max/min of them minus 1
    sessions: int = 1
    rounds_per_session: list[int] = field(default_factory=list)
    session_p50_ms: list[float] = field(default_factory=list)
    session_spread: float = 0.0
    #: per-session ratio estimates to the first model, and the verdict on the ratio ('faster'/'slower'/'none'/'underpowered')
    session_ratios: list[float] | None = None
    verdict: str | None = None
    #: the interval the rounds alone would give (as if every session agreed), and the half-width (a fraction)
    #: the session-to-session spread alone leaves: see :func:`bnfold.bench.stats.ratio_ci`
    within_ci95: list[float] | None = None
    spread_halfwidth: float | None = None
    #: raw per-round latencies, one list per session (round r of every model in a session is one round)
    samples_ms: list[list[float]] = field(default_factory=list, repr=False)

    def to_dict(self, with_samples: bool = True) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples_ms")
        return d




@dataclass
class BenchRun:
    results: list[BenchResult]
    skipped: list[dict]
    env: dict
    config: dict

    def to_dict(self, with_samples: bool = True) -> dict:
        return {"results": [r.to_dict(with_samples) for r in self.results], "skipped": self.skipped,
                "env": self.env, "config": self.config, "flags": machine_flags(self)}




# ------------------------------------------------------------------------------------------------ verdicts
def _get(r, key, default=None):
    return r.get(key, default) if isinstance(r, dict) else getattr(r, key, default)


def setting_name(r) -> str:
    return f"{_get(r, 'ep')} opt {_get(r, 'opt_level')} batch {_get(r, 'batch')}"


def machine_flags(run) -> list[str]:
    """Reasons to distrust what ``run`` (a BenchRun or its dict) says: a load average above the core count (at
    start or end); and "sessions disagree" for a comparison whose conclusion the session-to-session spread
    changes (the rounds alone would name a difference that the sessions' interval does not). A spread that
    changes no conclusion is not flagged: the intervals already include it."""
    env = _get(run, "env")
    cfg = _get(run, "config")
    flags = []
    cores = env.get("cpu_count") or 1
    loads = [v[0] for v in (cfg.get("load_start"), cfg.get("load_end"), env.get("loadavg")) if v]
    if loads and max(loads) > cores:
        flags.append(f"machine loaded (load average {max(loads):.1f} on {cores} cores)")
    eff = cfg.get("min_effect", MIN_EFFECT)
    for r in _get(run, "results") or []:
        within, ratio = _get(r, "within_ci95"), _get(r, "ratio")
        if _get(r, "verdict") is None or within is None or ratio is None:
            continue
        verdict = judge(ratio, _get(r, "ratio_ci95"), eff, _get(r, "spread_halfwidth"))
        alone = judge(ratio, within, eff)
        if verdict in ("none", "underpowered") and alone in ("faster", "slower"):
            per = _get(r, "session_ratios") or [ratio]
            flags.append(f"sessions disagree: {Path(str(_get(r, 'model'))).name} {setting_name(r)} would read "
                         f"{100 * abs(1 - ratio):.1f}% {alone} from the rounds alone, but its session ratios "
                         f"({min(per):.3f}-{max(per):.3f}) leave it undecided")
    return flags


def comparisons(run, min_effect: float | None = None) -> list[dict]:
    """One entry per (model, setting) compared with the first model: its ratio, interval, verdict and text."""
    cfg = _get(run, "config")
    eff = cfg.get("min_effect", MIN_EFFECT) if min_effect is None else min_effect
    results = _get(run, "results")
    firsts: dict[str, str] = {}
    out = []
    for r in results:
        if setting_name(r) not in firsts:  # the first model of a setting is the baseline
            firsts[setting_name(r)] = _get(r, "model")
            continue
        if _get(r, "ratio") is None:
            continue
        ratio, ci, spread = _get(r, "ratio"), _get(r, "ratio_ci95"), _get(r, "spread_halfwidth")
        out.append({"model": _get(r, "model"), "baseline": firsts[setting_name(r)], "setting": setting_name(r),
                    "ratio": ratio, "ci95": ci, "verdict": judge(ratio, ci, eff, spread),
                    "text": describe(ratio, ci, eff, spread, _get(r, "sessions"))})
    return out


def headline(run, min_effect: float | None = None, *, names: bool = True) -> str:
    """The differences ``run`` supports, in words: each named difference in full, the rest summed up as
    'no measurable difference', then the machine flags."""
    comps = comparisons(run, min_effect)
    parts = []
    for c in comps:
        if c["verdict"] != "none" or len(comps) <= 2:
            who = f"{Path(c['model']).name} vs {Path(c['baseline']).name}, " if names else ""
            parts.append(f"{who}{c['setting']}: {c['text']}")
    rest = [c for c in comps if c["verdict"] == "none"]
    if rest and len(comps) > 2:
        lo, hi = min(c["ratio"] for c in rest), max(c["ratio"] for c in rest)
        parts.append(f"no measurable difference in {'the other ' if len(rest) < len(comps) else ''}{len(rest)} "
                     f"comparison(s) (ratios {lo:.3f}-{hi:.3f})")
    parts += machine_flags(run)
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ A/A
@dataclass
class AAResult:
    """A model benchmarked against copies of itself: every ratio's true value is 1. The comparisons are
    independent: disjoint pairs of copies (#2/#1, #4/#3, ...) in separate fresh sessions per setting and repeat,
    never every copy against one shared baseline (correlated comparisons break tests that assume independence)."""
    comparisons: list[dict]
    runs: list[dict]

    @property
    def excluded(self) -> int:
        return sum(c["excludes_1"] for c in self.comparisons)

    def summary(self, level: float = AA_LEVEL) -> dict:
        """Exclusion rate (should be about 5%) with a two-sided binomial test (too many exclusions: intervals too
        narrow; too few: too wide), the median ratio overall and by listing position (should be 1) with
        two-sided sign tests; ``passed`` when no test rejects: the binomial test at ``level``/2, the sign tests
        at ``level``/2 shared equally (Bonferroni: all tests together false-alarm at most ``level``)."""
        n = len(self.comparisons)
        ratios = [c["ratio"] for c in self.comparisons]
        by_pos: dict[int, list[float]] = {}
        for c in self.comparisons:
            by_pos.setdefault(c["position"], []).append(c["ratio"])
        k = self.excluded
        p = binomial_two_sided(k, n, 0.05)
        median = float(np.median(ratios))
        pos_medians = {str(pos): float(np.median(v)) for pos, v in sorted(by_pos.items())}
        sign_p = {str(pos): sign_test(v) for pos, v in sorted(by_pos.items())}
        worst = max([abs(median - 1)] + [abs(v - 1) for v in pos_medians.values()])
        overall_p = sign_test(ratios)
        signs = [overall_p] + (list(sign_p.values()) if len(sign_p) > 1 else [])
        exclusions_ok = p >= level / 2  # half the level for the exclusion count, half shared by the sign tests
        order_ok = min(signs) >= level / 2 / len(signs)
        return {"comparisons": n, "excluded": k, "exclusion_rate": k / n, "coverage": 1 - k / n,
                "p_value": p, "median_ratio": median, "median_ratio_by_position": pos_medians,
                "sign_test_p_by_position": sign_p, "sign_test_p": overall_p,
                "median_within_0.5%": bool(worst <= 0.005), "level": level, "tests": 1 + len(signs),
                "exclusions_ok": bool(exclusions_ok), "order_ok": bool(order_ok),
                "passed": bool(exclusions_ok and order_ok)}

    def verdict(self) -> str:
        """'PASSED | A/A: k of n 95% intervals exclude 1 ...'; FAILED when k is improbable for a true 5% rate in
        either direction (two-sided binomial test), or the copies in one listing position are faster (or slower)
        in improbably many comparisons (two-sided sign tests, overall and per position), all tests together at
        the 1% level."""
        s = self.summary()
        pos = ", ".join(f"#{k} {v:.4f}" for k, v in s["median_ratio_by_position"].items())
        loads = [max(v) for run in self.runs for v in (run["config"].get("load_start"), run["config"].get("load_end")) if v]
        cores = self.runs[0]["env"].get("cpu_count") if self.runs else None
        spread = max((r["session_spread"] for run in self.runs for r in run["results"]), default=0.0)
        why = []
        if not s["exclusions_ok"]:
            why.append("intervals too narrow" if s["exclusion_rate"] > 0.05 else "intervals too wide")
        if not s["order_ok"]:
            why.append("ratios depend on the listing position")
        return (f"{'PASSED' if s['passed'] else 'FAILED'} | A/A: {s['excluded']} of {s['comparisons']} independent "
                f"95% intervals exclude 1 ({100 * s['exclusion_rate']:.1f}%, expected about 5%; two-sided binomial "
                f"p {s['p_value']:.2g})" + (f" - {', '.join(why)}" if why else "")
                + f"; median ratio {s['median_ratio']:.4f} (by listing position: {pos}; within 0.5% of 1: "
                f"{'yes' if s['median_within_0.5%'] else 'no'}); {s['tests']} tests at {100 * s['level']:g}% in all; "
                f"load average up to {max(loads, default=0):.1f} on {cores} cores, session medians of one model up "
                f"to {100 * spread:.0f}% apart")


def plot(run: BenchRun, path: str | os.PathLike) -> Path:
    """A PNG: p50 latency with its 95% interval, per model, grouped by setting."""
    from bnfold.outputs import save_figure
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BnfoldError("--plot needs matplotlib: pip install matplotlib") from None
    settings = []
    for r in run.results:
        key = (r.ep, r.opt_level, r.batch)
        if key not in settings:
            settings.append(key)
    models = []
    for r in run.results:
        if r.model not in models:
            models.append(r.model)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(settings) * max(1, len(models)) / 2), 4.5))
    width = 0.8 / max(1, len(models))
    for mi, m in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for si, key in enumerate(settings):
            r = next((r for r in run.results if (r.ep, r.opt_level, r.batch) == key and r.model == m), None)
            if r is None:
                continue
            xs.append(si + (mi - (len(models) - 1) / 2) * width)
            ys.append(r.p50_ms)
            lo.append(r.p50_ms - r.ci95_ms[0])
            hi.append(r.ci95_ms[1] - r.p50_ms)
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=Path(m).name)
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels([f"{ep}\nopt {lvl}\nbatch {b}" for ep, lvl, b in settings], fontsize=8)
    ax.set_ylabel("median latency (ms), 95% CI")
    env = run.env
    ax.set_title(f"{env.get('gpu') or env.get('cpu', '')} | ORT {env.get('onnxruntime')} | "
                 f"threads {run.config.get('threads') or 'default'}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return save_figure(fig, path)  # checks the suffix, writes atomically, never through a link
    finally:
        plt.close(fig)
