"""The ONNX fold pass: fold every BatchNormalization that can be folded exactly, in any ONNX model.

For each BatchNormalization (in the main graph and in If/Loop/Scan bodies), in graph order, the planner
(:mod:`bnfold.planner`) checks the node itself (inference mode, no statistics outputs, ``spatial=1``, constant
parameters; invalid statistics raise), then asks the rules (:mod:`bnfold.rules`, one per file): *backward* into
the producer (Conv, ConvTranspose, Gemm, MatMul[+Add], through Concat per slice, through Reshape after a
MatMul) when BN is the only user of the producer's output; otherwise *forward* into the only consumer (Conv
without padding, Gemm, MatMul, through Flatten); otherwise *lower* it to Mul+Add (optional); otherwise *skip*,
with a reason code (see :data:`bnfold.report.REASONS`). Per-channel Mul/Add/Sub/Div by constants right after a
producer (the way TensorFlow converters emit BN) fold backward the same way. Parallel branches summed by an
Add/Sub/Sum (RepVGG, MobileOne, RepViT, FastViT, RepGhost) are merged into one Conv when that is exact
(:mod:`bnfold.rules.branch_merge`; ``merge_branches=False`` keeps them).

The plan is computed without changing anything (``inspect``, ``--dry-run``); applying it edits the ModelProto in
place, touching only the folded nodes and their initializers. :func:`fold_model` applies it to a copy, so the
caller's model is never modified. A model that the full ``onnx.checker`` rejects is refused before anything
else (:class:`BnfoldError`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold import planner
from bnfold._version import __version__
from bnfold.errors import BnfoldError
from bnfold.graph import ModelGraph, NodeKey, NotConst, is_default_domain
from bnfold.graph import source_layers as _source_layers  # noqa: F401  (used by bnfold.verify)
from bnfold.onnx_io import walk_graphs
from bnfold.report import FoldReport

log = logging.getLogger(__name__)

METADATA_KEY = "bnfold"


@dataclass
class FoldOptions:
    """Switches of the ONNX pass."""

    forward: bool = True  #: fold into the consumer when the producer cannot take it
    affine_chains: bool = True  #: fold per-channel Mul/Add/Sub/Div by constants after a producer
    lower_standalone: bool = False  #: rewrite a BN with no foldable neighbour as Mul+Add
    merge_branches: bool = True  #: merge parallel conv/identity/BN branches summed by Add/Sub/Sum into one Conv


def check_input(model: onnx.ModelProto, name: str = "", *, source_path=None) -> None:
    """Refuse (:class:`BnfoldError`, the checker's message) a model the full onnx.checker rejects, or whose
    string attributes are not text. (Tensor data that does not match its dims, which the checker does not look
    at, is refused when a fold reads it: :meth:`bnfold.graph.ModelGraph.const`.)"""
    check_input_started(model, name, source_path=source_path)()


def check_input_started(model: onnx.ModelProto, name: str = "", *, source_path=None):
    """:func:`check_input`, its checker run in the background (:func:`bnfold.check.checker_error_in_background`,
    which takes the model as it is now); the text check runs here. Call the returned function to wait for the
    verdict (it raises as :func:`check_input` does)."""
    from bnfold.check import checker_error_in_background

    label = name or "model"
    # the file the model was loaded from, when given, is checked as a file (no re-serialization of the model)
    verdict = checker_error_in_background(source_path if source_path is not None else model,
                                          nodes=sum(len(g.node) for g in walk_graphs(model.graph)))

    def wait(failed: BaseException | None = None) -> None:
        """Raise the checker's complaint, if any (it wins over ``failed``, an error of the work done meanwhile);
        on an interrupt (``failed`` not an Exception) the check is abandoned."""
        if failed is not None and not isinstance(failed, Exception):
            verdict.cancel()
            return
        err = verdict()
        if err is not None:
            raise BnfoldError(f"{label}: not a valid ONNX model ({err[:300]}); fix or re-export it") from None
    try:
        _check_text(model, label)
    except BaseException as exc:
        wait(exc)
        raise
    return wait


def _check_text(model: onnx.ModelProto, label: str) -> None:
    for g in walk_graphs(model.graph):
        for node in g.node:
            for a in node.attribute:
                for raw in ([a.s] if a.type == onnx.AttributeProto.STRING else list(a.strings)):
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise BnfoldError(f"{label}: attribute '{a.name}' of node '{node.name or node.op_type}' "
                                          "is not valid UTF-8 text; the file is corrupted") from None





def _plan_options(options: FoldOptions) -> planner.PlanOptions:
    return planner.PlanOptions(forward=options.forward, affine_chains=options.affine_chains,
                               lower_standalone=options.lower_standalone, merge_branches=options.merge_branches)


def plan_model(model: onnx.ModelProto, options: FoldOptions | None = None, *, name: str = "") -> planner.Plan:
    """Check the model, then plan the fold (nothing is changed)."""
    check_input(model, name)
    return planner.plan(model, _plan_options(options or FoldOptions()))


def fold_model(model: onnx.ModelProto, options: FoldOptions | None = None, *, dry_run: bool = False,
               name: str = "", inplace: bool = False, source_path=None,
               materialize=None) -> tuple[onnx.ModelProto | None, FoldReport]:
    """Fold the BatchNorms of ``model``. Returns ``(folded_model, report)``; the folded model is None for a
    dry run. ``model`` itself is modified only with ``inplace=True`` (then the folded model *is* ``model``).
    ``source_path``: the unmodified file ``model`` was loaded from (the checker then reads the file).
    ``materialize``: the rounding hook of :func:`bnfold.planner.apply` (reduced precision).
    Raises :class:`BnfoldError` on invalid statistics or a model onnx.checker rejects."""
    options = options or FoldOptions()
    # the input is checked in a child process while this one plans (nothing is written before the verdict;
    # when planning fails, the checker's complaint, if any, is the error reported)
    checked = check_input_started(model, name, source_path=source_path)
    try:
        if dry_run:
            p = planner.plan(model, _plan_options(options))
            checked()
            return None, p.report(name=name, dry_run=True)
        if inplace:
            out = model
        else:
            out = onnx.ModelProto()
            out.CopyFrom(model)
        p = planner.plan(out, _plan_options(options))
    except BaseException as exc:
        checked(exc)
        raise
    checked()
    report = p.report(name=name)
    planner.apply(p, materialize=materialize)
    meta = {"version": __version__, "bn_total": report.bn_total, "folded": report.folded,
            "skipped": report.skipped, "affine_folded": report.affine_folded,
            "entries": [{k: v for k, v in (("bn", e.bn), ("status", e.status), ("into", e.into),
                                           ("direction", e.direction), ("reason", e.reason), ("layer", e.layer),
                                           ("into_layer", e.into_layer)) if v is not None}
                        for e in report.entries]}
    for idx in reversed([k for k, prop in enumerate(out.metadata_props) if prop.key == METADATA_KEY]):
        del out.metadata_props[idx]
    out.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta, separators=(",", ":")))
    return out, report


def inspect_model(model: onnx.ModelProto, options: FoldOptions | None = None, *, name: str = "") -> FoldReport:
    """What :func:`fold_model` would do to each BatchNorm, without changing anything."""
    return fold_model(model, options, dry_run=True, name=name)[1]


def materialize_params(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace weights and biases of Conv/ConvTranspose/Gemm/MatMul that the graph computes from constants
    (torch's dynamo exporter builds a zero bias for every bias-less conv at run time when ``optimize=False``)
    with initializers, dropping all-zero conv biases. BatchNorms are left alone. Returns the new model and the
    number of inputs rewritten. This gives runtimes the same constants for an original and its folded model,
    so that their own Conv+BN fusion can apply and latency comparisons are fair."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    mg = ModelGraph(out)
    ed = planner._Editor(planner.Plan(mg, planner.Context(mg)))
    changed = 0
    for g in mg.graphs:
        for i, node in enumerate(g.nodes):
            if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or not is_default_domain(node):
                continue
            key = NodeKey(g.index, i)
            for slot in range(1, min(len(node.input), 3)):
                name = node.input[slot]
                b = mg.resolve(g.index, name) if name else None
                if b is None or name in mg.graphs[b.graph].inits:
                    continue
                value = mg.const(b)
                if isinstance(value, NotConst):
                    continue
                if slot == 2 and node.op_type in ("Conv", "ConvTranspose") and not np.any(np.asarray(value, np.float64)):
                    ed.dec(g.index, name)
                    del node.input[2:]
                else:
                    new = mg.unique(f"{name}_const")
                    ed.add_initializer(g.index, new, np.asarray(value))
                    ed.set_input(key, slot, new)
                changed += 1
    ed.remove_dead()
    ed.rebuild_nodes()
    return out, changed


def count_bn(model: onnx.ModelProto) -> int:
    """Number of BatchNormalization nodes, subgraphs included."""
    n = sum(node.op_type == "BatchNormalization" for g in walk_graphs(model.graph) for node in g.node)
    return n + sum(node.op_type == "BatchNormalization" for f in model.functions for node in f.node)
