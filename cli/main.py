"""The `bnfold` command."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bnfold import __version__
from bnfold.errors import BnfoldError
from bnfold.fold import fold_onnx_file, fold_torch, inspect_onnx_file, inspect_torch
from bnfold.onnx_fold import FoldOptions
from bnfold.onnx_io import write_text_atomic
from bnfold.outputs import FIGURE_SUFFIXES, OutputPlan, strict_json

from .common import (
    EXIT_FAILED,
    EXIT_OK,
    common_options,
    fold_options,
    json_option,
    out_console,
    reparameterize_option,
    resolve_weights,
    styled,
    torch_model_options,
    verify_options,
    weights_note,
    weights_options,
)


def resolve_providers(eps, **kwargs):
    from bnfold.runtime import resolve_providers as resolve
    return resolve(eps, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="bnfold")
def main():
    """Fold BatchNormalization into neighbouring conv/linear layers, exactly, and show the evidence.

    MODEL is an .onnx file, or a PyTorch factory spec 'package.module:callable' (or a zoo model name)
    with --weights and --input-shape.

    \b
    Examples:
      bnfold inspect model.onnx
      bnfold fold model.onnx -o folded.onnx --report report.json
      bnfold fold torchvision.models:resnet18 --weights r18.pth --input-shape 1x3x224x224 -o r18.onnx
      bnfold verify original.onnx folded.onnx --data digits
    """


def layout_option(f):
    return click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True,
                        help="Layout of image arrays in an .npz --data: channels-first (nchw) or channels-last "
                             "(nhwc). Data that fits the model only after a transpose is refused.")(f)


def _zoo_names() -> list[str]:
    from bnfold.models import zoo
    return zoo.names()


def precision_options(f):
    """--dtype/--io-dtype/--strict-range (reduced precision, bnfold.precision)."""
    f = click.option("--strict-range", is_flag=True,
                     help="With --dtype: exit 1 naming the layers that do not fit the dtype, instead of keeping "
                          "them in fp32.")(f)
    f = click.option("--io-dtype", is_flag=True,
                     help="With --dtype: inputs and outputs in that dtype too (default: they stay fp32, with a "
                          "Cast at each boundary).")(f)
    f = click.option("--dtype", type=click.Choice(["fp16", "bf16"]), default=None,
                     help="Fold in float64 and write the model in this dtype, every folded parameter rounded "
                          "once; layers that would overflow stay fp32 (default: the model's own dtype).")(f)
    return f


def _precision(dtype, io_dtype, strict_range, data=None, input_shape=()):
    """PrecisionOptions for --dtype (None without it); --data (loaded) measures the activations."""
    if dtype is None:
        if io_dtype or strict_range:
            raise click.UsageError("--io-dtype and --strict-range need --dtype fp16|bf16")
        return None
    from bnfold.precision import PrecisionOptions
    from bnfold.specs import parse_input_shape

    shapes = {s.name: s.shape for s in map(parse_input_shape, input_shape or ())}
    return PrecisionOptions(dtype=dtype, io_dtype=io_dtype, strict_range=strict_range, data=data,
                            input_shapes=shapes or None)


def _options(lower_standalone: bool, no_forward: bool, no_affine: bool, no_merge: bool = False) -> FoldOptions:
    return FoldOptions(forward=not no_forward, affine_chains=not no_affine, lower_standalone=lower_standalone,
                       merge_branches=not no_merge)


def _is_onnx(model: str) -> bool:
    from bnfold.specs import is_onnx_path
    return is_onnx_path(model)


def _load_torch(model: str, source, input_shape, trust_pickle):
    """``source``: the WeightsSource :func:`resolve_weights` chose."""
    from bnfold.torch_io import load_torch_model
    loaded = load_torch_model(model, weights=source, trust_pickle=trust_pickle, input_shapes=list(input_shape))
    weights_note(model, source)
    return loaded


def _weights_for(model: str, weights, random_weights: bool):
    """The WeightsSource of a PyTorch MODEL; None for an ONNX MODEL, whose weights are in the file (a
    --weights/--random-weights given with one would be ignored silently: refused)."""
    if not _is_onnx(model):
        return resolve_weights(model, weights, random_weights)
    if weights is not None or random_weights:
        flag = "--weights" if weights is not None else "--random-weights"
        raise BnfoldError(f"{flag} applies to a PyTorch SPEC; {model} is an ONNX model, whose weights are in "
                          "the file: drop the option")
    return None


def _provenance(model: str, source, **extra) -> dict:
    from bnfold.provenance import provenance
    return provenance(model, weights=source, **extra)


def _finish(report, *, json_mode: bool, verdict: str, model: str, report_path: Path | None,
            all_layers: bool = False):
    if report_path is not None:
        write_text_atomic(report_path, strict_json(report.to_dict()) + "\n")
    con = out_console(json_mode)
    if json_mode:
        click.echo(strict_json(report.to_dict()))
    elif not click.get_current_context().meta.get("quiet") and report.entries:
        from .render import report_table  # (rich's table: only when a table is printed)
        con.print(report_table(report, f"{model}: {report.bn_total} BatchNorm", con.width))
    prec = report.extra.get("precision")
    if prec and not json_mode and not click.get_current_context().meta.get("quiet"):
        from .render import precision_table
        con.print(precision_table(prec, all_layers=all_layers))
    if prec:
        con.print(f"range: {prec['summary']}; activations from {prec['activations_from']}", soft_wrap=True)
    for w in report.extra.get("warnings", []):
        con.print(styled("warning:", "yellow"), w)
    _print_deploy_switches(con, report)
    con.print(verdict)


def _onnx_refuses_reparameterize(model: str, reparameterize: bool) -> None:
    if reparameterize and _is_onnx(model):
        raise BnfoldError(f"--reparameterize calls a PyTorch model's own deploy switches; {model} is ONNX "
                          "(export the reparameterized model from PyTorch instead)")


def _print_deploy_switches(con, report) -> None:
    if "deploy_switches" not in report.extra and "reparameterized" not in report.extra:
        return  # (an ONNX model: torch is not imported)
    from bnfold.torch_fold import describe_switches

    if "deploy_switches" in report.extra:
        found = report.extra["deploy_switches"]
        con.print(f"deploy switches: {describe_switches(found)}"
                  + ("; --reparameterize calls them before folding" if found else ""))
        if found and not click.get_current_context().meta.get("quiet"):
            for s in found:
                con.print(f"  {s['module'] or '(model)'}: {s['class']}.{s['method']}()")
    if "reparameterized" in report.extra:
        con.print(f"reparameterized {describe_switches(report.extra['reparameterized']['modules'])}")


@main.command()
@click.argument("model")
@precision_options
@click.option("--data", metavar="digits|FILE.npz|DIR", help="With --dtype: inputs on which to measure activations "
              "(default: random normal inputs, which the report says).")
@layout_option
@torch_model_options
@reparameterize_option
@fold_options
@json_option
@common_options
def inspect(model: str, json_mode: bool, dtype, io_dtype, strict_range, data, layout, weights, random_weights,
            input_shape, opset, trust_pickle, reparameterize, **opts):
    """List every BatchNorm in MODEL: its neighbour, what folding would do, and why. With --dtype (ONNX
    MODEL), also certify the range of every layer in that dtype (folded weights and biases, underflow,
    activations).

    For a PyTorch MODEL the plan is the module-level one, and the modules that carry their own deploy switch
    (reparameterize(), switch_to_deploy(), fuse(), fuse_model()) are listed.

    \b
    Example:
      bnfold inspect resnet18_unfolded.onnx
      bnfold inspect model.onnx --json | jq '.entries[] | select(.status == "skipped")'
      bnfold inspect model.onnx --dtype fp16 --data digits
      bnfold inspect mypkg.nets:build --weights w.safetensors --input-shape 1x3x224x224
    """
    _onnx_refuses_reparameterize(model, reparameterize)
    source = _weights_for(model, weights, random_weights)
    if _is_onnx(model):
        OutputPlan().read_model(model).read(data if dtype else None, "--data").check()
        loaded = _load_data(data, str(model), layout, _shapes(input_shape)) if data and dtype else None
        precision = _precision(dtype, io_dtype, strict_range, loaded, input_shape)
        report = inspect_onnx_file(Path(model), _options(**opts), precision=precision)
    else:
        if dtype or io_dtype or strict_range:
            raise click.UsageError("inspect --dtype certifies an .onnx file: export the model first "
                                   "(bnfold export MODEL --no-fold)")
        OutputPlan().read(weights, "--weights").check()
        torch_model, inputs, _ = _load_torch(model, source, input_shape, trust_pickle)
        report = inspect_torch(torch_model, inputs, _options(**opts), reparameterize=reparameterize)
    _finish(report, json_mode=json_mode, verdict=f"PLAN | {report.summary()}", model=str(model), report_path=None,
            all_layers=True)


@main.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the folded model (.onnx).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the fold report as JSON to this file.")
@click.option("--dry-run", is_flag=True, help="Plan only: report what would be folded, write nothing.")
@click.option("--in-place", is_flag=True, help="Allow the output path to be the input path (.onnx input).")
@click.option("--no-check", is_flag=True, help="Skip onnx.checker (full check) on the result.")
@click.option("--verify", "do_verify", is_flag=True,
              help="Compare the folded model with the original before writing it (exit 1 and write nothing if "
                   "they differ); --ep/--data/--atol/--rtol apply.")
@precision_options
@torch_model_options
@reparameterize_option
@verify_options
@layout_option
@fold_options
@json_option
@common_options
def fold(model: str, output: Path | None, report_path: Path | None, dry_run: bool, in_place: bool,
         no_check: bool, do_verify: bool, json_mode: bool, weights, random_weights, input_shape, opset,
         trust_pickle, reparameterize, ep, data, atol, rtol, batch, seed, layout, dtype, io_dtype, strict_range,
         **opts):
    """Fold every BatchNorm of MODEL that can be folded exactly and write the folded ONNX model.

    For an .onnx MODEL the ONNX pass runs on the graph. For a PyTorch MODEL the BNs are folded at module level
    (conv/linear weights updated, BN replaced by Identity), the result is exported with torch.onnx (dynamo) and
    the ONNX pass runs over the export.

    \b
    Examples:
      bnfold fold model.onnx -o folded.onnx --report fold.json
      bnfold fold model.onnx --dry-run
      bnfold fold bnfold.models.zoo:small_resnet --input-shape 1x3x32x32 -o small_resnet.onnx
      bnfold fold model.onnx -o model_fp16.onnx --dtype fp16 --data digits
    """
    if output is None and not dry_run:
        raise click.UsageError("missing -o/--output (or use --dry-run)")
    _precision(dtype, io_dtype, strict_range)  # usage checked before anything is read
    source = _weights_for(model, weights, random_weights)
    _onnx_refuses_reparameterize(model, reparameterize)
    plan = OutputPlan().read_model(model if _is_onnx(model) else None).read(weights, "--weights")
    plan.read(data if do_verify or dtype else None, "--data")
    plan.write_model(None if dry_run else output, "-o", in_place=in_place and _is_onnx(model))
    plan.write(report_path, "--report").check()
    options = _options(**opts)
    verify, choice = None, None
    if do_verify and not dry_run:
        choice = resolve_providers(ep, single=True)
        verify = _verify_kwargs(model, output, input_shape, choice.eps[0], data, atol, rtol, batch, seed, layout)

    precision = None
    if dtype:
        loaded = verify["data"] if verify and "data" in verify else \
            _load_data(data, model if _is_onnx(model) else None, layout, _shapes(input_shape)) if data else None
        precision = _precision(dtype, io_dtype, strict_range, loaded, input_shape)
    if _is_onnx(model):
        report = fold_onnx_file(Path(model), output, options, dry_run=dry_run, check=not no_check,
                                in_place=in_place, verify=verify, precision=precision)
    else:
        torch_model, inputs, names = _load_torch(model, source, input_shape, trust_pickle)
        _, report = fold_torch(torch_model, inputs, None if dry_run else output, options, opset=opset,
                               input_names=names, check=not no_check, dry_run=dry_run, verify=verify,
                               precision=precision, provenance=_provenance(model, source),
                               reparameterize=reparameterize)
    verdict = f"PLAN | {report.summary()}" if dry_run else f"FOLDED | {report.summary()} -> {output}"
    if "verify_verdict" in report.extra:
        out_console(json_mode).print(_with_note(report.extra["verify_verdict"], choice.note()), soft_wrap=True)
    _finish(report, json_mode=json_mode, verdict=verdict, model=model, report_path=report_path)


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the ONNX model.")
@click.option("--no-fold", is_flag=True, help="Keep every BatchNormalization (a reference to verify against).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the fold report as JSON to this file.")
@precision_options
@torch_model_options
@reparameterize_option
@json_option
@common_options
def export(model: str, output: Path, no_fold: bool, report_path: Path | None, json_mode: bool, weights,
           random_weights, input_shape, opset, trust_pickle, reparameterize, dtype, io_dtype, strict_range):
    """Export a PyTorch MODEL to ONNX (dynamic batch), folded by default, or with --no-fold as it is.

    \b
    Examples:
      bnfold export bnfold.models.zoo:small_resnet --input-shape 1x3x32x32 --no-fold -o original.onnx
      bnfold export mypkg.nets:build --weights ckpt.safetensors --input-shape 1x3x224x224 -o folded.onnx
    """
    if _is_onnx(model):
        raise BnfoldError(f"{model} is already ONNX: use 'bnfold fold {model} -o OUT.onnx' to fold it")
    source = resolve_weights(model, weights, random_weights)
    precision = _precision(dtype, io_dtype, strict_range, None, input_shape)
    if precision is not None and no_fold:
        raise click.UsageError("--dtype folds: it cannot be combined with --no-fold")
    OutputPlan().read(weights, "--weights").write_model(output, "-o").write(report_path, "--report").check()
    torch_model, inputs, names = _load_torch(model, source, input_shape, trust_pickle)
    _, report = fold_torch(torch_model, inputs, output, opset=opset, input_names=names, fold=not no_fold,
                           precision=precision, provenance=_provenance(model, source),
                           reparameterize=reparameterize)
    if no_fold:
        verdict = f"EXPORTED | BatchNorm kept ({report.extra['onnx_bn_kept']} BatchNormalization) -> {output}"
    else:
        verdict = f"EXPORTED | {report.summary()} -> {output}"
    _finish(report, json_mode=json_mode, verdict=verdict, model=model, report_path=report_path)


def _shapes(input_shape) -> list:
    from bnfold.specs import parse_input_shape
    return [parse_input_shape(s) for s in input_shape]


def _verify_kwargs(model, candidate_path, input_shape, ep, data, atol, rtol, batch, seed, layout) -> dict:
    from bnfold.specs import parse_input_shape

    kwargs = dict(input_shapes=[parse_input_shape(s) for s in input_shape], ep=ep, atol=atol, rtol=rtol,
                  batch=batch, seed=seed)
    if data:
        kwargs["data"] = _load_data(data, model if _is_onnx(model) else None, layout, kwargs["input_shapes"])
    return kwargs


def _load_data(spec: str, onnx_path: str | None, layout: str = "nchw", input_shapes=None):
    """Load --data shaped for the model (channels-first); see bnfold.verify.load_data_for."""
    from bnfold.data import load_for_model
    from bnfold.verify import load_data_for

    if onnx_path is None:
        return load_for_model(spec, None, layout=layout)
    return load_data_for(spec, onnx_path, input_shapes=input_shapes, layout=layout)



@main.command()
@click.argument("reference")
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@verify_options
@click.option("--max-samples", type=int, default=2000, show_default=True, help="Use at most this many data samples.")
@click.option("--input-shape", multiple=True, metavar="[NAME=]1x3x224x224",
              help="Shape of each input (needed for dynamic dimensions other than the batch).")
@weights_options

@click.option("--strict", is_flag=True,
              help="Exit 1 when a pass proves little (PASSED (unproven: ...): dropping a BatchNorm would not "
                   "have been seen on these inputs).")
@layout_option
@json_option
@common_options
def verify(reference: str, candidate: Path, ep, data, atol, rtol, batch, seed, max_samples, input_shape, weights,
           random_weights, trust_pickle, strict, layout, json_mode: bool):
    """Check that CANDIDATE (folded .onnx) computes what REFERENCE (the original) computes.

    REFERENCE is an .onnx file (run with ONNX Runtime's graph optimizations off, so the runtime cannot fold for
    us) or a PyTorch factory spec with --weights (run eagerly). Each output is held to the model's own rounding
    (--atol/--rtol: a fixed tolerance instead). Ends with a PASSED/FAILED line; exit 0 on pass, 1 on fail (and
    on an unproven pass with --strict), 2 on bad input. On failure the first fold whose output diverges is
    named.

    \b
    Examples:
      bnfold verify original.onnx folded.onnx
      bnfold verify original.onnx folded.onnx --data val.npz --json
      bnfold verify small_resnet folded.onnx --weights ckpt.safetensors --ep cuda
    """
    from bnfold.onnx_io import load_model
    from bnfold.specs import parse_input_shape
    from bnfold.verify import verify as run_verify

    source = _weights_for(reference, weights, random_weights)
    choice = resolve_providers(ep, single=True)
    ep = choice.eps[0]
    cand = load_model(candidate).model
    if _is_onnx(reference):
        ref = load_model(reference).model
    else:
        ref, _, _ = _load_torch(reference, source, input_shape, trust_pickle)
    shapes = [parse_input_shape(s) for s in input_shape]
    dataset = _load_data(data, cand, layout, shapes) if data else None
    result = run_verify(ref, cand, input_shapes=shapes, data=dataset, ep=ep, atol=atol, rtol=rtol, batch=batch,
                        seed=seed, max_samples=max_samples)
    con = out_console(json_mode)
    if json_mode:
        from bnfold import provenance as prov
        report = result.to_dict()
        report["provenance"] = {  # what was compared: each model's own record, else what it is
            "reference": prov.read(ref) or _provenance(reference, source) if source is None else
            _provenance(reference, source),
            "candidate": prov.read(cand) or prov.provenance(str(candidate))}
        click.echo(strict_json(report))
    elif not click.get_current_context().meta.get("quiet"):
        from .render import verify_table
        con.print(verify_table(result, con.width))
    for note in result.notes:
        con.print(styled("note:", "yellow"), note)
    con.print(_with_note(result.verdict(), choice.note()))
    sys.exit(EXIT_OK if result.passed and not (strict and result.unproven) else EXIT_FAILED)


def _csv(kind: str, allowed: tuple | None = None, cast=str):
    def parse(ctx, param, value):
        if value is None:
            return None
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise click.BadParameter(f"empty {kind} list")
        try:
            items = [cast(v) for v in items]
        except ValueError:
            raise click.BadParameter(f"'{value}' is not a comma-separated list of {kind}") from None
        if allowed:
            bad = [v for v in items if v not in allowed]
            if bad:
                raise click.BadParameter(f"unknown {kind} {', '.join(map(str, bad))}; choose from {', '.join(allowed)}")
        return items
    return parse


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--ep", "eps", default="cpu", show_default=True,
              callback=_csv("provider", ("cpu", "cuda", "tensorrt", "auto")),
              help="Comma-separated execution providers (ORT) or devices (torch: cpu, cuda); one that cannot run "
                   "here is an error; 'auto': every one that runs (cpu, cuda), naming the others.")
@click.option("--opt-level", "opt_levels", default="all", show_default=True,
              callback=_csv("level", ("off", "basic", "extended", "all")),
              help="Comma-separated ORT graph optimization levels. ORT folds Conv+BN itself from 'basic' on.")
@click.option("--batch", "batches", default="1", show_default=True, callback=_csv("batch size", cast=int),
              help="Comma-separated batch sizes.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per model before timing.")
@click.option("--iters", type=click.IntRange(min=1), default=100, show_default=True,
              help="Timed rounds per setting in all (each model once per round), split over about sqrt(ITERS) "
                   "fresh sessions.")
@click.option("--sessions", type=int, default=None,
              help="Fresh sessions per setting, at least 3 (default: about sqrt(--iters), or what --duration affords).")
@click.option("--session-time", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Seconds each session runs at least (more rounds for fast models; 0: the planned rounds).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds per setting, session set-up included, instead of --iters (sessions and rounds planned "
                   "from a trial session).")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads (default: 1 on ORT's CPU provider, for steady side-by-side timing; 0: the "
                   "runtime's choice).")
@click.option("--spin/--no-spin", default=False, show_default=True,
              help="Let ORT's intra-op threads spin between runs (off: idle sessions do not steal the cores).")
@click.option("--min-effect", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Name a difference only beyond this fraction (and when its 95% interval excludes 1).")
@click.option("--aa", is_flag=True, help="Self-check: time MODEL against copies of itself (disjoint pairs); report "
              "how often the 95% interval excludes 1 (exit 1 if improbably often or rarely for 5%).")
@click.option("--aa-copies", type=click.IntRange(2, 16), default=4, show_default=True, help="Copies for --aa.")
@click.option("--aa-repeats", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Separate benchmarks for --aa.")
@click.option("--io-binding/--no-io-binding", default=None,
              help="Bind inputs/outputs on the device (default: on for GPU providers).")
@click.option("--cuda-graph", is_flag=True, help="Capture the model in a CUDA graph (CUDA provider, IO binding).")
@click.option("--ep-option", "ep_option", multiple=True, metavar="KEY=VALUE",
              help="Provider option for the GPU providers, e.g. prefer_nhwc=1, cudnn_conv_algo_search=EXHAUSTIVE, "
                   "use_tf32=0 (repeatable).")
@click.option("--runtime", type=click.Choice(["ort", "torch"]), default="ort", show_default=True,
              help="ONNX Runtime on .onnx files, or PyTorch on specs (SPEC, SPEC@folded, SPEC@nobn).")
@click.option("--compile", "compile_mode", default=None, metavar="MODE",
              help="torch runtime: torch.compile the modules (MODE: default, reduce-overhead, max-autotune).")
@click.option("--input-shape", multiple=True, metavar="[NAME=]1x3x224x224",
              help="Shape of each input when it has dynamic dimensions besides the batch.")
@weights_options
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG plot.")
@json_option
@common_options
def bench(models, eps, opt_levels, batches, warmup, iters, sessions, session_time, duration, threads, spin,
          min_effect, aa, aa_copies, aa_repeats, io_binding, cuda_graph, ep_option, runtime, compile_mode,
          input_shape, weights, random_weights, trust_pickle, plot_path, json_mode):
    """Time MODELS side by side on each provider / optimization level / batch, in several fresh sessions of
    balanced order, with p50/p90/p99, 95% intervals (over sessions: t on the per-session estimates) and the
    ratio of every model to the first; a difference is named only when its interval supports it.

    \b
    Examples:
      bnfold bench original.onnx folded.onnx --opt-level off,basic,all --batch 1,8
      bnfold bench original.onnx folded.onnx --ep cpu,cuda --json > latency.json
      bnfold bench --aa original.onnx --aa-repeats 8
      bnfold bench small_resnet small_resnet@folded small_resnet@nobn --runtime torch --plot torch.png
    """
    from rich.progress import Progress

    from bnfold.bench import bench as run_bench
    from bnfold.bench import plot
    from bnfold.specs import parse_input_shape

    from .progress import BenchDisplay

    if (weights is not None or random_weights) and runtime != "torch":
        flag = "--weights" if weights is not None else "--random-weights"
        raise BnfoldError(f"{flag} is for PyTorch specs (--runtime torch); an .onnx file holds its own weights")
    plan = OutputPlan().read(weights, "--weights")
    for m in models if runtime == "ort" else ():
        plan.read_model(m, f"model {m}")
    plan.write(plot_path, "--plot", suffixes=FIGURE_SUFFIXES).check()
    shapes = [parse_input_shape(s) for s in input_shape]
    ep_options = {}
    for item in ep_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BnfoldError(f"--ep-option '{item}': expected KEY=VALUE, e.g. prefer_nhwc=1")
        ep_options[key] = value
    choice = resolve_providers(eps, runtime=runtime)  # exit 2 naming a provider that cannot run, or --ep auto
    eps = choice.eps
    if runtime == "ort":
        for m in models:
            if not Path(m).is_file():
                raise BnfoldError(f"{m}: no such .onnx file (use --runtime torch for PyTorch specs)")
            from bnfold.filetype import not_onnx_message
            if (msg := not_onnx_message(m)) is not None:
                raise BnfoldError(msg)
        targets = list(models)
    else:
        from bnfold.torch_io import make_variant
        targets = []
        for m in models:
            base = m.partition("@")[0]
            source = resolve_weights(base, weights, random_weights)
            module, inputs, _ = _load_torch(base, source, input_shape, trust_pickle)
            targets.append(make_variant(m, module, inputs))
    con = out_console(json_mode)
    quiet = click.get_current_context().meta.get("quiet")
    kwargs = dict(eps=eps, opt_levels=opt_levels, batches=batches, warmup=warmup, iters=iters, sessions=sessions,
                  duration_s=duration, threads=threads, spin=spin, io_binding=io_binding, cuda_graph=cuda_graph,
                  input_shapes=shapes, runtime=runtime, compile_mode=compile_mode, ep_options=ep_options,
                  min_effect=min_effect, min_session_s=session_time)
    if aa:
        if len(targets) != 1:
            raise BnfoldError(f"--aa takes one model, not {len(targets)}")
        from bnfold.bench import aa_check
        with Progress(console=con.rich, transient=True, disable=bool(quiet) or not con.is_terminal) as progress:
            task = progress.add_task("A/A", total=aa_repeats)
            result = aa_check(targets[0], copies=aa_copies, repeats=aa_repeats,
                              progress=lambda k, n: progress.update(task, completed=k), **kwargs)
        if json_mode:
            click.echo(strict_json({"summary": result.summary(), "comparisons": result.comparisons,
                                    "runs": result.runs}))
        con.print(result.verdict(), soft_wrap=True, markup=False)
        sys.exit(EXIT_OK if result.summary()["passed"] else EXIT_FAILED)
    with BenchDisplay(con, bool(quiet)) as display:
        run = run_bench(targets, **display.hooks(), **kwargs)
    if plot_path is not None:
        plot(run, plot_path)
    if json_mode:
        click.echo(strict_json(run.to_dict()))
    else:
        from .render import bench_table
        con.print(bench_table(run, con.width))
    for s in run.skipped:
        con.print(styled("skipped", "yellow"), f"{s['ep']} (opt {s['opt_level']}, batch {s['batch']}): {s['reason']}")
    from bnfold.bench import headline
    summary = "; ".join(x for x in (f"{len(run.results)} measurement(s), {len(run.skipped)} skipped", headline(run),
                                    choice.note()) if x)
    con.print(f"DONE | {summary}", soft_wrap=True, markup=False)
    sys.exit(EXIT_OK)


@main.command("train")
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to write (.safetensors, or .pt/.pth weights-only).")
@click.option("--data", default="digits", show_default=True, metavar="digits|FILE.npz|DIR",
              help="Training data: the bundled digits, an .npz with x and y, or an image folder; 20% is held "
                   "out for the test accuracy (for digits, the split --data digits means elsewhere).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Passes over the training split.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="Learning rate.")
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True,
              help="Mini-batch size (at least 2: BatchNorm needs two samples).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the initialisation and the batch order (the held-out split is fixed, whatever the seed).")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True,
              help="SGD with momentum 0.9, or Adam.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@layout_option
@json_option
@common_options
def train_cmd(name, output, data, epochs, lr, batch_size, seed, optimizer, device, layout, json_mode):
    """Train zoo model NAME, then set its BN statistics to Algorithm 2's population statistics.

    NAME is a zoo model (see `bnfold.models.zoo.names()`); flat digits are upsampled for image models.

    \b
    Examples:
      bnfold train mnist_mlp -o mnist_mlp.safetensors
      bnfold train small_resnet --epochs 3 --lr 0.05 -o small_resnet.safetensors
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from bnfold.models import zoo
    from bnfold.train import save_checkpoint, train

    try:
        zoo.get(name)
    except KeyError as exc:
        raise BnfoldError(str(exc).strip("'\"")) from None
    if output.suffix not in (".safetensors", ".pt", ".pth"):
        raise BnfoldError(f"{output}: checkpoints are .safetensors (recommended) or .pt/.pth")
    OutputPlan().read(data, "--data").write(output, "-o").check()
    con = out_console(json_mode)
    quiet = click.get_current_context().meta.get("quiet")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeRemainingColumn(), console=con.rich, disable=bool(quiet) or not con.is_terminal,
                  transient=True) as progress:
        task = progress.add_task(f"training {name}", total=None)

        def on_step(k, total):
            progress.update(task, completed=k, total=total)

        def on_epoch(m):
            progress.console.print(f"epoch {m.epoch}: loss {m.loss:.4f}, train acc {100 * m.train_accuracy:.2f}%, "
                                   f"test acc {100 * m.test_accuracy:.2f}%")
        result = train(name, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                       optimizer=optimizer, on_epoch=on_epoch, on_step=on_step, layout=layout)
    save_checkpoint(result.model, output, result.config)
    if json_mode:
        click.echo(strict_json(result.config))
    cal = result.calibration.summary()
    con.print(f"TRAINED | {name}: test accuracy {100 * result.test_accuracy:.2f}% with Algorithm 2 statistics "
              f"({cal['batches']} batches, {cal['samples']} samples) -> {output}", soft_wrap=True, markup=False)
    sys.exit(EXIT_OK)


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to write with the new statistics (.safetensors or .pt/.pth).")
@click.option("--data", required=True, metavar="digits|FILE.npz|DIR",
              help="Calibration (training) data; digits is the training split train uses (digits:all for all).")
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True,
              help="Mini-batch size (Algorithm 2's m; at least 2).")
@click.option("--max-batches", type=click.IntRange(min=1), default=None, help="Use at most this many batches.")
@click.option("--pooled", is_flag=True, help="Exact pooled variance of all values instead of Algorithm 2.")
@click.option("--input-shape", multiple=True, metavar="[NAME=]1x3x224x224",
              help="Model input shape (default: the model's, or the --data samples' shape).")
@weights_options
@layout_option
@json_option
@common_options
def calibrate(model, output, data, batch_size, max_batches, pooled, weights, random_weights, input_shape,
              trust_pickle, layout, json_mode):
    """Recompute every BN's population statistics of MODEL over --data (Algorithm 2), write a checkpoint.

    BNs normalise with their mini-batch statistics, as in training; every other layer is in eval mode
    (dropout off). Under torchrun the sums are all-reduced across processes.

    \b
    Examples:
      bnfold calibrate small_resnet --weights trained.safetensors --data digits -o calibrated.safetensors
      bnfold calibrate mypkg.nets:build --weights w.pt --data train.npz --input-shape 1x3x64x64 -o cal.pt
    """
    from bnfold.calibrate import calibrate_spec
    from bnfold.train import save_checkpoint

    if output.suffix not in (".safetensors", ".pt", ".pth"):
        raise BnfoldError(f"{output}: checkpoints are .safetensors (recommended) or .pt/.pth")
    if _is_onnx(model):
        from bnfold.filetype import not_onnx_message
        raise BnfoldError(not_onnx_message(model) or f"{model}: calibrate needs the PyTorch model (SPEC with "
                          "--weights), not an ONNX file: the statistics are recomputed by running it in PyTorch")
    source = resolve_weights(model, weights, random_weights)
    OutputPlan().read(weights, "--weights").read(data, "--data").write(output, "-o").check()
    torch_model, result, config = calibrate_spec(model, data, weights=source, trust_pickle=trust_pickle,
                                                 input_shapes=list(input_shape), batch_size=batch_size,
                                                 max_batches=max_batches, pooled=pooled, layout=layout)
    weights_note(model, source)
    save_checkpoint(torch_model, output, config)
    if json_mode:
        click.echo(strict_json(config["calibration"]))
    con = out_console(json_mode)
    for name, reason in result.skipped.items():
        con.print(f"skipped {name}: {reason}", soft_wrap=True, markup=False)
    con.print(f"CALIBRATED | {len(result.stats)} BatchNorm, {result.method}, {result.batches} batches of up to "
              f"{batch_size} ({result.samples} samples)"
              + (f", {len(result.skipped)} skipped" if result.skipped else "") + f" -> {output}",
              soft_wrap=True, markup=False)
    sys.exit(EXIT_OK)


def _with_note(verdict: str, note: str) -> str:
    """The verdict line, with what --ep auto skipped appended."""
    return f"{verdict}; {note}" if note else verdict


def _run_flow(model_obj, outdir, name, *, inputs=None, names=None, data=None, calibrate_batches=None, eps, iters,
              batches, threads, json_mode, extra=None, min_effect=0.02, dtype=None, io_dtype=False,
              strict_range=False, provenance=None, reparameterize=False):
    """``eps``: the :class:`bnfold.runtime.ProviderChoice` to verify and benchmark on."""
    from bnfold.pipeline import RunOptions, run_pipeline

    con = out_console(json_mode)
    quiet = click.get_current_context().meta.get("quiet")

    def step(msg):
        if not quiet:
            con.print(styled(f"- {msg}", "dim"))
    from .progress import BenchDisplay

    options = RunOptions(eps=eps.eps, eps_skipped=eps.skipped, batches=batches, iters=iters, threads=threads,
                         min_effect=min_effect, dtype=dtype,
                         io_dtype=io_dtype, strict_range=strict_range,
                         reparameterize=reparameterize)
    with BenchDisplay(con, bool(quiet), prefix="  ") as display:
        report = run_pipeline(model_obj, outdir, name=name, example_inputs=inputs, input_names=names, data=data,
                              calibrate_batches=calibrate_batches, options=options, extra=extra, step=step,
                              bench_hooks=display.hooks(), provenance=provenance)
    from bnfold.pipeline import run_verdict

    if json_mode:
        click.echo(strict_json(report))
    passed, line = run_verdict(report, outdir)
    con.print(line, soft_wrap=True, markup=False)
    return EXIT_OK if passed else EXIT_FAILED


@main.command()
@click.argument("model")
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for original.onnx, folded.onnx, report.json, report.md and latency.png.")
@click.option("--data", metavar="digits|FILE.npz|DIR",
              help="Labelled data for verification and accuracy; digits is the held-out split train reports on "
                   "(digits:all for all 1,797 samples).")
@click.option("--calibrate-data", metavar="digits|FILE.npz|DIR",
              help="Recalibrate BN statistics (Algorithm 2) on this data before folding (PyTorch models); digits "
                   "is the training split.")
@click.option("--ep", "eps", default="cpu", show_default=True,
              callback=_csv("provider", ("cpu", "cuda", "tensorrt", "auto")),
              help="Comma-separated execution providers to verify and benchmark on; one that cannot run here is "
                   "an error; 'auto': every one that runs (cpu, cuda), the verdict naming the others.")
@click.option("--batch", "batches", default="1", show_default=True, callback=_csv("batch size", cast=int),
              help="Comma-separated batch sizes to benchmark (verification runs on the data's or random inputs).")
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True,
              help="Benchmark rounds per setting in all (each model once per round), over about sqrt(ITERS) sessions.")
@click.option("--threads", type=int, default=None, help="Intra-op threads for the benchmark.")
@click.option("--min-effect", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Name a latency difference only beyond this fraction (and when its 95% interval excludes 1).")
@precision_options
@torch_model_options
@reparameterize_option
@layout_option
@json_option
@common_options
def run(model, outdir, data, calibrate_data, eps, batches, iters, threads, min_effect, weights, random_weights,
        input_shape, opset, layout, trust_pickle, reparameterize, json_mode, dtype, io_dtype, strict_range):
    """The whole job: (recalibrate) -> fold -> export -> verify -> benchmark original vs folded -> report.

    \b
    Examples:
      bnfold run small_resnet --weights trained.safetensors --data digits -o out/
      bnfold run model.onnx -o out/ --ep cpu,cuda --batch 1,8
    """
    from bnfold.pipeline import FILES, prepare_run

    _precision(dtype, io_dtype, strict_range)  # usage checked before anything is read
    source = _weights_for(model, weights, random_weights)
    eps = resolve_providers(eps)

    _onnx_refuses_reparameterize(model, reparameterize)
    plan = OutputPlan().read_model(model if _is_onnx(model) else None).read(weights, "--weights")
    plan.read(data, "--data").read(calibrate_data, "--calibrate-data")
    plan.write_folder(outdir, FILES, "-o", models=FILES[:2]).check()
    r = prepare_run(model, data=data, calibrate_data=calibrate_data, weights=source, input_shapes=list(input_shape),
                    trust_pickle=trust_pickle, layout=layout)
    weights_note(model, source)
    sys.exit(_run_flow(r.model, outdir, r.name, inputs=r.example_inputs, names=r.input_names, data=r.data,
                       calibrate_batches=r.calibrate_batches, eps=eps, iters=iters, batches=batches,
                       threads=threads, json_mode=json_mode, min_effect=min_effect, dtype=dtype,
                       io_dtype=io_dtype, strict_range=strict_range, provenance=r.provenance,
                       reparameterize=reparameterize))


@main.command()
@click.option("-o", "--outdir", default="bnfold-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the demo's files.")
@click.option("--model", "name", default="small_resnet", show_default=True, help="Zoo model to train.")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Training passes over the digits' training split.")
@json_option
@common_options
def demo(outdir, name, epochs, json_mode):
    """The whole flow on the embedded default: a zoo CNN trained on the bundled digits (Algorithm 2 statistics),
    folded, exported, verified (accuracy before/after) and benchmarked (CPU, and CUDA when a GPU is present).

    \b
    Example:
      bnfold demo -o demo/
    """
    import torch

    from bnfold.models import zoo
    from bnfold.pipeline import FILES, digits_for
    from bnfold.train import train

    OutputPlan().write_folder(outdir, FILES, "-o", models=FILES[:2]).check()
    con = out_console(json_mode)
    quiet = click.get_current_context().meta.get("quiet")
    if not quiet:
        con.print(styled(f"- training {name} on the bundled digits ({epochs} epochs)", "dim"))
    result = train(name, "digits", epochs=epochs, lr=0.05, device="cpu")
    shape = zoo.get(name).input_shape
    eps = resolve_providers("auto")  # cpu, and cuda where it runs (the verdict names it when skipped)
    from bnfold.provenance import provenance
    t = result.config
    prov = provenance(name, weights=f"trained by bnfold demo ({t['epochs']} epochs on {t['data']}, seed {t['seed']})",
                      statistics=f"Algorithm 2 over the training split ({t['train_samples']} samples)")
    sys.exit(_run_flow(result.model, outdir, f"{name} (demo, trained on digits)", inputs=(torch.zeros(shape),),
                       data=digits_for(shape), eps=eps, iters=200, batches=[1], threads=None, json_mode=json_mode,
                       extra={"training": result.config}, provenance=prov))


if __name__ == "__main__":  # pragma: no cover
    main()
