"""Reduced precision: fold once, straight into fp16 or bf16, with the range certified layer by layer.

Converting a folded fp32 model with another tool rounds every folded weight twice (float64 -> fp32 -> fp16), and
a converter that clamps values which do not fit hides what folding did to the range. Here the fold's float64
values are rounded once, to nearest, straight to the target (:func:`bnfold.formula.round_to`), and the rest of
the model follows:

1. **Fold.** The plan is applied with a rounding hook: every folded parameter that fits the target is written
   in the target dtype; one that would overflow (a finite value becoming inf) is written in the model's dtype and
   its layer stays fp32 (reason ``fp16_overflow``). Nothing is ever clamped. The hook also keeps the fp32
   rounding of the same float64 values, for the layers step 3 keeps in fp32.
2. **Certify.** Every float initializer (folded or not) is measured against the target: its largest magnitude
   against the largest finite value, how many of its non-zero values round to a subnormal or to zero, and the
   channel where that happens most. Activations: the folded model is run in fp32 on the given data (or on
   random inputs, which the report says) and every main-graph tensor's largest magnitude is recorded.
3. **Decide.** A node runs in the target dtype unless it must not: a weight or bias that overflows
   (``fp16_overflow``), an input or output whose magnitude times ``headroom`` passes the largest finite value
   (``fp16_activation_overflow``), an op that ONNX Runtime's CPU or CUDA provider cannot run in the target
   dtype (``no_fp16_kernel``), a custom-domain op (``custom_domain``) or a control-flow node, whose boundary stays
   as it was while its body is converted (``control_flow``). An op that only moves values (Reshape, Concat...)
   next to an fp32 node stays fp32 with it (``follows_fp32``: the Cast moves to the next compute node, where ONNX
   Runtime's CPU provider drops it instead of rounding an activation; identical values on an fp16 runtime). With
   ``strict_range`` a range problem raises :class:`RangeCheckFailed` instead.
4. **Convert.** Initializers, ``Constant``/``ConstantOfShape`` values, ``Cast`` targets and value_info follow the
   decisions: a parameter is stored in the target only when its readers run in it (or lack only a kernel), so a
   layer kept fp32 for its range holds its unfolded parameters as they were and its folded ones as the fp32
   rounding of the float64 fold (an fp16 copy cast up at run time would add a rounding to a layer that computes
   in fp32); a ``Cast`` is inserted wherever a tensor's dtype differs from what its reader runs in, in the main
   graph and in every subgraph. Graph inputs and outputs keep fp32 (a Cast at each boundary) unless
   ``io_dtype`` converts them too.

The result is checked: no initializer or constant gains an inf or NaN, and the model loads and runs in ONNX
Runtime's CPU provider (the provider the session really used is recorded).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold import formula
from bnfold.errors import BnfoldError, InternalError, VerificationFailed
from bnfold.graph import Binding, ModelGraph, is_default_domain
from bnfold.onnx_io import walk_graphs

log = logging.getLogger(__name__)

FLOAT = TensorProto.FLOAT

#: Ops ONNX Runtime runs in float16 on its CUDA provider (on the CPU provider every float16 node runs: a node
#: without a float16 kernel is computed in float32 between Casts the runtime inserts itself). Anything else stays
#: fp32 between Casts (``no_fp16_kernel``); so do ops whose output dtype is an attribute (RandomNormal, EyeLike...)
#: and ops whose result depends on exact integers in float form (Range, CumSum, TopK, NonMaxSuppression...).
FP16_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh DepthToSpace Div Dropout Einsum Elu Equal Erf Exp
Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater
GreaterOrEqual HardSigmoid HardSwish Identity InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax LRN MatMul Max MaxPool Mean Min Mish Mul Neg Not Or Pad Pow PRelu Reciprocal ReduceL1
ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize Round ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile Transpose Trilu Unsqueeze Upsample
Where Xor
""".split())
#: Ops run in bfloat16. ONNX Runtime's CPU provider (1.31, probed by ``tests/test_precision.py``) has no bfloat16
#: arithmetic kernels and inserts no Casts for bfloat16, and ONNX's Conv takes bfloat16 only from opset 22: a bf16
#: model stores every parameter in bfloat16 (rounded once) and computes in fp32 between Casts (``no_bf16_kernel``).
#: Data-movement ops are left out too: rounding an fp32 activation to bf16 between two fp32 ops only loses bits.
BF16_OPS: frozenset = frozenset()

#: Ops that only move or select values: rounding commutes with them (``round(op(x)) == op(round(x))``), so the
#: side of them a Cast sits on changes no value. Next to an fp32 node they stay fp32 too (``follows_fp32``), which
#: puts the Cast at the next compute node: a runtime that computes that node in fp32 anyway (ONNX Runtime's CPU
#: provider, for every fp16 op but a few) then drops the Cast pair instead of rounding the activation, as it does
#: for a model converted whole; an fp16 runtime computes exactly what it did.
MOVE_OPS = frozenset("""
Concat DepthToSpace Expand Flatten Gather GatherElements GatherND Identity Reshape Slice SpaceToDepth Split Squeeze
Tile Transpose Unsqueeze
""".split())

#: Why a node stays in fp32 (stable codes; scripts may rely on them). ``{t}`` is the target (fp16, bf16).
REASONS = {
    "{t}_overflow": "a weight, bias or constant of the node would overflow the target dtype (a finite value would "
                    "become inf); it is kept in fp32, never clamped",
    "{t}_activation_overflow": "an input or output of the node, measured on the fp32 model, times the headroom, "
                               "passes the target's largest finite value",
    "no_{t}_kernel": "ONNX Runtime's CPU or CUDA provider has no kernel for this op in the target dtype",
    "custom_domain": "an op outside the default ONNX domain: its kernels are unknown",
    "control_flow": "an If/Loop/Scan node: its inputs and outputs keep their dtype; its body is converted",
    "unknown_type": "shape inference could not type an output of the node, so it stays as it was",
    "follows_fp32": "an op that only moves values (Reshape, Concat...) reading from or read only by fp32 nodes, or "
                    "a Constant a reader takes in fp32: it stays fp32 with them, so the Cast sits at the next "
                    "compute node (the values are identical)",
}
_RANGE_REASONS = ("{t}_overflow", "{t}_activation_overflow")


@dataclass(frozen=True)
class Target:
    """A reduced-precision target dtype."""

    name: str  #: fp16 / bf16
    elem: int  #: ONNX element type
    dtype: np.dtype

    @property
    def max_finite(self) -> float:
        return float(ml_dtypes.finfo(self.dtype).max)

    @property
    def smallest_normal(self) -> float:
        return float(ml_dtypes.finfo(self.dtype).smallest_normal)

    @property
    def ops(self) -> frozenset:
        return FP16_OPS if self.name == "fp16" else BF16_OPS

    def code(self, reason: str) -> str:
        return reason.format(t=self.name)


TARGETS = {"fp16": Target("fp16", TensorProto.FLOAT16, np.dtype(np.float16)),
           "bf16": Target("bf16", TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16))}
_ALIASES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}


def target(name: str) -> Target:
    """The :class:`Target` for ``fp16``/``float16``/``bf16``/``bfloat16``; :class:`BnfoldError` otherwise."""
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise BnfoldError(f"unknown dtype '{name}': choose fp16 or bf16")
    return TARGETS[key]


@dataclass
class PrecisionOptions:
    """How to convert: the target ``dtype`` (fp16/bf16), inputs/outputs in it too (``io_dtype``), raise instead
    of keeping layers in fp32 for range reasons (``strict_range``), the safety factor on measured activations
    (``headroom``), and the inputs for measuring them: ``data`` (a :class:`bnfold.data.Dataset` keyed by the
    model's input names, or one array for a one-input model) or random normal inputs (``input_shapes``
    ``{name: shape}`` for dynamic dimensions other than the batch; ``samples`` random samples, ``seed``)."""

    dtype: str = "fp16"
    io_dtype: bool = False
    strict_range: bool = False
    headroom: float = 4.0
    data: object = None
    input_shapes: dict | None = None
    samples: int = 8
    max_samples: int = 64
    seed: int = 0
    check_runtime: bool = True


@dataclass
class TensorRange:
    """One float initializer against the target: largest magnitude, overflow, underflow (non-zero values that
    round to a subnormal or to zero), the channel with most underflow, and the dtype it is stored in."""

    name: str
    graph: str
    folded: bool
    elements: int
    max_abs: float
    overflow: int = 0
    subnormal: int = 0
    zero: int = 0
    worst_channel: int | None = None
    worst_channel_underflow: int = 0
    stored: str = "fp32"


@dataclass
class LayerRange:
    """The certificate of one node: its weight and bias ranges, its outputs' measured magnitude, and the dtype
    it runs in (with the reason when that is fp32)."""

    node: str
    op: str
    graph: str
    runs_in: str
    reason: str | None = None
    message: str = ""
    weight_max: float | None = None
    bias_max: float | None = None
    output_max: float | None = None
    subnormal: int = 0
    zero: int = 0
    worst_channel: int | None = None
    folded: bool = False


@dataclass
class PrecisionReport:
    dtype: str
    io_dtype: str
    max_finite: float
    smallest_normal: float
    headroom: float
    activations_from: str
    layers: list[LayerRange] = field(default_factory=list)
    tensors: list[TensorRange] = field(default_factory=list)
    activations: dict = field(default_factory=dict)
    providers: list[str] = field(default_factory=list)
    subgraphs_measured: bool = True

    @property
    def kept(self) -> list[LayerRange]:
        return [x for x in self.layers if x.runs_in == "fp32"]

    @property
    def range_kept(self) -> list[LayerRange]:
        codes = {r.format(t=self.dtype) for r in _RANGE_REASONS}
        return [x for x in self.kept if x.reason in codes]

    @property
    def subnormal(self) -> int:
        return sum(t.subnormal for t in self.tensors)

    @property
    def zero(self) -> int:
        return sum(t.zero for t in self.tensors)

    @property
    def clamped(self) -> int:
        """Values clamped to the target's range: always 0 (an overflowing tensor is kept fp32, never clamped)."""
        return 0

    def summary(self) -> str:
        kept = self.kept
        by: dict[str, int] = {}
        for x in kept:
            by[x.reason] = by.get(x.reason, 0) + 1
        s = f"{self.dtype}: {len(self.layers) - len(kept)} nodes in {self.dtype}, {len(kept)} kept fp32"
        if by:
            s += " (" + ", ".join(f"{k} {v}" for k, v in sorted(by.items())) + ")"
        s += f"; {self.subnormal} weights subnormal, {self.zero} round to zero; 0 clamped"
        return s

    def verdict(self) -> str:
        names = ", ".join(f"{x.node} ({x.reason})" for x in self.range_kept[:8])
        more = f" and {len(self.range_kept) - 8} more" if len(self.range_kept) > 8 else ""
        return f"FAILED | --strict-range: {len(self.range_kept)} layer(s) do not fit {self.dtype}: {names}{more}"

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "io_dtype": self.io_dtype, "max_finite": self.max_finite,
                "smallest_normal": self.smallest_normal, "headroom": self.headroom,
                "activations_from": self.activations_from, "subgraphs_measured": self.subgraphs_measured,
                "summary": self.summary(), "clamped": 0, "subnormal": self.subnormal, "zero": self.zero,
                "kept_fp32": [{"node": x.node, "op": x.op, "reason": x.reason, "message": x.message}
                              for x in self.kept],
                "layers": [asdict(x) for x in self.layers], "tensors": [asdict(t) for t in self.tensors],
                "activations": self.activations, "providers": self.providers}


class RangeCheckFailed(VerificationFailed):
    """``strict_range``: some layers do not fit the target (exit 1, nothing written). ``result`` is the
    :class:`PrecisionReport`."""


# ================================================================================================ measuring
def _out_axis(op: str, slot: int, attrs: dict, ndim: int) -> int | None:
    """The output-channel axis of a layer's parameter (for the worst channel), or None when it has none."""
    if ndim == 0:
        return None
    if ndim == 1:
        return 0
    if op == "ConvTranspose" and slot == 1:
        return 1
    if op == "Gemm" and slot == 1:
        return 0 if int(attrs.get("transB", 0)) else 1
    if op == "MatMul":
        return ndim - 1
    return 0


def round_quiet(values, dtype) -> np.ndarray:
    """:func:`bnfold.formula.round_to` without numpy's overflow warning (overflow is measured, not warned)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return formula.round_to(values, dtype)


def measure(values, rounded: np.ndarray, target: Target, *, axis: int | None = None) -> dict:
    """Range of ``values`` (float64 or the stored dtype) against their rounding ``rounded`` to ``target``."""
    v = np.asarray(values)
    r64 = np.asarray(rounded).astype(np.float64)
    fin = np.isfinite(v)
    a = np.abs(np.where(fin, v, 0)).astype(np.float64)
    overflow = fin & ~np.isfinite(r64)
    nonzero = fin & (v != 0)
    zero = nonzero & (r64 == 0)
    sub = nonzero & (r64 != 0) & (np.abs(r64) < target.smallest_normal)
    out = {"elements": int(v.size), "max_abs": float(a.max(initial=0.0)), "overflow": int(overflow.sum()),
           "subnormal": int(sub.sum()), "zero": int(zero.sum()), "worst_channel": None,
           "worst_channel_underflow": 0}
    if axis is not None and v.ndim and (out["subnormal"] or out["zero"]):
        per = np.moveaxis(sub | zero, axis, 0).reshape(v.shape[axis], -1).sum(axis=1)
        out["worst_channel"] = int(np.argmax(per))
        out["worst_channel_underflow"] = int(per.max())
    return out


class _Rounder:
    """The rounding hook of :func:`bnfold.planner.apply`: folded parameters go straight from float64 to the
    target, once; one that would overflow is left to the default (the model's dtype) and recorded."""

    def __init__(self, tgt: Target):
        self.target = tgt
        self.stats: dict[tuple, dict] = {}
        #: by the written (rounded) array's fingerprint: the same float64 values rounded once to fp32, for a layer
        #: that ends up kept in fp32; None where two parameters with different values rounded to the same bytes
        self.exact: dict[tuple, np.ndarray | None] = {}

    def __call__(self, mg: ModelGraph, key, slot, param, what: str):
        if np.dtype(param.dtype) != np.float32:
            return None  # only fp32 models are converted
        node = mg.node(key)
        f64 = np.asarray(param.f64(), np.float64)
        rounded = round_quiet(f64, self.target.dtype)
        op = node.op_type if slot != "bias_add" else "Add"
        axis = _out_axis(op, 1 if slot == 1 else 2, mg.attrs(key), f64.ndim)
        st = measure(f64, rounded, self.target, axis=axis)
        if st["overflow"]:
            log.info("%s: folded value overflows %s: kept in fp32", what, self.target.name)
            self.stats[fingerprint(f64.astype(np.float32))] = st  # what the default path writes
            return None
        fp = fingerprint(rounded)
        self.stats[fp] = st
        exact = f64.astype(np.float32)
        prev = self.exact.get(fp, exact)
        self.exact[fp] = exact if prev is not None and np.array_equal(prev.view(np.uint32), exact.view(np.uint32)) \
            else None
        return rounded


def fingerprint(arr: np.ndarray) -> tuple:
    """Identifies a written parameter by its dtype, shape and bytes (the fold's stats travel by it)."""
    a = np.ascontiguousarray(arr)
    return a.dtype.str, a.shape, hashlib.sha1(a.tobytes()).hexdigest()


#: samples per run when measuring activations (every tensor of the model is an output then: memory)
_BATCH = 4


def _random_batches(model: onnx.ModelProto, shapes: dict | None, n: int, seed: int) -> list[dict]:
    """``n`` random normal samples (one seed), in runs of at most ``_BATCH``; a fixed batch dimension is kept."""
    full = _random_feeds(model, shapes, n, seed)
    if not full:
        return [full]
    lead = {len(v) if np.ndim(v) else 0 for v in full.values()}
    if lead != {n} or n <= _BATCH:
        return [full]
    return [{k: v[i:i + _BATCH] for k, v in full.items()} for i in range(0, n, _BATCH)]


def _random_feeds(model: onnx.ModelProto, shapes: dict | None, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        if shapes and vi.name in shapes:
            dims = list(shapes[vi.name])
        elif len(shapes or {}) == 1 and len([v for v in model.graph.input if v.name not in inits]) == 1:
            dims = list(next(iter(shapes.values())))
        if dims and dims[0] is None:
            dims[0] = n
        if any(d is None for d in dims):
            raise BnfoldError(f"input '{vi.name}' has dynamic dimensions {dims}: give its shape (--input-shape) or "
                              "--data to measure activations")
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.dtype(dt).kind == "f":
            feeds[vi.name] = rng.standard_normal(dims).astype(dt)
        elif np.dtype(dt).kind == "b":
            feeds[vi.name] = np.zeros(dims, dt)
        else:
            feeds[vi.name] = np.zeros(dims, dt)
    return feeds


def _count(feeds: list[dict]) -> int:
    return sum(len(next(iter(f.values()))) if f and np.ndim(next(iter(f.values()))) else 1 for f in feeds)


def _data_feeds(model: onnx.ModelProto, data, limit: int) -> list[dict]:
    inits = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in inits]
    arrays = data.inputs if hasattr(data, "inputs") else ({names[0]: data} if len(names) == 1 else dict(data))
    if set(names) <= set(arrays):
        picked = {n: np.asarray(arrays[n]) for n in names}
    elif len(names) == 1 and len(arrays) == 1:
        picked = {names[0]: np.asarray(next(iter(arrays.values())))}
    else:
        raise BnfoldError(f"--data has arrays {sorted(arrays)} but the model's inputs are {names}")
    n = min(limit, min(len(a) for a in picked.values()))
    step = _BATCH
    vi = next(v for v in model.graph.input if v.name == names[0])
    dims = vi.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:  # a fixed batch: runs of exactly it
        step = dims[0].dim_value
        if n < step:
            raise BnfoldError(f"--data has {n} samples but the model's batch is fixed at {step}")
        n -= n % step
    return [{k: v[i:i + step] for k, v in picked.items()} for i in range(0, n, step)]


def measure_activations(model: onnx.ModelProto, feeds: list[dict]) -> tuple[dict[str, float], list[str]]:
    """Largest magnitude of every float tensor of ``model``'s main graph (fp32, ONNX Runtime CPU, graph
    optimizations off) over the batches ``feeds``; and the providers the session used."""
    from bnfold.runtime import make_session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    mg = ModelGraph(m)
    have = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for o in node.output:
            if o and o not in have and mg.elem_type(Binding(0, o)) == FLOAT:
                m.graph.output.append(helper.make_tensor_value_info(o, FLOAT, None))
                have.add(o)
    sess = make_session(m, ep="cpu", opt_level="off")
    names = [o.name for o in sess.get_outputs()]
    out: dict[str, float] = {}
    for feed in feeds:
        for k, v in feed.items():
            if np.asarray(v).dtype.kind == "f":
                out[k] = max(out.get(k, 0.0), _absmax(v))
        for name, v in zip(names, sess.run(None, feed)):
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                out[name] = max(out.get(name, 0.0), _absmax(v))
    return out, list(sess.get_providers())


def _absmax(v) -> float:
    a = np.asarray(v, np.float64)
    if not a.size:
        return 0.0
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a).max())


# ================================================================================================ the pass
def fold_to_dtype(model: onnx.ModelProto, fold_options=None, precision: PrecisionOptions | None = None, *,
                  name: str = "", inplace: bool = False, source_path=None):
    """Fold ``model``'s BatchNorms in float64 and write the result in ``precision.dtype`` (see the module's
    doc). Returns ``(model, FoldReport)``; the report's ``extra["precision"]`` holds the
    :class:`PrecisionReport` as a dict. ``model`` is modified only with ``inplace``. Raises
    :class:`RangeCheckFailed` with ``strict_range`` when a layer does not fit."""
    from bnfold.onnx_fold import fold_model

    precision = precision or PrecisionOptions()
    tgt = target(precision.dtype)
    before = {(gi, t.name) for gi, g in enumerate(walk_graphs(model.graph)) for t in g.initializer
              if t.data_type == tgt.elem}
    rounder = _Rounder(tgt)
    out, report = fold_model(model, fold_options, name=name, inplace=inplace, source_path=source_path,
                             materialize=rounder)
    prec = convert(out, tgt, precision, folded_stats=rounder.stats, preexisting=before, folded_exact=rounder.exact)
    report.extra["precision"] = prec.to_dict()
    return out, report


def convert(model: onnx.ModelProto, tgt: Target, options: PrecisionOptions, *, folded_stats: dict | None = None,
            preexisting: set | None = None, folded_exact: dict | None = None) -> PrecisionReport:
    """Convert ``model`` (fp32; folded parameters possibly already written in ``tgt`` by the fold) to ``tgt``,
    in place; returns the certificate. ``folded_exact``: the fold's fp32 values of those parameters, by the
    fingerprint of what it wrote (:attr:`_Rounder.exact`; consumed: emptied once the fp32 probe holds them): a
    layer kept in fp32 gets them. With
    ``options.strict_range``, raises :class:`RangeCheckFailed` before changing anything when a layer does not
    fit."""
    folded_stats = folded_stats or {}
    folded_exact = folded_exact or {}
    preexisting = preexisting or set()
    mg = ModelGraph(model)
    # tensors the fold wrote in the target dtype: the probe (fp32 twin, exact) carries them as fp32, the fold's own
    # fp32 rounding where the hook kept it
    fresh = {(g.index, n) for g in mg.graphs for n, t in g.inits.items()
             if t.data_type == tgt.elem and (g.index, n) not in preexisting}
    exact = {}
    for k in fresh:
        e = folded_exact.get(fingerprint(mg.read(mg.graphs[k[0]].inits[k[1]])))
        if e is not None:
            exact[k] = e
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    _upcast(probe, fresh, exact)
    folded_exact.clear()  # the probe holds those values now (a second copy of every folded weight otherwise)
    exact = set(exact)
    types = ModelGraph(probe)  # every dtype question is asked of the consistent fp32 twin

    # --- 1. every float initializer against the target
    tensors: dict[tuple, TensorRange] = {}
    rounded: dict[tuple, np.ndarray] = {}
    for g in mg.graphs:
        for n, t in g.inits.items():
            k = (g.index, n)
            if t.data_type not in (FLOAT, tgt.elem) or mg.is_overridable(Binding(*k)):
                continue
            if t.data_type == tgt.elem and k not in fresh:
                continue  # already in the target dtype in the source
            v = mg.read(t)
            st = folded_stats.get(fingerprint(v))
            folded = st is not None
            if st is None:
                if k in fresh:  # written by the fold but not by the hook: cannot happen
                    raise InternalError(f"'{n}' was written in {tgt.name} without its range")
                r = round_quiet(v, tgt.dtype)
                st = measure(v, r, tgt, axis=_axis_of_use(mg, Binding(*k), v.ndim))
                if not st["overflow"]:
                    rounded[k] = r
            tensors[k] = TensorRange(n, mg.graph_name(g.index), folded, stored=tgt.name if k in fresh else "fp32", **st)
    overflowing = {k for k, t in tensors.items() if t.overflow}

    # --- 2. activations of the folded model, in fp32
    if options.data is not None:
        feeds = _data_feeds(probe, options.data, options.max_samples)
        source = f"data ({getattr(options.data, 'name', 'given arrays')}, {_count(feeds)} samples)"
    else:
        feeds = _random_batches(probe, options.input_shapes, options.samples, options.seed)
        source = f"random normal inputs ({_count(feeds)} samples, seed {options.seed}; no --data given)"
    acts, _ = measure_activations(probe, feeds)
    limit = tgt.max_finite / options.headroom

    # --- 3. decisions, node by node
    modes: dict[tuple, tuple[str, str | None]] = {}
    layers: list[LayerRange] = []
    for g in mg.graphs:
        for i, node in enumerate(g.nodes):
            key = (g.index, i)
            floats_in = [(s, n) for s, n in enumerate(node.input) if n and _float_type(types, g.index, n, tgt)]
            floats_out = [n for n in node.output if n and _float_type(types, g.index, n, tgt)]
            untyped = [n for n in node.output if n and types.elem_type(Binding(g.index, n)) is None]
            if not floats_in and not floats_out and not untyped and node.op_type not in ("Constant", "ConstantOfShape"):
                modes[key] = ("low", None)  # no float tensor: nothing to decide
                continue
            reason, msg = None, ""
            bad = [n for _, n in floats_in if tuple(mg.resolve(g.index, n) or ()) in overflowing]
            big = [(n, acts[n]) for n in [x for _, x in floats_in] + floats_out
                   if g.index == 0 and n in acts and acts[n] > limit]
            if bad or (node.op_type == "Constant" and _constant_overflows(node, tgt)):
                reason = tgt.code("{t}_overflow")
                msg = (f"'{bad[0]}'" if bad else "its value") + \
                    f" would overflow {tgt.name} (largest finite {tgt.max_finite:.6g}): kept in fp32, not clamped"
            elif big:
                reason = tgt.code("{t}_activation_overflow")
                n, v = max(big, key=lambda x: x[1])
                msg = (f"'{n}' reaches {v:.4g} on the fp32 model; x{options.headroom:g} headroom passes "
                       f"{tgt.name}'s {tgt.max_finite:.6g}")
            elif not is_default_domain(node):
                reason, msg = "custom_domain", f"domain '{node.domain}'"
            elif any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                reason, msg = "control_flow", "its inputs and outputs keep their dtype; its body is converted"
            elif untyped:
                reason, msg = "unknown_type", f"output '{untyped[0]}' has no inferred type"
            elif node.op_type not in tgt.ops:
                reason = tgt.code("no_{t}_kernel")
                msg = f"ONNX Runtime's CPU or CUDA provider cannot run {node.op_type} in {tgt.name}"
            modes[key] = ("keep" if reason else "low", reason)
            layers.append(_layer_row(mg, g.index, node, floats_in, floats_out, tensors, acts, tgt, reason, msg))
    rows = {(r.graph, r.node): r for r in layers}
    _follow_fp32(mg, types, modes, rows, tgt, options.io_dtype)
    # a constant is made in the target only when every reader takes it so (Resize's scales stay fp32: exact)
    for g in mg.graphs:
        for i, node in enumerate(g.nodes):
            if node.op_type not in ("Constant", "ConstantOfShape") or modes[(g.index, i)][0] != "low" \
                    or not node.output:
                continue
            for u in mg.uses.get(Binding(g.index, node.output[0]), ()):
                reader = mg.graphs[u.graph].nodes[u.node] if u.node is not None else None
                rmode = modes.get((u.graph, u.node), ("keep",))[0] if reader is not None else "keep"
                if rmode != "low" or _expect_dtype(reader, u.slot, "low", tgt) != tgt.elem:
                    modes[(g.index, i)] = ("keep", None)
                    r = rows.get((mg.graph_name(g.index), _label(node)))
                    if r is not None:
                        r.runs_in, r.reason = "fp32", "follows_fp32"
                        r.message = "a reader takes it in fp32: kept exact"
                    break

    report = PrecisionReport(tgt.name, tgt.name if options.io_dtype else "fp32", tgt.max_finite,
                             tgt.smallest_normal, options.headroom, source, layers,
                             sorted(tensors.values(), key=lambda t: (t.graph, t.name)), acts,
                             subgraphs_measured=len(mg.graphs) == 1)
    if options.strict_range and report.range_kept:
        raise RangeCheckFailed(report)

    # --- 4. the rewrite
    nonfinite = _nonfinite_counts(model)
    _Converter(mg, types, tgt, modes, rounded, overflowing, options.io_dtype, exact).run()
    _check_finite(model, nonfinite)
    for t in report.tensors:
        t.stored = _stored_dtype(mg, t, tgt)
    if options.check_runtime:
        report.providers = _check_runs(model, feeds[0])
    return report


def _follow_fp32(mg: ModelGraph, types: ModelGraph, modes: dict, rows: dict, tgt: Target, io_dtype: bool) -> None:
    """Keep in fp32 every value-moving node (:data:`MOVE_OPS`) that reads a float tensor from an fp32 node, or
    whose float outputs are read only by fp32 nodes (``follows_fp32``), until nothing changes."""
    def fp32_node(gi: int, idx: int) -> bool:
        mode, reason = modes.get((gi, idx), ("low", None))
        return mode == "keep" and reason is not None  # a kept Constant (reason None) follows its readers

    changed = True
    while changed:
        changed = False
        for g in mg.graphs:
            for i, node in enumerate(g.nodes):
                if modes.get((g.index, i), ("keep",))[0] != "low" or node.op_type not in MOVE_OPS \
                        or not is_default_domain(node):
                    continue
                why = None
                for n in node.input:
                    b = mg.resolve(g.index, n) if n else None
                    p = mg.producer(b) if b is not None and _float_type(types, g.index, n, tgt) else None
                    if p is not None and p[0].graph == g.index and fp32_node(g.index, p[0].index):
                        why = f"reads '{n}' from fp32 node '{_label(g.nodes[p[0].index])}'"
                        break
                if why is None:
                    readers = []
                    for o in node.output:
                        if not o or not _float_type(types, g.index, o, tgt):
                            continue
                        for u in mg.uses.get(Binding(g.index, o), ()):
                            if u.node is None or u.graph != g.index:
                                readers = []  # a graph output or a subgraph reader: left as it is
                                break
                            if _expect_dtype(g.nodes[u.node], u.slot, "low", tgt) is not None:
                                readers.append(u.node)
                        else:
                            continue
                        break
                    if readers and all(fp32_node(g.index, r) for r in readers):
                        why = f"its outputs are read only by fp32 nodes ('{_label(g.nodes[readers[0]])}')"
                if why is None:
                    continue
                modes[(g.index, i)] = ("keep", "follows_fp32")
                r = rows.get((mg.graph_name(g.index), _label(node)))
                if r is not None:
                    r.runs_in, r.reason = "fp32", "follows_fp32"
                    r.message = f"only moves values; {why}: stays fp32 with it (identical values)"
                changed = True


def _layer_row(mg, gi, node, floats_in, floats_out, tensors, acts, tgt, reason, msg) -> LayerRange:
    lr = LayerRange(_label(node), node.op_type,
                    mg.graph_name(gi), "fp32" if reason else tgt.name, reason, msg)
    for s, n in floats_in:
        b = mg.resolve(gi, n)
        t = tensors.get((b.graph, b.name)) if b is not None else None
        if t is None:
            continue
        if s == 1 or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            lr.weight_max = max(lr.weight_max or 0.0, t.max_abs)
        else:
            lr.bias_max = max(lr.bias_max or 0.0, t.max_abs)
        lr.subnormal += t.subnormal
        lr.zero += t.zero
        lr.folded = lr.folded or t.folded
        if t.worst_channel is not None and lr.worst_channel is None:
            lr.worst_channel = t.worst_channel
    outs = [acts[n] for n in floats_out if gi == 0 and n in acts]
    lr.output_max = max(outs) if outs else None
    return lr


def _axis_of_use(mg: ModelGraph, b: Binding, ndim: int) -> int | None:
    uses = [u for u in mg.uses.get(b, ()) if u.node is not None]
    if not uses:
        return 0 if ndim else None
    node = mg.graphs[uses[0].graph].nodes[uses[0].node]
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    return _out_axis(node.op_type, uses[0].slot, attrs, ndim)


def _float_type(types: ModelGraph, gi: int, name: str, tgt: Target) -> bool:
    b = types.resolve(gi, name)
    return b is not None and types.elem_type(b) in (FLOAT, tgt.elem)


def _stored_dtype(mg: ModelGraph, t: TensorRange, tgt: Target) -> str:
    for g in mg.graphs:
        if mg.graph_name(g.index) == t.graph:
            for init in g.proto.initializer:
                if init.name == t.name:
                    return tgt.name if init.data_type == tgt.elem else "fp32"
    return t.stored


def _constant_overflows(node: onnx.NodeProto, tgt: Target) -> bool:
    for a in node.attribute:
        if a.name == "value" and a.t.data_type == FLOAT:
            v = numpy_helper.to_array(a.t)
        elif a.name in ("value_float", "value_floats"):
            v = np.asarray(helper.get_attribute_value(a), np.float32)
        else:
            continue
        r = round_quiet(v, tgt.dtype).astype(np.float64)
        if (np.isfinite(v) & ~np.isfinite(r)).any():
            return True
    return False


def _upcast(model: onnx.ModelProto, names: set, exact: dict | None = None) -> None:
    """Replace the initializers ``names`` ((graph index, name), stored in a reduced dtype) by fp32: the value in
    ``exact`` under the same key where there is one, an exact fp32 copy otherwise."""
    exact = exact or {}
    for gi, g in enumerate(walk_graphs(model.graph)):
        for t in g.initializer:
            if (gi, t.name) in names:
                v = exact.get((gi, t.name))
                v = numpy_helper.to_array(t).astype(np.float32) if v is None else v
                t.CopyFrom(numpy_helper.from_array(v, t.name))


def _float_tensors(model: onnx.ModelProto):
    for gi, g in enumerate(walk_graphs(model.graph)):
        for t in g.initializer:
            yield (gi, t.name), t
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield (gi, f"{node.name or node.output[0]}.{a.name}"), a.t


_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def _nonfinite_counts(model: onnx.ModelProto) -> dict:
    return {k: int((~np.isfinite(numpy_helper.to_array(t).astype(np.float64))).sum())
            for k, t in _float_tensors(model) if t.data_type in _FLOAT_TYPES}


def _check_finite(model: onnx.ModelProto, before: dict) -> None:
    """No tensor holds more infs or NaNs than its source did: an overflow is never written."""
    for k, t in _float_tensors(model):
        if t.data_type in _FLOAT_TYPES:
            n = int((~np.isfinite(numpy_helper.to_array(t).astype(np.float64))).sum())
            if n > before.get(k, 0):
                raise InternalError(f"bnfold wrote {n} non-finite values into '{k[1]}': a bug, please report it")


def _check_runs(model: onnx.ModelProto, feed: dict) -> list[str]:
    """Load and run the converted model in ONNX Runtime's CPU provider; the providers the session used."""
    from bnfold.runtime import make_session

    try:
        sess = make_session(model, ep="cpu", opt_level="all")
        kinds = {i.name: i.type for i in sess.get_inputs()}
        f = {k: v.astype(np.float16) if kinds.get(k) == "tensor(float16)" else v for k, v in feed.items()}
        if any(kinds.get(k) == "tensor(bfloat16)" for k in f):
            return list(sess.get_providers())  # numpy cannot feed bfloat16 to ONNX Runtime's Python API
        sess.run(None, f)
    except BnfoldError as exc:
        raise InternalError(f"the converted model does not run in ONNX Runtime (CPU): {exc}") from exc
    except Exception as exc:
        raise InternalError(f"the converted model does not run in ONNX Runtime (CPU): {str(exc)[:300]}") from exc
    return list(sess.get_providers())


# ================================================================================================ rewriting
def _expect_dtype(node, slot: int, mode: str, tgt: Target) -> int | None:
    """The dtype a float input must have for ``node`` running in ``mode``; None: any (left as it is)."""
    op = node.op_type if is_default_domain(node) else None
    if op in ("Cast", "Shape", "Size"):
        return None
    if (op == "Resize" and slot in (1, 2)) or (op == "Upsample" and slot == 1):
        return FLOAT  # roi/scales: float32 whatever the data's dtype
    return tgt.elem if mode == "low" else FLOAT


def _label(node) -> str:
    return node.name or f"{node.op_type}@{node.output[0] if node.output else '?'}"


class _Scope:
    """Dtypes of the tensors a graph binds (float ones only), and graph outputs renamed inside it."""

    def __init__(self, parent):
        self.parent = parent
        self.dt: dict[str, int] = {}
        self.rename: dict[str, str] = {}

    def lookup(self, name: str) -> tuple[str, int | None]:
        s = self
        while s is not None:
            if name in s.dt:
                return s.rename.get(name, name), s.dt[name]
            s = s.parent
        return name, None


class _Converter:
    def __init__(self, mg: ModelGraph, types: ModelGraph, tgt: Target, modes, rounded, overflowing, io_dtype: bool,
                 exact: set | None = None):
        self.mg, self.types, self.t = mg, types, tgt
        self.modes, self.rounded, self.overflowing = modes, rounded, overflowing
        #: parameters the fold wrote in the target whose fp32 values (the fold's own) the probe ``types`` holds
        self.exact = exact or set()
        self.io = tgt.elem if io_dtype else FLOAT
        self.gidx = {id(g.proto): g.index for g in mg.graphs}

    def run(self) -> None:
        self._graph(self.mg.graphs[0], None)

    def _expect(self, node, slot: int, mode: str) -> int | None:
        return _expect_dtype(node, slot, mode, self.t)

    def _store_low(self, gi: int, name: str) -> bool:
        """Whether initializer ``name`` of graph ``gi`` is stored in the target: it fits, and every reader runs
        in the target or stays fp32 only for want of a kernel (a Cast up is then exact)."""
        k = (gi, name)
        if k not in self.rounded or k in self.overflowing:
            return False
        return bool(self._readers_low(gi, name))

    def _readers_low(self, gi: int, name: str) -> bool | None:
        """Whether every reader of tensor ``name`` of graph ``gi`` takes it in the target: it runs in the target,
        or stays fp32 only for want of a kernel. None when nothing reads it."""
        readers = [u for u in self.mg.uses.get(Binding(gi, name), ()) if u.node is not None]
        if not readers:
            return None
        for u in readers:
            mode, reason = self.modes.get((u.graph, u.node), ("keep", "unknown_type"))
            node = self.mg.graphs[u.graph].nodes[u.node]
            if self._expect(node, u.slot, "low") != self.t.elem:
                return False
            if mode != "low" and reason != self.t.code("no_{t}_kernel"):
                return False
        return True

    def _graph(self, g, parent_scope: _Scope | None) -> None:
        gi, proto, main = g.index, g.proto, g.index == 0
        tgt = self.t
        scope = _Scope(parent_scope)
        for vi in proto.input:
            et = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
            if et in (FLOAT, tgt.elem):
                if main and et == FLOAT and self.io != FLOAT and vi.name not in g.inits:
                    vi.type.tensor_type.elem_type = et = self.io
                scope.dt[vi.name] = et
        for t in proto.initializer:
            if t.name in scope.dt:  # an overridable initializer is a graph input: never changed
                continue
            k = (gi, t.name)
            new = None
            if t.data_type == FLOAT and self._store_low(gi, t.name):
                new = self.rounded[k]
            elif t.data_type == tgt.elem and k in self.exact and self._readers_low(gi, t.name) is False:
                # folded, read by a layer kept fp32: the fold's fp32 rounding (as the probe holds it), not a Cast up
                new = self.types.read(self.types.graphs[gi].inits[t.name])
            if new is not None:
                keep = (t.doc_string, list(t.metadata_props))
                t.CopyFrom(numpy_helper.from_array(new, t.name))
                t.doc_string = keep[0]
                t.metadata_props.extend(keep[1])
            if t.data_type in (FLOAT, tgt.elem):
                scope.dt[t.name] = t.data_type
        # the dtype each float graph output must keep at the boundary
        out_want = {vi.name: (self.io if main else FLOAT) for vi in proto.output
                    if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == FLOAT}
        casts: dict[tuple[str, int], str] = {}
        new_nodes: list = []

        def cast_to(name: str, to: int) -> str:
            if (name, to) not in casts:
                suffix = tgt.name if to == tgt.elem else "fp32"
                out = self.mg.unique(f"{name}_{suffix}")
                new_nodes.append(helper.make_node("Cast", [name], [out], name=self.mg.unique(f"{out}_cast"), to=to))
                casts[(name, to)] = out
            return casts[(name, to)]

        for i, node in enumerate(g.nodes):
            mode = self.modes.get((gi, i), ("keep", None))[0]
            for s, name in enumerate(node.input):
                if not name:
                    continue
                real, cur = scope.lookup(name)
                want = self._expect(node, s, mode) if cur is not None else None
                node.input[s] = real if want is None or want == cur else cast_to(real, want)
            for a in node.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else \
                    list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
                for sub in subs:
                    self._graph(self.mg.graphs[self.gidx[id(sub)]], scope)
            if mode == "low" and is_default_domain(node):
                self._convert_attrs(node)
            for k, o in enumerate(node.output):
                if not o:
                    continue
                et = self.types.elem_type(Binding(gi, o))
                if node.op_type == "Cast" and is_default_domain(node):
                    et = next(int(a.i) for a in node.attribute if a.name == "to")
                elif et == FLOAT and mode == "low":
                    et = tgt.elem
                if et not in (FLOAT, tgt.elem):
                    continue
                scope.dt[o] = et
                if o in out_want and et != out_want[o]:
                    inner = self.mg.unique(f"{o}_{tgt.name if et == tgt.elem else 'fp32'}")
                    node.output[k] = inner
                    scope.rename[o] = inner
            new_nodes.append(node)
        for vi in proto.output:
            if vi.name not in out_want:
                continue
            real, cur = scope.lookup(vi.name)
            want = out_want[vi.name]
            if real != vi.name:
                new_nodes.append(helper.make_node("Cast", [real], [vi.name], name=self.mg.unique(f"{vi.name}_cast"),
                                                  to=want))
                cur = want
            if main and cur is not None:
                vi.type.tensor_type.elem_type = cur  # an input or initializer passed straight through keeps its own
        del proto.node[:]
        proto.node.extend(new_nodes)
        for vi in proto.value_info:  # value_info follows the tensors' dtypes
            if vi.name in scope.dt and vi.type.HasField("tensor_type") and \
                    vi.type.tensor_type.elem_type in (FLOAT, tgt.elem):
                vi.type.tensor_type.elem_type = out_want.get(vi.name, scope.dt[vi.name]) \
                    if vi.name in scope.rename else scope.dt[vi.name]

    def _convert_attrs(self, node: onnx.NodeProto) -> None:
        op, tgt = node.op_type, self.t
        if op == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == FLOAT:
                    a.i = tgt.elem
        elif op == "Constant":
            for a in list(node.attribute):
                if a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(round_quiet(numpy_helper.to_array(a.t), tgt.dtype),
                                                         a.t.name))
                elif a.name in ("value_float", "value_floats"):
                    v = np.asarray(helper.get_attribute_value(a), np.float32)
                    node.attribute.remove(a)
                    node.attribute.append(helper.make_attribute(
                        "value", numpy_helper.from_array(round_quiet(v, tgt.dtype))))
        elif op == "ConstantOfShape":
            a = next((a for a in node.attribute if a.name == "value"), None)
            if a is None:
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(
                    np.zeros((1,), tgt.dtype))))
            elif a.t.data_type == FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(round_quiet(numpy_helper.to_array(a.t), tgt.dtype),
                                                     a.t.name))
