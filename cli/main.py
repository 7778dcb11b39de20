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
    styled,
    torch_model_options,
    verify_options,
)
from .render import report_table


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


def _options(lower_standalone: bool, no_forward: bool, no_affine: bool) -> FoldOptions:
    return FoldOptions(forward=not no_forward, affine_chains=not no_affine, lower_standalone=lower_standalone)


def _is_onnx(model: str) -> bool:
    from bnfold.torch_io import is_onnx_path
    return is_onnx_path(model)


def _load_torch(model: str, weights, input_shape, trust_pickle):
    from bnfold.torch_io import load_torch_model
    return load_torch_model(model, weights=weights, trust_pickle=trust_pickle, input_shapes=list(input_shape))


def _finish(report, *, json_mode: bool, verdict: str, model: str, report_path: Path | None):
    if report_path is not None:
        write_text_atomic(report_path, strict_json(report.to_dict()) + "\n")
    con = out_console(json_mode)
    if json_mode:
        click.echo(strict_json(report.to_dict()))
    elif not click.get_current_context().meta.get("quiet") and report.entries:
        con.print(report_table(report, f"{model}: {report.bn_total} BatchNorm"))
    for w in report.extra.get("warnings", []):
        con.print(styled("warning:", "yellow"), w)
    _print_deploy_switches(con, report)
    con.print(verdict)


def _onnx_refuses_reparameterize(model: str, reparameterize: bool) -> None:
    if reparameterize and _is_onnx(model):
        raise BnfoldError(f"--reparameterize calls a PyTorch model's own deploy switches; {model} is ONNX "
                          "(export the reparameterized model from PyTorch instead)")


def _print_deploy_switches(con, report) -> None:
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
@torch_model_options
@reparameterize_option
@fold_options
@json_option
@common_options
def inspect(model: str, json_mode: bool, weights, input_shape, opset, trust_pickle, reparameterize, **opts):
    """List every BatchNorm in MODEL: its neighbour, what folding would do, and why.

    For a PyTorch MODEL the plan is the module-level one, and the modules that carry their own deploy switch
    (reparameterize(), switch_to_deploy(), fuse(), fuse_model()) are listed.

    \b
    Example:
      bnfold inspect resnet18_unfolded.onnx
      bnfold inspect model.onnx --json | jq '.entries[] | select(.status == "skipped")'
      bnfold inspect mypkg.nets:build --weights w.safetensors --input-shape 1x3x224x224
    """
    _onnx_refuses_reparameterize(model, reparameterize)
    if _is_onnx(model):
        report = inspect_onnx_file(Path(model), _options(**opts))
    else:
        OutputPlan().read(weights, "--weights").check()
        torch_model, inputs, _ = _load_torch(model, weights, input_shape, trust_pickle)
        report = inspect_torch(torch_model, inputs, _options(**opts), reparameterize=reparameterize)
    _finish(report, json_mode=json_mode, verdict=f"PLAN | {report.summary()}", model=str(model), report_path=None)


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
@torch_model_options
@reparameterize_option
@verify_options
@layout_option
@fold_options
@json_option
@common_options
def fold(model: str, output: Path | None, report_path: Path | None, dry_run: bool, in_place: bool,
         no_check: bool, do_verify: bool, json_mode: bool, weights, input_shape, opset, trust_pickle,
         reparameterize, ep, data, atol, rtol, batch, seed, layout, **opts):
    """Fold every BatchNorm of MODEL that can be folded exactly and write the folded ONNX model.

    For an .onnx MODEL the ONNX pass runs on the graph. For a PyTorch MODEL the BNs are folded at module level
    (conv/linear weights updated, BN replaced by Identity), the result is exported with torch.onnx (dynamo) and
    the ONNX pass runs over the export.

    \b
    Examples:
      bnfold fold model.onnx -o folded.onnx --report fold.json
      bnfold fold model.onnx --dry-run
      bnfold fold bnfold.models.zoo:small_resnet --input-shape 1x3x32x32 -o small_resnet.onnx
    """
    if output is None and not dry_run:
        raise click.UsageError("missing -o/--output (or use --dry-run)")
    _onnx_refuses_reparameterize(model, reparameterize)
    plan = OutputPlan().read_model(model if _is_onnx(model) else None).read(weights, "--weights")
    plan.read(data if do_verify else None, "--data")
    plan.write_model(None if dry_run else output, "-o", in_place=in_place and _is_onnx(model))
    plan.write(report_path, "--report").check()
    options = _options(**opts)
    verify = None
    if do_verify and not dry_run:
        verify = _verify_kwargs(model, output, input_shape, ep, data, atol, rtol, batch, seed, layout)
    if _is_onnx(model):
        report = fold_onnx_file(Path(model), output, options, dry_run=dry_run, check=not no_check,
                                in_place=in_place, verify=verify)
    else:
        torch_model, inputs, names = _load_torch(model, weights, input_shape, trust_pickle)
        _, report = fold_torch(torch_model, inputs, None if dry_run else output, options, opset=opset,
                               input_names=names, check=not no_check, dry_run=dry_run, verify=verify,
                               reparameterize=reparameterize)
    verdict = f"PLAN | {report.summary()}" if dry_run else f"FOLDED | {report.summary()} -> {output}"
    if "verify_verdict" in report.extra:
        out_console(json_mode).print(report.extra["verify_verdict"], soft_wrap=True, markup=False)
    _finish(report, json_mode=json_mode, verdict=verdict, model=model, report_path=report_path)


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the ONNX model.")
@click.option("--no-fold", is_flag=True, help="Keep every BatchNormalization (a reference to verify against).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the fold report as JSON to this file.")
@torch_model_options
@reparameterize_option
@json_option
@common_options
def export(model: str, output: Path, no_fold: bool, report_path: Path | None, json_mode: bool, weights,
           input_shape, opset, trust_pickle, reparameterize):
    """Export a PyTorch MODEL to ONNX (dynamic batch), folded by default, or with --no-fold as it is.

    \b
    Examples:
      bnfold export bnfold.models.zoo:small_resnet --input-shape 1x3x32x32 --no-fold -o original.onnx
      bnfold export mypkg.nets:build --weights ckpt.safetensors --input-shape 1x3x224x224 -o folded.onnx
    """
    if _is_onnx(model):
        raise BnfoldError(f"{model} is already ONNX: use 'bnfold fold {model} -o OUT.onnx' to fold it")
    OutputPlan().read(weights, "--weights").write_model(output, "-o").write(report_path, "--report").check()
    torch_model, inputs, names = _load_torch(model, weights, input_shape, trust_pickle)
    _, report = fold_torch(torch_model, inputs, output, opset=opset, input_names=names, fold=not no_fold,
                           reparameterize=reparameterize)
    if no_fold:
        verdict = f"EXPORTED | BatchNorm kept ({report.extra['onnx_bn_kept']} BatchNormalization) -> {output}"
    else:
        verdict = f"EXPORTED | {report.summary()} -> {output}"
    _finish(report, json_mode=json_mode, verdict=verdict, model=model, report_path=report_path)


def _verify_kwargs(model, candidate_path, input_shape, ep, data, atol, rtol, batch, seed, layout) -> dict:
    from bnfold.torch_io import parse_input_shape

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
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
              help="State dict for a PyTorch REFERENCE (.pt/.pth weights-only, or .safetensors).")
@click.option("--trust-pickle", is_flag=True, help="Load a .pt/.pth checkpoint that is not weights-only.")
@layout_option
@json_option
@common_options
def verify(reference: str, candidate: Path, ep, data, atol, rtol, batch, seed, max_samples, input_shape, weights,
           trust_pickle, layout, json_mode: bool):
    """Check that CANDIDATE (folded .onnx) computes what REFERENCE (the original) computes.

    REFERENCE is an .onnx file (run with ONNX Runtime's graph optimizations off, so the runtime cannot fold for
    us) or a PyTorch factory spec with --weights (run eagerly). Ends with a PASSED/FAILED line; exit 0 on pass,
    1 on fail, 2 on bad input. On failure the first fold whose output diverges is named.

    \b
    Examples:
      bnfold verify original.onnx folded.onnx
      bnfold verify original.onnx folded.onnx --data val.npz --json
      bnfold verify small_resnet folded.onnx --weights ckpt.safetensors --ep cuda
    """
    from bnfold.onnx_io import load_model
    from bnfold.torch_io import parse_input_shape
    from bnfold.verify import verify as run_verify

    cand = load_model(candidate).model
    if _is_onnx(reference):
        ref = load_model(reference).model
    else:
        ref, _, _ = _load_torch(reference, weights, input_shape, trust_pickle)
    shapes = [parse_input_shape(s) for s in input_shape]
    dataset = _load_data(data, cand, layout, shapes) if data else None
    result = run_verify(ref, cand, input_shapes=shapes, data=dataset, ep=ep, atol=atol, rtol=rtol, batch=batch,
                        seed=seed, max_samples=max_samples)
    con = out_console(json_mode)
    if json_mode:
        click.echo(strict_json(result.to_dict()))
    elif not click.get_current_context().meta.get("quiet"):
        from .render import verify_table
        con.print(verify_table(result))
    for note in result.notes:
        con.print(styled("note:", "yellow"), note)
    con.print(result.verdict())
    sys.exit(EXIT_OK if result.passed else EXIT_FAILED)


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
@click.option("--ep", "eps", default="cpu", show_default=True, callback=_csv("provider", ("cpu", "cuda", "tensorrt")),
              help="Comma-separated execution providers (ORT) or devices (torch: cpu, cuda).")
@click.option("--opt-level", "opt_levels", default="all", show_default=True,
              callback=_csv("level", ("off", "basic", "extended", "all")),
              help="Comma-separated ORT graph optimization levels. ORT folds Conv+BN itself from 'basic' on.")
@click.option("--batch", "batches", default="1", show_default=True, callback=_csv("batch size", cast=int),
              help="Comma-separated batch sizes.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per model before timing.")
@click.option("--iters", type=int, default=100, show_default=True,
              help="Timed rounds in all, split over the sessions (each model once per round).")
@click.option("--sessions", type=int, default=None,
              help="Fresh sessions per setting, at least 3 (default: 3-10, more for more --iters).")
@click.option("--session-time", type=click.FloatRange(0), default=0.5, show_default=True,
              help="Seconds each session runs at least (more rounds for fast models).")
@click.option("--duration", type=float, default=None, help="Time for this many seconds per setting instead of --iters.")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads (default: 1 on ORT's CPU provider, for steady side-by-side timing; 0: the "
                   "runtime's choice).")
@click.option("--spin/--no-spin", default=False, show_default=True,
              help="Let ORT's intra-op threads spin between runs (off: idle sessions do not steal the cores).")
@click.option("--min-effect", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Name a difference only beyond this fraction (and when its 95%% interval excludes 1).")
@click.option("--aa", is_flag=True, help="Self-check: time MODEL against copies of itself; report how often the "
              "95%% interval excludes 1 (exit 1 if far more often than 5%%).")
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
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG plot.")
@json_option
@common_options
def bench(models, eps, opt_levels, batches, warmup, iters, sessions, session_time, duration, threads, spin,
          min_effect, aa, aa_copies, aa_repeats, io_binding, cuda_graph, ep_option, runtime, compile_mode,
          input_shape, plot_path, json_mode):
    """Time MODELS side by side on each provider / optimization level / batch, in several fresh sessions of
    balanced order, with p50/p90/p99, 95% intervals (hierarchical bootstrap over sessions and runs) and the
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
    from bnfold.torch_io import parse_input_shape

    plan = OutputPlan()
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
    if runtime == "ort":
        for m in models:
            if not Path(m).is_file():
                raise BnfoldError(f"{m}: no such .onnx file (use --runtime torch for PyTorch specs)")
        targets = list(models)
    else:
        from bnfold.torch_io import build_variant
        targets = [build_variant(m, shapes) for m in models]
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
        with Progress(console=con, transient=True, disable=bool(quiet) or not con.is_terminal) as progress:
            task = progress.add_task("A/A", total=aa_repeats)
            result = aa_check(targets[0], copies=aa_copies, repeats=aa_repeats,
                              progress=lambda k, n: progress.update(task, completed=k), **kwargs)
        if json_mode:
            click.echo(strict_json({"summary": result.summary(), "comparisons": result.comparisons,
                                    "runs": result.runs}))
        con.print(result.verdict(), soft_wrap=True, markup=False)
        sys.exit(EXIT_OK if result.summary()["passed"] else EXIT_FAILED)
    with Progress(console=con, transient=True, disable=bool(quiet) or not con.is_terminal) as progress:
        task = progress.add_task("benchmarking", total=None)

        def report(k, n, s):
            progress.update(task, total=n, completed=k, description=f"{s.ep} opt {s.opt_level} batch {s.batch}")
        run = run_bench(targets, progress=report, **kwargs)
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
    summary = "; ".join(x for x in (f"{len(run.results)} measurement(s), {len(run.skipped)} skipped", headline(run)) if x)
    con.print(f"DONE | {summary}", soft_wrap=True, markup=False)
    sys.exit(EXIT_OK)


@main.command("train")
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to write (.safetensors, or .pt/.pth weights-only).")
@click.option("--data", default="digits", show_default=True, metavar="digits|FILE.npz|DIR",
              help="Training data: the bundled digits, an .npz with x and y, or an image folder.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="Learning rate.")
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True,
              help="Mini-batch size (at least 2: BatchNorm needs two samples).")
@click.option("--seed", type=int, default=0, show_default=True)
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
                  TimeRemainingColumn(), console=con, disable=bool(quiet) or not con.is_terminal,
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
@click.option("--data", required=True, metavar="digits|FILE.npz|DIR", help="Calibration (training) data.")
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True,
              help="Mini-batch size (Algorithm 2's m; at least 2).")
@click.option("--max-batches", type=click.IntRange(min=1), default=None, help="Use at most this many batches.")
@click.option("--pooled", is_flag=True, help="Exact pooled variance of all values instead of Algorithm 2.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
              help="State dict for MODEL (.pt/.pth weights-only, or .safetensors).")
@click.option("--input-shape", multiple=True, metavar="[NAME=]1x3x224x224",
              help="Model input shape (default: the model's, or the --data samples' shape).")
@click.option("--trust-pickle", is_flag=True, help="Load a .pt/.pth checkpoint that is not weights-only.")
@layout_option
@json_option
@common_options
def calibrate(model, output, data, batch_size, max_batches, pooled, weights, input_shape, trust_pickle, layout,
              json_mode):
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
    OutputPlan().read(weights, "--weights").read(data, "--data").write(output, "-o").check()
    torch_model, result, config = calibrate_spec(model, data, weights=weights, trust_pickle=trust_pickle,
                                                 input_shapes=list(input_shape), batch_size=batch_size,
                                                 max_batches=max_batches, pooled=pooled, layout=layout)
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


def _run_flow(model_obj, outdir, name, *, inputs=None, names=None, data=None, calibrate_batches=None, eps, iters,
              batches, threads, json_mode, extra=None, min_effect=0.02, reparameterize=False):
    from bnfold.pipeline import RunOptions, run_pipeline

    con = out_console(json_mode)
    quiet = click.get_current_context().meta.get("quiet")

    def step(msg):
        if not quiet:
            con.print(styled(f"- {msg}", "dim"))
    options = RunOptions(eps=eps, batches=batches, iters=iters, threads=threads, min_effect=min_effect,
                         reparameterize=reparameterize)
    report = run_pipeline(model_obj, outdir, name=name, example_inputs=inputs, input_names=names, data=data,
                          calibrate_batches=calibrate_batches, options=options, extra=extra, step=step)
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
@click.option("--data", metavar="digits|FILE.npz|DIR", help="Labelled data for verification and accuracy.")
@click.option("--calibrate-data", metavar="digits|FILE.npz|DIR",
              help="Recalibrate BN statistics (Algorithm 2) on this data before folding (PyTorch models).")
@click.option("--ep", "eps", default="cpu", show_default=True, callback=_csv("provider", ("cpu", "cuda", "tensorrt")),
              help="Comma-separated execution providers to verify and benchmark on.")
@click.option("--batch", "batches", default="1", show_default=True, callback=_csv("batch size", cast=int))
@click.option("--iters", type=int, default=50, show_default=True, help="Benchmark rounds per setting.")
@click.option("--threads", type=int, default=None, help="Intra-op threads for the benchmark.")
@click.option("--min-effect", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Name a latency difference only beyond this fraction (and when its 95%% interval excludes 1).")
@torch_model_options
@reparameterize_option
@layout_option
@json_option
@common_options
def run(model, outdir, data, calibrate_data, eps, batches, iters, threads, min_effect, weights, input_shape, opset, layout,
        trust_pickle, reparameterize, json_mode):
    """The whole job: (recalibrate) -> fold -> export -> verify -> benchmark original vs folded -> report.

    \b
    Examples:
      bnfold run small_resnet --weights trained.safetensors --data digits -o out/
      bnfold run model.onnx -o out/ --ep cpu,cuda --batch 1,8
    """
    from bnfold.pipeline import FILES, prepare_run

    _onnx_refuses_reparameterize(model, reparameterize)
    plan = OutputPlan().read_model(model if _is_onnx(model) else None).read(weights, "--weights")
    plan.read(data, "--data").read(calibrate_data, "--calibrate-data")
    plan.write_folder(outdir, FILES, "-o", models=FILES[:2]).check()
    r = prepare_run(model, data=data, calibrate_data=calibrate_data, weights=weights, input_shapes=list(input_shape),
                    trust_pickle=trust_pickle, layout=layout)
    sys.exit(_run_flow(r.model, outdir, r.name, inputs=r.example_inputs, names=r.input_names, data=r.data,
                       calibrate_batches=r.calibrate_batches, eps=eps, iters=iters, batches=batches,
                       threads=threads, json_mode=json_mode, min_effect=min_effect, reparameterize=reparameterize))


@main.command()
@click.option("-o", "--outdir", default="bnfold-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the demo's files.")
@click.option("--model", "name", default="small_resnet", show_default=True, help="Zoo model to train.")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True)
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
    from bnfold.runtime import provider_works
    from bnfold.train import train

    OutputPlan().write_folder(outdir, FILES, "-o", models=FILES[:2]).check()
    con = out_console(json_mode)
    quiet = click.get_current_context().meta.get("quiet")
    if not quiet:
        con.print(styled(f"- training {name} on the bundled digits ({epochs} epochs)", "dim"))
    result = train(name, "digits", epochs=epochs, lr=0.05, device="cpu")
    shape = zoo.get(name).input_shape
    eps = ["cpu"] + (["cuda"] if provider_works("cuda") else [])
    sys.exit(_run_flow(result.model, outdir, f"{name} (demo, trained on digits)", inputs=(torch.zeros(shape),),
                       data=digits_for(shape), eps=eps, iters=200, batches=[1], threads=None, json_mode=json_mode,
                       extra={"training": result.config}))


if __name__ == "__main__":  # pragma: no cover
    main()
