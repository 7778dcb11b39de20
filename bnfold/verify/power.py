"""Could the check have failed? A pass proves something only if a wrong fold would have been seen.

The simplest wrong fold drops a BatchNorm. On the inputs verify used, the reference is run with every
BatchNorm made the identity (γ 1, β 0, mean 0, var 1-ε), then with each one alone made the identity; a BN
whose removal moves no output by more than the fixed tolerance (1e-4 of the channel's scale + 1e-3 relative,
:data:`bnfold.verify.tolerance.TOLERANCES`) is one a fold could have dropped unseen: its statistics are the
identity, or the inputs never exercise its channels. A pass is then *unproven*, and says why.

The fixed tolerance, not the (tighter) rounding budget, is the yardstick on purpose: a BN that only moves the
outputs by its ε (an identity BN scales by 1/sqrt(1+ε), 5e-6) is detectable in principle but is no evidence
that the fold's arithmetic is right.
"""

from __future__ import annotations

import logging

import numpy as np

from bnfold.verify.compare import compare_output

log = logging.getLogger(__name__)

#: BatchNorms tried one at a time at most (all of them together are always tried)
MAX_SINGLE = 256


def _detected(ref_outs, outs, axes) -> bool:
    for r, o, ax in zip(ref_outs, outs, axes):
        if np.shape(r) != np.shape(o):
            return True
        if not compare_output(r, o, atol=None, rtol=None, channel_axes=ax).passed:
            return True
    return False


def check_power(runner, feeds: dict, ref_outs: list[np.ndarray], axes: list) -> tuple[dict | None, str | None]:
    """``runner``: an :class:`~bnfold.verify.runners.OnnxParamRunner` or
    :class:`~bnfold.verify.runners.TorchParamRunner` of the reference; ``ref_outs`` its outputs on ``feeds``;
    ``axes`` each output's channel axes. Returns ``(power, unproven)``: what was tried and found, and why a
    pass proves little (None when every BatchNorm tried matters)."""
    bns = runner.bns
    if not bns:
        return None, None
    base = runner.params
    all_ident = {k: v for _, ident in bns for k, v in ident.items()}
    all_detected = _detected(ref_outs, runner.run(feeds, {**base, **all_ident}), axes)
    power = {"bn_total": len(bns), "all_removed_detected": all_detected, "checked": 0, "undetected": []}
    if not all_detected:
        return power, "the BatchNorms are identities on this data: removing all of them changes no output"
    if len(bns) > MAX_SINGLE:
        log.info("power check: %d BatchNorms, only all of them together were removed", len(bns))
        return power, None
    undetected = [name for name, ident in bns if not _detected(ref_outs, runner.run(feeds, {**base, **ident}), axes)]
    runner.run(feeds, base)  # leave a stateful runner (the torch copy) with its own parameters
    power["checked"] = len(bns)
    power["undetected"] = undetected
    if undetected:
        shown = ", ".join(undetected[:3]) + (f" and {len(undetected) - 3} more" if len(undetected) > 3 else "")
        return power, (f"{len(undetected)} of {len(bns)} BatchNorms change no output when removed, on this data "
                       f"({shown})")
    return power, None
