"""Latency of folded vs original models, measured honestly.

Several models are timed *interleaved* on identical settings: in every round each model runs once, the
starting model rotating, so drift of the machine (clock boost, other processes) lands on all of them alike.
Per model and setting we report p50/p90/p99/mean latency, a bootstrap 95% confidence interval of the median,
throughput, session-creation time and model size; and for every model its ratio to the first one, with a
bootstrap interval that resamples whole rounds (keeping the pairing of the interleaved runs).

Settings are the cross product of execution providers (ONNX Runtime CPU/CUDA/TensorRT, or PyTorch eager or
compiled), graph optimization levels (ORT's off/basic/extended/all: ORT folds Conv+BN itself from *basic* on,
so a before/after comparison must say which level it ran), and batch sizes. The providers a session really
used are recorded (``get_available_providers()`` lists CUDA even where it cannot load).
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError

log = logging.getLogger(__name__)

BOOTSTRAP = 2000


# ------------------------------------------------------------------------------------------------ statistics
def summarize(samples_ms, *, seed: int = 0, n_boot: int = BOOTSTRAP) -> dict:
    """p50/p90/p99/mean of ``samples_ms`` and a percentile-bootstrap 95% interval of the median."""
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no samples")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    meds = np.median(x[idx], axis=1)
    return {
        "p50_ms": float(np.percentile(x, 50)), "p90_ms": float(np.percentile(x, 90)),
        "p99_ms": float(np.percentile(x, 99)), "mean_ms": float(x.mean()), "std_ms": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min_ms": float(x.min()), "ci95_ms": [float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))],
        "n": int(x.size),
    }


def ratio_ci(a_ms, b_ms, *, seed: int = 0, n_boot: int = BOOTSTRAP) -> dict:
    """median(a) / median(b) with a 95% bootstrap interval; ``a`` and ``b`` are paired by round (interleaved
    timing), so rounds are resampled together."""
    a = np.asarray(a_ms, np.float64)
    b = np.asarray(b_ms, np.float64)
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    return {"ratio": float(np.median(a) / np.median(b)),
            "ci95": [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]}


def interleave(runners: list, rounds: int, *, duration_s: float | None = None, min_rounds: int = 10) -> list[list[float]]:
    """Run ``runners`` (callables returning elapsed milliseconds) round-robin; the first runner of each round
    rotates. Stops after ``rounds`` rounds, or once ``duration_s`` has passed (at least ``min_rounds``)."""
    times: list[list[float]] = [[] for _ in runners]
    n = len(runners)
    start = time.perf_counter()
    r = 0
    while True:
        if duration_s is None and r >= rounds:
            break
        if duration_s is not None and r >= min_rounds and time.perf_counter() - start >= duration_s:
            break
        for k in range(n):
            i = (r + k) % n
            times[i].append(runners[i]())
        r += 1
    return times


# ------------------------------------------------------------------------------------------------ environment
def environment() -> dict:
    import onnxruntime as ort

    env = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_name(),
           "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__,
           "ort_available_providers": ort.get_available_providers()}
    try:
        import torch
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
    samples_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, with_samples: bool = False) -> dict:
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
                                     provider_options=opts)
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

    def to_dict(self, with_samples: bool = False) -> dict:
        return {"results": [r.to_dict(with_samples) for r in self.results], "skipped": self.skipped,
                "env": self.env, "config": self.config}


def bench(models: list, *, eps=("cpu",), opt_levels=("all",), batches=(1,), warmup: int = 10, iters: int = 100,
          duration_s: float | None = None, threads: int | None = None, io_binding: bool | None = None,
          cuda_graph: bool = False, input_shapes=None, runtime: str = "ort", compile_mode: str | None = None,
          ep_options: dict | None = None, progress=None) -> BenchRun:
    """Time ``models`` (ONNX paths for ``runtime="ort"``; ``(label, nn.Module, input_shape)`` for ``"torch"``)
    interleaved, for every (ep, opt level, batch) setting. ``io_binding`` defaults to on for GPU providers.
    ``ep_options`` are provider options for the GPU providers (CUDA: ``prefer_nhwc``, ``cudnn_conv_algo_search``,
    ``use_tf32``...); the CPU provider gets none."""
    if runtime == "torch" and (cuda_graph or io_binding or tuple(opt_levels) != ("all",)):
        raise BnfoldError("--cuda-graph, --io-binding and --opt-level are ONNX Runtime settings: they do not apply "
                          "to --runtime torch (use --compile for torch.compile)")
    results, skipped = [], []
    settings = []
    for ep in eps:
        for level in (opt_levels if runtime == "ort" else ["eager" if not compile_mode else "compiled"]):
            for b in batches:
                iob = (ep != "cpu") if io_binding is None else io_binding
                settings.append(Setting(ep, level, b, threads, iob, cuda_graph,
                                        dict(ep_options or {}) if ep != "cpu" else {}))
    for k, s in enumerate(settings):
        if progress:
            progress(k, len(settings), s)
        try:
            if runtime == "ort":
                runners = [OrtRunner(str(m), s, input_shapes) for m in models]
            else:
                runners = [TorchRunner(mod, label, s, shape, compile_mode) for label, mod, shape in models]
        except ProviderUnavailable as exc:
            skipped.append({"ep": s.ep, "opt_level": s.opt_level, "batch": s.batch, "reason": str(exc)})
            log.info("skipping %s: %s", s.ep, exc)
            continue
        except BnfoldError as exc:
            if "is not in this onnxruntime build" in str(exc):
                skipped.append({"ep": s.ep, "opt_level": s.opt_level, "batch": s.batch, "reason": str(exc)})
                continue
            raise
        for _ in range(warmup):
            for r in runners:
                r()
        times = interleave(runners, iters, duration_s=duration_s)
        base = None
        for r, t in zip(runners, times):
            st = summarize(t)
            res = BenchResult(model=r.label, ep=s.ep, opt_level=s.opt_level, batch=s.batch, p50_ms=st["p50_ms"],
                              p90_ms=st["p90_ms"], p99_ms=st["p99_ms"], mean_ms=st["mean_ms"], ci95_ms=st["ci95_ms"],
                              throughput=s.batch * 1e3 / st["mean_ms"], session_ms=r.session_ms,
                              model_mb=_model_mb(r.label) if runtime == "ort" else None, providers=r.providers,
                              iters=st["n"], threads=threads, io_binding=s.io_binding and runtime == "ort",
                              cuda_graph=s.cuda_graph, std_ms=st["std_ms"], min_ms=st["min_ms"], samples_ms=list(t),
                              ep_options=s.ep_options)
            if base is None:
                base = t
                res.ratio, res.ratio_ci95 = 1.0, [1.0, 1.0]
            else:
                rc = ratio_ci(t, base)
                res.ratio, res.ratio_ci95 = rc["ratio"], rc["ci95"]
            results.append(res)
    if not results and skipped:
        raise BnfoldError("no requested provider can run here: " + "; ".join(f"{s['ep']}: {s['reason']}" for s in skipped))
    config = {"runtime": runtime, "eps": list(eps), "opt_levels": list(opt_levels), "batches": list(batches),
              "warmup": warmup, "iters": iters, "duration_s": duration_s, "threads": threads,
              "io_binding": io_binding, "cuda_graph": cuda_graph, "compile": compile_mode,
              "ep_options": dict(ep_options or {}),
              "timing": "interleaved rounds, rotating start; wall clock (perf_counter) on CPU, "
                        "IO binding + synchronize on GPU, CUDA events for torch on GPU"}
    return BenchRun(results, skipped, environment(), config)


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
