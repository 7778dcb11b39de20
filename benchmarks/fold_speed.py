"""How fast is bnfold's file-to-file fold compared with plain ONNX load+save and with other tools?

The model is the zoo's ResNet-50 (25.6 M parameters, about 100 MB of ONNX) with randomized BatchNorm
statistics, exported by the dynamo exporter with ``optimize=False`` so that all 53 BatchNormalization nodes
survive. Every method is timed as a whole file-to-file operation (read the model from disk, process it, write
the result to disk):

========================  ==============================================================================
``floor``                 ``onnx.load`` + ``onnx.save``: the least any file-to-file tool can cost
``bnfold``                ``bnfold.fold_onnx_file(src, dst)`` (default: onnx.checker full check included)
``bnfold_nocheck``        ``bnfold.fold_onnx_file(src, dst, check=False)``
``onnxoptimizer``         load, ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])``, save
``onnxsim``               load, ``onnxsim.simplify(model)`` (defaults), save
``onnxslim``              load, ``onnxslim.slim(model)`` (defaults), save
``onnxscript``            load, ``onnxscript.optimizer.optimize(model)`` (defaults), save
``ort_offline``           ONNX Runtime's C++ optimizer, offline: a session with level BASIC (its Conv+BN fusion) and
                          ``optimized_model_filepath`` (it loads and saves the whole model too)
========================  ==============================================================================

Repetitions run in one process and are interleaved round-robin (the starting method rotates every
repetition) so that drift of the machine cancels; the median and minimum of ``--reps`` runs are reported,
after one untimed warm-up run per method. Before every timed run, untimed, garbage is collected and dirty
pages are flushed (``os.sync``) so that the write-back of one run's output does not land in the next. For
every method the output is checked: BatchNormalization nodes left (subgraphs included), file size, and the
largest absolute difference from the unfolded model in onnxruntime (CPUExecutionProvider, graph
optimizations disabled, one random input of batch 1).

Cold runs and peak memory: every method is also run ``--cold-reps`` times (interleaved the same way), each
time as the first operation of a fresh subprocess, as the command line would run it; the operation is timed
inside the child (imports excluded). The first operation in a process spends more kernel time getting fresh
memory, so cold times are higher than warm ones and the ratios differ; both are reported. The peak resident set
size of each child is its own ``VmHWM`` from ``/proc/self/status``, read by the child (a fresh interpreter
started by exec) right after its imports and at the end, so the cost of the operation itself is the
difference. (Not ``ru_maxrss``: a child inherits its parent's peak through fork/exec.)

As commands (``--command-reps``): ``bnfold fold SRC -o DST`` against ``python -c`` doing ``onnx.load`` +
``onnx.save`` of the same file, each a fresh process, interleaved, wall time from start to exit (interpreter
start and imports included), and each process's own VmHWM.

Start-up (``--startup-reps``): each command (``inspect``, ``fold``, ``fold --dry-run``, ``verify``, ``bench``)
on a tiny model against ``python -c "import onnx, onnxruntime"``, fresh processes, interleaved; whether torch
was imported is recorded (it must not be).

The chain study (``--chain``, doublings up to 3,000 pairs and beyond) times each size in process and as
commands; the time per doubling should stay near 2x (linear). These subprocess runs come first and double as a crash guard: a tool that fails or crashes there
is recorded with its error and left out of the in-process timing.

Where bnfold spends its time is measured twice: with low-overhead timers wrapped around its stages
(load, the onnx.checker gate on the input, ``planner.plan``, ``planner.apply``, the checker on the output,
save; the wrappers are installed at run time, no file is
changed) and with cProfile (top functions by own time).

Usage::

    python benchmarks/fold_speed.py [--reps N] [--cold-reps N] [--out benchmarks/results]

Writes ``fold_speed.json`` (all numbers) and ``fold_speed.md`` (table and summary) into ``--out``. The
exported model is cached in ``benchmarks/.cache`` (git-ignored) so that reruns skip the export.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as _dt
import gc
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL_NAME = "resnet50"
MODEL_FILE = "resnet50_unfolded.onnx"
INPUT_SHAPE = (1, 3, 224, 224)
SEED = 0
TARGET_RATIO = 1.0  # issues 12, 20: at most the Python load+save floor
CHAIN_TARGET_S = 10.0  # a chain of 3,000 Conv+BN pairs
CHAIN_COMMAND_TARGET_S = 1.5  # issue 20: 3,000 pairs as a command (ONNX Runtime's C++ optimizer: 1.6 s)
CHAIN_DOUBLING_MAX = 2.2  # linear in the node count: at most 2.2x per doubling
#: Bump when the way the model is built changes, so that stale caches are rebuilt.
CACHE_FORMAT = 1

FileOp = Callable[[str, str], None]


def log(msg: str) -> None:
    print(f"[fold_speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- methods
# Each setup function does the imports a method needs and returns the file-to-file operation, so that the
# imports are neither timed nor counted in the operation's own memory.

def _setup_floor() -> FileOp:
    import onnx

    def op(src, dst):
        onnx.save(onnx.load(src), dst)
    return op


def _setup_bnfold(check: bool) -> Callable[[], FileOp]:
    def setup() -> FileOp:
        import bnfold

        def op(src, dst):
            bnfold.fold_onnx_file(src, dst, check=check)
        return op
    return setup


def _setup_onnxoptimizer() -> FileOp:
    import onnx
    import onnxoptimizer

    def op(src, dst):
        onnx.save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)
    return op


def _setup_onnxsim() -> FileOp:
    import onnx
    import onnxsim

    def op(src, dst):
        model, ok = onnxsim.simplify(onnx.load(src))
        if not ok:
            raise RuntimeError("onnxsim.simplify reported that its result failed its own check")
        onnx.save(model, dst)
    return op


def _setup_onnxslim() -> FileOp:
    import onnx
    import onnxslim

    def op(src, dst):
        # slim() also accepts a path, but load + slim(ModelProto) + save is the same shape as the others.
        model = onnxslim.slim(onnx.load(src))
        if isinstance(model, tuple):  # some versions return (model, ...)
            model = model[0]
        onnx.save(model, dst)
    return op


def _setup_onnxscript() -> FileOp:
    import onnx
    import onnxscript.optimizer

    def op(src, dst):
        onnx.save(onnxscript.optimizer.optimize(onnx.load(src)), dst)
    return op


def _setup_ort_offline() -> FileOp:
    import onnxruntime as ort

    def op(src, dst):
        # ONNX Runtime's C++ graph optimizer, run offline: level BASIC includes its Conv+BN fusion
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return op


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    package: str | None  #: distribution whose version is reported
    setup: Callable[[], FileOp]


METHODS: dict[str, Method] = {m.key: m for m in [
    Method("floor", "onnx.load + onnx.save (floor)", "onnx", _setup_floor),
    Method("bnfold", "bnfold.fold_onnx_file (check=True)", "bnfold", _setup_bnfold(True)),
    Method("bnfold_nocheck", "bnfold.fold_onnx_file (check=False)", "bnfold", _setup_bnfold(False)),
    Method("onnxoptimizer", "onnxoptimizer fuse_bn_into_conv", "onnxoptimizer", _setup_onnxoptimizer),
    Method("onnxsim", "onnxsim.simplify", "onnxsim", _setup_onnxsim),
    Method("onnxslim", "onnxslim.slim", "onnxslim", _setup_onnxslim),
    Method("onnxscript", "onnxscript.optimizer.optimize", "onnxscript", _setup_onnxscript),
    Method("ort_offline", "onnxruntime offline optimizer (BASIC)", "onnxruntime", _setup_ort_offline),
]}
BNFOLD_KEYS = ("bnfold", "bnfold_nocheck")


# ---------------------------------------------------------------------------------------------- helpers
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _version(dist: str) -> str | None:
    for name in (dist, f"{dist}-gpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _mb(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 1e6:.1f}"


def _kb_mb(kb: int | None) -> str:
    """ru_maxrss (KiB on Linux) as MB."""
    return "—" if kb is None else f"{kb * 1024 / 1e6:.0f}"


def _rss_self_kb() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _settle() -> None:
    """Untimed: collect garbage and flush dirty pages left by earlier writes (so that their write-back does not
    land inside the next timed run)."""
    gc.collect()
    if hasattr(os, "sync"):
        os.sync()


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(str(path) + ".data").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- the model
def _export_model(dst: Path, variant: str = "raw") -> None:
    """Build and export the benchmark model (runs in a subprocess so that torch stays out of the timings).

    ``raw``: torch's dynamo export with ``optimize=False`` as is (every bias-less conv gets a zero bias the graph
    computes at run time); ``clean``: the same with those computed constants materialized as initializers
    (bnfold's default export), the form in which other tools' Conv+BN patterns can match."""
    import onnx  # noqa: I001  (ruff's view of bnfold.models as first- or third-party varies)
    import torch

    from bnfold.export import export_onnx
    from bnfold.models import zoo

    torch.manual_seed(SEED)
    model = zoo.randomize_bn(zoo.create(MODEL_NAME), seed=SEED).eval()
    proto = export_onnx(model, (torch.randn(*INPUT_SHAPE),), materialize=(variant == "clean"))
    onnx.save(proto, str(dst))


def prepare_model(cache_dir: Path, work_dir: Path, refresh: bool, variant: str = "raw") -> tuple[Path, dict]:
    """The unfolded model, copied into ``work_dir``; exported once and cached in ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    model_file = MODEL_FILE if variant == "raw" else MODEL_FILE.replace(".onnx", f"_{variant}.onnx")
    cached, meta_path = cache_dir / model_file, cache_dir / (model_file + ".json")
    want = {"format": CACHE_FORMAT, "model": MODEL_NAME, "seed": SEED, "torch": _version("torch"),
            "onnx": _version("onnx"), "variant": variant}
    if variant == "raw" and meta_path.is_file():  # caches written before variants existed are raw exports
        old = json.loads(meta_path.read_text())
        if old.get("key", {}).get("variant") is None and {**old.get("key", {}), "variant": "raw"} == want:
            old["key"]["variant"] = "raw"
            meta_path.write_text(json.dumps(old, indent=2) + "\n")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if refresh or not cached.is_file() or meta is None or meta.get("key") != want:
        log(f"exporting {MODEL_NAME} with BatchNorm kept -> {cached} (cached for reruns)")
        t0 = time.perf_counter()
        tmp = cache_dir / (model_file + ".tmp")
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--export-to", str(tmp), "--variant", variant],
                       check=True)
        os.replace(tmp, cached)
        meta = {"key": want, "export_s": round(time.perf_counter() - t0, 2),
                "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    else:
        log(f"using cached export {cached}")
    src = work_dir / model_file
    shutil.copyfile(cached, src)
    return src, meta


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def describe_model(path: Path) -> dict:
    """Size, node counts and how the convolutions before each BatchNorm get their bias."""
    import onnx

    import bnfold

    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    bias_kinds: dict[str, int] = defaultdict(int)
    for n in g.node:
        if n.op_type != "BatchNormalization":
            continue
        p = producer.get(n.input[0])
        if p is None or p.op_type != "Conv":
            bias_kinds["not after a Conv"] += 1
        elif len(p.input) < 3 or not p.input[2]:
            bias_kinds["Conv without bias"] += 1
        elif p.input[2] in inits:
            bias_kinds["Conv bias is an initializer"] += 1
        else:
            b = producer.get(p.input[2])
            bias_kinds[f"Conv bias computed by {b.op_type if b else '?'}"] += 1
    return {"file": path.name, "size_bytes": path.stat().st_size, "nodes": len(g.node),
            "bn_nodes": bnfold.count_bn(model), "initializers": len(g.initializer),
            "parameters": sum(_prod(t.dims) for t in g.initializer),
            "opset": next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), None),
            "conv_bias_before_bn": dict(bias_kinds)}


# ---------------------------------------------------------------------------------------------- subprocess runs
def _hwm_self_kb() -> int:
    """This process's own peak resident set (VmHWM, KiB). Unlike ``ru_maxrss``, which a child inherits from its
    parent through fork/exec (a child of a 310 MiB parent reports 311 MiB), VmHWM starts afresh at exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return _rss_self_kb()


def run_one(key: str, src: str, dst: str) -> None:
    """Child mode (a fresh interpreter, started by exec): run one method once and print a JSON line (seconds,
    own peak memory after the imports and at the end)."""
    op = METHODS[key].setup()
    after_import_kb = _hwm_self_kb()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        op(src, dst)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "rss_after_import_kb": after_import_kb, "hwm_kb": _hwm_self_kb()}))


def run_in_child(key: str, src: Path, dst: Path, work_dir: Path) -> dict:
    """Run ``key`` once in a fresh interpreter; return its time, peak RSS and error (if any)."""
    _unlink(dst)
    _settle()
    out_f, err_f = work_dir / f"{key}.child.out", work_dir / f"{key}.child.err"
    with open(out_f, "w") as out, open(err_f, "w") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--run-one", key, str(src), str(dst)],
                                stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        proc.returncode = os.waitstatus_to_exitcode(status)
    res: dict = {"ru_maxrss_kb": usage.ru_maxrss, "returncode": proc.returncode}
    stdout, stderr = out_f.read_text(), err_f.read_text()
    if proc.returncode != 0:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else (f"killed by signal {-proc.returncode}" if proc.returncode < 0 else "")
        res["error"] = f"exit status {proc.returncode}: {why}"
        return res
    try:
        info = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        res["error"] = "child printed no result"
        return res
    res["seconds"] = info["seconds"]
    res["rss_after_import_kb"] = info["rss_after_import_kb"]
    res["peak_rss_kb"] = info["hwm_kb"]  # the child's own VmHWM (ru_maxrss would include the parent's peak)
    res["op_rss_kb"] = info["hwm_kb"] - info["rss_after_import_kb"]
    return res


# ---------------------------------------------------------------------------------------------- commands
#: Runs a command line in a fresh interpreter and, at exit, writes its own VmHWM (KiB) and whether torch was
#: imported to the file named by $FOLD_SPEED_PROBE. The command is ``python -c CODE`` (argv[1]) or bnfold's CLI.
_PROBE = """
import atexit, os, sys
def _report():
    hwm = next((int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")), -1)
    with open(os.environ["FOLD_SPEED_PROBE"], "w") as fh:
        fh.write(f"{hwm} {int('torch' in sys.modules)}")
atexit.register(_report)
if sys.argv[1] == "--code":
    code = sys.argv[2]
    sys.argv = ["-c", *sys.argv[3:]]
    exec(compile(code, "<command>", "exec"), {"__name__": "__main__"})
else:
    from bnfold.cli.main import main
    sys.argv = ["bnfold", *sys.argv[1:]]
    main()
"""
FLOOR_CODE = "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
IMPORT_FLOOR_CODE = "import onnx, onnxruntime"


def run_command(argv: list[str], work: Path) -> dict:
    """Wall time (start to exit, interpreter start included), own VmHWM and torch use of one fresh process.
    ``argv`` is bnfold's arguments, or ``["--code", CODE, *args]``."""
    probe = work / "probe.txt"
    _unlink(probe)
    _settle()
    env = dict(os.environ, FOLD_SPEED_PROBE=str(probe))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    res: dict = {"seconds": seconds, "returncode": proc.returncode}
    if proc.returncode not in (0, 1):  # 1: a check failed (bench/verify verdicts), still a complete run
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        res["error"] = f"exit status {proc.returncode}: {lines[-1] if lines else ''}"
    with contextlib.suppress(OSError, ValueError):
        hwm, torch = probe.read_text().split()
        res["hwm_kb"], res["torch"] = int(hwm), bool(int(torch))
    return res


def interleaved_commands(cmds: dict[str, list[str]], work: Path, reps: int, before=None) -> dict[str, dict]:
    """``reps`` rounds of every command in a fresh process, interleaved with a rotating start; medians.
    ``before(key)`` runs (untimed) before each run, e.g. to remove the previous output."""
    keys = list(cmds)
    runs: dict[str, list[dict]] = {k: [] for k in keys}
    for r in range(reps):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            if before is not None:
                before(k)
            runs[k].append(run_command(cmds[k], work))
        log(f"  command round {r + 1}/{reps}: " + ", ".join(f"{k} {runs[k][-1]['seconds']:.2f}s" for k in order))
    out = {}
    for k in keys:
        ok = [x for x in runs[k] if "error" not in x]
        res: dict = {"argv": cmds[k], "times_s": [x["seconds"] for x in ok]}
        if len(ok) < len(runs[k]):
            res["error"] = next(x["error"] for x in runs[k] if "error" in x)
        if ok:
            res["median_s"] = _median(res["times_s"])
            res["min_s"] = min(res["times_s"])
            hwms = [x["hwm_kb"] for x in ok if "hwm_kb" in x]
            res["hwm_kb"] = int(_median(hwms)) if hwms else None
            res["torch_imported"] = any(x.get("torch") for x in ok)
        out[k] = res
    return out


def command_runs(src: Path, work: Path, reps: int, *, table: bool = False) -> dict:
    """``bnfold fold`` against the load+save floor, both as commands in fresh processes. With ``table``, also
    ``bnfold fold`` without ``-q`` (``bnfold_table``: as a person runs it, its table printed, to a pipe)."""
    outs = {"floor": work / "cmd_floor.onnx", "bnfold": work / "cmd_bnfold.onnx",
            "bnfold_table": work / "cmd_bnfold_table.onnx"}
    cmds = {"floor": ["--code", FLOOR_CODE, str(src), str(outs["floor"])],
            "bnfold": ["fold", str(src), "-o", str(outs["bnfold"]), "-q"]}
    if table:
        cmds["bnfold_table"] = ["fold", str(src), "-o", str(outs["bnfold_table"])]
    res = interleaved_commands(cmds, work, reps, before=lambda k: _unlink(outs[k]))
    fl = res["floor"].get("median_s")
    for k in cmds:
        if k != "floor":
            bf = res[k].get("median_s")
            res[k]["ratio_median"] = bf / fl if fl and bf else None
            # the ratio of each round's own pair: the floor and the command ran back to back
            pairs = [b / f for f, b in zip(res["floor"].get("times_s", []), res[k].get("times_s", [])) if f]
            res[k]["ratio_per_round_median"] = _median(pairs) if pairs else None
    res["ratio_median"] = res["bnfold"].get("ratio_median")
    return res


def startup_runs(work: Path, reps: int) -> dict:
    """Start-up of each ONNX command on a tiny model, against importing onnx and onnxruntime."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    small = work / "small.onnx"
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
              zip("sbmv", (rng.uniform(0.5, 1.5, 4), rng.normal(0, 1, 4), rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4)))]
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]),
                           helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])], "small",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, small)
    out = work / "small_folded.onnx"
    cmds = {"import onnx, onnxruntime (floor)": ["--code", IMPORT_FLOOR_CODE],
            "inspect": ["inspect", str(small), "-q"],
            "fold": ["fold", str(small), "-o", str(out), "-q"],
            "fold --dry-run": ["fold", str(small), "--dry-run", "-q"],
            "verify": ["verify", str(small), str(small), "-q"],
            "bench": ["bench", str(small), str(small), "--opt-level", "off", "--warmup", "1", "--iters", "5",
                      "--sessions", "3", "--session-time", "0", "-q"]}
    res = interleaved_commands(cmds, work, reps, before=lambda k: _unlink(out))
    fl = res["import onnx, onnxruntime (floor)"]
    floor = fl.get("median_s")
    for r in res.values():
        if floor and r.get("median_s"):
            r["ratio_to_import_floor"] = r["median_s"] / floor
        # each round's command over the same round's floor (run back to back): the machine's drift cancels
        pairs = [t / f for f, t in zip(fl.get("times_s", []), r.get("times_s", [])) if f]
        if pairs and len(pairs) == len(r.get("times_s", [])) == len(fl.get("times_s", [])):
            r["ratio_per_round_median"] = _median(pairs)
    return res


def commands_markdown(cmd: dict | None, startup: dict | None) -> list[str]:
    lines: list[str] = []
    if cmd:
        lines += ["", "## As commands (fresh processes, interleaved)", "",
                  "| command | median s | min s | × floor | own peak (VmHWM) MB |", "|---|---:|---:|---:|---:|"]
        for k in ("floor", "bnfold"):
            r = cmd[k]
            label = "python -c: onnx.load + onnx.save" if k == "floor" else "bnfold fold SRC -o DST"
            ratio = r["median_s"] / cmd["floor"]["median_s"] if r.get("median_s") and cmd["floor"].get("median_s") \
                else None
            lines.append(f"| {label} | {_fmt_s(r.get('median_s'))} | {_fmt_s(r.get('min_s'))} | {_fmt_ratio(ratio)} | "
                         f"{_kb_mb(r.get('hwm_kb'))} |")
        lines += ["", f"Target: `bnfold fold` ≤ 1.0× the floor as a command (medians); measured "
                      f"{_fmt_ratio(cmd.get('ratio_median'))}."]
    if startup:
        lines += ["", "## Start-up on a tiny model (fresh processes, interleaved)", "",
                  "| command | median s | × import floor | × floor, per round (median) | own peak (VmHWM) MB | "
                  "torch imported |",
                  "|---|---:|---:|---:|---:|---|"]
        for k, r in startup.items():
            lines.append(f"| `{k}` | {_fmt_s(r.get('median_s'))} | {_fmt_ratio(r.get('ratio_to_import_floor'))} | "
                         f"{_fmt_ratio(r.get('ratio_per_round_median'))} | "
                         f"{_kb_mb(r.get('hwm_kb'))} | {'yes' if r.get('torch_imported') else 'no'}"
                         f"{' (error: ' + r['error'] + ')' if r.get('error') else ''} |")
        lines += ["", "Target: `bnfold fold small.onnx` within 1.3× of `python -c \"import onnx, onnxruntime\"`; no "
                      "torch in any of these processes."]
    return lines


# ---------------------------------------------------------------------------------------------- timing
def cold_runs(keys: list[str], src: Path, outs: dict[str, Path], work: Path, reps: int) -> dict[str, dict]:
    """``reps`` interleaved rounds of one run per method, each in a fresh subprocess: time of the operation
    (imports not timed) and peak RSS. A method that fails once is dropped from later rounds."""
    runs: dict[str, list[dict]] = {k: [] for k in keys}
    errors: dict[str, str] = {}
    for r in range(reps):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            if k in errors:
                continue
            res = run_in_child(k, src, outs[k], work)
            if "error" in res:
                errors[k] = res["error"]
                log(f"  {k}: {res['error']}")
                continue
            runs[k].append(res)
        log(f"  cold round {r + 1}/{reps}: " + ", ".join(
            f"{k} {runs[k][-1]['seconds']:.2f}s/{runs[k][-1]['peak_rss_kb'] / 1024:.0f}MiB"
            for k in order if k not in errors and runs[k]))
    out: dict[str, dict] = {}
    for k in keys:
        if k in errors:
            out[k] = {"error": errors[k]}
            continue
        rs = runs[k]
        out[k] = {"cold_times_s": [x["seconds"] for x in rs],
                  "cold_median_s": _median([x["seconds"] for x in rs]),
                  "cold_min_s": min(x["seconds"] for x in rs)}
        for field in ("peak_rss_kb", "rss_after_import_kb", "op_rss_kb"):
            out[k][field] = int(_median([x[field] for x in rs]))
    return out


def time_methods(keys: list[str], src: Path, outs: dict[str, Path], reps: int) -> dict[str, dict]:
    """Warm up each method once, then ``reps`` interleaved round-robin rounds with a rotating start method."""
    ops: dict[str, FileOp] = {}
    results: dict[str, dict] = {k: {"times_s": []} for k in keys}
    for k in keys:
        try:
            ops[k] = METHODS[k].setup()
            _unlink(outs[k])
            with contextlib.redirect_stdout(io.StringIO()):
                ops[k](str(src), str(outs[k]))  # warm-up, untimed
        except Exception as exc:
            results[k]["error"] = _first_line(exc)
            ops.pop(k, None)
            log(f"  {k}: warm-up failed: {results[k]['error']}")
    live = [k for k in keys if k in ops]
    for r in range(reps):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for k in order:
            if "error" in results[k]:
                continue
            _unlink(outs[k])
            _settle()
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    ops[k](str(src), str(outs[k]))
            except Exception as exc:
                results[k]["error"] = _first_line(exc)
                log(f"  {k}: failed in round {r + 1}: {results[k]['error']}")
                continue
            results[k]["times_s"].append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{reps}: " + ", ".join(
            f"{k} {results[k]['times_s'][-1]:.2f}s" for k in order if results[k]["times_s"]))
    for k in keys:
        ts = results[k]["times_s"]
        if ts and "error" not in results[k]:
            results[k]["median_s"] = _median(ts)
            results[k]["min_s"] = min(ts)
    return results


# ---------------------------------------------------------------------------------------------- node-count scaling
def build_chain(n: int, path: Path) -> None:
    """A chain of ``n`` Conv(8->8, 1x1, bias) + BatchNormalization pairs on a (1, 8, 4, 4) input: many nodes, few
    bytes, so the time is what the tool spends per node."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(n)
    nodes, inits = [], []
    x = "x"
    for i in range(n):
        w, b = f"w{i}", f"b{i}"
        inits += [numpy_helper.from_array((rng.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32), w),
                  numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), b)]
        params = [f"s{i}", f"t{i}", f"m{i}", f"v{i}"]
        for name, v in zip(params, (rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.1, 8), rng.normal(0, 0.1, 8),
                                    rng.uniform(0.5, 2.0, 8))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), name))
        nodes.append(helper.make_node("Conv", [x, w, b], [f"c{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}"] + params, [f"y{i}"], name=f"bn{i}"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8, 4, 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def chain_scaling(sizes: list[int], keys: list[str], work: Path, reps: int, command_reps: int = 0) -> dict:
    """File-to-file time of ``keys`` on chains of each size, interleaved; per doubling, the time ratio."""
    out: dict = {"sizes": sizes, "reps": reps, "per_size": {}}
    for n in sizes:
        src = work / f"chain_{n}.onnx"
        build_chain(n, src)
        outs = {k: work / f"chain_{n}_out_{k}.onnx" for k in keys}
        log(f"chain of {n} Conv+BN pairs ({src.stat().st_size / 1e6:.1f} MB)")
        commands = None
        if command_reps:  # first: fresh processes started before this process has run any method in process
            log(f"chain of {n} as commands")
            commands = command_runs(src, work, command_reps, table=True)
        timing = time_methods(keys, src, outs, reps)
        bn_left = {}
        for k in keys:
            try:
                import onnx

                import bnfold
                bn_left[k] = bnfold.count_bn(onnx.load(str(outs[k]))) if outs[k].exists() else None
            except Exception:
                bn_left[k] = None
        out["per_size"][str(n)] = {k: {"median_s": timing[k].get("median_s"), "min_s": timing[k].get("min_s"),
                                       "error": timing[k].get("error"), "bn_left": bn_left[k]} for k in keys}
        if commands is not None:
            out["per_size"][str(n)]["commands"] = commands
    for k in keys:
        ratios = []
        for a, b in zip(sizes, sizes[1:]):
            ta = out["per_size"][str(a)][k]["median_s"]
            tb = out["per_size"][str(b)][k]["median_s"]
            if ta and tb and b == 2 * a:
                ratios.append(tb / ta)
        out.setdefault("doubling_ratio", {})[k] = ratios
    if command_reps:
        for k in ("floor", "bnfold", "bnfold_table"):
            ratios = []
            for a, b in zip(sizes, sizes[1:]):
                ta = out["per_size"][str(a)]["commands"][k].get("median_s")
                tb = out["per_size"][str(b)]["commands"][k].get("median_s")
                if ta and tb and b == 2 * a:
                    ratios.append(tb / ta)
            out.setdefault("command_doubling_ratio", {})[k] = ratios
    return out


def chain_instructions(sizes: list[int], work: Path) -> dict | None:
    """Instructions (callgrind's Ir) that ``bnfold.fold_onnx_file`` executes on each chain, minus those of the
    same process importing bnfold and stopping: a count that the machine's load does not move, so the ratio per
    doubling says whether the work is linear. None when valgrind is not installed."""
    import re

    if shutil.which("valgrind") is None:
        return None
    # (the input's check in this process, not in a forked child, which callgrind would not count)
    code_fold = ("import sys; from bnfold import check; check._BACKGROUND_CHECK = False; "
                 "from bnfold.fold import fold_onnx_file; fold_onnx_file(sys.argv[1], sys.argv[2])")
    code_base = "import sys; from bnfold.fold import fold_onnx_file"

    def ir(code: str, *argv: str) -> int:
        out = work / "callgrind.out"
        r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c",
                            code, *argv], capture_output=True, text=True, check=True)
        out.unlink(missing_ok=True)
        return int(re.search(r"Collected : (\d+)", r.stderr).group(1))
    res: dict = {"per_size": {}}
    for n in sizes:
        src = work / f"chain_{n}.onnx"
        if not src.exists():
            build_chain(n, src)
        log(f"instructions: chain of {n} under callgrind")
        dst = work / f"chain_{n}_ir.onnx"
        res["per_size"][str(n)] = (ir(code_fold, str(src), str(dst)) - ir(code_base)) / 1e6
    counts = [res["per_size"][str(n)] for n in sizes]
    res["doubling_ratio"] = [b / a for (na, a), (nb, b) in zip(zip(sizes, counts), zip(sizes[1:], counts[1:]))
                             if nb == 2 * na and a > 0]
    return res


def chain_markdown(ch: dict) -> list[str]:
    keys = [k for k in next(iter(ch["per_size"].values())) if k != "commands"]
    lines = ["", "## Node-count scaling: chains of Conv+BN pairs", "",
             f"Each chain is Conv(8->8, 1x1) + BatchNormalization repeated N times (tiny tensors, many nodes); "
             f"file to file, {ch['reps']} interleaved rounds in one process, medians. Targets: 3,000 pairs in "
             f"<= {CHAIN_TARGET_S:g} s; at most {CHAIN_DOUBLING_MAX}x per doubling of N.", "",
             "| N pairs | " + " | ".join(METHODS[k].label for k in keys) + " |",
             "|---:|" + "---:|" * len(keys)]
    for n, row in ch["per_size"].items():
        cells = []
        for k in keys:
            r = row[k]
            cells.append(f"error: {r['error']}" if r.get("error") else
                         f"{_fmt_s(r['median_s'])} s (BN left {r['bn_left']})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Time ratio per doubling of N: " + "; ".join(
        f"{METHODS[k].label}: {', '.join(f'{x:.2f}x' for x in v) or 'n/a'}" for k, v in ch["doubling_ratio"].items())]
    if ch.get("instructions"):
        ins = ch["instructions"]
        lines += ["", "Instructions executed by `bnfold.fold_onnx_file` (callgrind, imports subtracted; not moved by "
                  "the machine's load): " + ", ".join(f"{n} pairs {v:,.0f} M" for n, v in ins["per_size"].items())
                  + "; per doubling " + (", ".join(f"{x:.2f}x" for x in ins["doubling_ratio"]) or "n/a") + "."]
    if ch.get("command_doubling_ratio"):
        lines += ["", f"As commands (fresh processes, interleaved, medians; target: 3,000 pairs <= {CHAIN_COMMAND_TARGET_S:g} s"
                  " for `bnfold fold`; `-q`: no table; ratios: each round's command over the same round's floor, "
                  "median):", "",
                  "| N pairs | load+save floor s | bnfold fold -q s (x floor) | bnfold fold s, table printed (x floor) "
                  "| own peak MB |", "|---:|---:|---:|---:|---:|"]

        def cell(c: dict) -> str:
            r = c.get("ratio_per_round_median")
            return f"{_fmt_s(c.get('median_s'))}" + (f" ({r:.2f}x)" if r else "")
        for n, row in ch["per_size"].items():
            c = row.get("commands", {})
            lines.append(f"| {n} | {_fmt_s(c.get('floor', {}).get('median_s'))} | {cell(c.get('bnfold', {}))} | "
                         f"{cell(c.get('bnfold_table', {}))} | {_kb_mb(c.get('bnfold', {}).get('hwm_kb'))} |")
        lines += ["", "Per doubling, as commands: " + "; ".join(
            f"{k}: {', '.join(f'{x:.2f}x' for x in v) or 'n/a'}" for k, v in ch["command_doubling_ratio"].items())]
    return lines


# ---------------------------------------------------------------------------------------------- checking outputs
def check_outputs(src: Path, outs: dict[str, Path]) -> dict:
    """BN count, size and numerical agreement with the unfolded model for every output file."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    import bnfold

    def session(path: Path):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    ref_sess = session(src)
    rng = np.random.default_rng(SEED)
    feeds = {i.name: rng.standard_normal(INPUT_SHAPE, dtype=np.float32) for i in ref_sess.get_inputs()}
    ref = ref_sess.run(None, feeds)
    del ref_sess
    checks: dict[str, dict] = {}
    for k, path in outs.items():
        c: dict = {}
        checks[k] = c
        if not path.is_file():
            c["error"] = "no output file"
            continue
        c["output_bytes"] = path.stat().st_size
        try:
            c["bn_left"] = bnfold.count_bn(onnx.load(str(path)))
            got = session(path).run(None, feeds)
            pairs = list(zip(got, ref, strict=True))
            c["max_abs_err"] = max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64))))
                                   for g, r in pairs)
            c["matches"] = all(bool(np.allclose(g, r, rtol=1e-3, atol=1e-4)) for g, r in pairs)
        except Exception as exc:
            c["error"] = _first_line(exc)
    return {"ref_max_abs_output": max(float(np.max(np.abs(r))) for r in ref),
            "tolerance": "numpy.allclose(rtol=1e-3, atol=1e-4)",
            "input": f"standard normal, shape {list(INPUT_SHAPE)}, seed {SEED}", "per_method": checks}


# ---------------------------------------------------------------------------------------------- profiling bnfold
def _stage_targets() -> list[tuple[str, object, str]]:
    """(label, owner, attribute) of functions to time inside ``bnfold.fold_onnx_file``. Looked up at run time: a
    name that does not exist (bnfold's internals change) is skipped, and the nesting of the stages is taken from
    the calls actually seen, not assumed."""
    import onnx
    import onnx.checker

    import bnfold.check
    import bnfold.fold
    import bnfold.onnx_fold
    import bnfold.onnx_io
    import bnfold.planner
    import bnfold.protofile

    return [
        ("load_model", bnfold.fold, "load_model"),
        ("protofile.open_model (index + skeleton parse)", bnfold.protofile, "open_model"),
        ("onnx.load (protobuf parse)", onnx, "load"),
        ("fold_model", bnfold.fold, "fold_model"),
        ("check_input (onnx.checker gate on the input)", bnfold.onnx_fold, "check_input"),
        ("planner.plan (every rule's match)", bnfold.planner, "plan"),
        ("planner.apply (in-place edits)", bnfold.planner, "apply"),
        ("checker_error", bnfold.check, "checker_error"),
        ("onnx.checker.check_model (full)", onnx.checker, "check_model"),
        ("save_model", bnfold.fold, "save_model"),
        ("protofile.write_embedded (splice + copy)", bnfold.protofile, "write_embedded"),
        ("protofile.write_external (stream the data)", bnfold.protofile, "write_external"),
        ("onnx.save_model (serialize + write)", onnx, "save_model"),
    ]


IO_STAGES = ("onnx.load (protobuf parse)", "onnx.save_model (serialize + write)")
_MISSING = object()


@contextlib.contextmanager
def _stage_timers():
    """Wrap the stage functions with timers for the duration of the ``with`` block. Yields a dict from call path
    (tuple of labels, outermost first) to accumulated seconds, plus the order in which paths were first seen."""
    acc: dict[tuple[str, ...], float] = defaultdict(float)
    order: list[tuple[str, ...]] = []
    stack: list[str] = []
    saved = []
    for label, owner, attr in _stage_targets():
        orig = getattr(owner, attr, None) if owner is not None else None
        if orig is None:
            continue

        def wrapper(*args, __orig=orig, __label=label, **kwargs):
            if __label in stack:  # recursion: already being timed
                return __orig(*args, **kwargs)
            stack.append(__label)
            path = tuple(stack)
            if path not in acc:
                order.append(path)
            t0 = time.perf_counter()
            try:
                return __orig(*args, **kwargs)
            finally:
                acc[path] += time.perf_counter() - t0
                stack.pop()
        saved.append((owner, attr, vars(owner).get(attr, _MISSING)))
        setattr(owner, attr, wrapper)
    try:
        yield acc, order
    finally:
        for owner, attr, orig in reversed(saved):
            if orig is _MISSING:
                delattr(owner, attr)  # it was inherited: uncover the inherited one again
            else:
                setattr(owner, attr, orig)


def _stage_rows(paths: list[tuple[str, ...]], med: dict[tuple[str, ...], float], total: float) -> list[dict]:
    """Depth-first rows (parents before children, first-seen order) with a "rest of X" row after the children
    of every stage that has some, and an "other" row for the time outside every top-level stage."""
    children: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
    for p in paths:
        children[p[:-1]].append(p)
    rows: list[dict] = []

    def emit(p: tuple[str, ...]) -> None:
        rows.append({"stage": p[-1], "depth": len(p) - 1, "path": list(p), "median_s": med[p]})
        kids = children.get(p, [])
        for k in kids:
            emit(k)
        if kids:
            rest = med[p] - sum(med[k] for k in kids)
            if rest > 0.005:
                rows.append({"stage": f"rest of {p[-1]}", "depth": len(p), "path": [*p, "rest"], "median_s": rest})
    for top in children.get((), []):
        emit(top)
    top_sum = sum(med[p] for p in children.get((), []))
    rows.append({"stage": "other (outside the stages above)", "depth": 0, "path": ["other"],
                 "median_s": max(total - top_sum, 0.0)})
    for r in rows:
        r["share"] = r["median_s"] / total if total else None
    return rows


def protobuf_costs(src: Path, reps: int = 3) -> dict:
    """What one ``ByteSize()``, ``SerializeToString()`` and ``onnx.checker`` call cost on this model, the
    calls a file-to-file fold makes on the whole ModelProto."""
    import onnx
    import onnx.checker
    from google.protobuf.internal import api_implementation

    model = onnx.load(str(src))

    def med(fn):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return _median(ts)
    return {"backend": api_implementation.Type(),
            "ByteSize_s": med(model.ByteSize),
            "SerializeToString_s": med(model.SerializeToString),
            "checker_full_s": med(lambda: onnx.checker.check_model(model, full_check=True)),
            "checker_basic_s": med(lambda: onnx.checker.check_model(model))}


def profile_bnfold(src: Path, dst: Path, reps: int) -> dict:
    """Stage timings (median over ``reps`` runs, check=True) and a cProfile of one run."""
    import bnfold

    runs: list[dict[tuple[str, ...], float]] = []
    seen: list[tuple[str, ...]] = []
    totals = []
    for _ in range(reps):
        _unlink(dst)
        _settle()
        with _stage_timers() as (acc, order):
            t0 = time.perf_counter()
            bnfold.fold_onnx_file(str(src), str(dst))
            totals.append(time.perf_counter() - t0)
        runs.append(dict(acc))
        seen += [p for p in order if p not in seen]
    total = _median(totals)
    med = {p: _median([r.get(p, 0.0) for r in runs]) for p in seen}
    stages = _stage_rows(seen, med, total)

    _unlink(dst)
    _settle()
    prof = cProfile.Profile()
    prof.enable()
    bnfold.fold_onnx_file(str(src), str(dst))
    prof.disable()
    st = pstats.Stats(prof)
    prof_total = max(v[3] for v in st.stats.values())  # cumulative time of the outermost call

    def where(key) -> str:
        file, line, func = key
        if file == "~":
            return func  # a builtin / C function
        for root in (*sorted((Path(x) for x in sys.path if x), key=lambda p: -len(str(p))), REPO):
            with contextlib.suppress(ValueError):
                return f"{Path(file).relative_to(root)}:{line}({func})"
        return f"{file}:{line}({func})"

    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
    def callers(v) -> list[dict]:  # who calls it, by the own time spent in it for that caller
        cs = sorted(v[4].items(), key=lambda kv: kv[1][2], reverse=True)[:2]
        return [{"caller": where(ck), "ncalls": cv[1], "own_s": cv[2]} for ck, cv in cs]
    top_own = [{"function": where(k), "ncalls": v[1], "own_s": v[2], "cum_s": v[3], "callers": callers(v)}
               for k, v in rows]
    return {"runs": reps, "total_median_s": total, "stages": stages,
            "cprofile": {"total_s": prof_total, "top_by_own_time": top_own},
            "protobuf_costs": protobuf_costs(src)}


# ---------------------------------------------------------------------------------------------- environment
def bnfold_source_digest() -> str | None:
    """SHA-256 over bnfold's Python sources, to notice when the code changes while the benchmark runs."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("bnfold")
    if spec is None or not spec.origin:
        return None
    root = Path(spec.origin).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def environment(reps: int, cold_reps: int) -> dict:
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = dirty = None
    with contextlib.suppress(Exception):  # read-only git queries
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "bnfold"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    versions = {d: _version(d) for d in ("bnfold", "onnx", "onnxruntime", "onnxscript", "protobuf", "numpy",
                                          "torch", "onnxoptimizer", "onnxsim", "onnxslim")}
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "bnfold_tree_dirty": dirty,
        "reps": reps,
        "cold_reps": cold_reps,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "bnfold_source_sha256_start": bnfold_source_digest(),
    }


# ---------------------------------------------------------------------------------------------- report
def _fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _fmt_err(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def build_summary(res: dict) -> list[str]:
    """Plain-language reading of the numbers (generated from them, nothing hard-coded)."""
    m, model = res["methods"], res["model"]
    out: list[str] = []
    floor = m.get("floor", {})
    if floor.get("median_s") is None:
        return ["The floor (load+save) could not be measured, so no ratios are given."]
    out.append(f"Loading and saving the {model['size_bytes'] / 1e6:.0f} MB model costs {floor['median_s']:.2f} s "
               f"in a warm process (median of {res['setup']['reps']})"
               + (f" and {floor['cold_median_s']:.2f} s as the first operation of a fresh process"
                  if floor.get("cold_median_s") is not None else "")
               + "; that is the floor for any file-to-file tool.")
    for k in (k for k in BNFOLD_KEYS if k in m):
        r = m[k]
        if r.get("median_s") is None:
            out.append(f"`{k}` failed: {r.get('error', 'no result')}.")
            continue
        ratio = r["ratio_median"]
        verdict = (f"within the {TARGET_RATIO}× target" if ratio <= TARGET_RATIO else
                   f"**misses the {TARGET_RATIO}× target** by {ratio - TARGET_RATIO:.2f}× "
                   f"({r['median_s'] - TARGET_RATIO * floor['median_s']:.2f} s over the "
                   f"{TARGET_RATIO * floor['median_s']:.2f} s budget)")
        cold = ""
        if r.get("cold_ratio_median") is not None:
            cr = r["cold_ratio_median"]
            cold = (f". Run once in a fresh process, as the command line does, it takes {r['cold_median_s']:.2f} s "
                    f"against {floor['cold_median_s']:.2f} s for load+save, {cr:.2f}× "
                    + ("(within the target)" if cr <= TARGET_RATIO else f"(also above {TARGET_RATIO}×)"))
        out.append(f"In process, {METHODS[k].label} takes {r['median_s']:.2f} s, {ratio:.2f}× the floor: "
                   f"{verdict}{cold}.")
    prof = res.get("profile")
    if prof:
        rows = prof["stages"]
        leaves = [r for i, r in enumerate(rows)
                  if (i + 1 == len(rows) or rows[i + 1]["depth"] <= r["depth"])
                  and r["stage"] not in IO_STAGES and r["path"] != ["other"]]
        io_s = sum(r["median_s"] for r in rows if r["stage"] in IO_STAGES)
        extra = sorted(leaves, key=lambda r: -r["median_s"])
        if extra:
            parts = ", ".join(f"{r['stage']} {r['median_s']:.2f} s" for r in extra[:5])
            out.append(f"Of bnfold's {prof['total_median_s']:.2f} s (stage-timed runs, check on), "
                       f"{io_s:.2f} s is `onnx.load` and `onnx.save_model`, the parse and serialize+write the floor "
                       f"also pays; the largest other parts are {parts}.")
        top = prof["cprofile"]["top_by_own_time"]
        pc = prof.get("protobuf_costs")
        if pc:
            uses_bytesize = any(t["function"].startswith("<method 'ByteSize'") and t["own_s"] > 0.05 for t in top[:6])
            out.append(f"For scale, on this model one `SerializeToString()` costs {pc['SerializeToString_s']:.2f} s, "
                       f"one `ByteSize()` {pc['ByteSize_s']:.2f} s (protobuf backend {pc['backend']}"
                       + ("; each whole-model `ByteSize()` costs about one serialization" if uses_bytesize else "")
                       + f") and `onnx.checker.check_model` {pc['checker_full_s']:.2f} s with full_check "
                       f"({pc['checker_basic_s']:.2f} s without).")
        if top:
            def called_from(t):
                cs = t.get("callers") or []
                return f", mostly from `{cs[0]['caller']}`" if cs else ""
            out.append("By own time under cProfile the heaviest functions are "
                       + "; ".join(f"`{t['function']}` ({t['own_s']:.2f} s in {t['ncalls']} "
                                   f"call{'s' if t['ncalls'] != 1 else ''}{called_from(t)})" for t in top[:4])
                       + ".")
    bn_total = model["bn_nodes"]
    others = [k for k in m if k not in (*BNFOLD_KEYS, "floor")]
    counts = [(k, m[k]["bn_left"]) for k in (*BNFOLD_KEYS, *others) if m.get(k, {}).get("bn_left") is not None]
    if counts:
        out.append(f"BatchNorm nodes left of {bn_total}: " + ", ".join(f"{k} {n}" for k, n in counts) + ".")
    if any(n == bn_total for k, n in counts if k in others):
        computed = {k: v for k, v in model.get("conv_bias_before_bn", {}).items()
                    if k.startswith("Conv bias computed")}
        if computed:
            out.append("The tools that left every BatchNorm in place fuse only a Conv whose bias is absent or a "
                       "constant initializer; in this export the Conv before each BatchNorm has a computed bias ("
                       + ", ".join(f"{v} of {bn_total}: {k}" for k, v in computed.items())
                       + "; the exporter's zero bias, Expand of a CastLike that takes its type from the graph input, "
                       "which their constant folding does not remove), so the pattern never matches.")
    for k in others:
        if m[k].get("error"):
            out.append(f"{k}: {m[k]['error']}.")
    bad = [k for k in m if m[k].get("matches") is False]
    if bad:
        out.append("Numerical mismatch (beyond tolerance) for: " + ", ".join(bad) + ".")
    elif any("matches" in r for r in m.values()):
        out.append("Every produced model matches the unfolded one in onnxruntime within tolerance "
                   f"({res['numerics']['tolerance']}).")
    return out


def write_markdown(res: dict, path: Path) -> None:
    s, model, m = res["setup"], res["model"], res["methods"]
    v = s["versions"]
    lines = ["# bnfold fold speed: ResNet-50, file to file", ""]
    lines.append(f"Generated by `benchmarks/fold_speed.py` on {s['date']}.")
    if s.get("bnfold_source_changed_during_run"):
        lines += ["", "> **Warning:** bnfold's source changed while this benchmark ran (digest "
                  f"{s.get('bnfold_source_sha256_start')} → {s.get('bnfold_source_sha256_end')}); the numbers mix "
                  "versions. Rerun."]
    lines += ["", "## Setup", ""]
    lines.append(f"- CPU: {s['cpu']}, {s['cores']} cores ({s['cores_usable']} usable); {s['platform']}")
    if s.get("loadavg_start") and s.get("loadavg_end"):
        lines.append(f"- System load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in s['loadavg_start'])}, "
                     f"at end {'/'.join(f'{x:.2f}' for x in s['loadavg_end'])} (other processes share the machine; "
                     "interleaving spreads their effect over all methods)")
    lines.append(f"- Python {s['python']}; " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in v))
    lines.append(f"- bnfold at commit {s['git_commit']}"
                 f"{' (bnfold/ had uncommitted changes)' if s['bnfold_tree_dirty'] else ''}, "
                 f"source digest {s.get('bnfold_source_sha256_start')}")
    variant = model.get("variant", "raw")
    how = ("as is (every bias-less conv gets a zero bias the graph computes at run time)" if variant == "raw" else
           "with those computed conv constants materialized as initializers (`bnfold export`'s default)")
    lines.append(f"- Model: zoo `{MODEL_NAME}`, randomized BN statistics, dynamo export with `optimize=False` {how}: "
                 f"{model['size_bytes'] / 1e6:.1f} MB, {model['parameters'] / 1e6:.1f} M parameters, "
                 f"{model['nodes']} nodes, {model['bn_nodes']} BatchNormalization, opset {model['opset']}")
    lines.append(f"- Timing: whole file-to-file operation (load, process, save). Warm: {s['reps']} repetition(s) "
                 "per method in one process, interleaved round-robin (rotating start), one untimed warm-up each. "
                 f"Cold: {s.get('cold_reps')} runs per method, each in a fresh process, interleaved the same way. "
                 "`gc.collect()` + `os.sync()` (untimed) before each run")
    lines.append(f"- Numerics: onnxruntime CPUExecutionProvider, ORT_DISABLE_ALL, {res['numerics']['input']}; "
                 f"largest |output| of the reference {res['numerics']['ref_max_abs_output']:.3g}")
    lines += ["", "## Results", ""]
    lines.append("| method | median s | min s | × floor (median) | × floor (min) | cold median s | × floor (cold) "
                 "| BN left | output MB | max abs err | peak RSS MB | RSS of the op MB |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, r in m.items():
        label = METHODS[k].label
        if r.get("error") and r.get("median_s") is None:
            label += f" — **failed**: {r['error']}"
        lines.append(f"| {label} | {_fmt_s(r.get('median_s'))} | {_fmt_s(r.get('min_s'))} | "
                     f"{_fmt_ratio(r.get('ratio_median'))} | {_fmt_ratio(r.get('ratio_min'))} | "
                     f"{_fmt_s(r.get('cold_median_s'))} | {_fmt_ratio(r.get('cold_ratio_median'))} | "
                     f"{r.get('bn_left', '—')} | {_mb(r.get('output_bytes'))} | "
                     f"{_fmt_err(r.get('max_abs_err'))} | {_kb_mb(r.get('peak_rss_kb'))} | {_kb_mb(r.get('op_rss_kb'))} |")
    lines.append("")
    lines.append(f"Target: bnfold ≤ {TARGET_RATIO}× the floor. \"median/min\" are warm runs in one process; "
                 f"\"cold\" is the median of {s.get('cold_reps')} runs, each the first operation of a fresh process "
                 "(imports not timed), as with the command line. Peak RSS is the cold child's own VmHWM (median, read in the child; not `ru_maxrss`, which a child inherits from its parent), "
                 "imports included; \"RSS of the op\" is the peak minus the peak right after the imports. Model "
                 f"size on disk: {model['size_bytes'] / 1e6:.1f} MB.")
    lines += ["", "## What the numbers say", "", " ".join(build_summary(res))]
    mem = res.get("memory")
    if mem:
        lines += ["", mem["sentence"]]
    prof = res.get("profile")
    if prof:
        lines += ["", "## Where bnfold spends its time", ""]
        lines.append(f"Stage timers wrapped around `bnfold.fold_onnx_file(src, dst)` (check on), median of "
                     f"{prof['runs']} runs; total {prof['total_median_s']:.3f} s. Nesting is as observed at run "
                     "time: an indented row is called from the row above it; \"rest of X\" is the time X spends "
                     "outside its timed parts.")
        lines += ["", "| stage | median s | share |", "|---|---:|---:|"]
        for st in prof["stages"]:
            name = st["stage"]
            name = name if name.startswith(("rest of", "other")) else f"`{name}`"
            lines.append(f"| {'&nbsp;' * 4 * st['depth']}{name} | {st['median_s']:.3f} | {st['share']:.0%} |")
        pc = prof.get("protobuf_costs")
        if pc:
            lines.append("")
            lines.append(f"Single calls on the loaded model (protobuf backend `{pc['backend']}`): `ByteSize()` "
                         f"{pc['ByteSize_s']:.3f} s, `SerializeToString()` {pc['SerializeToString_s']:.3f} s, "
                         f"`onnx.checker.check_model` {pc['checker_full_s']:.3f} s (full_check) / "
                         f"{pc['checker_basic_s']:.3f} s (basic).")
        cp = prof["cprofile"]
        lines += ["", f"cProfile of one run (total {cp['total_s']:.2f} s under the profiler), top functions by own "
                  "time:", ""]
        lines += ["| function | calls | own s | cumulative s | main callers (own s spent for them) |",
                  "|---|---:|---:|---:|---|"]
        for t in cp["top_by_own_time"][:12]:
            who = "; ".join(f"`{c['caller']}` ({c['own_s']:.3f})" for c in t.get("callers", []))
            lines.append(f"| `{t['function']}` | {t['ncalls']} | {t['own_s']:.3f} | {t['cum_s']:.3f} | {who} |")
    lines += ["", f"Reproduce: `python benchmarks/fold_speed.py --reps {s['reps']} --cold-reps {s.get('cold_reps')}`"]
    path.write_text("\n".join(lines) + "\n")


def memory_summary(model: dict, child: dict[str, dict]) -> dict | None:
    """Peak RSS of the bnfold folds against load+save and the model size."""
    fl = child.get("floor", {})
    if "op_rss_kb" not in fl or not any("op_rss_kb" in child.get(k, {}) for k in BNFOLD_KEYS):
        return None
    size = model["size_bytes"]
    mem: dict = {"model_bytes": size, "floor_peak_rss_kb": fl["peak_rss_kb"], "floor_op_rss_kb": fl["op_rss_kb"]}
    parts = [f"Peak memory (fresh process each, model {size / 1e6:.0f} MB on disk): load+save peaks at "
             f"{fl['peak_rss_kb'] * 1024 / 1e6:.0f} MB ({fl['op_rss_kb'] * 1024 / 1e6:.0f} MB above its imports, "
             f"{fl['op_rss_kb'] * 1024 / size:.1f}× the file)"]
    for k in BNFOLD_KEYS:
        c = child.get(k, {})
        if "op_rss_kb" not in c:
            continue
        mem[k] = {"peak_rss_kb": c["peak_rss_kb"], "op_rss_kb": c["op_rss_kb"],
                  "op_vs_floor": c["op_rss_kb"] / fl["op_rss_kb"] if fl["op_rss_kb"] > 0 else None,
                  "op_vs_model_size": c["op_rss_kb"] * 1024 / size}
        vs_floor = f", {mem[k]['op_vs_floor']:.1f}× what load+save needs" if mem[k]["op_vs_floor"] else ""
        parts.append(f"{METHODS[k].label} peaks at {c['peak_rss_kb'] * 1024 / 1e6:.0f} MB "
                     f"({c['op_rss_kb'] * 1024 / 1e6:.0f} MB above its imports: "
                     f"{mem[k]['op_vs_model_size']:.1f}× the file{vs_floor})")
    mem["sentence"] = "; ".join(parts) + "."
    return mem


# ---------------------------------------------------------------------------------------------- main
def chain_only(args) -> int:
    """``--chain-only``: the node-count study alone, in process and as commands (``fold_speed_chain.*``)."""
    sizes = [int(x) for x in args.chain.split(",") if x.strip()]
    ckeys = [k.strip() for k in args.chain_methods.split(",") if k.strip() in METHODS]
    with tempfile.TemporaryDirectory(prefix="fold_speed.", dir=args.tmp_dir) as tmp:
        results: dict = {"benchmark": "fold_speed_chain", "setup": environment(args.reps, 0)}
        results["setup"]["bnfold_source_sha256_start"] = bnfold_source_digest()
        results["chain"] = chain_scaling(sizes, ckeys, Path(tmp), max(1, args.reps),
                                         command_reps=max(0, args.command_reps))
        if args.instructions:
            results["chain"]["instructions"] = chain_instructions(sizes, Path(tmp))
        results["setup"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        changed = bnfold_source_digest() != results["setup"]["bnfold_source_sha256_start"]
        results["setup"]["bnfold_source_changed_during_run"] = changed
    json_path, md_path = args.out / "fold_speed_chain.json", args.out / "fold_speed_chain.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    setup = results["setup"]
    head = ["# Fold speed: node-count scaling", "",
            f"Load average (1, 5, 15 min) at start / end: {setup.get('loadavg_start')} / {setup.get('loadavg_end')}; "
            f"git {setup.get('git_commit')}"
            + ("; **bnfold's source changed during the run: rerun**" if changed else "") + "."]
    md_path.write_text("\n".join(head + chain_markdown(results["chain"])) + "\n")
    log(f"wrote {json_path} and {md_path}")
    return 0


def _byte_compile_bnfold() -> None:
    """Write bnfold's bytecode before timing fresh processes, as ``pip install`` does: an editable checkout run
    with PYTHONDONTWRITEBYTECODE (as on the project's machine) otherwise compiles bnfold's source in every
    process, about 70 ms that no installed copy pays."""
    import compileall

    import bnfold
    import bnfold.cli

    for mod in (bnfold, bnfold.cli):
        compileall.compile_dir(str(Path(mod.__file__).parent), quiet=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per method (default 5)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for fold_speed.json/.md")
    ap.add_argument("--cache-dir", type=Path, default=HERE / ".cache", help="where the exported model is cached")
    ap.add_argument("--refresh-cache", action="store_true", help="re-export the model even if cached")
    ap.add_argument("--tmp-dir", type=Path, default=None, help="parent of the scratch folder (default: system temp)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of: " + ", ".join(METHODS) + " (floor is always run)")
    ap.add_argument("--cold-reps", type=int, default=3,
                    help="runs per method in fresh subprocesses, for cold time and peak RSS; 0 skips them and the "
                         "crash guard (default 3)")
    ap.add_argument("--no-profile", action="store_true", help="skip the stage timing and cProfile of bnfold")
    ap.add_argument("--command-reps", type=int, default=5,
                    help="runs of `bnfold fold` and of the load+save floor as commands (fresh processes); 0 skips")
    ap.add_argument("--startup-reps", type=int, default=5,
                    help="runs of each command on a tiny model against the import floor; 0 skips")
    ap.add_argument("--chain", default="750,1500,3000,6000",
                    help="sizes of the Conv+BN chains for the node-count scaling study ('' skips it)")
    ap.add_argument("--chain-methods", default="floor,bnfold,ort_offline",
                    help="methods timed on the chains (the Python optimizers take minutes there)")
    ap.add_argument("--instructions", action="store_true",
                    help="with --chain-only: also count the instructions of each chain's fold under valgrind's "
                         "callgrind (minutes; a load-independent check of linearity)")
    ap.add_argument("--chain-only", action="store_true",
                    help="only the chain study (no ResNet-50, no torch): writes fold_speed_chain.json/.md")
    # internal modes, used by the benchmark's own subprocesses
    ap.add_argument("--run-one", nargs=3, metavar=("METHOD", "SRC", "DST"), help=argparse.SUPPRESS)
    ap.add_argument("--export-to", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=("raw", "clean"), default="raw",
                    help="raw: torch's optimize=False export as is; clean: computed conv constants materialized "
                         "(results go to fold_speed_clean.*)")
    args = ap.parse_args(argv)
    _byte_compile_bnfold()

    if args.run_one:
        run_one(*args.run_one)
        return 0
    if args.export_to:
        _export_model(args.export_to, args.variant)
        return 0
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.cold_reps < 0:
        ap.error("--cold-reps must be at least 0")
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        ap.error(f"unknown method(s): {', '.join(unknown)}")
    keys = ["floor", *[k for k in keys if k != "floor"]]

    args.out.mkdir(parents=True, exist_ok=True)
    if args.chain_only:
        return chain_only(args)
    with tempfile.TemporaryDirectory(prefix="fold_speed.", dir=args.tmp_dir) as tmp:
        work = Path(tmp)
        src, cache_meta = prepare_model(args.cache_dir, work, args.refresh_cache, args.variant)
        model = describe_model(src)
        model["export_s"] = cache_meta.get("export_s")
        model["variant"] = args.variant
        log(f"model: {model['size_bytes'] / 1e6:.1f} MB, {model['bn_nodes']} BatchNormalization nodes")
        outs = {k: work / f"out_{k}.onnx" for k in keys}
        results: dict = {"benchmark": "fold_speed", "setup": environment(args.reps, args.cold_reps), "model": model,
                         "target_ratio": TARGET_RATIO}

        child: dict[str, dict] = {}
        if args.cold_reps > 0:
            log(f"cold runs: {args.cold_reps} interleaved rounds, each run in a fresh subprocess (time, peak RSS)")
            child = cold_runs(keys, src, outs, work, args.cold_reps)
        timed_keys = [k for k in keys if "error" not in child.get(k, {})]
        log(f"timing {', '.join(timed_keys)}: {args.reps} interleaved rounds")
        timing = time_methods(timed_keys, src, outs, args.reps)

        log("checking outputs (BN count, size, onnxruntime numerics)")
        numerics = check_outputs(src, {k: outs[k] for k in timed_keys})
        results["numerics"] = {k: v for k, v in numerics.items() if k != "per_method"}

        methods: dict[str, dict] = {}
        floor_med = timing.get("floor", {}).get("median_s")
        floor_min = timing.get("floor", {}).get("min_s")
        for k in keys:
            r: dict = {"label": METHODS[k].label, "version": _version(METHODS[k].package or "")}
            r.update(timing.get(k, {}))
            c = child.get(k, {})
            if c.get("error"):
                r["error"] = c["error"]
            for field in ("peak_rss_kb", "rss_after_import_kb", "op_rss_kb"):
                if field in c:
                    r[field] = c[field]
            r.update({f: c[f] for f in ("cold_times_s", "cold_median_s", "cold_min_s") if f in c})
            chk = numerics["per_method"].get(k, {})
            for field in ("bn_left", "output_bytes", "max_abs_err", "matches"):
                if field in chk:
                    r[field] = chk[field]
            if "error" in chk:
                r["check_error"] = chk["error"]
            if r.get("median_s") is not None and floor_med:
                r["ratio_median"] = r["median_s"] / floor_med
                r["ratio_min"] = r["min_s"] / floor_min
            cold_floor = child.get("floor", {}).get("cold_median_s")
            if r.get("cold_median_s") is not None and cold_floor:
                r["cold_ratio_median"] = r["cold_median_s"] / cold_floor
            if k in BNFOLD_KEYS and "ratio_median" in r:
                r["meets_target"] = r["ratio_median"] <= TARGET_RATIO
            methods[k] = r
        results["methods"] = methods
        mem = memory_summary(model, child)
        if mem:
            results["memory"] = mem

        if args.command_reps > 0:
            log(f"as commands: {args.command_reps} interleaved rounds of fresh processes")
            results["commands"] = command_runs(src, work, args.command_reps)
        if args.startup_reps > 0:
            log(f"start-up: {args.startup_reps} interleaved rounds of each command on a tiny model")
            results["startup"] = startup_runs(work, args.startup_reps)

        if not args.no_profile and methods.get("bnfold", {}).get("median_s") is not None:
            log("profiling bnfold.fold_onnx_file (stage timers, then cProfile)")
            results["profile"] = profile_bnfold(src, work / "out_profile.onnx", max(3, min(args.reps, 5)))
        sizes = [int(x) for x in args.chain.split(",") if x.strip()]
        if sizes:
            ckeys = [k.strip() for k in args.chain_methods.split(",") if k.strip() in METHODS]
            results["chain"] = chain_scaling(sizes, ckeys, work, max(1, min(args.reps, 3)),
                                             command_reps=max(0, min(args.command_reps, 3)))
        results["setup"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        results["setup"]["bnfold_source_sha256_end"] = end_digest = bnfold_source_digest()
        changed = end_digest != results["setup"]["bnfold_source_sha256_start"]
        results["setup"]["bnfold_source_changed_during_run"] = changed
        if changed:
            log("WARNING: bnfold's source changed while the benchmark ran; the numbers mix versions: rerun")
        results["summary"] = build_summary(results)

    stem = "fold_speed" if args.variant == "raw" else f"fold_speed_{args.variant}"
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, md_path)
    extra = commands_markdown(results.get("commands"), results.get("startup"))
    if results.get("chain"):
        extra += chain_markdown(results["chain"])
    if extra:
        with md_path.open("a") as fh:
            fh.write("\n".join(extra) + "\n")
    log(f"wrote {json_path} and {md_path}")
    for line in results["summary"]:
        log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
