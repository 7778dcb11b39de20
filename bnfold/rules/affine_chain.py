"""Per-channel ``Mul``/``Add``/``Sub``/``Div`` by a constant right after a foldable producer (how TensorFlow
converters emit an inference BN) fold backward like a BN. Before opset 7 a constant operand broadcasts only with
``broadcast=1``, aligned at ``axis``; the alignment is honoured when finding the channel axis."""

from __future__ import annotations

import numpy as np

from bnfold import formula
from bnfold.graph import Binding, NodeKey, NotConst, is_float_dtype

from .base import Context
from .matmul_backward import legacy_aligned

OPS = ("Mul", "Add", "Sub", "Div")


def producer_axis(ctx: Context, producer: NodeKey, out: Binding) -> tuple[int | None, int | None]:
    """(rank, channel axis) of a producer's output."""
    op = ctx.op(producer)
    if op in ("Conv", "ConvTranspose"):
        wb = ctx.mg.input_binding(producer, 1)
        r = ctx.mg.rank(wb) if wb is not None else None  # from the weight's dims: no need to read its data
        return (r if r is not None else ctx.mg.rank(out)), 1
    if op == "Gemm":
        return 2, 1
    r = ctx.mg.rank(out)
    return r, (r - 1 if r is not None else None)


def affine_of(ctx: Context, key: NodeKey) -> tuple[Binding, int, formula.Affine] | None:
    """For a per-channel affine op on a tensor produced by a layer: (input tensor, channel axis, affine).
    None when the node is not such an op (then it is left alone and not reported)."""
    from . import layers

    mg = ctx.mg
    n = mg.node(key)
    if len(n.input) != 2 or len(n.output) != 1 or not n.input[0] or not n.input[1]:
        return None
    bs = [mg.input_binding(key, i) for i in (0, 1)]
    values = [ctx.const(b) for b in bs]
    is_c = [not isinstance(v, NotConst) for v in values]
    if is_c[0] == is_c[1]:
        return None
    xi = 0 if not is_c[0] else 1
    x, c = bs[xi], np.asarray(values[1 - xi])
    if not is_float_dtype(c.dtype) or len(mg.real_uses(x)) != 1:
        return None
    p = ctx.producer(x)
    if p is None or p[0].graph != key.graph or layers.module_for(ctx, p[0]) is None:
        return None
    rank, axis = producer_axis(ctx, p[0], x)
    if rank is None or c.ndim > rank:
        return None
    if ctx.opset < 7:
        if xi != 0 or not legacy_aligned(ctx, key, c.shape, rank):
            return None  # only B broadcasts before opset 7, and only with broadcast=1
        a = ctx.attr(key, "axis", None)
        start = rank - c.ndim if a is None else (a + rank if a < 0 else a)
        shape = (1,) * start + tuple(c.shape) + (1,) * (rank - start - c.ndim)
    else:
        shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    vec = np.asarray(c, np.float64).reshape(-1)
    op = n.op_type
    if op == "Mul":
        aff = formula.Affine(vec, np.zeros_like(vec))
    elif op == "Add":
        aff = formula.Affine(np.ones_like(vec), vec)
    elif op == "Sub":
        aff = formula.Affine(np.ones_like(vec), -vec) if xi == 0 else formula.Affine(-np.ones_like(vec), vec)
    else:  # Div
        if xi != 0 or np.any(vec == 0):
            return None
        aff = formula.Affine(1.0 / vec, np.zeros_like(vec))
    if ctx.op(p[0]) == "MatMul" and np.any(aff.shift != 0):
        return None  # that Add is the MatMul's bias: nothing to fold
    return x, axis, aff

