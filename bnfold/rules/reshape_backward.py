"""Backward through Reshape: ``MatMul[+Add] -> Reshape -> BN`` (timm's LeViT: Linear on (B, N, C), flattened to
(B*N, C), BatchNorm1d). Exact when the Reshape keeps the MatMul's feature axis as the last axis: its constant
target shape ends in the feature count N (written out, not -1 or 0) and is 2-D, so that the BN channel axis (1)
is that last axis; row-major reshaping then leaves every element's feature index unchanged."""

from __future__ import annotations

import numpy as np

from bnfold import formula
from bnfold.graph import Binding, NodeKey, NotConst

from . import layers, matmul_backward
from .base import Context, Match, Skip

NAME = "reshape_backward"


def match(ctx: Context, reshape: NodeKey, site: NodeKey, x: Binding, y: Binding, affine: formula.Affine) -> Match:
    mg = ctx.mg
    label = mg.label(reshape)
    data = mg.input_binding(reshape, 0)
    p = ctx.producer(data) if data is not None else None
    if p is None or p[0].graph != reshape.graph or layers.module_for(ctx, p[0]) is not matmul_backward:
        raise Skip("no_foldable_neighbour", f"{label} does not reshape a MatMul output", applicable=False)
    if len(mg.real_uses(data)) != 1:
        raise Skip("producer_output_shared", f"the input of {label} is also used elsewhere")
    shape = ctx.const(mg.input_binding(reshape, 1))
    if isinstance(shape, NotConst) or np.asarray(shape).ndim != 1:
        raise Skip("unknown_rank", f"the target shape of {label} is not a constant")
    shape = [int(s) for s in np.asarray(shape)]
    n = layers.out_channels(ctx, p[0])
    if len(shape) != 2 or shape[-1] != n:
        raise Skip("channel_axis_mismatch", f"{label} reshapes to {shape}: the MatMul's {n} features are not the "
                   "BatchNorm channel axis")
    absorbs, into = layers.absorb_backward(ctx, p[0], affine, channel_axis=None, rank=None, feature_last=True)
    return Match(NAME, "backward", into, p[0], absorbs=absorbs, remove=[site],
                 set_output=[(reshape, 0, y.name)], redirect_dtype=(x, y.name), produced=(y, (reshape, 0)))
