"""Export a PyTorch module to ONNX with BatchNorm kept (the input of the ONNX fold pass, or a reference).

Uses ``torch.onnx.export`` with the dynamo exporter and ``optimize=False``, so that the exporter's own
optimizer does not fold anything behind the report's back; the batch dimension is dynamic by default.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import torch

from bnfold.errors import BnfoldError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18


def export_onnx(model: torch.nn.Module, example_inputs: tuple, *, opset: int | None = None,
                dynamic_batch: bool = True, input_names: list[str] | None = None,
                output_names: list[str] | None = None, materialize: bool = True,
                keep_bn: bool = False) -> onnx.ModelProto:
    """Export ``model`` (in eval mode) to an ONNX ModelProto, keeping BatchNormalization nodes.

    With ``materialize`` (default) conv/linear weights and biases the exporter computes in-graph from constants
    become initializers (all-zero biases dropped; see :func:`bnfold.onnx_fold.materialize_params`), so that a
    runtime sees the original model's constants as plainly as the folded model's. With ``keep_bn`` (a reference
    export) the TorchScript fallback, which folds Conv+BN on its own, is not used."""
    proto = _export(model, example_inputs, opset=opset, dynamic_batch=dynamic_batch, input_names=input_names,
                    output_names=output_names, keep_bn=keep_bn)
    if materialize:
        from bnfold.onnx_fold import materialize_params
        proto, _ = materialize_params(proto)
        proto, _ = constant_reshape_targets(proto)
    return proto


def constant_reshape_targets(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Give every Reshape whose target shape the graph computes at run time (the dynamo exporter, with a dynamic
    batch and ``optimize=False``, builds ``x.flatten(0, 1)``'s target as ``Concat(batch * N, C)``) a constant
    target, where the exporter's own output shape says it exactly: all dimensions known but one, which becomes
    ``-1``. The fold pass needs the target as a constant to see where the channel axis goes (timm's LeViT: Linear
    -> flatten -> BatchNorm1d); the model computes the same for every batch size. The shape computations left
    unused are removed. Returns the new model and the number of Reshapes rewritten."""
    import numpy as np

    from bnfold import planner
    from bnfold.graph import ModelGraph, NodeKey, NotConst, is_default_domain

    out = onnx.ModelProto()
    out.CopyFrom(model)
    mg = ModelGraph(out)
    ed = planner._Editor(planner.Plan(mg, planner.Context(mg)))
    changed = 0
    for g in mg.graphs:
        for i, node in enumerate(g.nodes):
            if node.op_type != "Reshape" or not is_default_domain(node) or len(node.input) < 2 or not node.output:
                continue
            b = mg.resolve(g.index, node.input[1])
            if b is None or not isinstance(mg.const(b), NotConst):
                continue  # already a constant
            target = _exported_shape(g.types.get(node.output[0]))
            if target is None:
                continue
            new = mg.unique(f"{node.output[0]}_shape")
            ed.add_initializer(g.index, new, np.asarray(target, dtype=np.int64))
            ed.set_input(NodeKey(g.index, i), 1, new)
            changed += 1
    if not changed:
        return model, 0
    ed.remove_dead()
    ed.rebuild_nodes()
    return out, changed


def _exported_shape(t) -> list[int] | None:
    """A Reshape target equal to the exported output type ``t``: its dimensions, the one symbolic dimension
    (if any) as -1; None when unknown, when two or more are symbolic, or when one is 0 (which Reshape without
    ``allowzero`` reads as "copy the input's dimension"). With no 0 in it, the target means the same with and
    without ``allowzero``."""
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_value"):
            return None
        else:
            dims.append(-1)
    return dims if dims.count(-1) <= 1 else None


def _export(model, example_inputs, *, opset, dynamic_batch, input_names, output_names,
            keep_bn=False) -> onnx.ModelProto:
    if model.training:
        raise BnfoldError("the model is in training mode: call model.eval() before exporting")
    example_inputs = tuple(example_inputs)
    names = input_names or (["input"] if len(example_inputs) == 1 else [f"input_{i}" for i in range(len(example_inputs))])
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)
    kwargs = dict(dynamo=True, optimize=False, opset_version=opset or DEFAULT_OPSET, input_names=names,
                  output_names=output_names, verbose=False)
    sink = io.StringIO()
    errors = []
    # torch's exporter warns about every optional torchvision op it cannot register: noise here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        for dyn in ([dynamic, None] if dynamic is not None else [None]):
            try:
                prog = torch.onnx.export(model, example_inputs, dynamic_shapes=dyn, **kwargs)
                return prog.model_proto
            except Exception as exc:
                errors.append(_first_line(exc))
                log.info("dynamo export (%s batch) failed: %s", "dynamic" if dyn else "static", errors[-1])
        if keep_bn:
            raise BnfoldError(f"the dynamo exporter failed ({errors[-1]}); the TorchScript exporter would fold "
                              "Conv+BatchNorm itself, so no BN-preserving reference can be exported")
        log.warning("the dynamo exporter failed (%s); falling back to the TorchScript exporter, which folds "
                    "Conv+BatchNorm pairs itself in eval mode", errors[-1])
        try:
            return _export_torchscript(model, example_inputs, opset or DEFAULT_OPSET, names, output_names,
                                       dynamic_batch)
        except Exception as exc:
            errors.append(_first_line(exc))
    raise BnfoldError("torch.onnx.export failed (dynamo: " + errors[0] + "; TorchScript: " + errors[-1] + ")")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _export_torchscript(model, example_inputs, opset, names, output_names, dynamic_batch) -> onnx.ModelProto:
    import os
    import tempfile

    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        torch.onnx.export(model, example_inputs, path, dynamo=False, opset_version=min(opset, 20),
                          input_names=names, output_names=output_names, dynamic_axes=axes,
                          do_constant_folding=False)
        return onnx.load(path)
