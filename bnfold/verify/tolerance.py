"""Fixed tolerances per dtype (see the package docstring)."""

from __future__ import annotations

TOLERANCES = {  # dtype -> (atol_scale, rtol)
    "float32": (1e-4, 1e-3),
    "float64": (1e-4, 1e-3),
    "float16": (5e-3, 1e-2),
    "bfloat16": (2e-2, 5e-2),
}
