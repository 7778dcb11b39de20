"""Measurement: runners, the balanced order, the session plan, and the timing loop.

The unit of measurement is a **session**: fresh runtime sessions of every model, created, warmed up, timed for
some rounds and released. Each model and setting is measured in several sessions (at least three), because what
changes from one session to the next (thread placement, thread pools, memory layout, cache state, the load of
a shared machine) is often larger than what changes from one run to the next inside a session; an interval
computed from the runs of one session does not see it (an A/A test then "finds" differences that are not
there). More rounds asked for (``--iters``) or more time (``--duration``) buy more sessions, not only longer
ones: only more sessions narrow an interval that the session-to-session spread keeps wide
(:func:`plan_sessions`, :func:`plan_duration`).

Order is balanced at both levels: inside a session every round runs each model once, in an order taken from a
Williams design (a balanced Latin square: every model equally often in every position, and every model
directly after every other equally often), and the rows are cycled so a session holds whole cycles; sessions
create their models in the order of successive rows, so no model is always created first.

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

import contextlib
import copy
import gc
import math
import os
import platform
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError

MIN_SESSIONS = 3

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
    """(sessions, rounds per session) for ``iters`` timed rounds in all (each model once per round): about
    sqrt(iters) sessions (at least MIN_SESSIONS, a multiple of the balanced order's cycle when that is at most
    4, so every creation order comes equally often) of about iters/sessions rounds, in whole cycles. Sessions
    grow with ``iters`` without a cap: the session-to-session spread shrinks only with more sessions."""
    cycle = len(williams_orders(n_models))
    if iters < 1:
        raise BnfoldError(f"--iters {iters}: at least 1 round is needed")
    if sessions is None:
        sessions = max(MIN_SESSIONS, round(math.sqrt(iters)))
        if cycle <= 4:
            sessions = -(-sessions // cycle) * cycle
    if sessions < MIN_SESSIONS:
        raise BnfoldError(f"--sessions {sessions}: at least {MIN_SESSIONS} sessions are needed for an interval "
                          "that includes session-to-session variation")
    per_session = -(-iters // sessions)  # ceil
    rounds = max(cycle, -(-per_session // cycle) * cycle)  # whole cycles
    return sessions, rounds


@dataclass
class Probe:
    """What one trial session of a setting cost (seconds): creating every model's session, one round (every
    model once), and releasing the session (``gc.collect``)."""
    create_s: float
    round_s: float
    release_s: float

    def session_s(self, rounds: int, warmup: int, min_session_s: float = 0.0) -> float:
        """Estimated seconds of one session of ``rounds`` rounds after ``warmup`` untimed ones."""
        return self.create_s + warmup * self.round_s + max(rounds * self.round_s, min_session_s) + self.release_s


def plan_duration(n_models: int, duration_s: float, probe: Probe, *, warmup: int, sessions: int | None = None,
                  min_session_s: float = 0.0) -> tuple[int, int]:
    """(sessions, rounds per session) that fill about ``duration_s`` seconds (set-up included) as the probe
    timed it: as many sessions as keep set-up within half the time and no more than sqrt(rounds affordable),
    at least MIN_SESSIONS of at least one cycle (which may take longer than asked: the plan says so)."""
    cycle = len(williams_orders(n_models))
    setup = probe.create_s + warmup * probe.round_s + probe.release_s
    rnd = max(probe.round_s, 1e-9)
    if sessions is None:
        by_setup = int(duration_s / 2 / max(setup, 1e-9))
        by_rounds = math.ceil(math.sqrt(duration_s / rnd))
        sessions = max(MIN_SESSIONS, min(by_setup, by_rounds))
        if cycle <= 4 and sessions > MIN_SESSIONS:
            sessions = max(MIN_SESSIONS, sessions // cycle * cycle)
    if sessions < MIN_SESSIONS:
        raise BnfoldError(f"--sessions {sessions}: at least {MIN_SESSIONS} sessions are needed for an interval "
                          "that includes session-to-session variation")
    per = max(0.0, duration_s / sessions - setup)
    if min_session_s > per:
        per = min_session_s
    rounds = max(cycle, int(per / rnd) // cycle * cycle)
    return sessions, rounds


@dataclass
class Measured:
    """Samples of one setting: ``samples[i][k]`` are model i's per-round times (ms) in session k; round r of
    every model in session k belongs to one round."""
    samples: list[list[array]]
    session_ms: list[list[float]]
    providers: list[list[str]]
    labels: list[str]
    rounds: int


def measure(factories: list, *, sessions: int, rounds: int, warmup: int = 10, min_session_s: float = 0.0,
            on_session=None) -> Measured:
    """Time the runners made by ``factories`` (callables returning a runner: a callable returning elapsed ms,
    with ``label``, ``session_ms`` and ``providers``) in ``sessions`` fresh sessions. Every session creates a
    runner per model (in the order of a Williams row), warms each up ``warmup`` times, times ``rounds`` rounds
    (each round runs every model once, in the next row's order; whole cycles of rows, at least one), then
    releases them. A session shorter than ``min_session_s`` seconds goes on, in whole cycles, until it is that
    long. ``on_session(k, sessions)`` is called after each session. Samples are kept as ``array('d')``
    (8 bytes a round)."""
    n = len(factories)
    rows = williams_orders(n)
    cycle = len(rows)
    samples = [[array("d") for _ in range(sessions)] for _ in range(n)]
    session_ms = [[0.0] * sessions for _ in range(n)]
    providers: list[list[str]] = [[] for _ in range(n)]
    labels = [""] * n
    n_rounds = None
    with _frozen_heap():
        for k in range(sessions):
            _session(k, rows, cycle, factories, samples, session_ms, providers, labels, warmup, rounds, min_session_s)
            n_rounds = len(samples[0][k]) if n_rounds is None else min(n_rounds, len(samples[0][k]))
            if on_session:
                on_session(k, sessions)
    return Measured(samples, session_ms, providers, labels, n_rounds or 0)


@contextlib.contextmanager
def _frozen_heap():
    """Objects alive before the benchmark are left out of its garbage collections (``gc.freeze``): after a
    torch export a full collection walks ~400,000 objects (about a second on a loaded machine), once per
    session; a session's own garbage is still collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _session(k, rows, cycle, factories, samples, session_ms, providers, labels, warmup, rounds, min_session_s):
    """Session k of :func:`measure`: create, warm up, time, release."""
    n = len(factories)
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
    while True:
        if r % cycle == 0 and r >= rounds and r >= cycle:
            if min_session_s <= 0 or time.perf_counter() - start >= min_session_s:
                break
        for i in rows[(k + r) % cycle]:
            samples[i][k].append(runners[i]())
        r += 1
    del runners
    gc.collect()


def probe(factories: list, *, warmup: int = 10) -> Probe:
    """One trial session of ``factories`` (not kept): the time to create every model's session, the mean time
    of a round after ``warmup`` untimed ones (at least 3 timed rounds and 20 ms), and the release."""
    with _frozen_heap():
        return _probe(factories, warmup)


def _probe(factories: list, warmup: int) -> Probe:
    t0 = time.perf_counter()
    runners = [f() for f in factories]
    create = time.perf_counter() - t0
    for _ in range(warmup):
        for r in runners:
            r()
    times = []
    t_start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - t_start < 0.02 and len(times) < 1000):
        t = time.perf_counter()
        for r in runners:
            r()
        times.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    del runners
    gc.collect()
    return Probe(create, float(np.mean(times)), time.perf_counter() - t0)  # a mean: what sums to the session's time


# ------------------------------------------------------------------------------------------------ environment
def environment() -> dict:
    import onnxruntime as ort

    env = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_name(),
           "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__,
           "ort_available_providers": ort.get_available_providers()}
    torch = sys.modules.get("torch")  # reported when the benchmark loaded it; never imported for ONNX files
    try:
        if torch is None:
            raise ImportError
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
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


def model_mb(path) -> float | None:
    """Size of an ONNX file with every external-data file it references (bnfold's ``<model>.<hex>.data`` or
    any other name), in MB; None when ``path`` is not a file."""
    p = Path(path)
    if not p.is_file():
        return None
    size = p.stat().st_size
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data

        from bnfold.onnx_io import iter_model_tensors
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # not ours to judge here: the runner reports a file it cannot load
        return size / 1e6
    seen = set()
    for t in iter_model_tensors(model):
        if uses_external_data(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            f = p.parent / loc
            if loc and loc not in seen and f.is_file():
                seen.add(loc)
                size += f.stat().st_size
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
