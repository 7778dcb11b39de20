"""Backward through Concat: ``Concat(axis=1)(P1(x1), P2(x2), ...) -> BN``, where every input is produced by a
foldable layer (Conv, ConvTranspose, Gemm, MatMul[+Add]) used only by the Concat, folds slice by slice: layer
``i`` absorbs the BN channels of its slice (MixConv / Inception-style heads)."""

from __future__ import annotations

import numpy as np

from bnfold import formula
from bnfold.graph import Binding, NodeKey

from . import layers
from .base import Context, Match, Skip

NAME = "concat_backward"


def match(ctx: Context, concat: NodeKey, site: NodeKey, x: Binding, y: Binding, affine: formula.Affine,
          rank: int | None, *, out_slot: int) -> Match:
    """``out_slot``: the Concat output ``x`` is, as planned so far (a BN before this one may have renamed it)."""
    mg = ctx.mg
    label = mg.label(concat)
    axis = int(ctx.attr(concat, "axis", 1))
    if axis < 0:
        if rank is None:
            raise Skip("unknown_rank", f"the rank of {label}'s output is unknown: its axis {axis} cannot be checked")
        axis += rank
    if axis != 1:
        raise Skip("channel_axis_mismatch", f"{label} concatenates along axis {axis}, not the BatchNorm channel axis")
    parts = []
    for slot, name in enumerate(mg.node(concat).input):
        b = mg.resolve(concat.graph, name) if name else None
        p = ctx.producer(b) if b is not None else None
        if p is None or p[0].graph != concat.graph or layers.module_for(ctx, p[0]) is None:
            raise Skip("no_foldable_neighbour", f"input {slot} of {label} is not produced by a foldable layer",
                       applicable=False)
        if len(mg.real_uses(b)) != 1 or any(q[0] == p[0] for q in parts):
            raise Skip("producer_output_shared", f"input {slot} of {label} is also used elsewhere")
        parts.append((p[0], p[1], b, layers.out_channels(ctx, p[0])))
    total = sum(n for *_, n in parts)
    if affine.channels not in (1, total):
        raise Skip("channel_count_mismatch", f"{affine.channels} channels but {label} concatenates {total}")
    if affine.channels == 1:
        affine = formula.Affine(np.repeat(affine.scale, total), np.repeat(affine.shift, total))
    absorbs, intos, start = [], [], 0
    for key, _, b, n in parts:
        sub = formula.Affine(affine.scale[start:start + n], affine.shift[start:start + n])
        start += n
        r = mg.rank(b) if ctx.op(key) in ("MatMul", "Add") else rank
        got, into = layers.absorb_backward(ctx, key, sub, channel_axis=1, rank=r)
        absorbs += got
        intos.append(into)
    return Match(NAME, "backward", "+".join(intos), parts[0][0], absorbs=absorbs, remove=[site],
                 set_output=[(concat, out_slot, y.name)], redirect_dtype=(x, y.name), produced=(y, (concat, out_slot)))
