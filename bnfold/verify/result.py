"""What verify found: per-output statistics and the verdict line."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field


@dataclass
class OutputStats:
    max_abs: float
    max_rel: float
    mean_abs: float
    p99_abs: float
    cosine: float
    atol: float
    rtol: float
    passed: bool
    dtype: str
    shape: list[int]
    #: "float", "int" or "bool"
    kind: str = "float"
    #: the channel axes the tolerance was computed per (None: the whole tensor is one channel)
    channel_axes: list[int] | None = None
    #: the channel with the largest error relative to its tolerance: index (one per channel axis), max_abs, atol
    worst_channel: dict | None = None
    #: max over elements of |cand - ref| / (atol_c + rtol*|ref|): > 1 fails (inf for a non-finite mismatch)
    tol_ratio: float = 0.0
    #: elements where exactly one model is NaN/inf, or both are but differ
    nonfinite_mismatches: int = 0
    #: integer/bool outputs: fraction of elements that differ (tie flips included)
    mismatch_rate: float | None = None
    #: arg-max outputs: disagreements accepted as ties (see the module docstring)
    tie_flips: int = 0
    #: the tolerance was this rounding budget ("float16 rounding": atol is the worst channel's budget, rtol 0);
    #: None: the fixed rule (or explicit --atol/--rtol)
    budget: str | None = None


@dataclass
class VerifyResult:
    passed: bool
    outputs: dict[str, OutputStats]
    top1_agreement: float | None
    accuracy: dict | None
    providers: dict[str, list[str]]
    samples: int
    inputs: str
    first_divergence: dict | None = None
    notes: list[str] = field(default_factory=list)
    #: the second run with overridable initializers fed random values: names and per-output stats (or None)
    overridden: dict | None = None
    #: how the tolerance was set: {"kind": "rounding", "dtype", "draws", "why"} or {"kind": "fixed", ...}
    tolerance: dict | None = None
    #: could the check have failed? {"bn_total", "checked", "all_removed_detected", "undetected": [...]}
    power: dict | None = None
    #: why a pass proves little (the BatchNorms are identities on this data, ...), or None
    unproven: str | None = None

    def to_dict(self) -> dict:
        return _json_safe(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _all_stats(self):
        items = list(self.outputs.items())
        if self.overridden:
            items += [(f"{k} (overridden initializers)", v) for k, v in self.overridden["outputs"].items()]
        return items

    def verdict(self) -> str:
        items = self._all_stats()

        def badness(kv):
            r = kv[1].tol_ratio
            return (not kv[1].passed, math.inf if math.isnan(r) else r)
        name, st = max(items, key=badness)
        if st.kind == "float":
            where = ""
            if st.worst_channel is not None and st.channel_axes:
                where = f" in channel {_fmt_index(st.worst_channel['index'])} of axis {_fmt_index(st.channel_axes)}"
            if st.budget:
                tol = f"= {_fmt_ratio(st.tol_ratio)} x its {st.budget} budget {st.atol:.3g}"
            else:
                tol = f"(tol {st.atol:.3g} + {st.rtol:.0e}*|ref|)"
            err = st.worst_channel["max_abs"] if where else st.max_abs
            detail = f"max_abs {err:.3g}{where} {tol}, cosine {_fmt_cos(st.cosine)}"
            if st.nonfinite_mismatches:
                detail += f", {st.nonfinite_mismatches} NaN/inf mismatch(es)"
        else:
            detail = f"{st.kind} output, {100 * (st.mismatch_rate or 0):.4g}% of elements differ"
            if st.tie_flips:
                detail += f" ({st.tie_flips} accepted arg-max tie flip(s))"
        parts = [f"{len(self.outputs)} output(s)", f"worst '{name}': {detail}"]
        if self.overridden:
            parts.append(f"{len(self.overridden['initializers'])} overridable initializer(s) also fed random values")
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement {100 * self.top1_agreement:.2f}%")
        if self.accuracy is not None:
            parts.append(f"accuracy {100 * self.accuracy['reference']:.2f}% -> {100 * self.accuracy['candidate']:.2f}%")
        parts.append(f"{self.samples} samples ({self.inputs}) on {', '.join(self.providers.get('candidate', []))}")
        tol = self.tolerance or {}
        if tol.get("kind") == "rounding":
            parts.append(f"tolerance: {tol['dtype']} rounding budget ({tol['why']})")
        elif tol.get("kind") == "fixed":
            parts.append(f"tolerance: {tol['why']}")
        if self.passed:
            head = f"PASSED (unproven: {self.unproven})" if self.unproven else "PASSED"
            return f"{head} | " + "; ".join(parts)
        msg = "FAILED | " + "; ".join(parts)
        if self.first_divergence:
            fd = self.first_divergence
            where = fd.get("node")
            if fd.get("layer"):
                where += f" (layer {fd['layer']})"
            msg += f"; first divergence at {where}"
            if fd.get("fold"):
                msg += f", where {fd['fold']} was folded"
        return msg


def _fmt_index(idx) -> str:
    return str(idx[0]) if isinstance(idx, (list, tuple)) and len(idx) == 1 else str(tuple(idx))


def _fmt_ratio(r) -> str:
    return "inf" if r is None or not math.isfinite(r) else f"{r:.2g}"


def _fmt_cos(c) -> str:
    return "NaN" if c is None or (isinstance(c, float) and math.isnan(c)) else f"{c:.6f}"


def _json_safe(obj):
    """NaN/inf floats become None, so that the JSON is valid."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
