"""Backward into Gemm: ``Y = alpha * A' B' + beta * C``; the BN scales the output features (axis 1 of Y): the
columns of B (rows when ``transB=1``); ``C' = beta * C * scale + shift`` (any broadcastable C) and ``beta=1``."""

from __future__ import annotations

import numpy as np

from bnfold import formula
from bnfold.graph import NodeKey

from .base import Absorb, Context, Param, Skip, channels, per_axis

OPS = ("Gemm",)


def out_channels(ctx: Context, key: NodeKey) -> int:
    w = ctx.param(key, 1, "weight (B)")
    return w.shape[0] if int(ctx.attr(key, "transB", 0)) else w.shape[1]


def gemm_bias(c: Param | None, n: int, label: str) -> None:
    if c is not None and (len(c.shape) > 2 or (len(c.shape) >= 1 and c.shape[-1] not in (1, n))):
        raise Skip("channel_count_mismatch", f"the bias C of {label} has shape {c.shape}, which does not "
                   f"broadcast to {n} output features")


def absorb(ctx: Context, key: NodeKey, affine: formula.Affine, *, channel_axis: int = 1,
           rank: int | None = None) -> tuple[list[Absorb], str]:
    label = ctx.mg.label(key)
    if channel_axis != 1:
        raise Skip("channel_axis_mismatch", f"channel axis {channel_axis} is not the Gemm output axis (1)")
    w = ctx.param(key, 1, "weight (B)")
    if len(w.shape) != 2:
        raise Skip("channel_axis_mismatch", f"the weight of {label} is not 2-D")
    c = ctx.param(key, 2, "bias (C)", optional=True)
    trans_b = int(ctx.attr(key, "transB", 0))
    beta = float(ctx.attr(key, "beta", 1.0))
    n = w.shape[0] if trans_b else w.shape[1]
    affine = channels(affine, n, label)
    gemm_bias(c, n, label)
    bias = np.zeros(n) if c is None else beta * c.f64()
    new_c = Param(w.dtype, value=bias * affine.scale + affine.shift)
    factor = per_axis(affine.scale, 2, 0 if trans_b else 1)
    return [Absorb(key, {1: w.scaled(factor), 2: new_c}, attrs={"beta": 1.0})], label
