"""What every rule shares: the skip, the match it returns, layer parameters and the planning context.

A rule's ``match`` is pure: it reads the model through a :class:`Context` (the graph facade plus what the plan
has decided so far) and returns a :class:`Match` holding every computed value, or raises :class:`Skip` with a
reason code (see :data:`bnfold.report.REASONS`) and a message. Nothing is written until
:func:`bnfold.planner.apply` carries the plan out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bnfold import formula, protofile
from bnfold.graph import Binding, ModelGraph, NodeKey, NotConst, is_float_dtype

#: A parameter slot of a layer: an input index, or BIAS_ADD, the bias of a MatMul that has no bias input yet
#: (an Add inserted after it when the plan is applied).
BIAS_ADD = "bias_add"


class Skip(Exception):
    """A rule does not apply. ``applicable`` is False when its pattern is simply absent (so a refusal by another
    rule, which names a more useful reason, wins)."""

    def __init__(self, code: str, message: str, applicable: bool = True):
        super().__init__(message)
        self.code = code
        self.message = message
        self.applicable = applicable


@dataclass
class Param:
    """A layer parameter as the plan will write it: ``base * factor`` (a stored weight times a small broadcastable
    float64 factor, so a weight is never copied to float64 and is rounded once) or a float64 ``value``.
    :meth:`recipe` is what :func:`bnfold.planner.apply` writes: the value is computed when the file is written."""

    dtype: np.dtype
    stored: np.ndarray | None = None
    factor: np.ndarray | float = 1.0
    value: np.ndarray | None = None
    #: reads a stored initializer's values when needed (the plan does not hold every weight in memory)
    loader: object = None
    stored_shape: tuple | None = None
    #: the loader reads the source file, not the TensorProto (which the fold may rewrite before it is written)
    detached: bool = False
    #: a small parameter's cast value, computed once (by :meth:`check_cast` while planning, reused when written)
    _cast: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def base(self) -> np.ndarray:
        return self.stored if self.stored is not None else self.loader()

    def f64(self) -> np.ndarray:
        if self.value is not None:
            return self.value
        return np.asarray(self.base, np.float64) * self.factor

    @property
    def shape(self) -> tuple:
        if self.value is not None:
            return tuple(np.shape(self.value))
        return self.stored_shape if self.stored is None else tuple(np.shape(self.stored))

    def scaled(self, factor: np.ndarray) -> Param:
        if self.value is not None:
            return Param(self.dtype, value=self.value * factor)
        return Param(self.dtype, stored=self.stored, factor=self.factor * factor, loader=self.loader,
                     stored_shape=self.stored_shape, detached=self.detached)

    def materialize(self, what: str) -> np.ndarray:
        if self._cast is not None:
            return self._cast
        if self.value is not None:
            out = formula.cast_checked(self.value, self.dtype, what=what)
        else:
            out = formula.scale_cast(self.base, np.asarray(self.factor, np.float64), self.dtype, what=what)
        if out.nbytes < protofile.SKELETON_BYTES:  # small: kept (read-only), so it is computed once
            out.flags.writeable = False
            self._cast = out
        return out

    def _small(self) -> bool:
        """Whether the cast value is small enough to keep (see :meth:`materialize`)."""
        if self.value is not None:
            size = self.value.size
        elif self.stored is not None:
            size = self.stored.size
        else:
            return False
        return size * self.dtype.itemsize < protofile.SKELETON_BYTES

    def recipe(self, what: str) -> protofile.Computed | np.ndarray:
        """The value to write: a recipe for :meth:`materialize` (evaluated when written, one tensor at a time),
        or the array itself when the value depends on a TensorProto that applying the plan may rewrite (a
        weight loaded whole, not a reference into the source file). :meth:`check_cast` ran while planning, so
        evaluating it cannot overflow."""
        if self.value is not None:
            size, shape = self.value.size, self.value.shape
        elif self.stored is not None or self.detached:
            size = self.stored.size if self.stored is not None else math.prod(self.stored_shape)
            shape = None
        else:
            return self.materialize(what)
        if size * self.dtype.itemsize < protofile.SKELETON_BYTES:
            return self.materialize(what)  # small: no recipe to keep
        blocks = None
        if shape is None:
            shape = np.broadcast_shapes(self.shape, np.shape(self.factor))
            if shape == tuple(self.shape) and len(shape) >= 1:
                blocks = lambda: self._blocks(what)  # noqa: E731
        return protofile.Computed(lambda: self.materialize(what), np.dtype(self.dtype), tuple(shape),
                                  blocks=blocks)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """``base[start:stop]``, read alone when the loader can."""
        if self.stored is not None:
            return self.stored[start:stop]
        rows = getattr(self.loader, "rows", None)
        return rows(start, stop) if rows is not None else self.loader()[start:stop]

    def _row_blocks(self) -> list[tuple[int, int]]:
        """Blocks of rows (axis 0) of about :data:`bnfold.protofile.BLOCK_BYTES` of the stored weight."""
        n = self.shape[0]
        row = max(1, math.prod(self.shape[1:]) * self.dtype.itemsize)
        step = max(1, protofile.BLOCK_BYTES // row)
        return [(i, min(n, i + step)) for i in range(0, n, step)]

    def _blocks(self, what: str):
        """:meth:`materialize`, block of rows by block (the factor broadcast against the weight's shape)."""
        f = np.asarray(self.factor, np.float64)
        per_row = f.ndim == len(self.shape) and f.shape[0] != 1
        for i, j in self._row_blocks():
            yield formula.scale_cast(self._rows(i, j), f[i:j] if per_row else f, self.dtype, what=what)

    def check_cast(self, what: str) -> None:
        """Raise :class:`Skip` ``cast_overflow`` when the value would not fit the dtype (checked before planning
        the fold, so that applying it cannot fail)."""
        try:
            if self.value is not None or (self._small() and np.size(self.factor) <= self.stored.size):
                self.materialize(what)  # computed once: kept for writing
                return
            limit = float(np.finfo(self.dtype).max) if self.dtype.kind == "f" else 3.3e38
            fmax = float(np.max(np.abs(self.factor), initial=0.0))
            if fmax <= 1.0:
                return  # |base * factor| <= |base|, which fits: the stored weight has the model's dtype
            wmax = 0.0
            if self.stored is not None or not hasattr(self.loader, "rows") or not self.stored_shape:
                blocks = [self.base]  # in memory already (or not readable by rows)
            else:  # block by block: the weight is never read whole here
                blocks = (self._rows(i, j) for i, j in self._row_blocks())
            for rows in blocks:
                if rows.size:
                    hi, lo = float(np.max(rows)), float(np.min(rows))
                    if not (np.isfinite(hi) and np.isfinite(lo)):
                        wmax = np.inf  # NaN or inf: the exact check below decides
                        break
                    wmax = max(wmax, abs(hi), abs(lo))
            if np.isfinite(wmax * fmax) and wmax * fmax < limit * 0.99:
                return
            formula.scale_cast(self.base, np.asarray(self.factor, np.float64), self.dtype, what=what)
        except formula.CastOverflow as exc:
            raise Skip("cast_overflow", str(exc)) from None


@dataclass
class Absorb:
    """New parameters (and attributes) for one layer."""

    node: NodeKey
    params: dict = field(default_factory=dict)  #: slot -> Param
    attrs: dict = field(default_factory=dict)  #: attribute name -> new value


@dataclass
class Match:
    """A rule's decision for one BatchNorm (or affine op): everything :func:`bnfold.planner.apply` will do."""

    rule: str
    direction: str  #: backward / forward / lowered
    into: str  #: label of the layer(s) the BN goes into
    into_node: NodeKey | None
    absorbs: list = field(default_factory=list)
    remove: list = field(default_factory=list)  #: nodes deleted
    set_output: list = field(default_factory=list)  #: (node, output slot, new name)
    set_input: list = field(default_factory=list)  #: (node, input slot, new name)
    redirect_dtype: tuple | None = None  #: (old binding, new name): dtype-only readers follow the surviving tensor
    new_nodes: list = field(default_factory=list)  #: (anchor node, NodeProto) for lowering
    produced: tuple | None = None  #: (binding, (node, slot)): the node that now writes the BN's output


class Context:
    """What a rule sees: the graph facade and the plan so far (parameters already changed by earlier matches,
    nodes already removed, tensors whose producer changed)."""

    def __init__(self, mg: ModelGraph):
        self.mg = mg
        self.opset = mg.opset
        self.params: dict[tuple[NodeKey, object], Param] = {}
        self.attrs: dict[NodeKey, dict] = {}
        self.removed: set[NodeKey] = set()
        self.producers: dict[Binding, tuple[NodeKey, int]] = {}
        self.bias_add_names: dict[NodeKey, tuple[str, str]] = {}
        #: inputs rewired by the plan so far (a BN folded forward makes its consumer read the BN's input)
        self.inputs: dict[tuple[NodeKey, int], str] = {}
        #: BatchNorms left in place (no neighbour could absorb them): node -> (input, affine, step index), for
        #: the branch merge, which may take them in as an identity branch
        self.standalone: dict[NodeKey, tuple[Binding, formula.Affine, int]] = {}

    # ------------------------------------------------------------------ graph, as changed by the plan so far
    def producer(self, b: Binding) -> tuple[NodeKey, int] | None:
        p = self.producers.get(b)
        if p is not None:
            return p
        p = self.mg.producer(b)
        if p is None or p[0] in self.removed:
            return None
        return p

    def attr(self, key: NodeKey, name: str, default=None):
        a = self.attrs.get(key, {})
        if name in a:
            return a[name]
        return self.mg.attrs(key).get(name, default)

    def op(self, key: NodeKey) -> str:
        return self.mg.node(key).op_type

    def input(self, key: NodeKey, slot: int) -> Binding | None:
        """The tensor input ``slot`` of ``key`` reads, as rewired by the plan so far."""
        name = self.inputs.get((key, slot))
        if name is None:
            return self.mg.input_binding(key, slot)
        return self.mg.resolve(key.graph, name)

    # ------------------------------------------------------------------ parameters
    def const(self, b: Binding | None):
        return self.mg.const(b)

    def param(self, key: NodeKey, slot, what: str, *, optional: bool = False) -> Param | None:
        """The current value of a layer parameter; None when an optional input is absent. Raises :class:`Skip`
        when it is not a usable constant."""
        cur = self.params.get((key, slot))
        if cur is not None:
            return cur
        if slot == BIAS_ADD:
            return None
        b = self.mg.input_binding(key, slot)
        if b is None:
            if optional:
                return None
            raise Skip("producer_weight_not_constant", f"{self.mg.label(key)} has no {what}")
        init = self.mg.graphs[b.graph].inits.get(b.name)
        if slot == 1 and init is not None and not self.mg.is_overridable(b) and protofile.tensor_size(init) > 1 << 16:
            # a large stored weight: read when applied, not held by the plan
            dtype = self.mg.np_dtype(b)
            if dtype is not None and is_float_dtype(dtype):
                loader = protofile.tensor_loader(init)  # a reference: read from the source, as it is now
                return Param(np.dtype(dtype), loader=loader or (lambda t=init: self.mg.read(t)),
                             stored_shape=tuple(init.dims), detached=loader is not None)
        v = self.mg.const(b)
        if isinstance(v, NotConst):
            raise not_const_skip(v, f"the {what} of {self.mg.label(key)}", weight=True)
        if not is_float_dtype(v.dtype):
            raise Skip("unsupported_dtype", f"the {what} of {self.mg.label(key)} is {v.dtype}, not floating point")
        if slot == 1:
            return Param(np.dtype(v.dtype), stored=v)
        return Param(np.dtype(v.dtype), value=np.asarray(v, np.float64))


def not_const_skip(v: NotConst, what: str, *, weight: bool) -> Skip:
    """The skip for a parameter that is not a constant, with an accurate reason code."""
    if v.kind == "overridable":
        return Skip("overridable_initializer", f"{what} is an initializer the caller may override (it is also a "
                    f"graph input: {v.detail})")
    if v.kind == "quantized":
        return Skip("quantized_weight", f"{what} is quantized ({v.detail}); bnfold does not dequantize weights")
    if v.kind == "too_large":
        return Skip("constant_too_large", f"{what} would be computed from constants beyond the size bound: {v.detail}")
    code = "producer_weight_not_constant" if weight else "non_constant_parameters"
    if v.kind == "not_evaluated":
        return Skip(code, f"{what} is not a stored constant: {v.detail}")
    return Skip(code, f"{what} depends on graph inputs ({v.detail})")


def channels(affine: formula.Affine, n: int, where: str) -> formula.Affine:
    """``affine`` with ``n`` channels (a 1-channel affine broadcasts); :class:`Skip` otherwise."""
    if affine.channels == n:
        return affine
    if affine.channels == 1:
        return formula.Affine(np.repeat(affine.scale, n), np.repeat(affine.shift, n))
    raise Skip("channel_count_mismatch", f"{affine.channels} channels but {where} has {n}")


def per_axis(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """``values`` shaped to broadcast along ``axis`` of an ``ndim``-D array."""
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)
