"""Latency of folded vs original models, measured so that the intervals hold.

Three parts: :mod:`bnfold.bench.measure` (runners, balanced order, the session plan, the timing loop),
:mod:`bnfold.bench.stats` (closed-form two-stage statistics in bounded memory) and :mod:`bnfold.bench.report`
(results, verdicts in words, machine flags, the A/A tests, the plot); :mod:`bnfold.bench.core` runs a
benchmark and the A/A self-check. The names below are the package's interface.
"""

from bnfold.bench.core import BenchPlan, BenchProgress, aa_check, bench
from bnfold.bench.measure import (
    MIN_SESSIONS,
    Measured,
    OrtRunner,
    Probe,
    ProviderUnavailable,
    Setting,
    TorchRunner,
    _threads,
    environment,
    measure,
    model_mb,
    plan_duration,
    plan_sessions,
    probe,
    williams_orders,
)
from bnfold.bench.report import (
    AA_LEVEL,
    AAResult,
    BenchResult,
    BenchRun,
    comparisons,
    headline,
    machine_flags,
    plot,
    setting_name,
)
from bnfold.bench.stats import (
    MIN_EFFECT,
    binomial_tail,
    binomial_two_sided,
    describe,
    judge,
    order_stats,
    ratio_ci,
    sessions_needed,
    sign_test,
    summarize,
    t975,
)

__all__ = [
    "AA_LEVEL", "AAResult", "BenchPlan", "BenchProgress", "BenchResult", "BenchRun", "MIN_EFFECT", "MIN_SESSIONS",
    "Measured", "OrtRunner", "Probe", "ProviderUnavailable", "Setting", "TorchRunner", "_threads", "aa_check",
    "bench", "binomial_tail", "binomial_two_sided", "comparisons", "describe", "environment", "headline", "judge",
    "machine_flags", "measure", "model_mb", "order_stats", "plan_duration", "plan_sessions", "plot", "probe",
    "ratio_ci", "sessions_needed", "setting_name", "sign_test", "summarize", "t975", "williams_orders",
]
