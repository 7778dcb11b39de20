"""Verify: prove a folded model computes what the original computes, and say which fold broke when it does not.

The reference (an ONNX model, run by ONNX Runtime with graph optimizations *off* so the runtime cannot fold BN
for us, or a PyTorch module, run eagerly) and the candidate (the folded ONNX model) get the same inputs: seeded
random tensors, or real data. Per output we report max/mean/p99 absolute error, max relative error, cosine
similarity and the worst channel.

**Floating-point outputs** pass when every element satisfies ``|cand - ref| <= atol_c + rtol * |ref|``, where
``atol_c`` belongs to the element's *channel*: ``atol_c = atol_scale * max(1, max|ref over channel c|)``. The
channel axis is the one the output's producer defines (Conv/BatchNorm/pooling: axis 1; Gemm: 1; MatMul: the
last axis; Concat and Softmax: their ``axis``; followed through elementwise ops, Transpose, and Reshape/Flatten
when the shapes are known); when it cannot be told, each slice of axis 1 is a channel. So a detector head that
puts box coordinates (hundreds) next to probabilities (0..1) in one tensor holds each probability channel to its
own magnitude. An explicit ``atol`` is absolute, for every channel.

=========  ==========  =====
dtype      atol_scale  rtol
=========  ==========  =====
fp32/fp64  1e-4        1e-3
fp16       5e-3        1e-2
bf16       2e-2        5e-2
=========  ==========  =====

A NaN or infinity in one model where the other has a finite value fails the output, and its cosine is reported
as NaN (``null`` in JSON).

**Integer and bool outputs** must match exactly; the disagreement rate is reported. One exception, for
arg-max ties that a correct fp32 fold can flip: for an output computed by ArgMax/ArgMin, a position where the
two models pick different indices is a *tie flip*, and accepted, when the reference's own scores at the two
indices differ by no more than the float tolerance above (``atol_scale * max(1, |s|) + rtol * |s|``, ``s``
the reference's score at its own index). This needs the scores, so it applies with an ONNX reference that
computes the arg-max input under the same tensor name; tie flips are counted in the report.

**Overridable initializers** (from IR 4 on, an initializer that is also a graph input is a default the caller
may override) are fed random values, the same in both models, in a second run besides their defaults: a
candidate that baked a default in fails.

On failure, the localizer compares intermediate tensors in the candidate's graph order: each layer a BatchNorm
was folded into (by the fold record the folded model carries in its metadata, module-level folds included)
with the original BN's output, and every other tensor both graphs compute with the same meaning; the first
that diverges is named, with its source layer and the fold that touched it. A PyTorch reference is exported
(BatchNorm kept) for this.
"""

from __future__ import annotations

import ast
import json
import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from bnfold.data import Dataset, fit_to_shape
from bnfold.errors import BnfoldError
from bnfold.runtime import make_session, ort_dtype, resolve_input_shapes

log = logging.getLogger(__name__)

TOLERANCES = {  # dtype -> (atol_scale, rtol)
    "float32": (1e-4, 1e-3),
    "float64": (1e-4, 1e-3),
    "float16": (5e-3, 1e-2),
    "bfloat16": (2e-2, 5e-2),
}
#: metadata key of the module-level fold record (written by :func:`bnfold.torch_fold.record_module_folds`)
MODULE_FOLDS_KEY = "bnfold.module_folds"
#: metadata key of the ONNX pass's record (written by :func:`bnfold.onnx_fold.fold_model`)
ONNX_FOLDS_KEY = "bnfold"


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
            detail = (f"max_abs {st.max_abs:.3g}{where} (tol {st.atol:.3g} + {st.rtol:.0e}*|ref|), "
                      f"cosine {_fmt_cos(st.cosine)}")
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
        if self.passed:
            return "PASSED | " + "; ".join(parts)
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


def _output_kind(dtype: np.dtype) -> str:
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "iu":
        return "int"
    return "float"


def compare_output(ref: np.ndarray, cand: np.ndarray, *, atol: float | None, rtol: float | None,
                   channel_axes: tuple[int, ...] | None = None, excused: np.ndarray | None = None) -> OutputStats:
    """Compare one output. ``channel_axes`` (default: axis 1 when the output has two or more dimensions) are the
    axes whose every index is a channel with its own default ``atol`` (see the module docstring); ``()`` makes
    the whole tensor one channel. ``excused`` marks elements of an integer output accepted as arg-max tie
    flips."""
    ref_a, cand_a = np.asarray(ref), np.asarray(cand)
    dtype = str(cand_a.dtype)
    kind = _output_kind(cand_a.dtype)
    if ref_a.shape != cand_a.shape:
        raise BnfoldError(f"output shapes differ: reference {ref_a.shape}, candidate {cand_a.shape}")
    ref64 = ref_a.astype(np.float64)
    cand64 = cand_a.astype(np.float64)
    shape = list(ref64.shape)
    if kind != "float":
        return _compare_exact(ref_a, cand_a, ref64, cand64, kind, dtype, shape, excused)
    a_scale, r_default = TOLERANCES.get(dtype, TOLERANCES["float32"])
    ndim = ref64.ndim
    axes = (1,) if channel_axes is None and ndim >= 2 else tuple(channel_axes or ())
    axes = tuple(sorted({a % ndim for a in axes})) if ndim else ()
    fin_r, fin_c = np.isfinite(ref64), np.isfinite(cand64)
    both = fin_r & fin_c
    with np.errstate(invalid="ignore"):
        same = (ref64 == cand64) | (np.isnan(ref64) & np.isnan(cand64))  # identical infinities / NaNs agree
    nonfinite_bad = ~both & ~same
    diff = np.where(both, np.abs(cand64 - ref64), 0.0)
    if atol is not None:
        atol_arr = np.full((1,) * ndim, float(atol))
    else:
        mag = np.where(fin_r, np.abs(ref64), 0.0)
        other = tuple(k for k in range(ndim) if k not in axes)
        ch_max = mag.max(axis=other, keepdims=True) if (other and mag.size) else (mag if mag.size else np.zeros((1,) * ndim))
        atol_arr = a_scale * np.maximum(1.0, ch_max)
    rtol_v = float(rtol) if rtol is not None else r_default
    bound = atol_arr + rtol_v * np.where(fin_r, np.abs(ref64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(both, diff / bound, 0.0)
    ratio = np.where(nonfinite_bad, np.inf, ratio)
    ok = not bool(np.any(ratio > 1.0))
    worst = None
    tol_ratio = 0.0
    atol_worst = float(np.max(atol_arr)) if atol_arr.size else 0.0
    if ratio.size:
        flat = int(np.argmax(ratio))
        tol_ratio = float(ratio.reshape(-1)[flat])
        idx = np.unravel_index(flat, ratio.shape)
        atol_idx = tuple(i if atol_arr.shape[k] > 1 else 0 for k, i in enumerate(idx))
        atol_worst = float(atol_arr[atol_idx]) if atol_arr.ndim else float(atol_arr)
        if axes:
            sel = tuple(slice(None) if k not in axes else slice(idx[k], idx[k] + 1) for k in range(ndim))
            worst = {"index": [int(idx[k]) for k in axes], "max_abs": float(diff[sel].max()), "atol": atol_worst}
    d = diff[both]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        rel = d / np.maximum(np.abs(ref64[both]), 1e-12) if d.size else d
    n_bad = int(nonfinite_bad.sum())
    if n_bad:
        cosine = math.nan
    else:
        r, c = ref64[both], cand64[both]
        denom = np.linalg.norm(r) * np.linalg.norm(c)
        cosine = float(np.dot(r, c) / denom) if denom > 0 else (1.0 if np.array_equal(r, c) else 0.0)
    return OutputStats(
        max_abs=float(d.max()) if d.size else 0.0, max_rel=float(rel.max()) if rel.size else 0.0,
        mean_abs=float(d.mean()) if d.size else 0.0, p99_abs=float(np.percentile(d, 99)) if d.size else 0.0,
        cosine=cosine, atol=atol_worst, rtol=rtol_v, passed=ok and n_bad == 0, dtype=dtype, shape=shape,
        kind="float", channel_axes=list(axes) if axes else None, worst_channel=worst, tol_ratio=tol_ratio,
        nonfinite_mismatches=n_bad)


def _compare_exact(ref_a, cand_a, ref64, cand64, kind, dtype, shape, excused) -> OutputStats:
    differ = ref_a != cand_a
    n = int(differ.sum())
    flips = int((differ & excused).sum()) if excused is not None else 0
    failing = n - flips
    d = np.abs(cand64 - ref64).reshape(-1)
    denom = np.linalg.norm(ref64) * np.linalg.norm(cand64)
    cosine = float(np.dot(ref64.reshape(-1), cand64.reshape(-1)) / denom) if denom > 0 else (
        1.0 if np.array_equal(ref64, cand64) else 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = d / np.maximum(np.abs(ref64.reshape(-1)), 1e-12) if d.size else d
    return OutputStats(
        max_abs=float(d.max()) if d.size else 0.0, max_rel=float(rel.max()) if rel.size else 0.0,
        mean_abs=float(d.mean()) if d.size else 0.0, p99_abs=float(np.percentile(d, 99)) if d.size else 0.0,
        cosine=cosine, atol=0.0, rtol=0.0, passed=failing == 0, dtype=dtype, shape=shape, kind=kind,
        tol_ratio=math.inf if failing else 0.0, mismatch_rate=n / max(1, differ.size), tie_flips=flips)


# ------------------------------------------------------------------------------------------------ channel axes
_AXIS1 = {"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "MaxPool", "AveragePool",
          "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Resize", "Upsample", "QLinearConv",
          "ConvInteger", "LRN", "MaxUnpool", "MaxRoiPool", "RoiAlign", "Gemm"}
_UNARY = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
          "Softplus", "Softsign", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish", "Clip",
          "Cast", "CastLike", "Identity", "Dropout", "Floor", "Ceil", "Round", "Sign", "Pad", "Slice", "Split",
          "LayerNormalization", "ThresholdedRelu", "Sin", "Cos", "Atan", "QuantizeLinear", "DequantizeLinear",
          "Shrink", "Not", "IsNaN", "IsInf", "CumSum", "Trilu"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal", "Less",
           "LessOrEqual", "Greater", "GreaterOrEqual", "Where", "Mod", "BitShift"}
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _dim_key(dims):
    """(product of known sizes, sorted symbolic names) of a list of dims, or None if one is unknown."""
    prod, syms = 1, []
    for d in dims:
        if isinstance(d, int):
            prod *= d
        elif isinstance(d, str) and d:
            syms.append(d)
        else:
            return None
    return prod, tuple(sorted(syms))


def _map_reshape(in_shape, out_shape, axes):
    """Where the channel axis ``axes`` of ``in_shape`` lands in ``out_shape`` (kept whole, or split into
    consecutive axes), or None."""
    if in_shape is None or out_shape is None or len(axes) != 1:
        return None
    a = axes[0] % len(in_shape) if in_shape else None
    if a is None:
        return None
    pre, c = _dim_key(in_shape[:a]), _dim_key([in_shape[a]])
    if pre is None or c is None:
        return None
    for b in range(len(out_shape) + 1):
        if _dim_key(out_shape[:b]) != pre:
            continue
        for e in range(b + 1, len(out_shape) + 1):
            k = _dim_key(out_shape[b:e])
            if k == c:
                # drop leading size-1 axes of a split, they do not tell channels apart
                span = tuple(i for i in range(b, e) if out_shape[i] != 1) or (b,)
                return span
            if k is None or (not c[1] and not k[1] and k[0] > c[0]):
                break
    return None


class _Graph:
    """Producers, shapes and source layers of one ONNX graph (the main graph)."""

    def __init__(self, model: onnx.ModelProto, input_shapes: dict | None = None):
        self.model = model
        g = model.graph
        self.producer = {}
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
        self.initializers = {t.name for t in g.initializer}
        self.shapes = _shapes(model, input_shapes)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    def rank(self, name):
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def channel_axes(self, name: str, ndim: int | None = None) -> tuple[int, ...] | None:
        """The channel axes of tensor ``name`` as its producers define them, or None when unknown."""
        path = []
        cur = name
        for _ in range(10000):
            node = self.producer.get(cur)
            if node is None:
                return None
            op = node.op_type
            if (node.domain or "") not in ("", "ai.onnx"):
                return None
            if op in _AXIS1:
                axes = (1,)
                break
            if op == "MatMul" or op == "MatMulInteger":
                axes = (-1,)
                break
            if op in ("Concat",):
                axes = (_attr(node, "axis", 0),)
                break
            if op in ("Softmax", "LogSoftmax", "Hardmax"):
                axes = (_attr(node, "axis", -1 if self.opset >= 13 else 1),)
                break
            if op in _UNARY or op in _BINARY or op in _RESHAPES or op == "Transpose":
                nxt = self._data_input(node, cur)
                if nxt is None:
                    return None
                path.append((node, nxt, cur))
                cur = nxt
                continue
            return None
        else:
            return None
        # walk forward again through the ops between the defining producer and ``name``
        for node, src, dst in reversed(path):
            op = node.op_type
            if op == "Transpose":
                r = self.rank(src)
                perm = list(_attr(node, "perm", []) or [])
                if not perm:
                    if r is None:
                        return None
                    perm = list(range(r))[::-1]
                r = len(perm)
                axes = tuple(perm.index(a % r) for a in axes)
            elif op in _RESHAPES:
                mapped = _map_reshape(self.shapes.get(src), self.shapes.get(dst), axes)
                if mapped is None:
                    return None
                axes = mapped
            elif op in _BINARY:
                rs, rd = self.rank(src), self.rank(dst)
                if rs is not None and rd is not None and rs != rd:
                    axes = tuple((a % rs) + (rd - rs) for a in axes)
        return axes

    def _data_input(self, node, out_name):
        op = node.op_type
        if op in _BINARY:
            r_out = self.rank(out_name)
            best = None
            for i in node.input:
                if not i or i in self.initializers or i not in self.producer:
                    continue
                if self.producer[i].op_type == "Constant":
                    continue
                if r_out is None or self.rank(i) in (None, r_out):
                    return i
                best = best or i
            return best
        return node.input[0] if node.input and node.input[0] else None


def _shapes(model: onnx.ModelProto, input_shapes: dict | None) -> dict:
    """Tensor name -> list of dims (int, symbol name, or None) from value_info, and from shape inference on a
    skeleton of the model (large initializers without their data) with the concrete input shapes."""
    def collect(g):
        out = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        return out

    shapes = collect(model.graph)
    try:
        sk = onnx.ModelProto()
        sk.ir_version = model.ir_version
        sk.opset_import.extend(model.opset_import)
        g = sk.graph
        g.node.extend(model.graph.node)
        g.output.extend(model.graph.output)
        g.value_info.extend(model.graph.value_info)
        for vi in model.graph.input:
            v = g.input.add()
            v.CopyFrom(vi)
            if input_shapes and vi.name in input_shapes and vi.type.tensor_type.HasField("shape"):
                dims = v.type.tensor_type.shape.dim
                for d, val in zip(dims, input_shapes[vi.name]):
                    d.Clear()
                    d.dim_value = int(val)
        for t in model.graph.initializer:
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            if n <= 64 and t.data_location != onnx.TensorProto.EXTERNAL:
                g.initializer.append(t)
            else:
                g.initializer.add(name=t.name, data_type=t.data_type, dims=list(t.dims))
        inferred = onnx.shape_inference.infer_shapes(sk, strict_mode=False)
        shapes.update({k: v for k, v in collect(inferred.graph).items() if all(d is not None for d in v)
                       or k not in shapes})
    except Exception as exc:  # shapes are a help for the channel axis, not a requirement
        log.debug("shape inference for channel axes failed: %s", exc)
    return shapes


# ------------------------------------------------------------------------------------------------ runners
class _OnnxRunner:
    def __init__(self, model, ep: str, opt_level: str, role: str, extra_outputs: list[str] | None = None):
        self.role = role
        self.model = _as_model(model)
        src = self.model
        self.extra = [n for n in (extra_outputs or []) if n not in {o.name for o in src.graph.output}]
        if self.extra:
            src = _with_outputs(src, self.extra)
            self.extra = [n for n in self.extra if n in {o.name for o in src.graph.output}]
        try:
            self.sess = make_session(src, ep=ep, opt_level=opt_level)
        except BnfoldError as exc:
            raise BnfoldError(f"the {role} model: {exc}") from None
        self.inputs = self.sess.get_inputs()
        self.output_names = [o.name for o in self.sess.get_outputs()][:len(self.sess.get_outputs()) - len(self.extra)]
        self.overridable = {i.name for i in self.sess.get_overridable_initializers()}
        self.providers = self.sess.get_providers()

    def run(self, feeds: dict) -> tuple[list[np.ndarray], dict]:
        try:
            outs = self.sess.run(None, {k: v for k, v in feeds.items()
                                        if k in self.overridable or k in {i.name for i in self.inputs}})
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BnfoldError(f"ONNX Runtime cannot run the {self.role} model: {msg[:300]}") from None
        n = len(outs) - len(self.extra)
        return outs[:n], dict(zip(self.extra, outs[n:]))


class _TorchRunner:
    role = "reference"

    def __init__(self, module, device: str):
        import copy

        import torch
        self.torch = torch
        current = next((p.device.type for p in module.parameters()), "cpu")
        # never move the caller's module: run a copy when it lives on another device
        self.module = (module if current == device else copy.deepcopy(module).to(device)).eval()
        self.device = device
        self.providers = [f"torch-{device}"]
        self.overridable = set()

    def run(self, feeds: dict) -> tuple[list[np.ndarray], dict]:
        torch = self.torch
        try:
            with torch.no_grad():
                out = self.module(*[torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for v in feeds.values()])
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BnfoldError(f"the reference PyTorch module fails on the inputs: {msg[:300]}") from None
        if isinstance(out, torch.Tensor):
            out = [out]
        elif isinstance(out, dict):
            out = list(out.values())
        return [o.detach().float().cpu().numpy() if o.dtype == torch.bfloat16 else o.detach().cpu().numpy()
                for o in out], {}


def _random_feeds(cand: _OnnxRunner, shapes: list[tuple], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp, shape in zip(cand.inputs, shapes):
        dt = ort_dtype(inp.type)
        if dt.kind == "f" or dt.name == "bfloat16":
            feeds[inp.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            feeds[inp.name] = rng.integers(0, 2, shape).astype(dt)
        else:
            feeds[inp.name] = rng.integers(0, 10, shape).astype(dt)
    return feeds


def overridable_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers that are also graph inputs (IR >= 4): defaults a caller may override."""
    if model.ir_version < 4:
        return []
    inputs = {i.name for i in model.graph.input}
    return [t.name for t in model.graph.initializer if t.name in inputs]


def _override_values(model: onnx.ModelProto, names: list[str], seed: int) -> dict:
    """Random values for the float overridable initializers: each default scaled elementwise by U(0.5, 1.5) plus
    noise of a tenth of its RMS; a default without negative values stays non-negative (a variance stays a
    variance). Integer initializers (shapes, indices) keep their defaults."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed + 7919)
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in names:
        a = numpy_helper.to_array(inits[n])
        if a.dtype.kind != "f" or a.size == 0:
            continue
        a64 = a.astype(np.float64)
        rms = float(np.sqrt(np.mean(a64 ** 2))) if a64.size else 0.0
        v = a64 * rng.uniform(0.5, 1.5, a64.shape) + rng.standard_normal(a64.shape) * 0.1 * max(rms, 1e-3)
        if not np.any(a64 < 0):
            v = np.abs(v)
        out[n] = v.astype(a.dtype)
    return out


def _data_batches(cand: _OnnxRunner, data: Dataset, shapes: list[tuple], batch_size: int, max_samples: int | None,
                  layout: str = "nchw"):
    arrays = fit_dataset(data, [(i.name, s, ort_dtype(i.type)) for i, s in zip(cand.inputs, shapes)], layout=layout)
    total = len(data) if max_samples is None else min(len(data), max_samples)
    static_batch = [d for d in (cand.inputs[0].shape[:1]) if isinstance(d, int) and d > 0]
    step = static_batch[0] if static_batch else batch_size
    usable = (total // step) * step if static_batch else total
    if usable == 0:
        raise BnfoldError(f"the data has {total} samples, fewer than the model's fixed batch of {step}")
    for start in range(0, usable, step):
        yield {n: a[start:start + step] for n, a in arrays.items()}, slice(start, min(start + step, usable))


def fit_dataset(data: Dataset, inputs: list[tuple], *, layout: str = "nchw") -> dict[str, np.ndarray]:
    """The dataset's arrays shaped and typed for the model's inputs ``[(name, shape, dtype), ...]`` (the shape
    with its batch dimension); raises :class:`BnfoldError` when they do not fit (see
    :func:`bnfold.data.fit_to_shape` for ``layout``)."""
    names = [n for n, _, _ in inputs]
    if set(names) <= set(data.inputs):
        arrays = {n: data.inputs[n] for n in names}
    elif len(names) == 1 and len(data.inputs) == 1:
        arrays = {names[0]: next(iter(data.inputs.values()))}
    else:
        raise BnfoldError(f"the data has arrays {sorted(data.inputs)} but the model's inputs are {names}: "
                          "name the .npz arrays after the inputs")
    return {n: fit_to_shape(np.asarray(arrays[n]), tuple(shape[1:]), layout=layout).astype(dt)
            for n, shape, dt in inputs}


def model_input_shapes(model: onnx.ModelProto, input_shapes: list | None = None, batch: int = 1) -> list[tuple]:
    """``[(name, shape, numpy dtype), ...]`` of an ONNX model's data inputs, dynamic batch set to ``batch``
    (other dynamic dimensions need ``input_shapes``)."""
    from bnfold.runtime import ort_dtype as _dt

    inits = {t.name for t in model.graph.initializer}

    class _Arg:  # what resolve_input_shapes reads from a session input
        def __init__(self, vi):
            self.name = vi.name
            tt = vi.type.tensor_type
            self.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            self.type = f"tensor({_ONNX_TYPE_NAMES.get(tt.elem_type, 'float')})"

    args = [_Arg(vi) for vi in model.graph.input if vi.name not in inits]
    shapes = resolve_input_shapes(args, input_shapes or [], batch)
    return [(a.name, s, _dt(a.type)) for a, s in zip(args, shapes)]


_ONNX_TYPE_NAMES = {1: "float", 11: "double", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 3: "int8",
                    2: "uint8", 9: "bool"}


def load_data_for(spec, model, *, input_shapes: list | None = None, layout: str = "nchw") -> Dataset:
    """``--data`` (digits, .npz, image folder) loaded for an ONNX ``model`` (ModelProto or path): image folders
    resized to its input, arrays shaped channels-first for it (``layout``: how the arrays are laid out).
    Raises :class:`BnfoldError` when the data does not fit."""
    from bnfold.data import load_for_model

    proto = model if isinstance(model, onnx.ModelProto) else _load_structure(model)
    try:
        inputs = [(n, s) for n, s, _ in model_input_shapes(proto, input_shapes)]
    except BnfoldError:  # dynamic dimensions without --input-shape: verify itself will say so
        inputs = None
    return load_for_model(spec, inputs, layout=layout)


def _load_structure(path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BnfoldError(f"{path}: not a readable ONNX model ({str(exc).strip()[:200]})") from None


def check_data(inputs: list[tuple], data: Dataset) -> None:
    """Raise :class:`BnfoldError` unless ``data`` (channels-first) fits the model inputs ``[(name, shape,
    dtype), ...]``; writes nothing."""
    fit_dataset(data, inputs)


def _argmax_scores(cand: onnx.ModelProto) -> dict[str, tuple[str, int, bool, bool]]:
    """Integer outputs computed by ArgMax/ArgMin: output -> (scores tensor, axis, keepdims, select_last)."""
    prod = {o: n for n in cand.graph.node for o in n.output}
    out = {}
    for o in cand.graph.output:
        n = prod.get(o.name)
        while n is not None and n.op_type in ("Cast", "Identity") and n.input:
            n = prod.get(n.input[0])
        if n is not None and n.op_type in ("ArgMax", "ArgMin") and (n.domain or "") in ("", "ai.onnx"):
            out[o.name] = (n.input[0], int(_attr(n, "axis", 0)), bool(_attr(n, "keepdims", 1)),
                           n.op_type == "ArgMin")
    return out


def _tie_flips(ref_idx: np.ndarray, cand_idx: np.ndarray, scores: np.ndarray, axis: int, keepdims: bool,
               minimum: bool) -> np.ndarray | None:
    """Positions where the candidate's index differs but the reference's scores at the two indices are tied
    within the float tolerance."""
    scores = np.asarray(scores, np.float64)
    axis = axis % scores.ndim
    r = ref_idx if keepdims else np.expand_dims(ref_idx, axis)
    c = cand_idx if keepdims else np.expand_dims(cand_idx, axis)
    if r.shape != tuple(1 if k == axis else s for k, s in enumerate(scores.shape)):
        return None
    n = scores.shape[axis]
    valid = (c >= 0) & (c < n)
    s_r = np.take_along_axis(scores, np.clip(r, 0, n - 1).astype(np.int64), axis)
    s_c = np.take_along_axis(scores, np.clip(c, 0, n - 1).astype(np.int64), axis)
    a_scale, rtol = TOLERANCES.get(str(scores.dtype), TOLERANCES["float32"])
    tol = a_scale * np.maximum(1.0, np.abs(s_r)) + rtol * np.abs(s_r)
    tied = valid & (np.abs(s_r - s_c) <= tol)
    return tied if keepdims else np.squeeze(tied, axis)


def verify(reference, candidate, *, input_shapes: list | None = None, data: Dataset | None = None,
           ep: str = "cpu", atol: float | None = None, rtol: float | None = None, batch: int = 8,
           batch_size: int = 64, max_samples: int | None = 2000, seed: int = 0, candidate_opt_level: str = "all",
           locate: bool = True, layout: str = "nchw") -> VerifyResult:
    """Compare ``candidate`` (folded ONNX: ModelProto or path) with ``reference`` (ONNX ModelProto/path, run with
    optimizations off, or a torch ``nn.Module``, run eagerly). See the module docstring for the rules.
    ``layout`` is the layout of ``data``'s image arrays (``nchw`` or ``nhwc``)."""
    import sys

    torch = sys.modules.get("torch")  # a torch module reference means torch is imported; never import it here
    cand_model = _as_model(candidate)
    argmax = _argmax_scores(cand_model)
    cand = _OnnxRunner(cand_model, ep, candidate_opt_level, "candidate")
    ref_model = None
    if torch is not None and isinstance(reference, torch.nn.Module):
        device = "cuda" if ep != "cpu" and torch.cuda.is_available() else "cpu"
        ref = _TorchRunner(reference, device)
    else:
        ref_model = _as_model(reference)
        ref = _OnnxRunner(ref_model, ep, "off", "reference", extra_outputs=sorted({s for s, *_ in argmax.values()}))
        ref_names = [i.name for i in ref.inputs]
        if ref_names != [i.name for i in cand.inputs]:
            raise BnfoldError(f"reference inputs {ref_names} differ from candidate inputs "
                              f"{[i.name for i in cand.inputs]}: are these the same model?")
    shapes = resolve_input_shapes(cand.inputs, input_shapes or [], batch)
    if data is None:
        batches = [(_random_feeds(cand, shapes, seed), None)]
        source = f"random, seed {seed}"
    else:
        batches = _data_batches(cand, data, shapes, batch_size, max_samples, layout)
        source = data.name
    outs_ref, outs_cand, extras, samples, first_feeds = [], [], [], 0, None
    for feeds, _ in batches:
        first_feeds = first_feeds or feeds
        r, ex = ref.run(feeds)
        outs_ref.append(r)
        extras.append(ex)
        outs_cand.append(cand.run(feeds)[0])
        samples += len(next(iter(feeds.values())))
    names = cand.output_names
    if len(outs_ref[0]) != len(names):
        raise BnfoldError(f"the reference has {len(outs_ref[0])} outputs, the candidate {len(names)}")
    graph = _Graph(cand_model, {i.name: s for i, s in zip(cand.inputs, shapes)})

    def compare_all(o_ref, o_cand, o_extra):
        stats, cat = {}, []
        for k, name in enumerate(names):
            r = np.concatenate([o[k] for o in o_ref]) if len(o_ref) > 1 else o_ref[0][k]
            c = np.concatenate([o[k] for o in o_cand]) if len(o_cand) > 1 else o_cand[0][k]
            cat.append((r, c))
            excused = None
            if name in argmax and argmax[name][0] in o_extra[0]:
                s_name, axis, keep, _ = argmax[name]
                scores = np.concatenate([e[s_name] for e in o_extra]) if len(o_extra) > 1 else o_extra[0][s_name]
                if np.shape(r) == np.shape(c):
                    excused = _tie_flips(np.asarray(r), np.asarray(c), scores, axis, keep, argmax[name][3])
            axes = graph.channel_axes(name) if np.ndim(r) >= 1 else None
            stats[name] = compare_output(r, c, atol=atol, rtol=rtol, channel_axes=axes, excused=excused)
        return stats, cat

    stats, cat = compare_all(outs_ref, outs_cand, extras)
    top1 = accuracy = None
    logits = [(r, c) for r, c in cat if r.ndim == 2 and r.shape[1] > 1 and np.asarray(r).dtype.kind == "f"]
    if logits:
        r, c = logits[0]
        pr, pc = r.argmax(1), c.argmax(1)
        top1 = float((pr == pc).mean())
        if data is not None and data.labels is not None:
            labels = data.labels[:len(pr)]
            accuracy = {"reference": float((pr == labels).mean()), "candidate": float((pc == labels).mean())}
            accuracy["delta"] = accuracy["candidate"] - accuracy["reference"]
    result = VerifyResult(passed=all(s.passed for s in stats.values()), outputs=stats, top1_agreement=top1,
                          accuracy=accuracy, providers={"reference": ref.providers, "candidate": cand.providers},
                          samples=samples, inputs=source)
    failing_feeds = first_feeds
    # overridable initializers: a second run with random values, the same in both models
    if ref_model is not None:
        names_ov = overridable_initializers(ref_model)
        values = _override_values(ref_model, names_ov, seed)
        if values:
            missing = sorted(n for n in values if n not in cand.overridable)
            if missing:
                result.notes.append(f"the candidate does not accept overridable initializer(s) {', '.join(missing)} "
                                    "of the reference: it may have baked their defaults in")
            feeds = {**first_feeds, **values}
            r, ex = ref.run(feeds)
            c = cand.run(feeds)[0]
            ov_stats, _ = compare_all([r], [c], [ex])
            result.overridden = {"initializers": sorted(values), "outputs": ov_stats}
            if not all(s.passed for s in ov_stats.values()):
                result.passed = False
                if all(s.passed for s in stats.values()):
                    failing_feeds = feeds
    if not result.passed and locate:
        try:
            loc_ref = ref_model if ref_model is not None else _export_reference(reference, failing_feeds, cand)
            result.first_divergence = locate_divergence(loc_ref, cand_model, failing_feeds, ep=ep, atol=atol,
                                                        rtol=rtol)
        except Exception as exc:  # localisation is best effort; the verdict stands without it
            result.notes.append(f"could not locate the divergence: {str(exc).strip()[:300]}")
    return result


def _export_reference(module, feeds: dict, cand: _OnnxRunner) -> onnx.ModelProto:
    """A PyTorch reference exported with BatchNorm kept, for the localizer."""
    import torch

    from bnfold.export import export_onnx

    inputs = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values() if True)
    inputs = inputs[:len(cand.inputs)]
    import copy
    m = copy.deepcopy(module).cpu().eval()
    return export_onnx(m, inputs, input_names=[i.name for i in cand.inputs], dynamic_batch=False, keep_bn=True)


def _as_model(m) -> onnx.ModelProto:
    if isinstance(m, onnx.ModelProto):
        return m
    try:
        return onnx.load(str(m))
    except Exception as exc:
        raise BnfoldError(f"{m}: not a readable ONNX model ({str(exc).strip()[:200]})") from None


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    except Exception:
        types = {}
    types.update({vi.name: vi for vi in list(model.graph.value_info) if vi.name not in types})
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n in existing:
            continue
        if n in types and types[n].type.HasField("tensor_type"):
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(types[n])
            vi.type.tensor_type.ClearField("shape")
            m.graph.output.append(vi)
    return m


# ------------------------------------------------------------------------------------------------ localizer
def source_layers(model: onnx.ModelProto) -> dict[str, str]:
    """Map a node's outputs to the source layer it came from, from exporter metadata (torch's dynamo exporter
    records the module path of every node in ``pkg.torch.onnx.name_scopes``)."""
    layers: dict[str, str] = {}
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = ast.literal_eval(p.value)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                    for o in n.output:
                        if o:
                            layers[o] = str(scopes[-2])
    return layers


def _layer_output(model: onnx.ModelProto, layers: dict[str, str], layer: str, prefer: str | None = None) -> str | None:
    """The output of ``layer``: the first output of its ``prefer`` node (e.g. its BatchNormalization, when the
    layer does more, like timm's BatchNormAct2d), else of the last node (graph order) its scope made."""
    last = None
    for n in model.graph.node:
        if n.output and n.output[0] and layers.get(n.output[0]) == layer and n.op_type not in ("Constant",):
            if prefer is not None and n.op_type == prefer:
                return n.output[0]
            last = n.output[0]
    return last


def _records(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    meta = {p.key: p.value for p in model.metadata_props}

    def entries(key):
        try:
            e = json.loads(meta[key]).get("entries", []) if key in meta else []
            return [x for x in e if isinstance(x, dict)]
        except (ValueError, AttributeError):
            return []
    return entries(ONNX_FOLDS_KEY), entries(MODULE_FOLDS_KEY)


_FOLDED_AWAY = {"BatchNormalization", "Mul", "Add", "Sub", "Div"}
_FOLD_TARGETS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "BatchNormalization"}


def _entry_into(entries: list[dict], node) -> dict | None:
    """The ONNX pass's record of a fold into ``node`` (by node name)."""
    label = node.name or f"{node.op_type}@{node.output[0]}"
    return next((e for e in entries if e.get("status") == "folded" and e.get("into")
                 and label in str(e["into"]).split("+")), None)


def locate_divergence(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict, *, ep: str = "cpu",
                      atol: float | None = None, rtol: float | None = None) -> dict | None:
    """The first tensor, in the candidate's graph order, that differs beyond tolerance from its counterpart in
    the reference; with the candidate node that computes it, the fold that touched it and its source layer.

    Counterparts: a layer that absorbed a BatchNorm at module level (the fold record in the candidate's
    ``bnfold.module_folds`` metadata) is compared with the original BN's output (backward fold) or the
    original layer's output (forward fold); any other tensor with a name both graphs compute, when its
    producers agree on the op and, where recorded, on the source layer."""
    onnx_entries, module_entries = _records(candidate)
    ref_prod = {o: n for n in reference.graph.node for o in n.output if o}
    cand_prod = {o: n for n in candidate.graph.node for o in n.output if o}
    ref_layers, cand_layers = source_layers(reference), source_layers(candidate)
    pairs: dict[str, tuple[str, dict | None]] = {}  # candidate tensor -> (reference tensor, module fold)
    for e in module_entries:
        t = e.get("tensor")
        if e.get("status", "folded") != "folded" or not t or t not in cand_prod:
            continue
        src = e.get("bn") if e.get("direction") == "backward" else e.get("into_layer")
        prefer = "BatchNormalization" if e.get("direction") == "backward" else None
        r = _layer_output(reference, ref_layers, src, prefer) if src else None
        if r is not None:
            pairs[t] = (r, e)
    recorded = set(pairs)
    for t, n in cand_prod.items():
        if t in recorded or t not in ref_prod:
            continue
        rn = ref_prod[t]
        if rn.op_type == n.op_type:
            if t in cand_layers and t in ref_layers and cand_layers[t] != ref_layers[t]:
                continue  # the same name made by another layer: a name counter shifted, not the same tensor
        elif not (rn.op_type in _FOLDED_AWAY and n.op_type in _FOLD_TARGETS):
            continue  # only a layer that absorbed a BN (or affine op) backward takes over its output name
        else:
            e = _entry_into(onnx_entries, n)
            if e is not None and e.get("layer") and t in ref_layers and e["layer"] != ref_layers[t]:
                # the name belongs to another BN in the reference (export counters shifted): pair by layer
                r = _layer_output(reference, ref_layers, e["layer"], prefer="BatchNormalization")
                if r is not None:
                    pairs[t] = (r, None)
                continue
        pairs[t] = (t, None)
    order = [(n, n.output[0]) for n in candidate.graph.node if n.output and n.output[0] in pairs]
    if not order:
        return None
    c_names = [t for _, t in order]
    r_names = sorted({pairs[t][0] for t in c_names})
    r_sess = make_session(_with_outputs(reference, r_names), ep=ep, opt_level="off")
    c_sess = make_session(_with_outputs(candidate, c_names), ep=ep, opt_level="off")
    r_feeds = {i.name: feeds[i.name] for i in r_sess.get_inputs() if i.name in feeds}
    r_feeds.update({i.name: feeds[i.name] for i in r_sess.get_overridable_initializers() if i.name in feeds})
    c_feeds = {i.name: feeds[i.name] for i in c_sess.get_inputs() if i.name in feeds}
    c_feeds.update({i.name: feeds[i.name] for i in c_sess.get_overridable_initializers() if i.name in feeds})
    r_vals = dict(zip([o.name for o in r_sess.get_outputs()], r_sess.run(None, r_feeds)))
    c_vals = dict(zip([o.name for o in c_sess.get_outputs()], c_sess.run(None, c_feeds)))
    graph = _Graph(candidate, {k: np.shape(v) for k, v in feeds.items()})
    for node, name in order:
        r_name, mfold = pairs[name]
        if name not in c_vals or r_name not in r_vals:
            continue
        rv, cv = r_vals[r_name], c_vals[name]
        if np.shape(rv) != np.shape(cv):
            continue
        st = compare_output(rv, cv, atol=atol, rtol=rtol, channel_axes=graph.channel_axes(name))
        if st.passed:
            continue
        label = node.name or f"{node.op_type}@{name}"
        if mfold is not None:
            return {"tensor": name, "reference_tensor": r_name, "node": label, "op": node.op_type,
                    "layer": mfold.get("into_layer") or cand_layers.get(name), "fold": mfold.get("bn"),
                    "fold_direction": mfold.get("direction"), "fold_level": "module",
                    "max_abs": st.max_abs, "atol": st.atol}
        fold = next((e for e in onnx_entries if e.get("status") == "folded" and e.get("into")
                     and label in str(e["into"]).split("+")), None)
        if fold is None:  # a backward fold writes the BN's output tensor: find the BN by its output name
            bn = ref_prod.get(name)
            if bn is not None and bn.op_type == "BatchNormalization":
                fold = next((e for e in onnx_entries if e.get("bn") in (bn.name, f"BatchNormalization@{name}")),
                            None)
        layer = (fold or {}).get("into_layer") or cand_layers.get(name) or ref_layers.get(name)
        return {"tensor": name, "reference_tensor": r_name, "node": label, "op": node.op_type, "layer": layer,
                "fold": None if fold is None else (fold.get("layer") or fold.get("bn")),
                "fold_direction": None if fold is None else fold.get("direction"),
                "fold_level": None if fold is None else "onnx", "max_abs": st.max_abs, "atol": st.atol}
    return None
