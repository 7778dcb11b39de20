"""The whole job in one call: (recalibrate) -> fold -> export -> verify -> benchmark -> report.

``run_pipeline`` writes into an output folder ``original.onnx`` (BatchNorm kept), ``folded.onnx``,
``report.json``, ``report.md`` (readable on its own) and ``latency.png``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bnfold._version import __version__
from bnfold.errors import BnfoldError
from bnfold.onnx_io import save_model, write_text_atomic
from bnfold.outputs import OutputPlan, markdown_text, printable, strict_json

log = logging.getLogger(__name__)

FILES = ("original.onnx", "folded.onnx", "report.json", "report.md", "latency.png")


@dataclass
class RunOptions:
    eps: list[str] = field(default_factory=lambda: ["cpu"])
    opt_levels: list[str] = field(default_factory=lambda: ["off", "all"])
    batches: list[int] = field(default_factory=lambda: [1])
    warmup: int = 5
    iters: int = 50
    threads: int | None = None
    atol: float | None = None
    rtol: float | None = None
    sessions: int | None = None
    #: name a latency difference only beyond this fraction (and when its interval excludes 1)
    min_effect: float = 0.02
    #: reduced precision (bnfold.precision): fold straight into fp16/bf16; io in it too; fail instead of fp32
    dtype: str | None = None
    io_dtype: bool = False
    strict_range: bool = False
    #: providers `--ep auto` left out, with why (see :func:`bnfold.runtime.resolve_providers`): in the verdict
    eps_skipped: dict = field(default_factory=dict)
    #: PyTorch models: call the modules' own deploy switches before folding (the reference stays as given)
    reparameterize: bool = False


def run_pipeline(model, outdir: str | Path, *, name: str, example_inputs: tuple | None = None,
                 input_names: list[str] | None = None, data=None, calibrate_batches=None,
                 options: RunOptions | None = None, extra: dict | None = None, step=None,
                 bench_hooks: dict | None = None, provenance: dict | None = None) -> dict:
    """Run the flow on ``model`` (an ``onnx.ModelProto`` or a torch ``nn.Module`` with ``example_inputs``).
    ``data`` is a :class:`bnfold.data.Dataset` shaped for the model (for accuracy), ``calibrate_batches`` an
    iterable of input batches for Algorithm 2 recalibration (torch models). ``step(msg)`` reports progress;
    ``bench_hooks`` (``on_plan``/``progress``) go to :func:`bnfold.bench.bench`.
    ``provenance`` (:func:`bnfold.provenance.provenance`) goes into the report and both models' metadata.
    Returns the report dict (also written to ``report.json``)."""
    from bnfold import provenance as prov_mod
    from bnfold.bench import bench, comparisons, machine_flags, plot
    from bnfold.verify import verify

    options = options or RunOptions()
    if data is not None:  # the data must fit before the first file is written
        _check_run_data(model, data, example_inputs, input_names)
    out = Path(outdir)
    OutputPlan().write_folder(out, FILES, "output folder", models=FILES[:2]).check()
    out.mkdir(parents=True, exist_ok=True)
    step = step or (lambda msg: log.info(msg))
    timings: dict[str, float] = {}
    report: dict = {"bnfold": __version__, "model": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "files": {}, **(extra or {})}
    if provenance is not None:
        report["provenance"] = provenance

    def timed(key):
        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timings[key] = round(time.perf_counter() - self.t, 3)
        return _T()

    is_onnx = isinstance(model, onnx.ModelProto)
    if calibrate_batches is not None:
        if is_onnx:
            raise BnfoldError("--calibrate-data needs a PyTorch model (an ONNX graph cannot be recalibrated)")
        from bnfold.calibrate import population_statistics
        step("recalibrating BatchNorm statistics (Algorithm 2)")
        with timed("calibrate"):
            cal = population_statistics(model, calibrate_batches)
        report["calibration"] = cal.summary()
    step("folding" + (f" into {options.dtype}" if options.dtype else ""))
    with timed("fold"):
        if options.dtype:
            from bnfold.precision import PrecisionOptions, fold_to_dtype
            prec = PrecisionOptions(dtype=options.dtype, io_dtype=options.io_dtype,
                                    strict_range=options.strict_range, data=data)
            if not is_onnx:  # the ONNX pass folds the export in float64 straight into the dtype
                from bnfold.export import export_onnx
                model = export_onnx(model, example_inputs, input_names=input_names, keep_bn=True)
            original = model
            folded, fold_report = fold_to_dtype(model, precision=prec, name=name)
        elif is_onnx:
            from bnfold.onnx_fold import fold_model
            original = model
            folded, fold_report = fold_model(model, name=name)
            prov_mod.record(folded, provenance)
        else:
            from bnfold.export import export_onnx
            from bnfold.fold import fold_torch
            original = export_onnx(model, example_inputs, input_names=input_names, keep_bn=True)
            _, fold_report = fold_torch(model, example_inputs, out / "folded.onnx", input_names=input_names,
                                        provenance=provenance, reparameterize=options.reparameterize)
            folded = None
            prov_mod.record(original, provenance)
    save_model(original, out / "original.onnx")
    if folded is not None:
        save_model(folded, out / "folded.onnx")
    report["fold"] = fold_report.to_dict()
    step("verifying")
    with timed("verify"):
        result = verify(out / "original.onnx", out / "folded.onnx", data=data, ep=options.eps[0],
                        atol=options.atol, rtol=options.rtol)
    report["verify"] = result.to_dict()
    report["verify"]["verdict"] = result.verdict()
    step("benchmarking original vs folded")
    with timed("bench"):
        run = bench([out / "original.onnx", out / "folded.onnx"], eps=options.eps, opt_levels=options.opt_levels,
                    batches=options.batches, warmup=options.warmup, iters=options.iters, threads=options.threads,
                    sessions=options.sessions, min_effect=options.min_effect, **(bench_hooks or {}))
    report["bench"] = run.to_dict()
    report["latency"] = {"comparisons": comparisons(run), "flags": machine_flags(run), "min_effect": options.min_effect}
    plot(run, out / "latency.png")
    report["providers_skipped"] = dict(options.eps_skipped)
    report["timings_s"] = timings
    report["passed"] = bool(result.passed)
    for f in FILES:
        report["files"][f] = str(out / f)
    write_text_atomic(out / "report.json", strict_json(report) + "\n")
    write_text_atomic(out / "report.md", render_markdown(report))
    return report


def headline(report: dict) -> str:
    """What the run proved, in one line: BatchNorms folded, outputs (and accuracy) equal, and a latency
    difference only where its interval excludes 1 and it exceeds the minimum effect; a loaded machine is said."""
    fold, ver = report["fold"], report["verify"]
    worst = max((s["max_abs"] for s in ver["outputs"].values()), default=0.0)
    parts = [f"{fold['folded']}/{fold['bn_total']} BatchNorm folded",
             f"outputs {'equal' if ver['passed'] else 'DIFFER'} (max abs err {worst:.2g})"]
    if ver.get("accuracy"):
        a = ver["accuracy"]
        same = "equal" if a["delta"] == 0 else f"{100 * a['delta']:+.2f} points"
        parts.append(f"accuracy {same} ({100 * a['reference']:.2f}% -> {100 * a['candidate']:.2f}%)")
    elif ver.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {100 * ver['top1_agreement']:.2f}%")
    lat = report.get("latency") or {}
    comps = lat.get("comparisons", [])
    named = [c for c in comps if c["verdict"] != "none"]
    rest = [c for c in comps if c["verdict"] == "none"]
    if len(comps) <= 4:
        shown = comps
    else:
        shown = named
    if shown:
        parts.append("latency folded/original: " + ", ".join(f"{c['setting']} {c['text']}" for c in shown))
    if rest and len(comps) > 4:
        lo, hi = min(c["ci95"][0] for c in rest), max(c["ci95"][1] for c in rest)
        parts.append(f"no measurable latency difference in {'the other ' if named else ''}{len(rest)} settings "
                     f"(intervals within [{lo:.2f}, {hi:.2f}])")
    parts += lat.get("flags", [])
    parts += [f"skipped {ep} ({why})" for ep, why in (report.get("providers_skipped") or {}).items()]
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ markdown
def _fmt(x: float) -> str:
    return f"{x:.3g}"


def render_markdown(r: dict) -> str:
    fold, ver, bench = r["fold"], r["verify"], r["bench"]
    env = bench["env"]
    cfg = bench["config"]
    lines = [f"# bnfold report: {markdown_text(r['model'])}", "",
             f"{'**PASSED**' if r['passed'] else '**FAILED**'}: {fold['folded']} of {fold['bn_total']} BatchNorm folded, "
             f"{fold['skipped']} skipped; the folded model {'matches' if ver['passed'] else 'does NOT match'} the "
             f"original on {ver['samples']} samples ({ver['inputs']}).", "",
             f"In one line: {headline(r)}.", "",
             f"Generated by bnfold {r['bnfold']} on {r['date']}.", ""]
    if r.get("provenance"):
        p = r["provenance"]
        lines += [f"Model: `{printable(p.get('model')).replace('`', chr(39))}`; weights: "
                  f"{markdown_text(p.get('weights'))}; BatchNorm statistics: {markdown_text(p.get('statistics'))}.",
                  ""]
    if r.get("training"):
        t = r["training"]
        lines += ["## Model", "", f"Zoo model `{t['model']}` trained on {t['data']} for {t['epochs']} epochs "
                  f"(lr {t['lr']}, batch {t['batch_size']}, seed {t['seed']}); BN statistics are Algorithm 2 "
                  f"population statistics over the training set ({t['calibration']['batches']} batches); "
                  f"held-out test accuracy {100 * t['test_accuracy']:.2f}%.", ""]
    if fold.get("precision"):
        lines += _precision_markdown(fold["precision"])
    if r.get("calibration"):
        c = r["calibration"]
        lines += [f"BatchNorm statistics recalibrated before folding ({c['method']}, {c['batches']} batches, "
                  f"{c['samples']} samples).", ""]
    lines += ["## What was folded", "",
              "Each BatchNorm: folded into which layer (backward = into the layer before it, forward = into the "
              "layer after it), or skipped and why.", "",
              "| BatchNorm | result | into | reason | detail |", "|---|---|---|---|---|"]
    for e in fold["entries"]:
        name = markdown_text(e.get("layer") or e["bn"])
        if e["status"] == "folded":
            lines.append(f"| {name} | folded ({e['direction']}) | {markdown_text(e.get('into_layer') or e['into'])} | | |")
        else:
            lines.append(f"| {name} | **skipped** | | `{e['reason']}` | {markdown_text(e['message'])} |")
    if fold.get("reparameterized"):
        from bnfold.torch_fold import describe_switches
        lines += ["", f"Before folding, the model's own deploy switches were called: "
                  f"{markdown_text(describe_switches(fold['reparameterized']['modules']))}."]
    if fold.get("onnx_pass"):
        op = fold["onnx_pass"]
        lines += ["", f"After export, the ONNX pass saw {op['bn_total']} BatchNormalization left and folded "
                  f"{op['folded']} of them."]
    lines += ["", "## Numerical agreement", "",
              f"Reference: `original.onnx` run by ONNX Runtime with graph optimizations off (so the runtime cannot "
              f"fold BN itself); candidate: `folded.onnx`. Inputs: {ver['samples']} samples ({ver['inputs']}). "
              f"Providers: reference {', '.join(ver['providers']['reference'])}, candidate "
              f"{', '.join(ver['providers']['candidate'])}.", "",
              "| output | max abs err | mean abs err | p99 abs err | max rel err | cosine | tolerance | ok |",
              "|---|---:|---:|---:|---:|---:|---|---|"]
    for name, s in ver["outputs"].items():
        cos = "NaN" if s["cosine"] is None else f"{s['cosine']:.6f}"
        lines.append(f"| {markdown_text(name)} | {_fmt(s['max_abs'])} | {_fmt(s['mean_abs'])} | {_fmt(s['p99_abs'])} | "
                     f"{_fmt(s['max_rel'])} | {cos} | {_fmt(s['atol'])} + {s['rtol']:.0e}·abs(ref) | "
                     f"{'yes' if s['passed'] else '**no**'} |")
    lines.append("")
    if ver.get("top1_agreement") is not None:
        lines.append(f"Top-1 agreement between original and folded: {100 * ver['top1_agreement']:.2f}%.")
    if ver.get("accuracy"):
        a = ver["accuracy"]
        lines.append(f"Accuracy on the labelled data: original {100 * a['reference']:.2f}%, folded "
                     f"{100 * a['candidate']:.2f}% (delta {100 * a['delta']:+.2f} points).")
    if ver.get("first_divergence"):
        fd = ver["first_divergence"]
        lines.append(f"First divergence: node {markdown_text(fd['node'])} (layer {markdown_text(fd.get('layer'))}), "
                     f"fold of {markdown_text(fd.get('fold'))}.")
    verdict = printable(ver["verdict"]).replace("`", "'")  # shown in a code span
    lines += ["", f"Verdict: `{verdict}`", "", "## Latency", "",
              f"Original and folded timed side by side on the same session settings, in {cfg.get('sessions')} fresh "
              f"sessions per setting (each {cfg.get('rounds_per_session')} rounds"
              + (f" and at least {cfg.get('min_session_s')} s long" if cfg.get('min_session_s') else "")
              + "; every round runs both, in "
              f"balanced order: original first in half the rounds), warm-up {cfg['warmup']} runs per session, "
              f"threads {cfg['threads'] or 'runtime default'}, ORT intra-op spinning "
              f"{'on' if cfg.get('spin') else 'off'}, IO binding "
              f"{'on GPU providers' if cfg['io_binding'] is None else cfg['io_binding']}. Intervals are 95% "
              "Student's t intervals over the sessions' own estimates (session medians; for ratios, per-round "
              "ratios' medians), so they include the session-to-session variation; the ratio pairs the two "
              "models round by round. "
              f"A difference is named only when its interval excludes 1 and it exceeds "
              f"{100 * r.get('latency', {}).get('min_effect', 0.02):g}%. "
              "Optimization level `off` is ORT_DISABLE_ALL; from `basic` on, ONNX Runtime folds Conv+BN itself, so "
              "at those levels original and folded should run alike, and the gain of folding offline (what "
              "runtimes that do not fold see: ORT with optimizations off, PyTorch eager, many edge runtimes) "
              "shows at `off`.", ""]
    for c in r.get("latency", {}).get("comparisons", []):
        lines.append(f"- folded/original, {c['setting']}: **{c['text']}**")
    for f in r.get("latency", {}).get("flags", []):
        lines.append(f"- **{f}**: small differences on this run are not evidence")
    lines += ["", "| model | provider | opt level | batch | p50 ms | 95% CI of p50 | p90 ms | p99 ms | sessions | "
              "ratio to original [95% CI] |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in bench["results"]:
        ratio = "" if x["ratio"] is None else f"{x['ratio']:.3f} [{x['ratio_ci95'][0]:.3f}, {x['ratio_ci95'][1]:.3f}]"
        lines.append(f"| {markdown_text(Path(x['model']).name)} | {', '.join(x['providers'][:1])} | {x['opt_level']} | {x['batch']} | "
                     f"{x['p50_ms']:.3f} | {x['ci95_ms'][0]:.3f}-{x['ci95_ms'][1]:.3f} | {x['p90_ms']:.3f} | "
                     f"{x['p99_ms']:.3f} | {x.get('sessions', 1)} | {ratio} |")
    for s in bench.get("skipped", []):
        lines.append(f"\nSkipped {s['ep']} (opt {s['opt_level']}, batch {s['batch']}): {markdown_text(s['reason'])}")
    lines += ["", "![latency](latency.png)", "", "## Environment", "",
              f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} cores); GPU: {env.get('gpu', 'none')}",
              f"- {env.get('platform')}; Python {env.get('python')}; ONNX Runtime {env.get('onnxruntime')}; "
              f"torch {env.get('torch', 'n/a')}; bnfold {r['bnfold']}",
              f"- Load average (1, 5, 15 min) at the benchmark's start / end: {cfg.get('load_start')} / "
              f"{cfg.get('load_end')}",
              f"- Step times (s): {', '.join(f'{k} {v}' for k, v in r['timings_s'].items())}", "",
              "## Files", "", "- `original.onnx`: the model with its BatchNorms (the reference)",
              "- `folded.onnx`: the folded model", "- `report.json`: everything on this page, machine-readable",
              "- `latency.png`: the latency plot", ""]
    return "\n".join(lines)


def _precision_markdown(p: dict) -> list[str]:
    lines = ["## Reduced precision", "",
             f"Folded in float64 and written in {p['dtype']} (every folded parameter rounded once; inputs and "
             f"outputs {p['io_dtype']}). {markdown_text(p['summary'])}. Activations measured on "
             f"{markdown_text(p['activations_from'])}, headroom x{p['headroom']:g} against the largest finite "
             f"{p['dtype']} value {p['max_finite']:.6g}.", ""]
    rows = [x for x in p["layers"] if x["runs_in"] == "fp32" or x["subnormal"] or x["zero"]]
    if rows:
        lines += ["| node | runs in | reason | max abs weight | max abs output | subnormal | zero | worst channel |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for x in rows:
            lines.append(f"| {markdown_text(x['node'])} ({x['op']}) | {x['runs_in']} | {x['reason'] or ''} | "
                         f"{'' if x['weight_max'] is None else _fmt(x['weight_max'])} | "
                         f"{'' if x['output_max'] is None else _fmt(x['output_max'])} | {x['subnormal']} | "
                         f"{x['zero']} | {'' if x['worst_channel'] is None else x['worst_channel']} |")
        lines.append("")
    return lines


def digits_for(shape: tuple):
    """The bundled digits' held-out split shaped for a model input (flat, or upsampled images), with labels."""
    from bnfold.data import Dataset, load_digits
    from bnfold.train import prepare

    d = load_digits("test")  # the held-out split train reports on, as `--data digits` everywhere
    x, y = prepare(d, shape)
    return Dataset({"x": x.numpy().astype(np.float32)}, y.numpy(), d.name)



def _check_run_data(model, data, example_inputs, input_names) -> None:
    from bnfold.verify import check_data, model_input_shapes

    if isinstance(model, onnx.ModelProto):
        inputs = model_input_shapes(model)
    else:
        names = input_names or (["input"] if len(example_inputs) == 1 else
                                [f"input_{i}" for i in range(len(example_inputs))])
        inputs = [(n, tuple(x.shape), np.float32) for n, x in zip(names, example_inputs)]
    check_data(inputs, data)


@dataclass
class RunInputs:
    """What `bnfold run` feeds :func:`run_pipeline`, prepared (and checked) before anything is written."""

    model: object
    name: str
    example_inputs: tuple | None = None
    input_names: list[str] | None = None
    data: object = None
    calibrate_batches: list | None = None
    provenance: dict | None = None


def prepare_run(model: str, *, data: str | None = None, calibrate_data: str | None = None, weights=None,
                input_shapes: list[str] | None = None, trust_pickle: bool = False, layout: str = "nchw",
                calibrate_batch_size: int = 64, random_weights: bool = False) -> RunInputs:
    """Load MODEL (an .onnx file or a PyTorch spec) and its ``--data``/``--calibrate-data``, shaped for the
    model (``layout``: how .npz arrays are laid out); raises :class:`BnfoldError` on bad input, writes
    nothing. ``weights``: a file or a :class:`bnfold.torch_io.WeightsSource` (the policy of
    :func:`bnfold.torch_io.choose_weights` applies)."""
    from bnfold.data import load_for_model
    from bnfold.provenance import provenance
    from bnfold.specs import is_onnx_path
    from bnfold.torch_io import WeightsSource, choose_weights, load_torch_model

    if is_onnx_path(model):
        from bnfold.onnx_io import load_model
        from bnfold.verify import load_data_for
        if calibrate_data:
            raise BnfoldError("--calibrate-data needs a PyTorch model: an ONNX graph cannot be recalibrated")
        proto = load_model(model).model
        dataset = load_data_for(data, proto, layout=layout) if data else None
        return RunInputs(proto, Path(model).name, data=dataset, provenance=provenance(model))
    source = weights if isinstance(weights, WeightsSource) else choose_weights(model, weights, random_weights)
    torch_model, inputs, names = load_torch_model(model, weights=source, trust_pickle=trust_pickle,
                                                  input_shapes=list(input_shapes or []))
    shapes = [(n, tuple(x.shape)) for n, x in zip(names or [None] * len(inputs), inputs)]
    dataset = load_for_model(data, shapes, layout=layout) if data else None
    cal = None
    if calibrate_data:
        from bnfold.calibrate import calibration_batches
        cal_ds, cal = calibration_batches(calibrate_data, shapes[0][1], batch_size=calibrate_batch_size,
                                          layout=layout)
    stats = f"recalibrated by bnfold run (Algorithm 2) over {cal_ds.name}" if calibrate_data else None
    return RunInputs(torch_model, model, inputs, names, dataset, cal,
                     provenance(model, weights=source, statistics=stats))


def run_verdict(report: dict, outdir) -> tuple[bool, str]:
    """The one-line verdict of a :func:`run_pipeline` report: ``(passed, "PASSED | ...")``; what it states is
    :func:`headline`'s (a latency difference only where its interval supports one)."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    return bool(report["passed"]), f"{verdict} | {headline(report)} -> {outdir}/report.md"
