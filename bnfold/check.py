"""Validity checks on a folded model: ``onnx.checker`` (full check, which includes strict shape inference)."""

from __future__ import annotations

import logging
import os
import tempfile

import onnx

from bnfold.errors import BnfoldError

log = logging.getLogger(__name__)
_2GB = 2**31 - 1


def checker_error(model: onnx.ModelProto) -> str | None:
    """The first line of onnx.checker's complaint about ``model`` (full check), or None if it passes."""
    try:
        if model.ByteSize() > _2GB:
            with tempfile.TemporaryDirectory() as d:
                p = os.path.join(d, "m.onnx")
                onnx.save_model(model, p, save_as_external_data=True, location="m.data")
                onnx.checker.check_model(p, full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def check_folded(original: onnx.ModelProto, folded: onnx.ModelProto, label: str = "model") -> str | None:
    """Check the folded model. A failure the original shares is returned as a warning string; a failure only
    the folded model has is a bug in bnfold and raises."""
    err = checker_error(folded)
    if err is None:
        return None
    orig_err = checker_error(original)
    if orig_err is not None:
        msg = f"{label}: the input already fails onnx.checker ({orig_err}); the folded model fails it too"
        log.warning(msg)
        return msg
    raise BnfoldError(f"internal error: the folded {label} fails onnx.checker ({err}) although the input passes; "
                      "nothing was written. Please report this with the model")
