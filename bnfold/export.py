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
                output_names: list[str] | None = None) -> onnx.ModelProto:
    """Export ``model`` (in eval mode) to an ONNX ModelProto, keeping BatchNormalization nodes."""
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
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            try:
                prog = torch.onnx.export(model, example_inputs, dynamic_shapes=dynamic, **kwargs)
            except Exception as exc:
                if dynamic is None:
                    raise
                log.info("export with a dynamic batch failed (%s); retrying with a static batch", exc)
                prog = torch.onnx.export(model, example_inputs, **kwargs)
    except Exception as exc:
        raise BnfoldError(f"torch.onnx.export failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return prog.model_proto
