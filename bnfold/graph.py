"""A small read-only facade over an ``onnx.ModelProto`` for the fold rules.

Every graph (the main graph and every If/Loop/Scan body, nested) is walked once. Names are resolved with lexical
scoping: a name bound in a subgraph (a subgraph input, initializer or node output) shadows the same name in the
enclosing graphs, so two sibling branches that each hold their own initializer ``W`` are two different tensors,
and neither is the main graph's ``W``. A tensor is identified by its :class:`Binding` ``(graph index, name)``.

The facade answers what the rules ask: who produces a tensor, who uses it (subgraph reads and graph outputs
included; uses that read only the dtype, such as ``CastLike``'s second input, are kept apart), whether it is a
constant (an initializer that the caller cannot override, a ``Constant`` node, or a short list of shape/cast ops
over constants, evaluated under a size bound), its rank and element type, and fresh unique names.
Nothing here changes the model.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold import protofile

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")

#: Ops the constant evaluator runs on constant inputs: shape and cast ops only (how exporters build biases and
#: parameters in-graph). Anything else (arithmetic, reductions, random ops, custom ops) is not evaluated.
EVAL_OPS = frozenset({"Identity", "Cast", "CastLike", "ConstantOfShape", "Expand", "Reshape", "Unsqueeze",
                      "Squeeze", "Flatten", "Concat", "Transpose", "Shape", "Size", "Gather", "Slice"})
#: Ops whose output is a dequantized (quantized) tensor.
DEQUANTIZE_OPS = frozenset({"DequantizeLinear", "DynamicQuantizeLinear"})
_MIN_EVAL_BYTES = 1 << 20
_UNSEEN = object()
_MAX_EVAL_DEPTH = 32


class Binding(NamedTuple):
    """One tensor: the index of the graph that binds ``name`` and the name."""

    graph: int
    name: str


class NodeKey(NamedTuple):
    graph: int
    index: int


class Use(NamedTuple):
    """One read of a tensor: by input ``slot`` of node ``node`` (which lives in graph ``graph``, possibly a
    subgraph of the tensor's graph), or as output number ``slot`` of graph ``graph`` when ``node`` is None.
    (A named tuple: the facade makes one per node input, and a tuple is several times cheaper to build than a
    frozen dataclass.)"""

    graph: int
    node: int | None
    slot: int
    dtype_only: bool = False


@dataclass(frozen=True)
class NotConst:
    """Why a tensor is not a constant. ``kind``: ``input`` (depends on a graph input or a non-constant op),
    ``overridable`` (an initializer also listed as a graph input), ``quantized`` (a DequantizeLinear output),
    ``not_evaluated`` (computed from constants by an op bnfold does not evaluate) or ``too_large``."""

    kind: str
    detail: str


@dataclass
class GraphScope:
    index: int
    proto: onnx.GraphProto
    parent: int | None
    owner: NodeKey | None  #: the node whose attribute holds this subgraph
    name: str
    nodes: list = field(default_factory=list)
    inits: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  #: name -> ValueInfoProto
    outputs: list = field(default_factory=list)
    producer: dict = field(default_factory=dict)  #: name -> (node index, output index)
    types: dict = field(default_factory=dict)  #: name -> TypeProto (value_info, inputs, outputs)

    def binds(self, name: str) -> bool:
        return name in self.producer or name in self.inits or name in self.inputs


def is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


def node_label(node: onnx.NodeProto) -> str:
    if node.name:
        return node.name
    out = next((o for o in node.output if o), "?")
    return f"{node.op_type}@{out}"


def attrs_of(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute
            if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)}


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def is_float_dtype(dtype) -> bool:
    known = _FLOAT_DTYPE.get(dtype) if isinstance(dtype, np.dtype) else None
    if known is not None:
        return known
    try:
        d = np.dtype(dtype)
    except TypeError:
        return False
    result = d.kind == "f" or d.name in ("bfloat16",)
    if isinstance(dtype, np.dtype):
        _FLOAT_DTYPE[dtype] = result
    return result


_FLOAT_DTYPE: dict[np.dtype, bool] = {}  #: is_float_dtype's answers, per numpy dtype


class ModelGraph:
    """The facade. ``size_bound`` caps the bytes of any tensor the constant evaluator may compute (by default
    the larger of 1 MiB and the model's initializer bytes: no computed constant may exceed the file)."""

    def __init__(self, model: onnx.ModelProto, *, size_bound: int | None = None):
        self.model = model
        self.opset = next((int(o.version) for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)
        self.ir_version = model.ir_version
        self.graphs: list[GraphScope] = []
        self.names: set[str] = set()
        self._walk(model.graph, None, None, "")
        self._bound: list[dict[str, Binding | None]] = [{} for _ in self.graphs]  #: resolve()'s memo, per graph
        self.uses: dict[Binding, list[Use]] = {}
        self._resolve_uses()
        self._size_bound = size_bound
        self._const: dict[Binding, np.ndarray | NotConst] = {}
        self._attrs: dict[NodeKey, dict] = {}
        self._inferred: dict[Binding, onnx.TypeProto] | None = None
        self._counter = 0

    # ------------------------------------------------------------------ walking
    def _walk(self, proto: onnx.GraphProto, parent: int | None, owner: NodeKey | None, name: str) -> None:
        g = GraphScope(len(self.graphs), proto, parent, owner, name)
        self.graphs.append(g)
        g.nodes = list(proto.node)
        names = self.names
        for t in proto.initializer:
            name = t.name
            g.inits[name] = t
            names.add(name)
        for vi in proto.input:
            name = vi.name
            g.inputs[name] = vi
            g.types[name] = vi.type
            names.add(name)
        for vi in proto.value_info:
            g.types.setdefault(vi.name, vi.type)
        for vi in proto.output:
            g.types.setdefault(vi.name, vi.type)
        g.outputs = [vi.name for vi in proto.output]
        producer = g.producer
        for i, n in enumerate(g.nodes):
            name = n.name
            if name:
                names.add(name)
            for k, o in enumerate(n.output):
                if o:
                    producer[o] = (i, k)
                    names.add(o)
            for a in n.attribute:  # its subgraphs (_subgraphs), numbered in node order, depth first
                if a.type == onnx.AttributeProto.GRAPH:
                    self._walk(a.g, g.index, NodeKey(g.index, i), a.g.name)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        self._walk(sub, g.index, NodeKey(g.index, i), sub.name)

    def _resolve_uses(self) -> None:
        uses = self.uses
        new = tuple.__new__  # (a named tuple built in C: its generated __new__ is a Python call per use)
        for g in self.graphs:
            resolve, gi = self._resolver(g.index), g.index
            for i, n in enumerate(g.nodes):
                dtype_only_slot = 1 if n.op_type == "CastLike" and is_default_domain(n) else -1
                for k, name in enumerate(n.input):
                    if not name:
                        continue
                    b = resolve(name)
                    if b is not None:
                        u = new(Use, (gi, i, k, k == dtype_only_slot))
                        found = uses.get(b)
                        if found is None:
                            uses[b] = [u]
                        else:
                            found.append(u)
            for k, name in enumerate(g.outputs):
                b = resolve(name)
                if b is not None:
                    uses.setdefault(b, []).append(Use(g.index, None, k))

    def _resolver(self, graph: int):
        """:meth:`resolve` for one graph (a main graph's lookup without the scope walk)."""
        scope = self.graphs[graph]
        if scope.parent is not None:
            return lambda name: self.resolve(graph, name)
        producer, inits, inputs, seen = scope.producer, scope.inits, scope.inputs, self._bound[graph]

        def resolve_main(name: str) -> Binding | None:
            b = seen.get(name, _UNSEEN)
            if b is _UNSEEN:
                b = seen[name] = tuple.__new__(Binding, (graph, name)) \
                    if name in producer or name in inits or name in inputs else None
            return b
        return resolve_main

    @property
    def size_bound(self) -> int:
        """Bytes a computed constant may take: the model's initializer bytes, at least 1 MiB (computed once,
        when first needed)."""
        if self._size_bound is None:
            self._size_bound = max(_MIN_EVAL_BYTES, sum(protofile.tensor_size(t) for g in self.graphs
                                                         for t in g.inits.values()))
        return self._size_bound

    @staticmethod
    def read(t: onnx.TensorProto) -> np.ndarray:
        """A stored tensor's values, read afresh (not cached)."""
        return _to_array(t)

    # ------------------------------------------------------------------ lookups
    def resolve(self, graph: int, name: str) -> Binding | None:
        """The binding a read of ``name`` in graph ``graph`` sees (innermost scope first); None if unbound.
        (Memoized per graph: the facade's scopes do not change.)"""
        seen = self._bound[graph]
        b = seen.get(name, _UNSEEN)
        if b is not _UNSEEN:
            return b
        scope = self.graphs[graph]
        while True:
            if name in scope.producer or name in scope.inits or name in scope.inputs:  # scope.binds, inlined
                b = Binding(scope.index, name)
                break
            if scope.parent is None:
                b = None
                break
            scope = self.graphs[scope.parent]
        seen[name] = b
        return b

    def node(self, key: NodeKey) -> onnx.NodeProto:
        return self.graphs[key.graph].nodes[key.index]

    def attrs(self, key: NodeKey) -> dict:
        a = self._attrs.get(key)
        if a is None:
            a = self._attrs[key] = attrs_of(self.node(key))
        return a

    def producer(self, b: Binding) -> tuple[NodeKey, int] | None:
        p = self.graphs[b.graph].producer.get(b.name)
        return None if p is None else (NodeKey(b.graph, p[0]), p[1])

    def input_binding(self, key: NodeKey, slot: int) -> Binding | None:
        n = self.node(key)
        if slot >= len(n.input) or not n.input[slot]:
            return None
        return self.resolve(key.graph, n.input[slot])

    def output_binding(self, key: NodeKey, slot: int = 0) -> Binding | None:
        n = self.node(key)
        if slot >= len(n.output) or not n.output[slot]:
            return None
        return Binding(key.graph, n.output[slot])

    def real_uses(self, b: Binding) -> list[Use]:
        """Uses that read the values (dtype-only reads excluded); graph outputs included."""
        return [u for u in self.uses.get(b, ()) if not (u.dtype_only and u.graph == b.graph)]

    def dtype_uses(self, b: Binding) -> list[Use]:
        """Same-graph uses that read only the dtype (a subgraph's dtype read counts as a real use: the
        surviving tensor's name might be shadowed there)."""
        return [u for u in self.uses.get(b, ()) if u.dtype_only and u.graph == b.graph]

    def only_consumer(self, b: Binding) -> NodeKey | None:
        """The single node (in the tensor's own graph) that reads ``b``'s values, if there is exactly one and the
        tensor is not a graph output."""
        uses = self.real_uses(b)
        if len(uses) != 1 or uses[0].node is None or uses[0].graph != b.graph:
            return None
        return NodeKey(uses[0].graph, uses[0].node)

    def is_overridable(self, b: Binding) -> bool:
        """An initializer the caller may replace: listed among its graph's inputs (IR >= 4 for the main graph;
        a subgraph input is always a formal parameter)."""
        g = self.graphs[b.graph]
        if b.name not in g.inits or b.name not in g.inputs:
            return False
        return g.parent is not None or self.ir_version >= 4

    def label(self, key: NodeKey) -> str:
        return node_label(self.node(key))

    def graph_name(self, index: int) -> str:
        return "" if index == 0 else self.graphs[index].name

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    # ------------------------------------------------------------------ types and ranks
    def _type(self, b: Binding) -> onnx.TypeProto | None:
        t = self.graphs[b.graph].types.get(b.name)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
            return t
        init = self.graphs[b.graph].inits.get(b.name)
        if init is not None:
            return helper.make_tensor_type_proto(init.data_type, list(init.dims))
        self._infer()
        return self._inferred.get(b, t)

    def rank(self, b: Binding) -> int | None:
        t = self._type(b)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    def shape(self, b: Binding) -> list[int | None] | None:
        t = self._type(b)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]

    def elem_type(self, b: Binding) -> int | None:
        init = self.graphs[b.graph].inits.get(b.name)
        if init is not None:
            return init.data_type
        t = self.graphs[b.graph].types.get(b.name)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type:
            return t.tensor_type.elem_type
        p = self.producer(b)
        if p is not None and self.node(p[0]).op_type == "Constant":
            v = self.const(b)
            if isinstance(v, np.ndarray):
                return helper.np_dtype_to_tensor_dtype(v.dtype)
        self._infer()
        t = self._inferred.get(b)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type:
            return t.tensor_type.elem_type
        return None

    def np_dtype(self, b: Binding):
        et = self.elem_type(b)
        if not et:
            return None
        try:
            return helper.tensor_dtype_to_np_dtype(et)
        except (KeyError, ValueError):
            return None

    def _infer(self) -> None:
        """Shape inference, once, on a copy whose large initializers carry no data (only dims and dtypes)."""
        if self._inferred is not None:
            return
        self._inferred = {}
        light = onnx.ModelProto()
        light.ir_version = self.model.ir_version
        light.opset_import.extend(self.model.opset_import)
        light.functions.extend(self.model.functions)
        src = self.model.graph
        for f in ("node", "input", "output", "value_info", "sparse_initializer"):
            getattr(light.graph, f).extend(getattr(src, f))
        for t in src.initializer:
            if protofile.tensor_size(t) > 4096 and t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                stub = light.graph.initializer.add()
                stub.name, stub.data_type = t.name, t.data_type
                stub.dims.extend(t.dims)
            else:
                light.graph.initializer.append(t)
        try:
            inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
        except Exception as exc:  # inference may fail on odd models: ranks stay unknown
            log.debug("shape inference failed: %s", exc)
            return
        scopes = []

        def walk(g):
            scopes.append(g)
            for n in g.node:
                for sub in _subgraphs(n):
                    walk(sub)
        walk(inferred.graph)
        if len(scopes) != len(self.graphs):
            return
        for idx, g in enumerate(scopes):
            for vi in list(g.value_info) + list(g.input) + list(g.output):
                self._inferred.setdefault(Binding(idx, vi.name), vi.type)

    # ------------------------------------------------------------------ constants
    def const(self, b: Binding | None, depth: int = 0) -> np.ndarray | NotConst:
        """The value of ``b`` when it is a constant, else a :class:`NotConst` saying why."""
        if b is None:
            return NotConst("input", "missing input")
        v = self._const.get(b)
        if v is None:
            v = self._const_uncached(b, depth)
            self._const[b] = v
        return v

    def _const_uncached(self, b: Binding, depth: int) -> np.ndarray | NotConst:
        g = self.graphs[b.graph]
        if b.name in g.inits:
            if self.is_overridable(b):
                return NotConst("overridable", f"'{b.name}' is an initializer that is also a graph input: the "
                                "caller may override it")
            return _to_array(g.inits[b.name])
        p = self.producer(b)
        if p is None:
            return NotConst("input", f"'{b.name}' is a graph input")
        key, out_idx = p
        n = self.node(key)
        if not is_default_domain(n):
            return NotConst("input", f"'{b.name}' is computed by the custom op {n.domain}.{n.op_type}")
        if n.op_type in DEQUANTIZE_OPS:
            return NotConst("quantized", f"'{b.name}' is dequantized by {n.op_type}: a quantized tensor")
        if n.op_type == "Constant":
            return self._constant_node(key)
        if n.op_type not in EVAL_OPS:
            # not followed further: whatever its inputs are, bnfold does not evaluate this op (and walking up
            # through it would read weights and recurse through the whole graph)
            return NotConst("not_evaluated", f"'{b.name}' is computed by {n.op_type}, which bnfold does not "
                            "evaluate")
        if depth > _MAX_EVAL_DEPTH:
            return NotConst("not_evaluated", f"'{b.name}' is computed by too long a chain of ops")
        inputs: list[np.ndarray | None] = []
        for k, name in enumerate(n.input):
            if not name:
                inputs.append(None)
                continue
            ib = self.resolve(key.graph, name)
            if n.op_type == "CastLike" and k == 1:  # only the dtype matters
                dt = self.np_dtype(ib) if ib is not None else None
                if dt is None:
                    return NotConst("input", f"the dtype of '{name}' is unknown")
                inputs.append(np.zeros((), dt))
                continue
            if n.op_type in ("Shape", "Size") and k == 0:
                shape = self.shape(ib) if ib is not None else None
                if shape is None or any(d is None for d in shape):
                    return NotConst("input", f"the shape of '{name}' is not static")
                small = np.prod(shape, dtype=np.float64) * 4 <= _MIN_EVAL_BYTES
                inputs.append(np.zeros(shape, np.float32) if small or np.prod(shape) * 4 <= self.size_bound else None)
                if inputs[-1] is None:
                    return NotConst("too_large", f"'{name}' is too large to evaluate")
                continue
            v = self.const(ib, depth + 1)
            if isinstance(v, NotConst):
                return v
            inputs.append(v)
        est = _estimate_bytes(n.op_type, inputs, self.attrs(key))
        if est is None or (est > _MIN_EVAL_BYTES and est > self.size_bound):
            return NotConst("too_large", f"'{b.name}' ({n.op_type}) would take "
                            f"{'an unknown number of' if est is None else f'{est:,}'} bytes, more than the bound of "
                            f"{self.size_bound:,} bytes (the model's size)")
        try:
            results = _evaluate(n, inputs, self.opset)
        except Exception as exc:  # a malformed node
            log.debug("cannot evaluate %s: %s", node_label(n), exc)
            return NotConst("not_evaluated", f"'{b.name}' cannot be evaluated ({type(exc).__name__})")
        return results[out_idx]

    def _constant_node(self, key: NodeKey) -> np.ndarray | NotConst:
        for a in self.node(key).attribute:
            if a.name == "value":
                return _to_array(a.t)
            if a.name == "value_float":
                return np.array(a.f, np.float32)
            if a.name == "value_floats":
                return np.array(list(a.floats), np.float32)
            if a.name == "value_int":
                return np.array(a.i, np.int64)
            if a.name == "value_ints":
                return np.array(list(a.ints), np.int64)
        return NotConst("not_evaluated", f"Constant {self.label(key)} holds a sparse or string value")


def _to_array(t: onnx.TensorProto) -> np.ndarray:
    try:
        return protofile.tensor_array(t)  # a skeleton's reference is read from its source
    except Exception as exc:  # data that does not match the dims: the checker does not look at tensor data
        from bnfold.errors import BnfoldError
        raise BnfoldError(f"initializer '{t.name}' is corrupted ({str(exc)[:200]}); fix or re-export the model") \
            from None


def _estimate_bytes(op: str, inputs: list, attrs: dict) -> int | None:
    """An upper bound of the output's bytes, computed before evaluating (None: cannot tell)."""
    def nbytes(a):
        return 0 if a is None else int(np.asarray(a).size) * max(8, np.asarray(a).itemsize)
    if op == "ConstantOfShape":
        shape = inputs[0] if inputs else np.zeros(0, np.int64)
        if shape is None or np.asarray(shape).ndim != 1 or np.any(np.asarray(shape) < 0):
            return None
        return int(np.prod(np.asarray(shape, dtype=np.float64))) * 8
    if op == "Expand":
        if len(inputs) < 2 or inputs[1] is None or np.asarray(inputs[1]).ndim != 1:
            return None
        shape = [int(d) for d in np.asarray(inputs[1])]
        data = list(np.shape(inputs[0]))
        n = max(len(shape), len(data))
        shape = [1] * (n - len(shape)) + shape
        data = [1] * (n - len(data)) + data
        return int(np.prod([max(a, b) for a, b in zip(shape, data)], dtype=np.float64)) * 8
    if op == "Gather":
        if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
            return None
        return nbytes(inputs[0]) * max(1, int(np.asarray(inputs[1]).size))
    return sum(nbytes(a) for a in inputs)


def _evaluate(node: onnx.NodeProto, inputs: list, opset: int) -> list[np.ndarray]:
    """Run one node of :data:`EVAL_OPS` on constant inputs: in numpy for the common forms, else with onnx's
    reference evaluator (slow to start: it imports every op)."""
    out = _evaluate_numpy(node, inputs, opset)
    if out is not None:
        return [out]
    return _evaluate_reference(node, inputs, opset)


def _evaluate_numpy(node: onnx.NodeProto, inputs: list, opset: int) -> np.ndarray | None:
    op = node.op_type
    a = attrs_of(node)
    x = inputs[0] if inputs else None

    def axes_of(k):
        if "axes" in a:
            return [int(v) for v in a["axes"]]
        if len(inputs) > k and inputs[k] is not None:
            return [int(v) for v in np.asarray(inputs[k]).reshape(-1)]
        return None
    if op == "Identity":
        return np.asarray(x)
    if op == "Cast":
        return np.asarray(x).astype(helper.tensor_dtype_to_np_dtype(int(a["to"])))
    if op == "CastLike":
        return np.asarray(x).astype(inputs[1].dtype)
    if op == "ConstantOfShape":
        value = numpy_helper.to_array(a["value"]).reshape(-1) if "value" in a else np.zeros(1, np.float32)
        return np.full([int(d) for d in np.asarray(x).reshape(-1)], value[0], dtype=value.dtype)
    if op == "Expand":
        shape = [int(d) for d in np.asarray(inputs[1]).reshape(-1)]
        return np.array(np.broadcast_to(x, np.broadcast_shapes(np.shape(x), tuple(shape))))
    if op == "Reshape":
        shape = [int(d) for d in np.asarray(inputs[1]).reshape(-1)] if len(inputs) > 1 else list(a.get("shape", []))
        if not a.get("allowzero", 0):
            shape = [np.shape(x)[i] if d == 0 else d for i, d in enumerate(shape)]
        return np.asarray(x).reshape(shape)
    if op == "Unsqueeze":
        axes = axes_of(1)
        rank = np.ndim(x) + len(axes)
        return np.expand_dims(x, tuple(sorted(ax % rank for ax in axes)))
    if op == "Squeeze":
        axes = axes_of(1)
        return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(ax % np.ndim(x) for ax in axes))
    if op == "Flatten":
        axis = int(a.get("axis", 1)) % (np.ndim(x) + 1) if np.ndim(x) else 0
        lead = int(np.prod(np.shape(x)[:axis], dtype=np.int64))
        return np.asarray(x).reshape(lead, -1)
    if op == "Concat":
        return np.concatenate([np.asarray(v) for v in inputs if v is not None], axis=int(a["axis"]))
    if op == "Transpose":
        perm = a.get("perm")
        return np.transpose(x, None if perm is None else [int(p) for p in perm])
    if op == "Shape":
        shape = np.shape(x)
        start, end = a.get("start", 0), a.get("end", None)
        return np.array(shape[start:end], np.int64)
    if op == "Size":
        return np.array(np.size(x), np.int64)
    if op == "Gather":
        idx = np.asarray(inputs[1])
        return np.take(x, idx, axis=int(a.get("axis", 0)))
    return None  # Slice and anything unusual: the reference evaluator


def _evaluate_reference(node: onnx.NodeProto, inputs: list, opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)]
    outs = [f"o{k}" for k in range(len(node.output))]
    proto = helper.make_node(node.op_type, names, outs)
    proto.attribute.extend(node.attribute)
    ev = ReferenceEvaluator(helper.make_model(
        helper.make_graph([proto], "eval", [], [helper.make_value_info(o, onnx.TypeProto()) for o in outs]),
        opset_imports=[helper.make_opsetid("", opset)]))
    return [np.asarray(r) for r in ev.run(None, {n: v for n, v in zip(names, inputs) if n})]


def source_layers(model: onnx.ModelProto) -> dict[str, str]:
    """Map a node's first output to the source layer it came from, from exporter metadata (torch's dynamo
    exporter records the module path of every node in ``pkg.torch.onnx.name_scopes``)."""
    layers: dict[str, str] = {}

    def walk(graph: onnx.GraphProto):
        for n in graph.node:
            for p in n.metadata_props:
                if p.key == "pkg.torch.onnx.name_scopes" and n.output:
                    try:
                        scopes = ast.literal_eval(p.value)
                    except (ValueError, SyntaxError):
                        continue
                    if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                        layers[n.output[0]] = str(scopes[-2])
            for sub in _subgraphs(n):
                walk(sub)

    walk(model.graph)
    return layers
