"""Backward into MatMul (constant 2-D weight ``(K, N)``), optionally followed by ``Add`` of a constant bias:
the BN scales the output features (the last axis), so it folds only when its channel axis is that axis.
``W' = W * scale`` (columns), ``bias' = bias * scale + shift``; without an Add, one is inserted after the MatMul
when the new bias is not all zero."""

from __future__ import annotations

import numpy as np

from bnfold import formula
from bnfold.graph import NodeKey, NotConst, is_default_domain

from .base import BIAS_ADD, Absorb, Context, Param, Skip, channels, per_axis

OPS = ("MatMul", "Add")


def legacy_aligned(ctx: Context, key: NodeKey, const_shape: tuple, rank: int | None) -> bool:
    """Whether a constant operand of Mul/Add/Sub/Div ``key`` broadcasts the standard (numpy) way. Before opset 7
    broadcasting needs ``broadcast=1`` and aligns the constant's dims at ``axis`` (default: trailing)."""
    if ctx.opset >= 7:
        return True
    if not int(ctx.attr(key, "broadcast", 0)):
        return False
    axis = ctx.attr(key, "axis", None)
    if axis is None:
        return True
    if rank is None:
        return False
    if axis < 0:
        axis += rank
    return axis + len(const_shape) == rank


def matmul_add(ctx: Context, key: NodeKey):
    """For ``Add(MatMul(x, W), bias)`` with a constant bias: (matmul key, bias slot); else None."""
    n = ctx.mg.node(key)
    if n.op_type != "Add" or len(n.input) != 2 or not is_default_domain(n):
        return None
    for i in (0, 1):
        b = ctx.mg.input_binding(key, i)
        if b is None:
            continue
        p = ctx.producer(b)
        if p is None or ctx.op(p[0]) != "MatMul" or not is_default_domain(ctx.mg.node(p[0])):
            continue
        if p[0].graph != key.graph or len(ctx.mg.real_uses(b)) != 1:
            continue
        c = ctx.const(ctx.mg.input_binding(key, 1 - i))
        if isinstance(c, NotConst):
            continue
        return p[0], 1 - i
    return None


def bias_add_label(ctx: Context, mm: NodeKey) -> str:
    names = ctx.bias_add_names.get(mm)
    if names is None:
        n = ctx.mg.node(mm)
        base = n.name or n.output[0]
        names = ctx.bias_add_names[mm] = (ctx.mg.unique(f"{base}_bias_add"), ctx.mg.unique(f"{base}_nobias"))
    return names[0]


def out_channels(ctx: Context, key: NodeKey) -> int:
    mm = key if ctx.op(key) == "MatMul" else (matmul_add(ctx, key) or (None,))[0]
    if mm is None:
        raise Skip("no_foldable_neighbour", f"{ctx.op(key)} cannot absorb it", applicable=False)
    w = ctx.param(mm, 1, "weight")
    if len(w.shape) != 2:
        raise Skip("channel_axis_mismatch", f"{ctx.mg.label(mm)} weight is {len(w.shape)}-D")
    return w.shape[1]


def absorb(ctx: Context, key: NodeKey, affine: formula.Affine, *, channel_axis: int | None = 1,
           rank: int | None = None, feature_last: bool = False) -> tuple[list[Absorb], str]:
    """``feature_last``: the caller has proved that the BN channels are the MatMul's last axis."""
    op = ctx.op(key)
    mm_add = matmul_add(ctx, key) if op == "Add" else None
    mm = key if op == "MatMul" else (mm_add[0] if mm_add else None)
    if mm is None:
        raise Skip("no_foldable_neighbour", f"{op} cannot absorb it", applicable=False)
    mlabel = ctx.mg.label(mm)
    a0 = ctx.const(ctx.mg.input_binding(mm, 0))
    if not isinstance(a0, NotConst):
        raise Skip("channel_axis_mismatch", f"{mlabel} multiplies a constant by a tensor: the channel axis is not "
                   "its weight's feature axis")
    w = ctx.param(mm, 1, "weight")
    if len(w.shape) != 2:
        raise Skip("channel_axis_mismatch", f"{mlabel} weight is {len(w.shape)}-D; only a 2-D weight has one "
                   "feature axis")
    if not feature_last and affine.channels != 1:  # a 1-channel BN is a scalar map: any axis will do
        if rank is None:
            raise Skip("unknown_rank", f"the rank of {mlabel}'s output is unknown; the channel axis cannot be checked")
        if channel_axis != rank - 1:
            raise Skip("channel_axis_mismatch", f"the channel axis ({channel_axis}) is not {mlabel}'s feature axis "
                       f"({rank - 1}) of its {rank}-D output")
    n = w.shape[1]
    affine = channels(affine, n, mlabel)
    factor = per_axis(affine.scale, 2, 1)
    if mm_add is not None:
        slot = mm_add[1]
        bias = ctx.param(key, slot, "bias")
        if not legacy_aligned(ctx, key, bias.shape, rank):
            raise Skip("channel_axis_mismatch", f"the bias Add {ctx.mg.label(key)} broadcasts with a legacy axis "
                       "that is not the feature axis")
        if len(bias.shape) >= 1 and bias.shape[-1] not in (1, n):
            raise Skip("channel_count_mismatch", f"the bias of {ctx.mg.label(key)} has shape {bias.shape}")
        new_b = Param(w.dtype, value=bias.f64() * affine.scale + affine.shift)
        return [Absorb(mm, {1: w.scaled(factor)}), Absorb(key, {slot: new_b})], f"{mlabel}+{ctx.mg.label(key)}"
    cur = ctx.param(mm, BIAS_ADD, "bias", optional=True)
    bias = np.zeros(n) if cur is None else cur.f64()
    new_b = bias * affine.scale + affine.shift
    params = {1: w.scaled(factor), BIAS_ADD: Param(w.dtype, value=new_b)}
    into = f"{mlabel}+{bias_add_label(ctx, mm)}" if np.any(new_b) else mlabel
    return [Absorb(mm, params)], into
