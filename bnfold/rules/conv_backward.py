"""Backward into Conv / ConvTranspose: scale the output channels of the weight, ``b' = b * scale + shift``.

Conv weights are ``(M, C/g, k...)`` (output channel on axis 0); ConvTranspose weights are ``(C, M/g, k...)``:
the output channel of element ``(i0, i1)`` is ``(i0 // (C/g)) * (M/g) + i1`` (scaled per group).
"""

from __future__ import annotations

import numpy as np

from bnfold import formula
from bnfold.graph import NodeKey

from .base import Absorb, Context, Param, Skip, channels

OPS = ("Conv", "ConvTranspose")


def out_channels(ctx: Context, key: NodeKey) -> int:
    w = ctx.param(key, 1, "weight")
    return w.shape[0] if ctx.op(key) == "Conv" else w.shape[1] * int(ctx.attr(key, "group", 1))


def vector_bias(b: Param | None, n: int, label: str) -> Param | None:
    """A conv bias is 1-D with one value per output channel; an all-zero bias of another shape (the dynamo
    exporter builds one for bias-less Conv3d) is no bias."""
    if b is None or b.shape == (n,):
        return b
    if not np.any(b.f64()):
        return None
    raise Skip("channel_count_mismatch", f"the bias of {label} has shape {b.shape}, expected ({n},)")


def absorb(ctx: Context, key: NodeKey, affine: formula.Affine, *, channel_axis: int = 1,
           rank: int | None = None) -> tuple[list[Absorb], str]:
    """The new weight and bias of Conv/ConvTranspose ``key`` with ``affine`` applied to its output."""
    label = ctx.mg.label(key)
    op = ctx.op(key)
    w = ctx.param(key, 1, "weight")
    b = ctx.param(key, 2, "bias", optional=True)
    if channel_axis != 1:
        raise Skip("channel_axis_mismatch", f"channel axis {channel_axis} is not the {op} channel axis (1)")
    if len(w.shape) < 3:
        raise Skip("channel_axis_mismatch", f"the weight of {label} has {len(w.shape)} dimensions")
    groups = int(ctx.attr(key, "group", 1))
    n = w.shape[0] if op == "Conv" else w.shape[1] * groups  # out_channels(), from the weight already read
    b = vector_bias(b, n, label)
    affine = channels(affine, n, label)
    if op == "Conv":
        factor = affine.scale.reshape((n,) + (1,) * (len(w.shape) - 1))
    else:
        if w.shape[0] % groups:
            raise Skip("channel_count_mismatch", f"{label}: {w.shape[0]} input channels do not split into {groups} groups")
        factor = formula._per_element(affine.scale, w.shape, 1, groups)
    bias = np.zeros(n) if b is None else b.f64()
    new_b = Param(w.dtype, value=bias * affine.scale + affine.shift)
    return [Absorb(key, {1: w.scaled(factor), 2: new_b})], label
