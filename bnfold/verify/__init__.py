"""Verify: prove a folded model computes what the original computes, and say which fold broke when it does not.

The reference (an ONNX model, run by ONNX Runtime with graph optimizations *off* so the runtime cannot fold BN
for us, or a PyTorch module, run eagerly) and the candidate (the folded ONNX model) get the same inputs: seeded
random tensors, or real data. Per output we report max/mean/p99 absolute error, max relative error, cosine
similarity and the worst channel.

**Floating-point outputs** pass when every channel's error is within its *rounding budget*: what rounding the
parameters by half an ULP of the candidate's dtype does to the reference's outputs on the same inputs
(:mod:`bnfold.verify.tolerance`). ``atol``/``rtol`` replace it by the fixed rule ``|cand - ref| <= atol_c +
rtol * |ref|``. The channel axis is the one the output's producer defines (Conv/BatchNorm/pooling: axis 1;
Gemm: 1; MatMul: the last axis; Softmax: its ``axis``; Concat: its inputs' when they agree, else its ``axis``;
followed through elementwise ops, Transpose, and Reshape/Flatten when the shapes are known); when it cannot be
told, each slice of axis 1 is a channel.

After a pass, :mod:`bnfold.verify.power` asks whether dropping a BatchNorm would have been seen; where not,
the verdict says ``PASSED (unproven: ...)``.

A NaN or infinity in one model where the other has a finite value fails the output, and its cosine is reported
as NaN (``null`` in JSON).

**Integer and bool outputs** must match exactly; the disagreement rate is reported. One exception, for
arg-max ties that a correct fp32 fold can flip: for an output computed by ArgMax/ArgMin, a position where the
two models pick different indices is a *tie flip*, and accepted, when the reference's own scores at the two
indices differ by no more than the fixed float tolerance (``atol_scale * max(1, |s|) + rtol * |s|``, ``s``
the reference's score at its own index). This needs the scores, so it applies with an ONNX reference that
computes the arg-max input under the same tensor name; tie flips are counted in the report.

**Overridable initializers** (from IR 4 on, an initializer that is also a graph input is a default the caller
may override) are fed random values, the same in both models, in a second run besides their defaults: a
candidate that baked a default in fails.

On failure, the localizer compares intermediate tensors in the candidate's graph order: each layer a BatchNorm
was folded into (by the fold record the folded model carries in its metadata, module-level folds included)
with the original BN's output, and every other tensor both graphs compute with the same meaning; the first
that diverges is named, with its source layer and the fold that touched it. A PyTorch reference is exported
(BatchNorm kept) for this.
"""

from __future__ import annotations

from bnfold.verify.channels import _Graph
from bnfold.verify.compare import compare_output
from bnfold.verify.core import verify
from bnfold.verify.data import (
    check_data,
    fit_dataset,
    load_data_for,
    model_input_shapes,
    overridable_initializers,
)
from bnfold.verify.localize import (
    MODULE_FOLDS_KEY,
    ONNX_FOLDS_KEY,
    _layer_output,
    locate_divergence,
    source_layers,
)
from bnfold.verify.result import OutputStats, VerifyResult
from bnfold.verify.tolerance import TOLERANCES

__all__ = ["MODULE_FOLDS_KEY", "ONNX_FOLDS_KEY", "TOLERANCES", "OutputStats", "VerifyResult", "check_data",
           "compare_output", "fit_dataset", "load_data_for", "locate_divergence", "model_input_shapes",
           "overridable_initializers", "source_layers", "verify", "_Graph", "_layer_output"]
