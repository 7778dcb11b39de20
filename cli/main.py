"""The `bnfold` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from bnfold import __version__
from bnfold.errors import BnfoldError
from bnfold.fold import fold_onnx_file, fold_torch, inspect_onnx_file
from bnfold.onnx_fold import FoldOptions
from bnfold.onnx_io import write_text_atomic

from .common import EXIT_OK, common_options, fold_options, json_option, out_console, torch_model_options
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
    """


def _options(lower_standalone: bool, no_forward: bool, no_affine: bool) -> FoldOptions:
    return FoldOptions(forward=not no_forward, affine_chains=not no_affine, lower_standalone=lower_standalone)


def _is_onnx(model: str) -> bool:
    return model.lower().endswith(".onnx") or Path(model).is_file()


def _load_torch(model: str, weights, input_shape, trust_pickle):
    from bnfold.torch_io import load_torch_model

    if _is_onnx(model) and not Path(model).exists():
        raise BnfoldError(f"{model}: no such file")
    return load_torch_model(model, weights=weights, trust_pickle=trust_pickle, input_shapes=list(input_shape))


def _finish(report, *, json_mode: bool, verdict: str, model: str, report_path: Path | None):
    if report_path is not None:
        write_text_atomic(report_path, report.to_json() + "\n")
    con = out_console(json_mode)
    if json_mode:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not click.get_current_context().meta.get("quiet") and report.entries:
        con.print(report_table(report, f"{model}: {report.bn_total} BatchNorm"))
    for w in report.extra.get("warnings", []):
        con.print(f"[yellow]warning:[/] {w}")
    con.print(verdict, soft_wrap=True)
    sys.exit(EXIT_OK)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@fold_options
@json_option
@common_options
def inspect(model: Path, json_mode: bool, **opts):
    """List every BatchNorm in MODEL.onnx: its neighbour, what folding would do, and why.

    \b
    Example:
      bnfold inspect resnet18_unfolded.onnx
      bnfold inspect model.onnx --json | jq '.entries[] | select(.status == "skipped")'
    """
    report = inspect_onnx_file(model, _options(**opts))
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
@torch_model_options
@fold_options
@json_option
@common_options
def fold(model: str, output: Path | None, report_path: Path | None, dry_run: bool, in_place: bool,
         no_check: bool, json_mode: bool, weights, input_shape, opset, trust_pickle, **opts):
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
    options = _options(**opts)
    if _is_onnx(model):
        report = fold_onnx_file(Path(model), output, options, dry_run=dry_run, check=not no_check,
                                in_place=in_place)
    else:
        torch_model, inputs, names = _load_torch(model, weights, input_shape, trust_pickle)
        _, report = fold_torch(torch_model, inputs, None if dry_run else output, options, opset=opset,
                               input_names=names, check=not no_check, dry_run=dry_run)
    verdict = f"PLAN | {report.summary()}" if dry_run else f"FOLDED | {report.summary()} -> {output}"
    _finish(report, json_mode=json_mode, verdict=verdict, model=model, report_path=report_path)


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the ONNX model.")
@click.option("--no-fold", is_flag=True, help="Keep every BatchNormalization (a reference to verify against).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the fold report as JSON to this file.")
@torch_model_options
@json_option
@common_options
def export(model: str, output: Path, no_fold: bool, report_path: Path | None, json_mode: bool, weights,
           input_shape, opset, trust_pickle):
    """Export a PyTorch MODEL to ONNX (dynamic batch), folded by default, or with --no-fold as it is.

    \b
    Examples:
      bnfold export bnfold.models.zoo:small_resnet --input-shape 1x3x32x32 --no-fold -o original.onnx
      bnfold export mypkg.nets:build --weights ckpt.safetensors --input-shape 1x3x224x224 -o folded.onnx
    """
    if _is_onnx(model):
        raise BnfoldError(f"{model} is already ONNX: use 'bnfold fold {model} -o OUT.onnx' to fold it")
    torch_model, inputs, names = _load_torch(model, weights, input_shape, trust_pickle)
    _, report = fold_torch(torch_model, inputs, output, opset=opset, input_names=names, fold=not no_fold)
    if no_fold:
        verdict = f"EXPORTED | BatchNorm kept ({report.extra['onnx_bn_kept']} BatchNormalization) -> {output}"
    else:
        verdict = f"EXPORTED | {report.summary()} -> {output}"
    _finish(report, json_mode=json_mode, verdict=verdict, model=model, report_path=report_path)


if __name__ == "__main__":  # pragma: no cover
    main()
