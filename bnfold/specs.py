"""Command-line model arguments that need no torch: is MODEL an ONNX file, and ``--input-shape`` values.

Kept apart from :mod:`bnfold.torch_io` (which imports torch) so that the ONNX paths of every command
(``inspect``, ``fold``, ``verify``, ``bench`` of ``.onnx`` files) never import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from bnfold.errors import BnfoldError

MAX_INPUT_ELEMENTS = 2**31 - 1  # per input: beyond int32 indexing, and 8 GB of float32


@dataclass
class InputSpec:
    name: str | None
    shape: tuple[int, ...]


def parse_input_shape(text: str) -> InputSpec:
    name, _, dims = text.rpartition("=")
    parts = dims.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise BnfoldError(f"--input-shape '{text}': expected dimensions like 1x3x224x224 (or NAME=1x3x224x224)") from None
    if not shape or any(d <= 0 for d in shape):
        raise BnfoldError(f"--input-shape '{text}': every dimension must be a positive integer")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise BnfoldError(f"--input-shape '{text}': {math.prod(shape):.3g} elements is too large for an example "
                          f"input (at most {MAX_INPUT_ELEMENTS:,}); give the shape of one real input")
    return InputSpec(name or None, shape)


def is_onnx_path(model: str) -> bool:
    """Whether MODEL (a command-line argument) names an ONNX file rather than a PyTorch spec."""
    return str(model).lower().endswith(".onnx") or Path(model).is_file()
