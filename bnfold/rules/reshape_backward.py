"""Backward through Reshape and/or Transpose: ``MatMul[+Add] -> Reshape -> BN``, ``MatMul[+Add] -> Transpose ->
BN`` and ``MatMul[+Add] -> Reshape -> Transpose -> BN`` (timm's LeViT: Linear on (B, N, C), flattened to
(B*N, C), BatchNorm1d; transformer blocks that move the features to axis 1 for a BatchNorm1d).

Exact when every element keeps its feature index: a Reshape whose constant target shape ends in the MatMul's
feature count N (written out, not -1 or 0) keeps the feature axis last (row-major reshaping of a tensor whose
last axis is N into one whose last axis is N leaves each element's feature index unchanged), and then either the
Reshape's output is 2-D (the BN channel axis 1 is that last axis) or a Transpose with ``perm[1] == rank - 1``
moves that last axis to the BN channel axis. Without a Transpose, a target ``(rows, N, 1, ..., 1)`` (trailing
ones: ONNX Runtime's FuseMatmulBNWithOnlyReshape case) also keeps the feature on axis 1: the flat index
``row * N + feature`` is the same in both shapes.
"""

from __future__ import annotations

import numpy as np

from bnfold import formula
from bnfold.graph import Binding, NodeKey, NotConst, is_default_domain

from . import layers, matmul_backward
from .base import Context, Match, Skip

NAME = "reshape_backward"
OPS = ("Reshape", "Transpose")


def _step(ctx: Context, key: NodeKey) -> NodeKey:
    """The producer of ``key``'s data input, which must be used only by ``key``."""
    mg = ctx.mg
    data = mg.input_binding(key, 0)
    p = ctx.producer(data) if data is not None else None
    if p is None or p[0].graph != key.graph or not is_default_domain(mg.node(p[0])):
        raise Skip("no_foldable_neighbour", f"{mg.label(key)} does not carry a MatMul output", applicable=False)
    if len(mg.real_uses(data)) != 1:
        raise Skip("producer_output_shared", f"the input of {mg.label(key)} is also used elsewhere")
    return p[0]


def match(ctx: Context, first: NodeKey, site: NodeKey, x: Binding, y: Binding, affine: formula.Affine, *,
          out_slot: int) -> Match:
    """``out_slot``: the output of ``first`` that ``x`` is, as planned so far (a BN before this one may have
    renamed it)."""
    mg = ctx.mg
    transpose = reshape = None
    shape: list[int] = []
    key = first
    if ctx.op(key) == "Transpose":
        transpose = key
        perm = ctx.attr(key, "perm", None)
        if perm is None or len(perm) < 2 or int(perm[1]) != len(perm) - 1:
            raise Skip("channel_axis_mismatch", f"{mg.label(key)} does not move the last axis to the BatchNorm "
                       f"channel axis (perm {perm})")
        key = _step(ctx, key)
    if ctx.op(key) == "Reshape" and is_default_domain(mg.node(key)):
        reshape = key
        value = ctx.const(mg.input_binding(key, 1))
        if isinstance(value, NotConst) or np.asarray(value).ndim != 1:
            raise Skip("unknown_rank", f"the target shape of {mg.label(key)} is not a constant")
        shape = [int(s) for s in np.asarray(value)]
        key = _step(ctx, key)
    if layers.module_for(ctx, key) is not matmul_backward:
        raise Skip("no_foldable_neighbour", f"{mg.label(first)} does not carry a MatMul output", applicable=False)
    n = layers.out_channels(ctx, key)
    # (rows, N) or (rows, N, 1, ...) without a Transpose: axis 1 holds the feature; with one: N last, moved to 1
    feature_on_1 = len(shape) >= 2 and shape[1] == n and all(d == 1 for d in shape[2:])
    if reshape is not None and not (feature_on_1 if transpose is None else shape[-1] == n):
        raise Skip("channel_axis_mismatch", f"{mg.label(reshape)} reshapes to {shape}: the MatMul's {n} features "
                   "are not the BatchNorm channel axis")
    absorbs, into = layers.absorb_backward(ctx, key, affine, channel_axis=None, rank=None, feature_last=True)
    return Match(NAME, "backward", into, key, absorbs=absorbs, remove=[site], set_output=[(first, out_slot, y.name)],
                 redirect_dtype=(x, y.name), produced=(y, (first, out_slot)))
