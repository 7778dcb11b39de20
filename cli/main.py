"""The `bnfold` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from bnfold import __version__
from bnfold.fold import fold_onnx_file, inspect_onnx_file
from bnfold.onnx_fold import FoldOptions
from bnfold.onnx_io import write_text_atomic

from .common import EXIT_OK, common_options, fold_options, json_option, out_console
from .render import report_table


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="bnfold")
def main():
    """Fold BatchNormalization into neighbouring conv/linear layers, exactly, and show the evidence.

    \b
    Examples:
      bnfold inspect model.onnx
      bnfold fold model.onnx -o folded.onnx --report report.json
    """


def _options(lower_standalone: bool, no_forward: bool, no_affine: bool) -> FoldOptions:
    return FoldOptions(forward=not no_forward, affine_chains=not no_affine, lower_standalone=lower_standalone)


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
    if json_mode:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        con = out_console(json_mode)
        con.print(report_table(report, f"{model}: {report.bn_total} BatchNorm"))
        con.print(f"PLAN | {report.summary()}")
    sys.exit(EXIT_OK)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the folded model (.onnx).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the fold report as JSON to this file.")
@click.option("--dry-run", is_flag=True, help="Plan only: report what would be folded, write nothing.")
@click.option("--in-place", is_flag=True, help="Allow the output path to be the input path.")
@click.option("--no-check", is_flag=True, help="Skip onnx.checker (full check) on the result.")
@fold_options
@json_option
@common_options
def fold(model: Path, output: Path | None, report_path: Path | None, dry_run: bool, in_place: bool,
         no_check: bool, json_mode: bool, **opts):
    """Fold every BatchNorm of MODEL.onnx that can be folded exactly and write the result.

    \b
    Example:
      bnfold fold model.onnx -o folded.onnx --report fold.json
      bnfold fold model.onnx --dry-run
    """
    if output is None and not dry_run:
        raise click.UsageError("missing -o/--output (or use --dry-run)")
    report = fold_onnx_file(model, output, _options(**opts), dry_run=dry_run, check=not no_check,
                            in_place=in_place)
    if report_path is not None:
        write_text_atomic(report_path, report.to_json() + "\n")
    con = out_console(json_mode)
    if json_mode:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not click.get_current_context().meta.get("quiet"):
        con.print(report_table(report, f"{model}: {report.bn_total} BatchNorm"))
    for w in report.extra.get("warnings", []):
        con.print(f"[yellow]warning:[/] {w}")
    verdict = "PLAN" if dry_run else "FOLDED"
    where = "" if dry_run else f" -> {output}"
    con.print(f"{verdict} | {report.summary()}{where}")
    sys.exit(EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
