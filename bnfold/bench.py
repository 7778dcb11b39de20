"""Latency of folded vs original models, measured so that the intervals hold.

The unit of measurement is a **session**: fresh runtime sessions of every model, created, warmed up, timed for
some rounds and released. Each model and setting is measured in several sessions (at least three), because what
changes from one session to the next (thread placement, thread pools, memory layout, cache state, the load of
a shared machine) is often larger than what changes from one run to the next inside a session; an interval
computed from the runs of one session does not see it (an A/A test then "finds" differences that are not
there).

Order is balanced at both levels: inside a session every round runs each model once, in an order taken from a
Williams design (a balanced Latin square: every model equally often in every position, and every model
directly after every other equally often), and the rows are cycled so a session holds whole cycles; sessions
create their models in the order of successive rows, so no model is always created first.

Statistics (:func:`summarize`, :func:`ratio_ci`) are a hierarchical bootstrap: resample sessions, then runs
(rounds) within each chosen session. A ratio is paired by round within session pairs: the median per-round log
ratio over the rounds of one order (pooled over sessions), averaged over the orders. With few sessions a bootstrap interval is too narrow (a sample of three
sessions under-states their spread), so the percentile interval is widened about the estimate by
``sqrt(S/(S-1)) * t(S-1) / z`` (S sessions). :func:`aa_check` measures a model against copies of itself and
reports how often the 95% interval excludes 1 (it should, about 5% of the time).

Settings are the cross product of execution providers (ONNX Runtime CPU/CUDA/TensorRT, or PyTorch eager or
compiled), graph optimization levels (ORT's off/basic/extended/all: ORT folds Conv+BN itself from *basic* on,
so a before/after comparison must say which level it ran), and batch sizes. The providers a session really
used are recorded (``get_available_providers()`` lists CUDA even where it cannot load). ONNX Runtime's intra-op
threads spin (busy-wait) after each run by default; interleaved sessions then burn the cores their neighbours
run on, so the benchmark turns spinning off (``session.intra_op.allow_spinning = 0``) unless asked. On the CPU
provider it runs one intra-op thread unless told otherwise (``threads=0``: the runtime's choice): a run that
spreads over every core waits for the slowest one, which on a shared machine is the one another process holds;
one thread per run gives the steadiest comparison (``benchmarks/results/latency_aa_cpu.md`` measures both).
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError

log = logging.getLogger(__name__)

BOOTSTRAP = 2000
#: a ratio is named a difference only when its interval excludes 1 and it is beyond 1 +- MIN_EFFECT
MIN_EFFECT = 0.02
#: session medians of one model differing by more than this flag the machine as noisy
SPREAD_LIMIT = 0.10
MIN_SESSIONS = 3
_Z975 = 1.959963984540054
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


# ------------------------------------------------------------------------------------------------ statistics
def t975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("t needs at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def widening(sessions: int) -> float:
    """Factor by which a bootstrap percentile interval over ``sessions`` top-level units is widened:
    ``sqrt(S/(S-1)) * t(S-1) / z`` (the bootstrap's variance is (S-1)/S of the plug-in one, and a sample of S
    needs t's tails, not the normal's). 1 for a single session (nothing to widen: see ``single_session``)."""
    if sessions < 2:
        return 1.0
    return math.sqrt(sessions / (sessions - 1)) * t975(sessions - 1) / _Z975


def _as_sessions(x) -> list[np.ndarray]:
    """A list of per-session sample arrays; a flat sequence of numbers is one session."""
    if len(x) == 0:
        raise ValueError("no samples")
    if np.ndim(x[0]) == 0:
        x = [x]
    out = [np.asarray(s, dtype=np.float64) for s in x]
    if any(s.size == 0 for s in out):
        raise ValueError("a session without samples")
    return out


def _resample(rng, sessions: list[np.ndarray], n_boot: int) -> np.ndarray:
    """Hierarchical bootstrap draws, shape (n_boot, S, n_max): S sessions drawn with replacement, then n_max
    values drawn with replacement inside each drawn session (every session weighs the same). With a single
    session only the values are resampled."""
    S = len(sessions)
    lens = np.array([s.size for s in sessions])
    n_max = int(lens.max())
    X = np.zeros((S, n_max))
    for k, s in enumerate(sessions):
        X[k, :s.size] = s
    ks = rng.integers(0, S, size=(n_boot, S)) if S > 1 else np.zeros((n_boot, 1), dtype=np.int64)
    idx = (rng.random((n_boot, S, n_max)) * lens[ks][:, :, None]).astype(np.int64)
    return X[ks[:, :, None], idx]


def _interval(point: float, draws: np.ndarray, sessions: int) -> list[float]:
    """Percentile 95% interval of ``draws`` (log scale) widened about ``point`` for few sessions."""
    lo, hi = np.percentile(draws, [2.5, 97.5])
    c = widening(sessions)
    lo, hi = point - c * (point - lo), point + c * (hi - point)
    return [float(min(lo, point)), float(max(hi, point))]


def summarize(samples_ms, *, seed: int = 0, n_boot: int = BOOTSTRAP) -> dict:
    """p50/p90/p99/mean of the pooled samples and a hierarchical-bootstrap 95% interval of the median.
    ``samples_ms`` is a list of per-session sample lists (a flat list is one session)."""
    sess = _as_sessions(samples_ms)
    x = np.concatenate(sess)
    if np.any(x <= 0):
        raise ValueError("latencies must be positive")
    p50 = float(np.median(x))
    rng = np.random.default_rng(seed)
    draws = np.log(np.median(_resample(rng, sess, n_boot).reshape(n_boot, -1), axis=1))
    lo, hi = _interval(math.log(p50), draws, len(sess))
    medians = [float(np.median(s)) for s in sess]
    return {
        "p50_ms": p50, "p90_ms": float(np.percentile(x, 90)), "p99_ms": float(np.percentile(x, 99)),
        "mean_ms": float(x.mean()), "std_ms": float(x.std(ddof=1)) if x.size > 1 else 0.0, "min_ms": float(x.min()),
        "ci95_ms": [math.exp(lo), math.exp(hi)], "n": int(x.size), "sessions": len(sess),
        "session_p50_ms": medians, "session_spread": max(medians) / min(medians) - 1,
    }


def ratio_ci(a_ms, b_ms, *, block: int = 1, seed: int = 0, n_boot: int = BOOTSTRAP) -> dict:
    """Ratio a/b with a 95% hierarchical-bootstrap interval. ``a_ms`` and ``b_ms`` are per-session sample
    lists timed side by side: session k of ``a`` and session k of ``b`` are a pair, and their samples are paired
    by round (round r of one with round r of the other). ``block`` is the length of the balanced order's cycle:
    round r of session k ran in the cycle's order (k + r) mod ``block`` (as :func:`measure` runs them), so the
    rounds of one order form a stratum in which the two models always held the same positions. The estimate
    is the mean over strata of the median per-round log ratio in the stratum, pooled over sessions: position
    effects cancel, and a median shrugs off preempted runs and a session that went wrong. The bootstrap
    resamples session pairs, then rounds within each stratum of a chosen pair (both members of a round
    together), and recomputes the estimate."""
    a, b = _as_sessions(a_ms), _as_sessions(b_ms)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} sessions against {len(b)}: a ratio needs paired sessions")
    d = []
    for k, (sa, sb) in enumerate(zip(a, b)):
        if sa.size != sb.size:
            raise ValueError("paired sessions need the same number of rounds")
        if np.any(sa <= 0) or np.any(sb <= 0):
            raise ValueError("latencies must be positive")
        m = sa.size // block
        if m == 0:
            raise ValueError(f"a session of {sa.size} rounds holds no whole cycle of {block}")
        x = (np.log(sa[:m * block]) - np.log(sb[:m * block])).reshape(m, block)  # (cycle, round in cycle)
        d.append(np.roll(x, k % block, axis=1))  # column = the order the round ran in
    per_session = np.array([np.median(x, axis=0).mean() for x in d])
    point = float(np.median(np.concatenate(d), axis=0).mean())
    rng = np.random.default_rng(seed)
    S, L = len(d), block
    m_max = max(x.shape[0] for x in d)
    X = np.zeros((S, m_max, L))
    lens = np.array([x.shape[0] for x in d])
    for k, x in enumerate(d):
        X[k, :x.shape[0]] = x
    ks = rng.integers(0, S, size=(n_boot, S)) if S > 1 else np.zeros((n_boot, 1), dtype=np.int64)
    idx = (rng.random((n_boot, S, m_max, L)) * lens[ks][:, :, None, None]).astype(np.int64)
    vals = X[ks[:, :, None, None], idx, np.arange(L)[None, None, None, :]]
    draws = np.median(vals.reshape(n_boot, S * m_max, L), axis=1).mean(axis=1)
    lo, hi = _interval(point, draws, S)
    return {"ratio": math.exp(point), "ci95": [math.exp(lo), math.exp(hi)],
            "session_ratios": [float(math.exp(v)) for v in per_session], "sessions": S, "block": block}


def judge(ratio: float, ci95, min_effect: float = MIN_EFFECT) -> str:
    """'faster' / 'slower' when the interval excludes 1 and the ratio is beyond 1 -+ ``min_effect``; else 'none'."""
    if ci95[1] < 1 and ratio < 1 - min_effect:
        return "faster"
    if ci95[0] > 1 and ratio > 1 + min_effect:
        return "slower"
    return "none"


def describe(ratio: float, ci95, min_effect: float = MIN_EFFECT) -> str:
    """'6.1% faster (ratio 0.939 [0.915, 0.962])', or 'no measurable difference (ratio r, interval [lo, hi])'."""
    verdict = judge(ratio, ci95, min_effect)
    if verdict == "none":
        return f"no measurable difference (ratio {ratio:.3f}, interval [{ci95[0]:.3f}, {ci95[1]:.3f}])"
    pct = 100 * (1 - ratio) if verdict == "faster" else 100 * (ratio - 1)
    return f"{pct:.1f}% {verdict} (ratio {ratio:.3f} [{ci95[0]:.3f}, {ci95[1]:.3f}])"


# ------------------------------------------------------------------------------------------------ order
def williams_orders(n: int) -> list[list[int]]:
    """Rows of a Williams design for ``n`` treatments: every treatment equally often in every position and
    directly after every other treatment equally often (n rows for even n, 2n for odd n)."""
    if n < 1:
        raise ValueError("no treatments")
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    if n % 2 and n > 1:
        rows += [row[::-1] for row in rows]
    return rows


def plan_sessions(n_models: int, iters: int, sessions: int | None = None) -> tuple[int, int]:
    """(sessions, rounds per session) for ``iters`` rounds in all: at least MIN_SESSIONS sessions, more for
    more rounds (about 20 rounds a session, up to 10 sessions), rounded to whole cycles of the balanced order."""
    cycle = len(williams_orders(n_models))
    if sessions is None:
        sessions = max(MIN_SESSIONS, min(10, iters // 20))
        if cycle <= 4:
            sessions = -(-sessions // cycle) * cycle  # every creation order equally often
    if sessions < MIN_SESSIONS:
        raise BnfoldError(f"--sessions {sessions}: at least {MIN_SESSIONS} sessions are needed for an interval "
                          "that includes session-to-session variation")
    rounds = max(cycle, -(-max(1, iters // sessions) // cycle) * cycle)
    return sessions, rounds


@dataclass
class Measured:
    """Samples of one setting: ``samples[i][k]`` are model i's per-round times (ms) in session k; round r of
    every model in session k belongs to one round."""
    samples: list[list[list[float]]]
    session_ms: list[list[float]]
    providers: list[list[str]]
    labels: list[str]
    rounds: int


def measure(factories: list, *, sessions: int, rounds: int, warmup: int = 10, duration_s: float | None = None,
            min_session_s: float = 0.0, on_session=None) -> Measured:
    """Time the runners made by ``factories`` (callables returning a runner: a callable returning elapsed ms,
    with ``label``, ``session_ms`` and ``providers``) in ``sessions`` fresh sessions. Every session creates a
    runner per model (in the order of a Williams row), warms each up ``warmup`` times, times ``rounds`` rounds
    (each round runs every model once, in the next row's order), then releases them. With ``duration_s`` a
    session runs for ``duration_s / sessions`` seconds instead, in whole cycles of rows (at least one). A session
    shorter than ``min_session_s`` seconds goes on, in whole cycles, until it is that long: the scheduler of a
    busy machine hands out time in slices of milliseconds, and a session of a few milliseconds is one draw of
    it."""
    n = len(factories)
    rows = williams_orders(n)
    cycle = len(rows)
    samples = [[[] for _ in range(sessions)] for _ in range(n)]
    session_ms = [[0.0] * sessions for _ in range(n)]
    providers: list[list[str]] = [[] for _ in range(n)]
    labels = [""] * n
    n_rounds = None
    for k in range(sessions):
        runners: list = [None] * n
        for i in rows[k % cycle]:
            runners[i] = factories[i]()
            session_ms[i][k] = float(runners[i].session_ms)
            providers[i] = list(runners[i].providers)
            labels[i] = runners[i].label
        for w in range(warmup):
            for i in rows[(k + w) % cycle]:
                runners[i]()
        start = time.perf_counter()
        r = 0
        target_s = max(min_session_s, duration_s / sessions if duration_s is not None else 0.0)
        while True:
            if r % cycle == 0 and (duration_s is not None or r >= rounds) and r >= cycle:
                if time.perf_counter() - start >= target_s:
                    break
            for i in rows[(k + r) % cycle]:
                samples[i][k].append(runners[i]())
            r += 1
        n_rounds = r if n_rounds is None else min(n_rounds, r)
        del runners
        gc.collect()
        if on_session:
            on_session(k, sessions)
    return Measured(samples, session_ms, providers, labels, n_rounds or 0)


# ------------------------------------------------------------------------------------------------ environment
def environment() -> dict:
    import onnxruntime as ort

    env = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_name(),
           "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__,
           "ort_available_providers": ort.get_available_providers()}
    try:  # torch is only looked at when the run already imported it (ONNX runs never import torch)
        import sys
        from importlib import metadata

        env["torch"] = metadata.version("torch")
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    except Exception:  # torch without a working CUDA is fine
        pass
    try:
        load = os.getloadavg()
        env["loadavg"] = [round(v, 2) for v in load]
    except OSError:
        pass
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------ runners
@dataclass
class Setting:
    ep: str
    opt_level: str
    batch: int
    threads: int | None = None
    io_binding: bool = False
    cuda_graph: bool = False
    #: provider options for the setting's own provider (e.g. CUDA's prefer_nhwc, cudnn_conv_algo_search, use_tf32)
    ep_options: dict = field(default_factory=dict)
    #: let ORT's intra-op threads spin (busy-wait) between runs; off by default for fair interleaving
    spin: bool = False


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
    #: per-session ratio estimates to the first model, and the verdict on the ratio ('faster'/'slower'/'none')
    session_ratios: list[float] | None = None
    verdict: str | None = None
    #: raw per-round latencies, one list per session (round r of every model in a session is one round)
    samples_ms: list[list[float]] = field(default_factory=list, repr=False)

    def to_dict(self, with_samples: bool = True) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples_ms")
        return d


def _model_mb(path) -> float | None:
    p = Path(path)
    if not p.is_file():
        return None
    size = p.stat().st_size
    data = p.with_name(p.name + ".data")
    if data.exists():
        size += data.stat().st_size
    return size / 1e6


class OrtRunner:
    """One ORT session on a setting, with inputs (bound on the device with IO binding)."""

    def __init__(self, path: str, setting: Setting, input_shapes=None, seed: int = 0):
        import onnxruntime as ort

        from bnfold.runtime import PRIMARY, ProviderFallback, make_session, ort_dtype, resolve_input_shapes

        self.label = str(path)
        own = {k: str(v) for k, v in setting.ep_options.items()}
        if setting.cuda_graph:
            if setting.ep != "cuda":
                raise BnfoldError("--cuda-graph needs the CUDA provider")
            own["enable_cuda_graph"] = "1"
        opts = {PRIMARY[setting.ep]: own} if own else {}
        t0 = time.perf_counter()
        try:
            self.sess = make_session(path, ep=setting.ep, opt_level=setting.opt_level, threads=setting.threads,
                                     provider_options=opts,
                                     config={"session.intra_op.allow_spinning": "1" if setting.spin else "0"})
        except ProviderFallback as exc:
            raise ProviderUnavailable(str(exc)) from None
        self.session_ms = (time.perf_counter() - t0) * 1e3
        self.providers = self.sess.get_providers()
        rng = np.random.default_rng(seed)
        inputs = self.sess.get_inputs()
        shapes = resolve_input_shapes(inputs, input_shapes or [], setting.batch)
        self.feeds = {i.name: rng.standard_normal(s).astype(ort_dtype(i.type)) for i, s in zip(inputs, shapes)}
        self.device = setting.ep != "cpu"
        self.binding = None
        if setting.io_binding or setting.cuda_graph:
            b = self.sess.io_binding()
            dev = "cuda" if self.device else "cpu"
            self._keep = []
            for name, arr in self.feeds.items():
                v = ort.OrtValue.ortvalue_from_numpy(arr, dev, 0)
                self._keep.append(v)
                b.bind_ortvalue_input(name, v)
            for o in self.sess.get_outputs():
                b.bind_output(o.name, dev)
            self.binding = b

    def __call__(self) -> float:
        if self.binding is not None:
            t0 = time.perf_counter_ns()
            self.sess.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
            return (time.perf_counter_ns() - t0) / 1e6
        t0 = time.perf_counter_ns()
        self.sess.run(None, self.feeds)
        return (time.perf_counter_ns() - t0) / 1e6


class TorchRunner:
    """A PyTorch module timed eagerly (or compiled), with CUDA events on a GPU."""

    def __init__(self, module, label: str, setting: Setting, input_shape: tuple, compile_mode: str | None = None):
        import torch

        self.torch = torch
        self.label = label
        if setting.ep not in ("cpu", "cuda"):
            raise BnfoldError(f"--runtime torch runs on cpu or cuda, not {setting.ep}")
        device = "cuda" if setting.ep == "cuda" else "cpu"
        if setting.ep == "cuda" and not torch.cuda.is_available():
            raise ProviderUnavailable("torch.cuda.is_available() is False")
        if setting.threads:
            torch.set_num_threads(setting.threads)
        self.device = device
        t0 = time.perf_counter()
        current = next((p.device.type for p in module.parameters()), "cpu")
        self.module = (module if current == device else copy.deepcopy(module).to(device)).eval()
        if compile_mode:
            self.module = torch.compile(self.module, mode=None if compile_mode == "default" else compile_mode)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn((setting.batch,) + tuple(input_shape[1:]), generator=g).to(device)
        with torch.no_grad():
            self.module(self.x)  # compile / lazy init happens here: part of "session" time
        if device == "cuda":
            torch.cuda.synchronize()
        self.session_ms = (time.perf_counter() - t0) * 1e3
        self.providers = [f"torch-{device}" + ("-compiled" if compile_mode else "-eager")]

    def __call__(self) -> float:
        torch = self.torch
        with torch.no_grad():
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.module(self.x)
                end.record()
                end.synchronize()
                return float(start.elapsed_time(end))
            t0 = time.perf_counter_ns()
            self.module(self.x)
            return (time.perf_counter_ns() - t0) / 1e6


class ProviderUnavailable(Exception):
    """The requested provider cannot run here; the setting is skipped (reported, not fatal)."""


@dataclass
class BenchRun:
    results: list[BenchResult]
    skipped: list[dict]
    env: dict
    config: dict

    def to_dict(self, with_samples: bool = True) -> dict:
        return {"results": [r.to_dict(with_samples) for r in self.results], "skipped": self.skipped,
                "env": self.env, "config": self.config, "flags": machine_flags(self)}


def bench(models: list, *, eps=("cpu",), opt_levels=("all",), batches=(1,), warmup: int = 10, iters: int = 100,
          sessions: int | None = None, duration_s: float | None = None, threads: int | None = None,
          spin: bool = False, io_binding: bool | None = None, cuda_graph: bool = False, input_shapes=None,
          runtime: str = "ort", compile_mode: str | None = None, ep_options: dict | None = None,
          labels: list[str] | None = None, min_effect: float = MIN_EFFECT, min_session_s: float = 0.5,
          progress=None) -> BenchRun:
    """Time ``models`` (ONNX paths for ``runtime="ort"``; ``(label, nn.Module, input_shape)`` for ``"torch"``)
    side by side for every (ep, opt level, batch) setting, in ``sessions`` fresh sessions (default: from
    :func:`plan_sessions`) of balanced order, about ``iters`` rounds in all. ``io_binding`` defaults to on for
    GPU providers. ``ep_options`` are provider options for the GPU providers (CUDA: ``prefer_nhwc``,
    ``cudnn_conv_algo_search``, ``use_tf32``...); the CPU provider gets none. ``spin`` lets ORT's intra-op
    threads busy-wait between runs. ``threads``: intra-op threads; ``None`` is 1 on the CPU provider (ORT) and the
    runtime's choice elsewhere, 0 the runtime's choice everywhere. A session lasts at least ``min_session_s`` seconds (more rounds when the
    models are fast). Every model gets its ratio to the first, judged with ``min_effect``."""
    if runtime == "torch" and (cuda_graph or io_binding or tuple(opt_levels) != ("all",)):
        raise BnfoldError("--cuda-graph, --io-binding and --opt-level are ONNX Runtime settings: they do not apply "
                          "to --runtime torch (use --compile for torch.compile)")
    if not models:
        raise BnfoldError("no model to benchmark")
    if labels is not None and len(labels) != len(models):
        raise ValueError("one label per model")
    if labels is None and runtime == "ort" and len({str(m) for m in models}) < len(models):
        labels = [f"{m}#{i + 1}" for i, m in enumerate(models)]  # the same file twice: tell the copies apart
    n_sessions, rounds = plan_sessions(len(models), iters, sessions)
    load_start = _loadavg()
    results, skipped = [], []
    settings = []
    for ep in eps:
        for level in (opt_levels if runtime == "ort" else ["eager" if not compile_mode else "compiled"]):
            for b in batches:
                iob = (ep != "cpu") if io_binding is None else io_binding
                settings.append(Setting(ep, level, b, _threads(threads, ep, runtime), iob, cuda_graph,
                                        dict(ep_options or {}) if ep != "cpu" else {}, spin))
    for k, s in enumerate(settings):
        if progress:
            progress(k, len(settings), s)
        if runtime == "ort":
            factories = [(lambda m=m, s=s: OrtRunner(str(m), s, input_shapes)) for m in models]
        else:
            factories = [(lambda label=label, mod=mod, shape=shape, s=s:
                          TorchRunner(copy.deepcopy(mod), label, s, shape, compile_mode))
                         for label, mod, shape in models]
        try:
            got = measure(factories, sessions=n_sessions, rounds=rounds, warmup=warmup, duration_s=duration_s,
                          min_session_s=min_session_s)
        except ProviderUnavailable as exc:
            skipped.append({"ep": s.ep, "opt_level": s.opt_level, "batch": s.batch, "reason": str(exc)})
            log.info("skipping %s: %s", s.ep, exc)
            continue
        except BnfoldError as exc:
            if "is not in this onnxruntime build" in str(exc):
                skipped.append({"ep": s.ep, "opt_level": s.opt_level, "batch": s.batch, "reason": str(exc)})
                continue
            raise
        for i, t in enumerate(got.samples):
            st = summarize(t)
            res = BenchResult(model=labels[i] if labels else got.labels[i], ep=s.ep, opt_level=s.opt_level,
                              batch=s.batch, p50_ms=st["p50_ms"], p90_ms=st["p90_ms"], p99_ms=st["p99_ms"],
                              mean_ms=st["mean_ms"], ci95_ms=st["ci95_ms"], throughput=s.batch * 1e3 / st["mean_ms"],
                              session_ms=float(np.median(got.session_ms[i])),
                              model_mb=_model_mb(got.labels[i]) if runtime == "ort" else None,
                              providers=got.providers[i], iters=st["n"], threads=s.threads,
                              io_binding=s.io_binding and runtime == "ort", cuda_graph=s.cuda_graph,
                              std_ms=st["std_ms"], min_ms=st["min_ms"], ep_options=s.ep_options,
                              sessions=st["sessions"], rounds_per_session=[len(x) for x in t],
                              session_p50_ms=st["session_p50_ms"], session_spread=st["session_spread"],
                              samples_ms=[list(x) for x in t])
            if i == 0:
                res.ratio, res.ratio_ci95 = 1.0, [1.0, 1.0]
            else:
                rc = ratio_ci(t, got.samples[0], block=len(williams_orders(len(models))))
                res.ratio, res.ratio_ci95, res.session_ratios = rc["ratio"], rc["ci95"], rc["session_ratios"]
                res.verdict = judge(res.ratio, res.ratio_ci95, min_effect)
            results.append(res)
    if not results and skipped:
        raise BnfoldError("no requested provider can run here: " + "; ".join(f"{s['ep']}: {s['reason']}" for s in skipped))
    config = {"runtime": runtime, "eps": list(eps), "opt_levels": list(opt_levels), "batches": list(batches),
              "warmup": warmup, "iters": iters, "sessions": n_sessions, "rounds_per_session": rounds,
              "min_session_s": min_session_s,
              "duration_s": duration_s, "threads": _threads(threads, "cpu", runtime) if "cpu" in eps else threads,
              "spin": spin,
              "io_binding": io_binding, "cuda_graph": cuda_graph, "compile": compile_mode,
              "ep_options": dict(ep_options or {}), "min_effect": min_effect,
              "load_start": load_start, "load_end": _loadavg(),
              "order": "per session: fresh sessions of every model, created in the order of a Williams-design row; "
                       "rounds run every model once, rows cycled (each model equally often in each position and "
                       "after each other model)",
              "interval": "hierarchical bootstrap (sessions, then rounds within them), percentile 95% interval "
                          "widened by sqrt(S/(S-1))*t(S-1)/z; ratios paired by round within session pairs, "
                          "rounds grouped in blocks of one balanced-order cycle",
              "timing": "wall clock (perf_counter) on CPU, IO binding + synchronize on GPU, CUDA events for torch "
                        "on GPU"}
    return BenchRun(results, skipped, environment(), config)


def _threads(threads: int | None, ep: str, runtime: str) -> int | None:
    """Intra-op threads for a setting: 1 on ORT's CPU provider unless given; 0 means the runtime's choice."""
    if threads is None:
        return 1 if (ep == "cpu" and runtime == "ort") else None
    return threads or None


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ verdicts
def _get(r, key):
    return r[key] if isinstance(r, dict) else getattr(r, key)


def machine_flags(run) -> list[str]:
    """Reasons to distrust small differences in ``run`` (a BenchRun or its dict): a load average above the
    core count (at start or end), or a model whose session medians differ by more than SPREAD_LIMIT."""
    env = _get(run, "env")
    cfg = _get(run, "config")
    flags = []
    cores = env.get("cpu_count") or 1
    loads = [v[0] for v in (cfg.get("load_start"), cfg.get("load_end"), env.get("loadavg")) if v]
    if loads and max(loads) > cores:
        flags.append(f"machine loaded (load average {max(loads):.1f} on {cores} cores)")
    results = _get(run, "results")
    if results:
        worst = max(results, key=lambda r: _get(r, "session_spread"))
        spread = _get(worst, "session_spread")
        if spread > SPREAD_LIMIT:
            flags.append(f"sessions disagree (medians of one model differ by {100 * spread:.0f}%)")
    return flags


def setting_name(r) -> str:
    return f"{_get(r, 'ep')} opt {_get(r, 'opt_level')} batch {_get(r, 'batch')}"


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
        ratio, ci = _get(r, "ratio"), _get(r, "ratio_ci95")
        out.append({"model": _get(r, "model"), "baseline": firsts[setting_name(r)], "setting": setting_name(r),
                    "ratio": ratio, "ci95": ci, "verdict": judge(ratio, ci, eff), "text": describe(ratio, ci, eff)})
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
    """A model benchmarked against copies of itself: every ratio's true value is 1."""
    comparisons: list[dict]
    runs: list[dict]

    @property
    def excluded(self) -> int:
        return sum(c["excludes_1"] for c in self.comparisons)

    def summary(self) -> dict:
        """Exclusion rate (should be about 5%) with a binomial test, median ratios overall and by listing
        position (should be 1) with sign tests; ``passed`` when no test rejects at 1%."""
        n = len(self.comparisons)
        ratios = [c["ratio"] for c in self.comparisons]
        by_pos: dict[int, list[float]] = {}
        for c in self.comparisons:
            by_pos.setdefault(c["position"], []).append(c["ratio"])
        k = self.excluded
        p = binomial_tail(k, n, 0.05)
        median = float(np.median(ratios))
        pos_medians = {str(pos): float(np.median(v)) for pos, v in sorted(by_pos.items())}
        sign_p = {str(pos): sign_test(v) for pos, v in sorted(by_pos.items())}
        worst = max([abs(median - 1)] + [abs(v - 1) for v in pos_medians.values()])
        overall_p = sign_test(ratios)
        order_bias = min(sign_p.values()) * len(sign_p) < 0.01 or overall_p < 0.01
        return {"comparisons": n, "excluded": k, "exclusion_rate": k / n, "coverage": 1 - k / n,
                "p_value": p, "median_ratio": median, "median_ratio_by_position": pos_medians,
                "sign_test_p_by_position": sign_p, "sign_test_p": overall_p,
                "median_within_0.5%": bool(worst <= 0.005),
                "passed": bool(p >= 0.01 and not order_bias)}

    def verdict(self) -> str:
        """'PASSED | A/A: k of n 95% intervals exclude 1 ...'; FAILED when k is improbable for a true 5% rate
        (binomial p < 0.01) or the copies in one listing position are faster (or slower) in improbably many
        comparisons (sign test over all comparisons, or per position with Bonferroni, p < 0.01)."""
        s = self.summary()
        pos = ", ".join(f"#{k} {v:.4f}" for k, v in s["median_ratio_by_position"].items())
        loads = [max(v) for run in self.runs for v in (run["config"].get("load_start"), run["config"].get("load_end")) if v]
        cores = self.runs[0]["env"].get("cpu_count") if self.runs else None
        spread = max((r["session_spread"] for run in self.runs for r in run["results"]), default=0.0)
        return (f"{'PASSED' if s['passed'] else 'FAILED'} | A/A: {s['excluded']} of {s['comparisons']} 95% intervals "
                f"exclude 1 ({100 * s['exclusion_rate']:.1f}%, expected about 5%; binomial p {s['p_value']:.2g}); "
                f"median ratio {s['median_ratio']:.4f} (by listing position: {pos}; within 0.5% of 1: "
                f"{'yes' if s['median_within_0.5%'] else 'no'}); load average up to {max(loads, default=0):.1f} on "
                f"{cores} cores, session medians of one model up to {100 * spread:.0f}% apart")


def sign_test(ratios) -> float:
    """Two-sided sign test of ratios against 1 (ties dropped)."""
    up = sum(r > 1 for r in ratios)
    down = sum(r < 1 for r in ratios)
    n = up + down
    if n == 0:
        return 1.0
    return min(1.0, 2 * binomial_tail(max(up, down), n, 0.5))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return float(sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1)))


def aa_check(model, *, copies: int = 4, repeats: int = 3, progress=None, **bench_kwargs) -> AAResult:
    """Benchmark ``model`` against ``copies - 1`` copies of itself, ``repeats`` times (each a separate
    :func:`bench` call, fresh sessions); every ratio's true value is 1, so about 5% of the 95% intervals should
    exclude 1 and the median ratio should be 1 whatever the listing position."""
    if copies < 2:
        raise BnfoldError("--aa needs at least 2 copies")
    comps, runs = [], []
    name = Path(str(model[0] if isinstance(model, tuple) else model)).name
    for rep in range(repeats):
        if progress:
            progress(rep, repeats)
        run = bench([model] * copies, labels=[f"{name}#{i + 1}" for i in range(copies)], **bench_kwargs)
        runs.append(run.to_dict())
        for pos, r in enumerate(run.results):
            pos = pos % copies
            if pos == 0:
                continue
            comps.append({"repeat": rep, "setting": setting_name(r), "position": pos + 1, "ratio": r.ratio,
                          "ci95": r.ratio_ci95, "excludes_1": bool(r.ratio_ci95[0] > 1 or r.ratio_ci95[1] < 1)})
    return AAResult(comps, runs)


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
