"""Which rule absorbs a per-channel affine map into which producing layer (used by every backward rule)."""

from __future__ import annotations

from bnfold import formula
from bnfold.graph import NodeKey, is_default_domain

from . import conv_backward, gemm_backward, matmul_backward
from .base import Context, Skip

BACKWARD = {op: mod for mod in (conv_backward, gemm_backward, matmul_backward) for op in mod.OPS}


def module_for(ctx: Context, key: NodeKey):
    node = ctx.mg.node(key)
    if not is_default_domain(node):
        return None
    mod = BACKWARD.get(node.op_type)
    if mod is matmul_backward and node.op_type == "Add" and matmul_backward.matmul_add(ctx, key) is None:
        return None
    return mod


def absorb_backward(ctx: Context, key: NodeKey, affine: formula.Affine, *, channel_axis: int, rank: int | None,
                    mod=None, **kw):
    """``mod.absorb`` of the rule for ``key``'s op (``mod``: :func:`module_for`, when the caller has it)."""
    mod = mod or module_for(ctx, key)
    if mod is None:
        raise Skip("no_foldable_neighbour", f"producer {ctx.op(key)} cannot absorb it", applicable=False)
    return mod.absorb(ctx, key, affine, channel_axis=channel_axis, rank=rank, **kw)


def out_channels(ctx: Context, key: NodeKey) -> int:
    mod = module_for(ctx, key)
    if mod is None:
        raise Skip("no_foldable_neighbour", f"{ctx.op(key)} cannot absorb it", applicable=False)
    return mod.out_channels(ctx, key)
