"""Forward into Gemm (``transA=0``) or MatMul (2-D input) that reads the BN output, directly or through
``Flatten(axis=1)`` (the classifier head ``BN -> Flatten -> Linear``): scale the weight's input features and add
``W . shift`` to the bias. Through Flatten, input feature ``f`` is channel ``f // (H*W)`` of the BN output
(row-major flattening), so each channel's scale covers ``K / C`` consecutive features."""

from __future__ import annotations

import numpy as np

from bnfold import formula
from bnfold.graph import NodeKey

from .base import BIAS_ADD, Absorb, Context, Param, Skip, per_axis
from .gemm_backward import gemm_bias
from .matmul_backward import bias_add_label, matmul_add

OPS = ("Gemm", "MatMul")


def _expand(affine: formula.Affine, k: int, spatial_known: bool, label: str) -> formula.Affine:
    """The affine per input feature of a K-feature layer (through Flatten: K / C features per channel)."""
    c = affine.channels
    if c == k:
        return affine
    if c == 1:
        return formula.Affine(np.repeat(affine.scale, k), np.repeat(affine.shift, k))
    if spatial_known and k % c == 0:
        r = k // c
        return formula.Affine(np.repeat(affine.scale, r), np.repeat(affine.shift, r))
    raise Skip("channel_count_mismatch", f"{c} channels but {label} has {k} input features")


def absorb(ctx: Context, key: NodeKey, affine: formula.Affine, *, rank: int | None = None,
           flattened: bool = False) -> tuple[list[Absorb], str]:
    label = ctx.mg.label(key)
    op = ctx.op(key)
    if op == "Gemm":
        if int(ctx.attr(key, "transA", 0)):
            raise Skip("channel_axis_mismatch", f"{label} has transA=1: the BatchNorm channels are its rows")
        w = ctx.param(key, 1, "weight (B)")
        if len(w.shape) != 2:
            raise Skip("channel_axis_mismatch", f"the weight of {label} is not 2-D")
        c = ctx.param(key, 2, "bias (C)", optional=True)
        trans_b = int(ctx.attr(key, "transB", 0))
        gemm_bias(c, w.shape[0] if trans_b else w.shape[1], label)
        alpha = float(ctx.attr(key, "alpha", 1.0))
        beta = float(ctx.attr(key, "beta", 1.0))
        k = w.shape[1] if trans_b else w.shape[0]
        affine = _expand(affine, k, flattened, label)
        in_axis = 1 if trans_b else 0
        w64 = w.f64()
        delta = (w64 * per_axis(affine.shift, 2, in_axis)).sum(axis=in_axis)
        new_c = alpha * delta + (0.0 if c is None else beta * c.f64())
        factor = per_axis(affine.scale, 2, in_axis)
        return [Absorb(key, {1: w.scaled(factor), 2: Param(w.dtype, value=new_c)}, attrs={"beta": 1.0})], label
    # MatMul
    w = ctx.param(key, 1, "weight")
    if len(w.shape) != 2:
        raise Skip("channel_axis_mismatch", f"{label} weight is {len(w.shape)}-D")
    if not flattened:
        if rank is None:
            raise Skip("unknown_rank", f"the rank of {label}'s input is unknown; the channel axis cannot be checked")
        if rank != 2:
            raise Skip("channel_axis_mismatch", f"the BatchNorm channel axis (1) is not {label}'s contraction axis "
                       f"({rank - 1}) of its {rank}-D input")
    affine = _expand(affine, w.shape[0], flattened, label)
    w64 = w.f64()
    delta = (w64 * per_axis(affine.shift, 2, 0)).sum(axis=0)
    factor = per_axis(affine.scale, 2, 0)
    out = ctx.mg.output_binding(key)
    nxt = ctx.mg.only_consumer(out) if out is not None else None
    mm_add = matmul_add(ctx, nxt) if nxt is not None else None
    if mm_add is not None and mm_add[0] == key:
        slot = mm_add[1]
        bias = ctx.param(nxt, slot, "bias")
        if len(bias.shape) >= 1 and bias.shape[-1] not in (1, w.shape[1]):
            raise Skip("channel_count_mismatch", f"the bias of {ctx.mg.label(nxt)} has shape {bias.shape}")
        new_b = Param(w.dtype, value=bias.f64() + delta)
        return [Absorb(key, {1: w.scaled(factor)}), Absorb(nxt, {slot: new_b})], f"{label}+{ctx.mg.label(nxt)}"
    cur = ctx.param(key, BIAS_ADD, "bias", optional=True)
    new_b = delta + (0.0 if cur is None else cur.f64())
    into = f"{label}+{bias_add_label(ctx, key)}" if np.any(new_b) else label
    return [Absorb(key, {1: w.scaled(factor), BIAS_ADD: Param(w.dtype, value=new_b)})], into
