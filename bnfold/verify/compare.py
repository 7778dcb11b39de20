"""Compare one output of the reference with the candidate's, per channel; arg-max tie flips."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.verify.channels import _attr
from bnfold.verify.result import OutputStats
from bnfold.verify.tolerance import TOLERANCES, channel_budget, unit_roundoff

if TYPE_CHECKING:
    import onnx


def _output_kind(dtype: np.dtype) -> str:
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "iu":
        return "int"
    return "float"


def compare_output(ref: np.ndarray, cand: np.ndarray, *, atol: float | None, rtol: float | None,
                   channel_axes: tuple[int, ...] | None = None, excused: np.ndarray | None = None,
                   spread: np.ndarray | None = None, budget_dtype: str | None = None) -> OutputStats:
    """Compare one output. ``channel_axes`` (default: axis 1 when the output has two or more dimensions) are the
    axes whose every index is a channel with its own tolerance; ``()`` makes the whole tensor one channel.

    With ``spread`` (the reference's deviation under rounding-sized perturbations, see
    :func:`bnfold.verify.tolerance.rounding_spread`) and neither ``atol`` nor ``rtol``, each channel is held to
    its rounding budget (:func:`bnfold.verify.tolerance.channel_budget`, at ``budget_dtype``'s unit roundoff);
    otherwise to the fixed rule (:data:`bnfold.verify.tolerance.TOLERANCES`, ``atol``/``rtol`` overriding it).
    ``excused`` marks elements of an integer output accepted as arg-max tie flips."""
    ref_a, cand_a = np.asarray(ref), np.asarray(cand)
    dtype = str(cand_a.dtype)
    kind = _output_kind(cand_a.dtype)
    if ref_a.shape != cand_a.shape:
        raise BnfoldError(f"output shapes differ: reference {ref_a.shape}, candidate {cand_a.shape}")
    ref64 = ref_a.astype(np.float64)
    cand64 = cand_a.astype(np.float64)
    shape = list(ref64.shape)
    if kind != "float":
        return _compare_exact(ref_a, cand_a, ref64, cand64, kind, dtype, shape, excused)
    a_scale, r_default = TOLERANCES.get(dtype, TOLERANCES["float32"])
    ndim = ref64.ndim
    axes = (1,) if channel_axes is None and ndim >= 2 else tuple(channel_axes or ())
    axes = tuple(sorted({a % ndim for a in axes})) if ndim else ()
    fin_r, fin_c = np.isfinite(ref64), np.isfinite(cand64)
    both = fin_r & fin_c
    with np.errstate(invalid="ignore"):
        same = (ref64 == cand64) | (np.isnan(ref64) & np.isnan(cand64))  # identical infinities / NaNs agree
    nonfinite_bad = ~both & ~same
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(both, np.abs(cand64 - ref64), 0.0)
    use_budget = spread is not None and atol is None and rtol is None
    if use_budget:
        budget_dtype = budget_dtype or "float32"
        atol_arr = channel_budget(spread, ref64, axes, unit_roundoff(budget_dtype))
    elif atol is not None:
        atol_arr = np.full((1,) * ndim, float(atol))
    else:
        mag = np.where(fin_r, np.abs(ref64), 0.0)
        other = tuple(k for k in range(ndim) if k not in axes)
        ch_max = mag.max(axis=other, keepdims=True) if (other and mag.size) else (mag if mag.size else np.zeros((1,) * ndim))
        atol_arr = a_scale * np.maximum(1.0, ch_max)
    rtol_v = 0.0 if use_budget else (float(rtol) if rtol is not None else r_default)
    bound = atol_arr + rtol_v * np.where(fin_r, np.abs(ref64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(both & (diff > 0), diff / bound, 0.0)
    ratio = np.where(nonfinite_bad, np.inf, ratio)
    ok = not bool(np.any(ratio > 1.0))
    worst = None
    tol_ratio = 0.0
    atol_worst = float(np.max(atol_arr)) if atol_arr.size else 0.0
    if ratio.size:
        flat = int(np.argmax(ratio))
        tol_ratio = float(ratio.reshape(-1)[flat])
        idx = np.unravel_index(flat, ratio.shape)
        atol_idx = tuple(i if atol_arr.shape[k] > 1 else 0 for k, i in enumerate(idx))
        atol_worst = float(atol_arr[atol_idx]) if atol_arr.ndim else float(atol_arr)
        if axes:
            sel = tuple(slice(None) if k not in axes else slice(idx[k], idx[k] + 1) for k in range(ndim))
            worst = {"index": [int(idx[k]) for k in axes], "max_abs": float(diff[sel].max()), "atol": atol_worst}
    d = diff[both]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        rel = d / np.maximum(np.abs(ref64[both]), 1e-12) if d.size else d
    n_bad = int(nonfinite_bad.sum())
    if n_bad:
        cosine = math.nan
    else:
        r, c = ref64[both], cand64[both]
        denom = np.linalg.norm(r) * np.linalg.norm(c)
        cosine = float(np.dot(r, c) / denom) if denom > 0 else (1.0 if np.array_equal(r, c) else 0.0)
    return OutputStats(
        max_abs=float(d.max()) if d.size else 0.0, max_rel=float(rel.max()) if rel.size else 0.0,
        mean_abs=float(d.mean()) if d.size else 0.0, p99_abs=float(np.percentile(d, 99)) if d.size else 0.0,
        cosine=cosine, atol=atol_worst, rtol=rtol_v, passed=ok and n_bad == 0, dtype=dtype, shape=shape,
        kind="float", channel_axes=list(axes) if axes else None, worst_channel=worst, tol_ratio=tol_ratio,
        nonfinite_mismatches=n_bad, budget=f"{budget_dtype} rounding" if use_budget else None)


def _compare_exact(ref_a, cand_a, ref64, cand64, kind, dtype, shape, excused) -> OutputStats:
    differ = ref_a != cand_a
    n = int(differ.sum())
    flips = int((differ & excused).sum()) if excused is not None else 0
    failing = n - flips
    d = np.abs(cand64 - ref64).reshape(-1)
    denom = np.linalg.norm(ref64) * np.linalg.norm(cand64)
    cosine = float(np.dot(ref64.reshape(-1), cand64.reshape(-1)) / denom) if denom > 0 else (
        1.0 if np.array_equal(ref64, cand64) else 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = d / np.maximum(np.abs(ref64.reshape(-1)), 1e-12) if d.size else d
    return OutputStats(
        max_abs=float(d.max()) if d.size else 0.0, max_rel=float(rel.max()) if rel.size else 0.0,
        mean_abs=float(d.mean()) if d.size else 0.0, p99_abs=float(np.percentile(d, 99)) if d.size else 0.0,
        cosine=cosine, atol=0.0, rtol=0.0, passed=failing == 0, dtype=dtype, shape=shape, kind=kind,
        tol_ratio=math.inf if failing else 0.0, mismatch_rate=n / max(1, differ.size), tie_flips=flips)

def _argmax_scores(cand: onnx.ModelProto) -> dict[str, tuple[str, int, bool, bool]]:
    """Integer outputs computed by ArgMax/ArgMin: output -> (scores tensor, axis, keepdims, select_last)."""
    prod = {o: n for n in cand.graph.node for o in n.output}
    out = {}
    for o in cand.graph.output:
        n = prod.get(o.name)
        while n is not None and n.op_type in ("Cast", "Identity") and n.input:
            n = prod.get(n.input[0])
        if n is not None and n.op_type in ("ArgMax", "ArgMin") and (n.domain or "") in ("", "ai.onnx"):
            out[o.name] = (n.input[0], int(_attr(n, "axis", 0)), bool(_attr(n, "keepdims", 1)),
                           n.op_type == "ArgMin")
    return out


def _tie_flips(ref_idx: np.ndarray, cand_idx: np.ndarray, scores: np.ndarray, axis: int, keepdims: bool,
               minimum: bool) -> np.ndarray | None:
    """Positions where the candidate's index differs but the reference's scores at the two indices are tied
    within the float tolerance."""
    scores = np.asarray(scores, np.float64)
    axis = axis % scores.ndim
    r = ref_idx if keepdims else np.expand_dims(ref_idx, axis)
    c = cand_idx if keepdims else np.expand_dims(cand_idx, axis)
    if r.shape != tuple(1 if k == axis else s for k, s in enumerate(scores.shape)):
        return None
    n = scores.shape[axis]
    valid = (c >= 0) & (c < n)
    s_r = np.take_along_axis(scores, np.clip(r, 0, n - 1).astype(np.int64), axis)
    s_c = np.take_along_axis(scores, np.clip(c, 0, n - 1).astype(np.int64), axis)
    a_scale, rtol = TOLERANCES.get(str(scores.dtype), TOLERANCES["float32"])
    tol = a_scale * np.maximum(1.0, np.abs(s_r)) + rtol * np.abs(s_r)
    tied = valid & (np.abs(s_r - s_c) <= tol)
    return tied if keepdims else np.squeeze(tied, axis)
