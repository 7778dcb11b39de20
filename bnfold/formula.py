"""The fold formula, shared by every front end (ONNX graphs and PyTorch modules).

Inference-mode BatchNorm is a per-channel affine map::

    y = gamma * (x - mean) / sqrt(var + eps) + beta  =  scale * x + shift
    scale = gamma / sqrt(var + eps),   shift = beta - mean * scale

Folding it *backward* into the layer that produced x (Conv, ConvTranspose, Gemm/Linear, MatMul) scales that
layer's output channels: ``W' = W * scale`` (on the output-channel axis), ``b' = b * scale + shift``.
Folding it *forward* into the layer that consumes y scales that layer's input channels:
``W' = W * scale`` (on the input-channel axis), ``b' = b + W . shift``; this is exact only when every input value
the consumer reads is a BN output (no zero padding).

All arithmetic is float64; the caller casts once to the model's dtype with :func:`cast_checked`.

Weight layouts (``layout``):

* ``"out_in"``: the output channel is axis 0, the input channel axis 1: Conv ``(M, C/g, k...)``,
  torch Linear ``(N, K)``, Gemm with ``transB=1``.
* ``"in_out"``: the input channel is axis 0, the output channel axis 1: ConvTranspose ``(C, M/g, k...)``,
  Gemm with ``transB=0`` and MatMul ``(K, N)``.

``groups`` splits both channel axes into ``groups`` blocks; block ``g`` of inputs feeds block ``g`` of outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnfold.errors import InvalidStatisticsError

__all__ = [
    "Affine",
    "bn_affine",
    "fold_backward",
    "fold_forward",
    "cast_checked",
    "CastOverflow",
]


@dataclass(frozen=True)
class Affine:
    """A per-channel affine map ``y = scale * x + shift`` in float64, one value per channel."""

    scale: np.ndarray
    shift: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    def then(self, other: Affine) -> Affine:
        """The composition ``other(self(x))``."""
        return Affine(self.scale * other.scale, self.shift * other.scale + other.shift)


def _f64(a, n: int | None = None, fill: float = 0.0) -> np.ndarray:
    if a is None:
        assert n is not None
        return np.full((n,), fill, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    return a if a.ndim == 1 else a.reshape(-1)


def bn_affine(gamma, beta, mean, var, eps: float, *, name: str = "BatchNorm") -> Affine:
    """Per-channel ``(scale, shift)`` of an inference BatchNorm, in float64.

    ``gamma``/``beta`` may be None (BN without affine parameters). Raises :class:`InvalidStatisticsError`,
    naming ``name``, for non-finite parameters or ``var + eps <= 0``.
    """
    mean64 = _f64(mean)
    var64 = _f64(var)
    n = mean64.shape[0]
    if var64.shape[0] != n:
        raise InvalidStatisticsError(
            f"BatchNorm '{name}': running_mean has {n} channels but running_var has {var64.shape[0]}; "
            "the model is malformed: re-export it"
        )
    gamma64 = _f64(gamma, n, 1.0)
    beta64 = _f64(beta, n, 0.0)
    eps64 = float(eps)
    if gamma64.shape[0] == n and beta64.shape[0] == n:  # the common case, checked in three array operations
        denom = var64 + eps64
        if np.isfinite(np.concatenate((gamma64, beta64, mean64, var64))).all() and (denom > 0).all():
            scale = gamma64 / np.sqrt(denom)
            return Affine(scale, beta64 - mean64 * scale)
    # something is wrong: find the first problem, in the order a person fixes them
    for label, arr in (("scale (gamma)", gamma64), ("bias (beta)", beta64), ("mean", mean64), ("var", var64)):
        if arr.shape[0] != n:
            raise InvalidStatisticsError(
                f"BatchNorm '{name}': {label} has {arr.shape[0]} channels, expected {n}; the model is malformed"
            )
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise InvalidStatisticsError(
                f"BatchNorm '{name}': {label} is not finite at channel {int(bad[0])} ({arr[bad[0]]!r}); "
                "recalibrate the statistics (bnfold calibrate) or fix the checkpoint"
            )
    denom = var64 + eps64
    bad = np.flatnonzero(denom <= 0)
    if bad.size:
        c = int(bad[0])
        raise InvalidStatisticsError(
            f"BatchNorm '{name}': var + eps <= 0 at channel {c} (var={var64[c]!r}, eps={eps64!r}); "
            "the running variance is invalid: recalibrate the statistics (bnfold calibrate)"
        )
    scale = gamma64 / np.sqrt(denom)
    shift = beta64 - mean64 * scale
    return Affine(scale, shift)


def _axes(layout: str) -> tuple[int, int]:
    """(output-channel axis, input-channel axis) of a weight in ``layout``."""
    if layout == "out_in":
        return 0, 1
    if layout == "in_out":
        return 1, 0
    raise ValueError(f"unknown weight layout {layout!r}")


def _per_element(values: np.ndarray, shape, axis: int, groups: int) -> np.ndarray:
    """Broadcastable array holding, for each weight element, ``values`` of the channel it touches on ``axis``.

    Axis 0 holds all its channels; axis 1 holds ``channels / groups`` of them, the group given by axis 0's
    block: element ``(i0, i1)`` touches channel ``(i0 // (shape[0] / groups)) * shape[1] + i1``.
    """
    ndim = len(shape)
    if axis == 0:
        assert shape[0] == values.shape[0], (shape, values.shape)
        return values.reshape((shape[0],) + (1,) * (ndim - 1))
    assert shape[1] * groups == values.shape[0] and shape[0] % groups == 0, (shape, groups, values.shape)
    v = np.repeat(values.reshape(groups, shape[1]), shape[0] // groups, axis=0)
    return v.reshape(v.shape + (1,) * (ndim - 2))


def fold_backward(weight, bias, affine: Affine, *, layout: str = "out_in", groups: int = 1, dtype=None):
    """Fold ``affine`` (applied to this layer's output) into the layer. Returns ``(weight, bias)``: float64, or
    cast once to ``dtype`` (with the overflow check of :func:`cast_checked`) when it is given.

    ``bias`` may be None (treated as 0) or any array broadcastable against the channels on its last axis
    (Gemm's C of shape ``(M, N)``, ``(1, N)``, a scalar...); the result has the broadcast shape.
    """
    out_axis, _ = _axes(layout)
    w = np.asarray(weight)
    s = _per_element(affine.scale, w.shape, out_axis, groups)
    b = np.zeros((affine.channels,), np.float64) if bias is None else np.asarray(bias, dtype=np.float64)
    b_new = b * affine.scale + affine.shift
    if dtype is None:
        return w.astype(np.float64) * s, b_new
    return scale_cast(w, s, dtype, what="weight"), cast_checked(b_new, dtype, what="bias")


_NATIVE_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_SMALL = 4096  #: elements: below this, scale_cast computes a float64 copy (the same values, fewer numpy calls)


def scale_cast(weight: np.ndarray, factor: np.ndarray, dtype, *, what: str) -> np.ndarray:
    """``weight * factor`` computed in float64 and rounded once to ``dtype``, without materialising a float64
    copy of the weight (numpy's ufunc loop casts in small buffers). Raises :class:`CastOverflow` if a finite
    product does not fit ``dtype``."""
    dtype = np.dtype(dtype)
    w = np.asarray(weight)
    if dtype not in _NATIVE_FLOATS or w.dtype not in _NATIVE_FLOATS:  # bfloat16 and friends: the plain path
        return cast_checked(w.astype(np.float64) * factor, dtype, what=what)
    if w.size <= _SMALL:  # a small weight: a float64 copy costs less than the buffered ufunc's set-up
        with np.errstate(over="ignore", invalid="ignore"):
            out = (w.astype(np.float64) * factor).astype(dtype)
    else:
        out = np.empty(np.broadcast_shapes(w.shape, np.shape(factor)), dtype=dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(w, factor, out=out, dtype=np.float64, casting="unsafe")
    if not np.isfinite(out).all():
        exact = w.astype(np.float64) * factor
        bad = np.flatnonzero((np.isfinite(exact) & ~np.isfinite(out)).reshape(-1))
        if bad.size:
            raise CastOverflow(f"{what}: folded value {exact.reshape(-1)[bad[0]]:.6g} overflows {dtype.name}")
    return out


def fold_forward(weight, bias, affine: Affine, *, layout: str = "out_in", groups: int = 1):
    """Fold ``affine`` (applied to this layer's input) into the layer. Returns float64 ``(weight, bias)``.

    The bias gains the layer's response to the constant ``shift`` (for a conv: the sum over the kernel
    window), which is exact only when the layer reads no padding (the caller checks). ``bias`` None is 0.
    """
    w = np.asarray(weight, dtype=np.float64)
    out_axis, in_axis = _axes(layout)
    if layout == "in_out" and groups != 1:
        raise ValueError("forward fold into a grouped in_out weight is not defined")
    w_new = w * _per_element(affine.scale, w.shape, in_axis, groups)
    t = _per_element(affine.shift, w.shape, in_axis, groups)
    resp = (w * t).sum(axis=tuple(a for a in range(w.ndim) if a != out_axis))
    b = np.zeros_like(resp) if bias is None else np.asarray(bias, dtype=np.float64)
    return w_new, b + resp


class CastOverflow(ValueError):
    """A folded float64 value does not fit the model's dtype."""


def round_to(values, dtype) -> np.ndarray:
    """``values`` rounded once, to nearest (ties to even), to ``dtype``. numpy and ml_dtypes cast float64 to
    bfloat16 (and the other ml_dtypes floats) through float32, rounding twice; here the float32 step rounds to
    odd (truncate, then set the last bit when inexact), which makes the second rounding the correct one."""
    dtype = np.dtype(dtype)
    v = np.asarray(values)
    if dtype in _NATIVE_FLOATS or v.dtype != np.float64 or dtype.itemsize > 2 or dtype.kind in "iub":
        return v.astype(dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        f = v.astype(np.float32)
        f64 = f.astype(np.float64)
        away = np.isfinite(v) & (np.abs(f64) > np.abs(v))
        f = np.where(away, np.nextafter(f, np.float32(0)), f)
        inexact = np.isfinite(v) & (f.astype(np.float64) != v)
    bits = f.view(np.uint32) | inexact.astype(np.uint32)
    return bits.view(np.float32).astype(dtype)


def cast_checked(values: np.ndarray, dtype, *, what: str) -> np.ndarray:
    """Cast float64 ``values`` to ``dtype`` once; raise :class:`CastOverflow` if a finite value becomes inf."""
    out = round_to(values, dtype)
    if out.dtype in _NATIVE_FLOATS and np.isfinite(out).all():
        return out  # nothing became inf (the common case: one reduction)
    if np.issubdtype(np.asarray(values).dtype, np.floating):
        finite_in = np.isfinite(values)
        finite_out = np.isfinite(out.astype(np.float64))
        bad = np.flatnonzero((finite_in & ~finite_out).reshape(-1))
        if bad.size:
            raise CastOverflow(
                f"{what}: folded value {np.asarray(values).reshape(-1)[bad[0]]:.6g} overflows {np.dtype(dtype).name}"
            )
    return out
