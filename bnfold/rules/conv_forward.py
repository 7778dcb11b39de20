"""Forward into a Conv that reads the BN output: scale the weight's input channels, and add to the bias the
conv's response to the BN shift (the sum over the kernel window). Exact only when the conv reads no padding:
padded zeros would not see the shift (``consumer_padded``)."""

from __future__ import annotations

from bnfold import formula
from bnfold.graph import NodeKey

from .base import Absorb, Context, Param, Skip, channels
from .conv_backward import vector_bias

OPS = ("Conv",)


def padded(ctx: Context, key: NodeKey, kernel: tuple) -> bool:
    dil = ctx.attr(key, "dilations", None) or [1] * len(kernel)
    pads = list(ctx.attr(key, "pads", None) or [0] * 2 * len(kernel))
    auto_pad = ctx.attr(key, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # SAME pads (k-1)*d+1 minus a stride remainder: nothing for a kernel extent of 1
        return not all((k - 1) * d == 0 for k, d in zip(kernel, dil))
    return auto_pad != "VALID" and any(pads)


def absorb(ctx: Context, key: NodeKey, affine: formula.Affine, *, spatial: int = 1) -> tuple[list[Absorb], str]:
    label = ctx.mg.label(key)
    if spatial != 1:
        raise Skip("channel_axis_mismatch", f"{label} reads a flattened tensor", applicable=False)
    w = ctx.param(key, 1, "weight")
    b = ctx.param(key, 2, "bias", optional=True)
    if len(w.shape) < 3:
        raise Skip("channel_axis_mismatch", f"the weight of {label} has {len(w.shape)} dimensions")
    groups = int(ctx.attr(key, "group", 1))
    b = vector_bias(b, w.shape[0], label)
    if padded(ctx, key, tuple(w.shape[2:])):
        raise Skip("consumer_padded", f"{label} zero-pads its input: the padded zeros would not see the BatchNorm "
                   "shift, so a forward fold would not be exact")
    if w.shape[0] % groups:
        raise Skip("channel_count_mismatch", f"{label}: {w.shape[0]} output channels do not split into {groups} groups")
    affine = channels(affine, w.shape[1] * groups, label)
    w64 = w.f64()
    _, new_b = formula.fold_forward(w64, None if b is None else b.f64(), affine, layout="out_in", groups=groups)
    factor = formula._per_element(affine.scale, w.shape, 1, groups)
    return [Absorb(key, {1: w.scaled(factor), 2: Param(w.dtype, value=new_b)})], label
