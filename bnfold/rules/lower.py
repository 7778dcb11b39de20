"""Lowering (opt-in): a BN with no foldable neighbour becomes ``Mul`` + ``Add`` by per-channel constants shaped
``(C, 1, ..., 1)`` (before opset 7: ``(C,)`` with ``broadcast=1, axis=1``), typed like the BN input."""

from __future__ import annotations

import numpy as np
from onnx import helper

from bnfold import formula
from bnfold.graph import Binding, NodeKey, is_float_dtype

from .base import Context, Match, Skip

NAME = "lower"


def match(ctx: Context, bn: NodeKey, x: Binding, y: Binding, affine: formula.Affine) -> Match:
    mg = ctx.mg
    label = mg.label(bn)
    rank = mg.rank(x)
    if rank is None:
        rank = mg.rank(y)
    if rank is None or rank < 2:
        raise Skip("unknown_rank", "input rank unknown: cannot shape the Mul/Add constants")
    dt = next((d for d in (mg.np_dtype(x), mg.np_dtype(y)) if d is not None and is_float_dtype(d)), None)
    if dt is None:
        raise Skip("unsupported_dtype", "the dtype of the BatchNorm input is unknown: cannot type the Mul/Add "
                   "constants")
    legacy = ctx.opset < 7
    shape = (affine.channels,) if legacy else (affine.channels,) + (1,) * (rank - 2)
    attrs = {"broadcast": 1, "axis": 1} if legacy else {}
    try:
        s = formula.cast_checked(affine.scale.reshape(shape), dt, what=f"{label} scale")
        t = formula.cast_checked(affine.shift.reshape(shape), dt, what=f"{label} shift")
    except formula.CastOverflow as exc:
        raise Skip("cast_overflow", str(exc)) from None
    base = mg.node(bn).name or y.name
    mid, mul_name, add_name = mg.unique(f"{base}_scaled"), mg.unique(f"{base}_mul"), mg.unique(f"{base}_add")
    s_name, t_name = mg.unique(f"{base}_scale"), mg.unique(f"{base}_shift")
    mul = helper.make_node("Mul", [x.name, s_name], [mid], name=mul_name, **attrs)
    add = helper.make_node("Add", [mid, t_name], [y.name], name=add_name, **attrs)
    return Match(NAME, "lowered", f"{mul_name}+{add_name}", None, remove=[bn],
                 new_nodes=[(bn, mul, {s_name: np.asarray(s)}), (bn, add, {t_name: np.asarray(t)})])
