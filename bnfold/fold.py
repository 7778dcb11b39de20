"""End-to-end entry points: fold an ONNX file or a PyTorch module, and write the result safely."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import threading
from pathlib import Path

from bnfold import protofile
from bnfold.check import folded_checker
from bnfold.errors import BnfoldError
from bnfold.onnx_fold import FoldOptions, fold_model
from bnfold.onnx_io import load_model, save_model
from bnfold.outputs import OutputPlan
from bnfold.report import FoldReport

log = logging.getLogger(__name__)

_GC_LOCK = threading.Lock()
_GC_PAUSES = [0, False]  # folds in progress, and whether the first of them found the collector enabled


@contextlib.contextmanager
def cyclic_gc_paused():
    """Python's cyclic garbage collector off for the duration (then as it was). A fold allocates a few objects
    per node and frees nearly all of them by reference counting, but every automatic collection re-walks
    every object the process holds: collections took a quarter to a third of the CPU time of a 3,000-node
    fold as a command, growing faster than the node count. (What a fold leaves in cycles, such as its plan,
    is collected once the collector runs again.) Nested and concurrent folds are counted: the last
    one out restores the collector."""
    with _GC_LOCK:
        if _GC_PAUSES[0] == 0:
            _GC_PAUSES[1] = gc.isenabled()
            gc.disable()
        _GC_PAUSES[0] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_PAUSES[0] -= 1
            if _GC_PAUSES[0] == 0 and _GC_PAUSES[1]:
                gc.enable()


def _gc_paused(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cyclic_gc_paused():
            return fn(*args, **kwargs)
    return wrapper


@_gc_paused
def inspect_onnx_file(path: str | os.PathLike, options: FoldOptions | None = None, *, precision=None) -> FoldReport:
    """What folding ``path`` would do to each BatchNorm; writes nothing. With ``precision``
    (:class:`bnfold.precision.PrecisionOptions`) the fold is carried out in memory and the report holds the
    range certificate (``extra["precision"]``)."""
    if precision is not None:
        from bnfold.precision import fold_to_dtype
        loaded = load_model(path)
        report = fold_to_dtype(loaded.model, options, precision, name=str(path), inplace=True, source_path=path)[1]
        report.dry_run = True
        return report
    from bnfold import provenance as prov_mod

    with load_model(path, skeleton=True) as loaded:
        report = fold_model(loaded.model, options, dry_run=True, name=str(path),
                            source_path=None if loaded.source is not None else path)[1]
    report.extra["provenance"] = prov_mod.provenance(str(path))
    return report


@_gc_paused
def fold_onnx_file(src: str | os.PathLike, dst: str | os.PathLike | None, options: FoldOptions | None = None, *,
                   dry_run: bool = False, check: bool = True, in_place: bool = False,
                   verify: dict | bool | None = None, precision=None,
                   provenance: dict | None = None) -> FoldReport:
    """Fold the ONNX model at ``src`` and write it atomically to ``dst``.

    ``dst`` equal to ``src`` is refused unless ``in_place``. With ``dry_run`` nothing is written. The written
    model passes ``onnx.checker`` (full check) when ``check`` is set; models that used external data keep it
    (``<dst>.data``). With ``verify`` (True, or a dict of :func:`bnfold.verify.verify` arguments) the folded model
    is compared with the original before anything is written; a failure raises
    :class:`bnfold.errors.VerificationFailed` and writes nothing. With ``precision``
    (:class:`bnfold.precision.PrecisionOptions`) the folded model is written in fp16/bf16 (a dry run then
    certifies the range in memory, like :func:`inspect_onnx_file`). ``provenance`` (default: the input file's,
    see :mod:`bnfold.provenance`) is recorded in the report and the written model's metadata.
    """
    from bnfold import provenance as prov_mod

    src_p = Path(src)
    prov = provenance or prov_mod.provenance(str(src_p))
    if dry_run and precision is not None:
        return inspect_onnx_file(src_p, options, precision=precision)
    if not dry_run:
        if dst is None:
            raise BnfoldError("no output path: pass -o OUT.onnx (or --dry-run)")
        dst_p = Path(dst)
        if dst_p.exists() and dst_p.is_dir():
            raise BnfoldError(f"output {dst_p} is a folder: give a file path such as {dst_p / 'folded.onnx'}")
        # the output (and the old data files its write removes) must not be the input or its external data
        OutputPlan().read_model(src_p).write_model(dst_p, "output", in_place=in_place).check()
    if precision is not None and not dry_run:
        # fp16/bf16 conversion rewrites every float tensor: the whole model is loaded (no skeleton)
        from bnfold.precision import fold_to_dtype
        loaded = load_model(src_p)
        folded, report = fold_to_dtype(loaded.model, options, precision, name=str(src_p), inplace=not verify,
                                       source_path=src_p)
        report.extra["provenance"] = prov
        prov_mod.record(folded, prov)
        if verify:
            _verify_or_raise(loaded.model, folded, report, verify)
        external = loaded.external_data
        del loaded
        _release_memory()
        warnings: list[str] = []
        validate = folded_checker(src_p, str(src_p), warnings) if check else None
        save_model(folded, dst_p, external_data=external, copy=False, validate=validate)
        report.extra["output"] = str(dst_p)
        if warnings:
            report.extra["warnings"] = warnings
        return report
    with load_model(src_p, skeleton=True) as loaded, protofile.deferred_tensors():
        # the file is read once: large tensors stay in it (a skeleton, bnfold.protofile) and are read on demand
        source_path = None if loaded.source is not None else src_p  # a skeleton is checked as is
        # without --verify the original is not needed again: fold the loaded model in place (no copy)
        folded, report = fold_model(loaded.model, options, dry_run=dry_run, name=str(src_p), inplace=not verify,
                                    source_path=source_path)
        report.extra["provenance"] = prov
        if dry_run:
            return report
        prov_mod.record(folded, prov)
        if verify:
            # the fold's new weights are references too (protofile.deferred_tensors): ONNX Runtime gets data
            reference = loaded.source.materialize() if loaded.source is not None else loaded.model
            candidate = protofile.materialize(folded)
            _verify_or_raise(reference, candidate, report, verify)
            del reference, candidate
        external = loaded.external_data
        if loaded.source is None:
            loaded.model = None  # the original is no longer needed: free it before serializing the result
            _release_memory()
        warnings: list[str] = []
        validate = folded_checker(src_p, str(src_p), warnings) if check else None
        save_model(folded, dst_p, external_data=external, copy=False, validate=validate)
    if warnings:
        report.extra["warnings"] = warnings
    report.extra["output"] = str(dst_p)
    return report


def fold_torch(model, example_inputs, dst: str | os.PathLike | None, options: FoldOptions | None = None, *,
               opset: int | None = None, input_names: list[str] | None = None, check: bool = True,
               fold: bool = True, dynamic_batch: bool = True, dry_run: bool = False,
               verify: dict | bool | None = None, precision=None, provenance: dict | None = None,
               reparameterize: bool = False):
    """Fold a PyTorch module at module level, export it to ONNX and run the ONNX pass over the export.

    Returns ``(TorchFoldResult | None, FoldReport)``. The report has one entry per BatchNorm module; a BN the
    module-level pass skipped but the ONNX pass then folded (e.g. a BN whose conv output is also used
    elsewhere is never folded, but a functional pattern may be) is marked folded with where it went.
    With ``fold=False`` the export keeps every BatchNormalization (a reference for `bnfold verify`).
    ``verify`` compares the folded ONNX model with the original module (run eagerly) before writing.
    With ``precision`` (:class:`bnfold.precision.PrecisionOptions`) the module is exported with its BatchNorms
    and the ONNX pass folds them in float64 straight into fp16/bf16 (a module-level fold would round the folded
    weights to fp32 first); the report's entries are the ONNX pass's.
    ``provenance`` (:func:`bnfold.provenance.provenance`) is recorded in the report and the model's metadata;
    the model's ``bnfold`` metadata summary counts what the report counts (module level and ONNX pass).
    With ``reparameterize`` every module's own deploy switch (``reparameterize()``, ``switch_to_deploy()``,
    ``fuse()``, ``fuse_model()``; see :func:`bnfold.torch_fold.reparameterize`) is called first, on a copy; the
    report's ``reparameterized`` says which. ``verify`` still compares with the model as given.
    """
    from bnfold import provenance as prov_mod
    from bnfold.export import export_onnx
    from bnfold.torch_fold import fold_module
    from bnfold.torch_fold import reparameterize as call_deploy_switches

    result = None
    module = model
    switched = None
    if reparameterize:
        module, calls = call_deploy_switches(model)
        switched = {"count": len(calls), "modules": [c.to_dict() for c in calls]}
        log.info("reparameterized %d module(s) with their own deploy switches", len(calls))

    if precision is not None and fold and not dry_run:
        from bnfold.precision import fold_to_dtype
        exported = export_onnx(module, example_inputs, opset=opset, input_names=input_names,
                               dynamic_batch=dynamic_batch, keep_bn=True)
        onnx_model, report = fold_to_dtype(exported, options, precision, name=type(model).__name__)
        if switched is not None:
            report.extra["reparameterized"] = switched
        if provenance is not None:
            report.extra["provenance"] = provenance
            prov_mod.record(onnx_model, provenance)
        if verify:
            _verify_or_raise(model, onnx_model, report, verify)
        if dst is not None:
            _save_export(onnx_model, exported, dst, check, report)
        return None, report
    if fold:
        result = fold_module(module, example_inputs, inplace=reparameterize)  # a copy already when switched
        module = result.module
        if switched is not None:
            result.report.extra["reparameterized"] = switched
        if dry_run:
            result.report.dry_run = True
            if provenance is not None:
                result.report.extra["provenance"] = provenance
            return result, result.report
    exported = export_onnx(module, example_inputs, opset=opset, input_names=input_names, dynamic_batch=dynamic_batch,
                           keep_bn=not fold)
    if fold:
        onnx_model, onnx_report = fold_model(exported, options, name="export")
        from bnfold.torch_fold import record_module_folds
        record_module_folds(onnx_model, result.report)  # the fold record travels with the model (localizer)
        report = _merge(result.report, onnx_report)
        _record_summary(onnx_model, report)
    else:
        onnx_model = exported
        from bnfold.onnx_fold import inspect_model
        report = FoldReport(entries=[], model=type(model).__name__, extra={"fold": False})
        report.extra["onnx_bn_kept"] = inspect_model(exported).bn_total
        if switched is not None:
            report.extra["reparameterized"] = switched

    if provenance is not None:
        report.extra["provenance"] = provenance
        prov_mod.record(onnx_model, provenance)
    if verify and fold:
        _verify_or_raise(model, onnx_model, report, verify)
    if dst is not None:
        _save_export(onnx_model, exported, dst, check, report)
    return result, report


def _save_export(onnx_model, exported, dst, check: bool, report: FoldReport) -> None:
    """Write the folded export to ``dst`` (checked against the export it came from when ``check``)."""
    warnings: list[str] = []
    validate = folded_checker(exported, "export", warnings) if check else None
    save_model(onnx_model, dst, copy=False, validate=validate)
    report.extra["output"] = str(dst)
    if warnings:
        report.extra["warnings"] = warnings


def _record_summary(onnx_model, report: FoldReport) -> None:
    """Make the ``bnfold`` metadata's counts those of the whole fold (what the command prints), not only the
    ONNX pass's over the export (which sees the BNs the module level left: often none). Its ``entries`` stay
    the ONNX pass's (node names, for the localizer); module-level folds are in ``bnfold.module_folds``."""
    import json

    from bnfold.onnx_fold import METADATA_KEY

    for p in onnx_model.metadata_props:
        if p.key == METADATA_KEY:
            meta = json.loads(p.value)
            onnx_pass = {k: meta.get(k) for k in ("bn_total", "folded", "skipped", "affine_folded")}
            meta.update(bn_total=report.bn_total, folded=report.folded, skipped=report.skipped,
                        affine_folded=report.affine_folded, onnx_pass=onnx_pass)
            p.value = json.dumps(meta, separators=(",", ":"))


def inspect_torch(model, example_inputs, options: FoldOptions | None = None, *,
                  reparameterize: bool = False) -> FoldReport:
    """What folding a PyTorch module would do to each BatchNorm (module level; writes nothing), and which of its
    modules carry their own deploy switch (``deploy_switches`` in the report: path, class, method), which
    ``reparameterize`` would call first."""
    from bnfold.torch_fold import find_deploy_switches

    _, report = fold_torch(model, example_inputs, None, options, dry_run=True, reparameterize=reparameterize)
    report.extra["deploy_switches"] = [s.to_dict() for s in find_deploy_switches(model)]
    return report



def _merge(torch_report: FoldReport, onnx_report: FoldReport) -> FoldReport:
    """Torch-level entries, updated with what the ONNX pass then did to the BNs left in the export: folded
    there, or skipped there for the ONNX pass's reason (the last pass's reason is the one shown)."""
    by_layer = {e.layer: e for e in onnx_report.entries if e.layer}
    for e in torch_report.entries:
        if e.status == "skipped" and e.layer in by_layer and by_layer[e.layer].status == "folded":
            o = by_layer[e.layer]
            e.status, e.direction, e.into, e.into_layer = "folded", o.direction, o.into, o.into_layer
            e.message = f"folded {o.direction} into {o.into_layer or o.into} in the exported ONNX " \
                        f"(module level: {e.reason}: {e.message})"
            e.reason = None
        elif e.status == "skipped" and e.layer in by_layer and by_layer[e.layer].reason:
            o = by_layer[e.layer]  # the last pass's reason is the one that holds
            if o.reason != e.reason:
                e.message = f"{o.message} (module level: {e.reason}: {e.message})"
                e.reason = o.reason
    extra = dict(torch_report.extra)
    extra["onnx_pass"] = {"bn_total": onnx_report.bn_total, "folded": onnx_report.folded,
                          "skipped": onnx_report.skipped, "affine_folded": onnx_report.affine_folded}
    return FoldReport(entries=torch_report.entries, model=torch_report.model, extra=extra)


def _verify_or_raise(reference, folded, report: FoldReport, verify) -> None:
    from bnfold.errors import VerificationFailed
    from bnfold.verify import verify as run_verify

    kwargs = verify if isinstance(verify, dict) else {}
    result = run_verify(reference, folded, **kwargs)
    report.extra["verify"] = result.to_dict()
    report.extra["verify_verdict"] = result.verdict()
    if not result.passed:
        raise VerificationFailed(result)


def _release_memory() -> None:
    """Hand freed memory back to the system, so that serializing the result does not stack on top of what the
    fold used. (The fold builds no reference cycles, so no gc.collect(): in a process that holds many objects a
    full collection costs seconds.)"""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
