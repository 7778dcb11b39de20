"""File-level entry points: fold or inspect a model file and write the result safely."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from bnfold.check import check_folded
from bnfold.errors import BnfoldError
from bnfold.onnx_fold import FoldOptions, fold_model
from bnfold.onnx_io import load_model, save_model
from bnfold.report import FoldReport

log = logging.getLogger(__name__)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def inspect_onnx_file(path: str | os.PathLike, options: FoldOptions | None = None) -> FoldReport:
    """What folding ``path`` would do to each BatchNorm; writes nothing."""
    loaded = load_model(path)
    return fold_model(loaded.model, options, dry_run=True, name=str(path))[1]


def fold_onnx_file(src: str | os.PathLike, dst: str | os.PathLike | None, options: FoldOptions | None = None, *,
                   dry_run: bool = False, check: bool = True, in_place: bool = False) -> FoldReport:
    """Fold the ONNX model at ``src`` and write it atomically to ``dst``.

    ``dst`` equal to ``src`` is refused unless ``in_place``. With ``dry_run`` nothing is written. The written
    model passes ``onnx.checker`` (full check) when ``check`` is set; models that used external data keep it
    (``<dst>.data``).
    """
    src_p = Path(src)
    if not dry_run:
        if dst is None:
            raise BnfoldError("no output path: pass -o OUT.onnx (or --dry-run)")
        dst_p = Path(dst)
        if (_same_file(src_p, dst_p) or src_p.resolve() == dst_p.resolve()) and not in_place:
            raise BnfoldError(f"output {dst_p} is the input file: choose another path or pass --in-place")
        if dst_p.exists() and dst_p.is_dir():
            raise BnfoldError(f"output {dst_p} is a folder: give a file path such as {dst_p / 'folded.onnx'}")
    loaded = load_model(src_p)
    folded, report = fold_model(loaded.model, options, dry_run=dry_run, name=str(src_p))
    if dry_run:
        return report
    if check:
        warning = check_folded(loaded.model, folded, str(src_p))
        if warning:
            report.extra["warnings"] = [warning]
    external = loaded.external_data
    del loaded
    save_model(folded, dst_p, external_data=external, copy=False)
    report.extra["output"] = str(dst_p)
    return report

