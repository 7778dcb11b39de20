"""How far apart two correct models may be: a budget from the model's own rounding, or a fixed rule.

**The rounding budget** (the default). Rounding alone moves a model's outputs: every parameter of the folded
model is one rounding of the exact fold (at most half a unit in the last place, ½ ULP, of the candidate's dtype),
and every layer rounds its results. We measure what that does to *this* model on *these* inputs: the reference
is run again with every parameter ``p`` replaced by ``p * (1 + s * u)`` (``u`` the unit roundoff of the
candidate's dtype: 2**-24 for fp32, 2**-11 for fp16, 2**-8 for bf16; ``s`` a random sign per element), a few
times (:data:`DRAWS`). The spread of those outputs, per channel (max over the channel's elements and the draws of
``|perturbed - reference|``), is what rounding can do; the budget is

    budget_c = SAFETY * spread_c + FLOOR_ULPS * u * max|reference over channel c|
               + TENSOR_ULPS * u * max|reference over the whole output|

``SAFETY`` covers what the draws do not (a few draws of a random process, the rounding of activations and
of accumulation order); the floor covers outputs rounding cannot move in the reference (saturated, constant)
but can in the candidate by an ULP or so; the last term is the rounding of accumulation that a fold which
reorders sums (merged branches: three convolutions summed become one) adds to every channel of a layer alike,
at the scale of the layer's output, not of one channel that happens to be small (found on timm repghostnet_050
and repvit_m0_9, whose merged folds were 1.1x a budget without it). A correct fold stays well inside at any dynamic range (its error is
one more rounding of the same kind); a wrong fold (a channel x1.25, a bias +0.5) is orders of magnitude above.

**The fixed rule** (``--atol``/``--rtol``, and the arg-max tie test): ``|cand - ref| <= atol_c + rtol*|ref|`` with
``atol_c = atol_scale * max(1, max|ref over channel c|)``:

=========  ==========  =====
dtype      atol_scale  rtol
=========  ==========  =====
fp32/fp64  1e-4        1e-3
fp16       5e-3        1e-2
bf16       2e-2        5e-2
=========  ==========  =====
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TOLERANCES = {  # dtype -> (atol_scale, rtol)
    "float32": (1e-4, 1e-3),
    "float64": (1e-4, 1e-3),
    "float16": (5e-3, 1e-2),
    "bfloat16": (2e-2, 5e-2),
}

#: unit roundoff (half an ULP at 1.0) per dtype name
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
#: perturbed runs of the reference
DRAWS = 3
#: the budget is this many times the largest deviation the draws produced ...
SAFETY = 4.0
#: ... plus this many unit roundoffs (half-ULPs) of the channel's largest magnitude
FLOOR_ULPS = 16.0
#: ... plus this many unit roundoffs of the whole output's largest magnitude (accumulation order)
TENSOR_ULPS = 2.0


def unit_roundoff(dtype: str) -> float:
    """Half an ULP at 1.0 for a float dtype name (``float32``, ``float16``, ``bfloat16``, ``float64``)."""
    try:
        return UNIT_ROUNDOFF[dtype]
    except KeyError:
        raise ValueError(f"no unit roundoff for dtype {dtype!r}") from None


def perturb(params: dict[str, np.ndarray], u: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each parameter times ``1 + s*u`` with a random sign ``s`` per element, computed in float64 and cast back
    to the parameter's dtype once. For a dtype coarser than ``u`` (a float16 parameter perturbed at fp32's
    roundoff) the cast would undo the step, so the step is at least one of that dtype's ULPs."""
    out = {}
    for name, p in params.items():
        a = np.asarray(p)
        s = np.where(rng.random(a.shape) < 0.5, -1.0, 1.0)
        q = (a.astype(np.float64) * (1.0 + s * u)).astype(a.dtype)
        if a.dtype.kind == "f" and np.finfo(a.dtype).eps / 2 > u:
            step = np.where(s > 0, np.inf, -np.inf).astype(a.dtype)
            q = np.where(a != 0, np.nextafter(a, step), a)
        out[name] = np.asarray(q, a.dtype)
    return out


def rounding_spread(run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], params: dict[str, np.ndarray],
                    u: float, *, baseline: list[np.ndarray] | None = None, draws: int = DRAWS,
                    seed: int = 0) -> list[np.ndarray]:
    """Per output, the largest ``|run(perturbed) - run(params)|`` over ``draws`` draws of :func:`perturb`
    (float64 arrays shaped like the outputs; NaN/inf positions count as zero). ``run`` maps a parameter dict to
    the model's outputs; ``baseline`` is ``run(params)`` when the caller has it."""
    base = baseline if baseline is not None else run(params)
    base64 = [np.asarray(b, np.float64) for b in base]
    spread = [np.zeros(b.shape) for b in base64]
    rng = np.random.default_rng(seed + 104729)
    for _ in range(draws):
        outs = run(perturb(params, u, rng))
        for k, (o, b) in enumerate(zip(outs, base64)):
            o64 = np.asarray(o, np.float64)
            if o64.shape != b.shape:  # a perturbation changed a shape: no estimate from this draw
                continue
            with np.errstate(invalid="ignore", over="ignore"):
                d = np.abs(o64 - b)
            spread[k] = np.maximum(spread[k], np.where(np.isfinite(d), d, 0.0))
    return spread


def channel_budget(spread: np.ndarray, ref: np.ndarray, axes: tuple[int, ...], u: float, *,
                   safety: float = SAFETY, floor_ulps: float = FLOOR_ULPS,
                   tensor_ulps: float = TENSOR_ULPS) -> np.ndarray:
    """The budget per channel (``axes``: the channel axes; ``()`` the whole tensor is one channel), shaped to
    broadcast against ``ref``: ``safety * max spread + floor_ulps * u * max|ref|`` over each channel, plus
    ``tensor_ulps * u * max|ref|`` over the whole tensor."""
    ref64 = np.asarray(ref, np.float64)
    ndim = ref64.ndim
    mag = np.where(np.isfinite(ref64), np.abs(ref64), 0.0)
    sp = np.asarray(spread, np.float64)
    if mag.size == 0:
        return np.zeros((1,) * ndim)
    whole = float(mag.max())
    other = tuple(k for k in range(ndim) if k not in axes)
    if other:
        mag = mag.max(axis=other, keepdims=True)
        sp = sp.max(axis=other, keepdims=True)
    return safety * sp + floor_ulps * u * mag + tensor_ulps * u * whole


def candidate_dtype(float_dtypes: list[tuple[str, int]]) -> str:
    """The precision a model computes in, from its float parameters ``[(dtype name, element count), ...]``:
    the coarsest dtype holding a tenth or more of the parameters' elements (``float32`` when there are none)."""
    total = sum(n for _, n in float_dtypes)
    if total == 0:
        return "float32"
    counts: dict[str, int] = {}
    for dt, n in float_dtypes:
        counts[dt] = counts.get(dt, 0) + n
    for dt in ("bfloat16", "float16", "float32", "float64"):
        if counts.get(dt, 0) * 10 >= total:
            return dt
    return "float32"
