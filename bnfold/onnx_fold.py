"""The ONNX fold pass: fold every BatchNormalization that can be folded exactly, in any ONNX model.

For each BatchNormalization (in the main graph and in If/Loop/Scan bodies), in graph order:

1. *check the node itself*: inference mode, no statistics outputs, ``spatial=1``, constant parameters
   (parameters computed from constants only are evaluated first); invalid statistics raise.
2. *backward*: fold into the producer (Conv, ConvTranspose, Gemm, MatMul[+Add]) when BN is the only user of
   the producer's output;
3. *forward*: otherwise fold into the only consumer (Conv without padding, Gemm, MatMul);
4. *lower* (optional): otherwise rewrite it as Mul+Add;
5. otherwise *skip*, with a reason code (see :data:`bnfold.report.REASONS`).

Per-channel Mul/Add/Sub/Div by constants right after a producer (the way TensorFlow converters emit BN) fold
backward the same way. Every rule first checks, then rewrites; nothing is changed for a skipped node. The caller
gets a fresh model; the input ``ModelProto`` is never modified.
"""

from __future__ import annotations

import ast
import json
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from bnfold import formula
from bnfold._version import __version__
from bnfold.errors import BnfoldError
from bnfold.onnx_io import default_opset
from bnfold.report import FoldEntry, FoldReport

log = logging.getLogger(__name__)

PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CONSUMERS = ("Conv", "Gemm", "MatMul")
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}
_MAX_EVAL_DEPTH = 32
METADATA_KEY = "bnfold"


@dataclass
class FoldOptions:
    """Switches of the ONNX pass."""

    forward: bool = True  #: fold into the consumer when the producer cannot take it
    affine_chains: bool = True  #: fold per-channel Mul/Add/Sub/Div by constants after a producer
    lower_standalone: bool = False  #: rewrite a BN with no foldable neighbour as Mul+Add


class _Skip(Exception):
    """A rule does not apply: carries the reason code and message. ``applicable`` tells whether the rule's
    pattern matched at all (a matched-but-refused reason is more informative than 'no neighbour')."""

    def __init__(self, code: str, message: str, applicable: bool = True):
        super().__init__(message)
        self.code = code
        self.message = message
        self.applicable = applicable


def _node_label(node: gs.Node) -> str:
    if node.name:
        return node.name
    out = next((t.name for t in node.outputs if t.name), "?")
    return f"{node.op}@{out}"


def _is_float(dtype) -> bool:
    try:
        d = np.dtype(dtype)
    except TypeError:
        return False
    return d.kind == "f" or d.name == "bfloat16"


def _iter_graphs(graph: gs.Graph):
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from _iter_graphs(value)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    if isinstance(v, gs.Graph):
                        yield from _iter_graphs(v)


class _Folder:
    def __init__(self, model: onnx.ModelProto, options: FoldOptions):
        self.model = model
        self.options = options
        self.opset = default_opset(model) or 1
        self.root = gs.import_onnx(model)
        self.graphs = list(_iter_graphs(self.root))
        self.all_outputs = {id(t) for g in self.graphs for t in g.outputs}
        self.names = {name for g in self.graphs for name in g.tensors()}
        self.names.update(n.name for g in self.graphs for n in g.nodes if n.name)
        # node -> its graph, by identity (gs.Node.__eq__ compares attributes: far too slow for membership tests)
        self.graph_of: dict[int, gs.Graph] = {id(n): g for g in self.graphs for n in g.nodes}
        self.entries: list[FoldEntry] = []
        self._const_cache: dict[int, np.ndarray | None] = {}
        self._ranks: dict[str, int] | None = None
        self._layers = _source_layers(model)
        self.into_layer: str | None = None

    def layer(self, node: gs.Node | None) -> str | None:
        if node is None:
            return None
        out = next((t.name for t in node.outputs if t.name), None)
        return self._layers.get(out)

    # ---------------------------------------------------------------- helpers
    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def uses(self, t: gs.Tensor) -> int:
        return len(t.outputs) + (1 if id(t) in self.all_outputs else 0)

    def const(self, t: gs.Tensor | None, depth: int = 0) -> np.ndarray | None:
        """Value of ``t`` if it is a constant or computed from constants only; None otherwise."""
        if t is None or not t.name and not isinstance(t, gs.Constant):
            return None
        key = id(t)
        if key in self._const_cache:
            return self._const_cache[key]
        value = self._const_uncached(t, depth)
        if not isinstance(t, gs.Constant):  # stored constants are cheap to re-read; computed ones are cached
            self._const_cache[key] = value
        return value

    def _const_uncached(self, t: gs.Tensor, depth: int) -> np.ndarray | None:
        if isinstance(t, gs.Constant):
            lazy = t._values
            if isinstance(lazy, LazyValues):
                return numpy_helper.to_array(lazy.tensor)  # bf16 comes back as ml_dtypes.bfloat16
            return np.asarray(t.values)
        if len(t.inputs) != 1 or depth > _MAX_EVAL_DEPTH:
            return None
        node = t.inputs[0]
        if (node.domain or "") not in ("", "ai.onnx") or node.op in _NONDETERMINISTIC:
            return None
        if node.op == "Constant":
            return self._constant_attr(node)
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return None
        if node.op == "CastLike" and len(node.inputs) == 2:
            # Only the dtype of the second input matters (the dynamo exporter casts a constant zero bias
            # "like" the graph input): constant whenever that dtype is known.
            like = node.inputs[1]
            v = self.const(node.inputs[0], depth + 1)
            like_v = self.const(like, depth + 1)
            dtype = like_v.dtype if like_v is not None else like.dtype
            if v is None or dtype is None:
                return None
            return np.asarray(v).astype(dtype)
        inputs = []
        for i in node.inputs:
            if not i.name and not isinstance(i, gs.Constant):
                inputs.append(None)
                continue
            v = self.const(i, depth + 1)
            if v is None:
                return None
            inputs.append(v)
        try:
            results = _evaluate(node, inputs, self.opset)
        except Exception as exc:  # the reference evaluator lacks an op, or the node is malformed
            log.debug("cannot evaluate %s: %s", _node_label(node), exc)
            return None
        idx = next(i for i, o in enumerate(node.outputs) if o is t)
        return results[idx]

    @staticmethod
    def _constant_attr(node: gs.Node) -> np.ndarray | None:
        a = node.attrs
        if "value" in a:
            v = a["value"]
            if isinstance(v, gs.Constant):
                lazy = v._values
                if isinstance(lazy, LazyValues):
                    return numpy_helper.to_array(lazy.tensor)
                return np.asarray(v.values)
            return None
        if "value_float" in a:
            return np.array(a["value_float"], np.float32)
        if "value_floats" in a:
            return np.array(a["value_floats"], np.float32)
        if "value_int" in a:
            return np.array(a["value_int"], np.int64)
        if "value_ints" in a:
            return np.array(a["value_ints"], np.int64)
        return None

    def rank(self, t: gs.Tensor) -> int | None:
        if t.shape is not None:
            return len(t.shape)
        self._infer()
        return self._ranks.get(t.name)

    def elem_dtype(self, t: gs.Tensor):
        """numpy dtype of ``t`` from shape inference, when the graph does not say."""
        self._infer()
        return self._dtypes.get(t.name)

    def _infer(self) -> None:
        if self._ranks is not None:
            return
        self._ranks, self._dtypes = {}, {}
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception as exc:
            log.debug("shape inference failed: %s", exc)
            return
        g = inferred.graph
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                self._ranks[vi.name] = len(tt.shape.dim)
            if tt.elem_type:
                try:
                    self._dtypes[vi.name] = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
                except (KeyError, ValueError):
                    pass

    def set_input(self, node: gs.Node, idx: int, values: np.ndarray, base: str) -> None:
        """Give ``node`` input ``idx`` the constant ``values``: rewrite the existing constant in place when only
        this node uses it; otherwise add a private copy, so other users keep the original.

        The new values stay numpy arrays until :meth:`export` writes them straight into the output model."""
        old = node.inputs[idx] if idx < len(node.inputs) else None
        if isinstance(old, gs.Constant) and old.name and self.uses(old) == 1:
            old.values = np.asarray(values)
            self._const_cache.pop(id(old), None)
            return
        name = self.unique(f"{old.name if old is not None and old.name else base}_bnfold")
        c = gs.Constant(name, np.asarray(values))
        if old is None:
            while len(node.inputs) < idx:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(c)
        else:
            node.inputs[idx] = c

    def in_graph(self, node: gs.Node, graph: gs.Graph) -> bool:
        return self.graph_of.get(id(node)) is graph

    @staticmethod
    def _position(graph: gs.Graph, node: gs.Node) -> int:
        return next(i for i, n in enumerate(graph.nodes) if n is node)

    def remove_node(self, graph: gs.Graph, node: gs.Node) -> None:
        node.inputs.clear()
        node.outputs.clear()
        del graph.nodes[self._position(graph, node)]
        self.graph_of.pop(id(node), None)

    def insert_after(self, graph: gs.Graph, anchor: gs.Node, node: gs.Node) -> None:
        graph.nodes.insert(self._position(graph, anchor) + 1, node)
        self.graph_of[id(node)] = graph

    # ---------------------------------------------------------------- driver
    def run(self) -> None:
        for graph in self.graphs:
            gname = "" if graph is self.root else graph.name
            for node in list(graph.nodes):
                if not self.in_graph(node, graph):
                    continue  # removed by an earlier fold
                if (node.domain or "") not in ("", "ai.onnx"):
                    continue
                layer = self.layer(node)
                if node.op == "BatchNormalization":
                    entry = self.fold_bn(graph, node, gname)
                elif node.op in AFFINE_OPS and self.options.affine_chains:
                    entry = self.fold_affine(graph, node, gname)
                else:
                    continue
                if entry is not None:
                    entry.layer = layer
                    self.entries.append(entry)
        for fn in self.model.functions:
            for n in fn.node:
                if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx"):
                    self.entries.append(FoldEntry(
                        bn=f"{fn.name}/{n.name or n.output[0]}", status="skipped", reason="inside_function",
                        message=f"inside model-local function '{fn.name}', which bnfold does not rewrite",
                        graph=fn.name))

    # ---------------------------------------------------------------- BatchNormalization
    def fold_bn(self, graph: gs.Graph, bn: gs.Node, gname: str) -> FoldEntry:
        label = _node_label(bn)

        def skip(code, message):
            return FoldEntry(bn=label, status="skipped", reason=code, message=message, graph=gname)

        a = bn.attrs
        if int(a.get("training_mode", 0)) == 1:
            return skip("training_mode", "training_mode=1: it normalises with batch statistics; "
                        "re-export the model in eval mode")
        if self.opset < 7 and int(a.get("is_test", 0)) == 0:
            return skip("training_mode", "is_test=0 (opset < 7): the node is declared in training mode")
        if any(o.name for o in bn.outputs[1:]):
            return skip("extra_outputs", "it outputs running/saved statistics: "
                        "only an inference-mode BatchNormalization with one output can be folded")
        if int(a.get("spatial", 1)) == 0:
            return skip("spatial_disabled", "spatial=0: statistics are per channel and position, "
                        "not a per-channel affine map")
        if len(bn.inputs) < 5:
            return skip("non_constant_parameters", "malformed node: fewer than 5 inputs")
        x, y = bn.inputs[0], bn.outputs[0]
        params = [self.const(t) for t in bn.inputs[1:5]]
        if any(p is None for p in params):
            which = [n for n, p in zip(("scale", "B", "mean", "var"), params) if p is None]
            return skip("non_constant_parameters", f"{', '.join(which)} depend on graph inputs")
        if not all(_is_float(p.dtype) for p in params):
            return skip("unsupported_dtype", "parameters are not floating point")
        gamma, beta, mean, var = params
        affine = formula.bn_affine(gamma, beta, mean, var, float(a.get("epsilon", 1e-5)), name=label)

        tried: list[_Skip] = []
        for direction, rule in (("backward", self._bn_backward), ("forward", self._bn_forward)):
            if direction == "forward" and not self.options.forward:
                continue
            try:
                into = rule(graph, bn, x, y, affine)
            except _Skip as s:
                tried.append(s)
                continue
            return FoldEntry(bn=label, status="folded", into=into, direction=direction,
                             message=f"folded {direction} into {into}", graph=gname, into_layer=self.into_layer)
        if self.options.lower_standalone:
            try:
                into = self._lower(graph, bn, x, y, affine, params[0].dtype)
                return FoldEntry(bn=label, status="folded", into=into, direction="lowered",
                                 message=f"no foldable neighbour; lowered to {into}", graph=gname)
            except _Skip as s:
                tried.append(s)
        informative = [s for s in tried if s.applicable]
        if informative:
            return skip(informative[0].code, informative[0].message)
        prod = x.inputs[0].op if x.inputs else "a graph input"
        cons = ", ".join(sorted({n.op for n in y.outputs})) or "a graph output"
        return skip("no_foldable_neighbour", f"produced by {prod} and consumed by {cons}; neither can absorb it")

    def _bn_backward(self, graph, bn, x, y, affine) -> str:
        if not x.inputs:
            raise _Skip("no_foldable_neighbour", "input is a graph input", applicable=False)
        producer = x.inputs[0]
        if not self.in_graph(producer, graph) or not self._is_producer(producer):
            raise _Skip("no_foldable_neighbour", f"producer {producer.op} cannot absorb it", applicable=False)
        if self.uses(x) != 1:
            raise _Skip("producer_output_shared",
                        f"the output of {_node_label(producer)} is also used elsewhere (or is a graph output); "
                        "folding would change what the other users see")
        rank = self.rank(x) if producer.op in ("MatMul", "Add") else None
        self.into_layer = self.layer(producer)
        into = self._fold_into_producer(graph, producer, affine, channel_axis=1, rank=rank)
        writer = x.inputs[0]  # the producer, or the bias Add the fold put after it
        writer.outputs[_index(writer.outputs, x)] = y  # it now writes the BN output directly
        self.remove_node(graph, bn)
        return into

    def _bn_forward(self, graph, bn, x, y, affine) -> str:
        consumers = list(y.outputs)
        foldable = [c for c in consumers if c.op in CONSUMERS and (c.domain or "") in ("", "ai.onnx")]
        if not foldable:
            raise _Skip("no_foldable_neighbour", "no consumer can absorb it", applicable=False)
        if len(consumers) != 1 or id(y) in self.all_outputs or not self.in_graph(consumers[0], graph):
            raise _Skip("consumer_output_shared",
                        "its output has several consumers or is a graph output, so it cannot fold forward")
        q = consumers[0]
        if not q.inputs or q.inputs[0] is not y or any(t is y for t in q.inputs[1:]):
            raise _Skip("channel_axis_mismatch", f"it feeds the weight/bias of {q.op}, not its data input")
        self.into_layer = self.layer(q)
        into = self._fold_into_consumer(graph, q, affine, rank=self.rank(x) if q.op == "MatMul" else None)
        q.inputs[0] = x
        self.remove_node(graph, bn)
        return into

    def _lower(self, graph, bn, x, y, affine, dtype) -> str:
        rank = self.rank(x)
        if rank is None:
            rank = self.rank(y)
        if rank is None or rank < 2:
            raise _Skip("unknown_rank", "input rank unknown: cannot shape the Mul/Add constants")
        dt = next((d for d in (x.dtype, y.dtype, self.elem_dtype(x), self.elem_dtype(y))
                   if d is not None and _is_float(d)), None)
        if dt is None:
            raise _Skip("unsupported_dtype", "the dtype of the BatchNorm input is unknown: cannot type the "
                        "Mul/Add constants")
        # opset < 7 broadcasts only with broadcast=1, matching B's dims to A's from `axis` on: use (C,) at axis 1
        legacy = self.opset < 7
        shape = (affine.channels,) if legacy else (affine.channels,) + (1,) * (rank - 2)
        attrs = {"broadcast": 1, "axis": 1} if legacy else {}
        try:
            s = formula.cast_checked(affine.scale.reshape(shape), dt, what=f"{_node_label(bn)} scale")
            t = formula.cast_checked(affine.shift.reshape(shape), dt, what=f"{_node_label(bn)} shift")
        except formula.CastOverflow as exc:
            raise _Skip("cast_overflow", str(exc)) from None
        base = bn.name or y.name
        mid = gs.Variable(self.unique(f"{base}_scaled"), dtype=y.dtype, shape=y.shape)
        mul = gs.Node("Mul", self.unique(f"{base}_mul"), attrs=dict(attrs),
                      inputs=[x, gs.Constant(self.unique(f"{base}_scale"), s)], outputs=[mid])
        add = gs.Node("Add", self.unique(f"{base}_add"), attrs=dict(attrs),
                      inputs=[mid, gs.Constant(self.unique(f"{base}_shift"), t)], outputs=[y])
        idx = self._position(graph, bn)
        bn.outputs.clear()
        bn.inputs.clear()
        graph.nodes[idx:idx + 1] = [mul, add]
        self.graph_of.pop(id(bn), None)
        self.graph_of[id(mul)] = self.graph_of[id(add)] = graph
        return f"{mul.name}+{add.name}"

    # ---------------------------------------------------------------- per-channel affine ops
    def fold_affine(self, graph: gs.Graph, node: gs.Node, gname: str) -> FoldEntry | None:
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return None
        values = [self.const(t) for t in node.inputs]
        if (values[0] is None) == (values[1] is None):
            return None  # both constant, or neither: not a per-channel affine op on a tensor
        xi = 0 if values[0] is None else 1
        x, c = node.inputs[xi], values[1 - xi]
        if not x.inputs or self.uses(x) != 1 or not _is_float(c.dtype):
            return None
        producer = x.inputs[0]
        if not self.in_graph(producer, graph) or not self._is_producer(producer):
            return None
        rank, axis = self._producer_axis(producer, x)
        if rank is None or c.ndim > rank:
            return None
        shape = (1,) * (rank - c.ndim) + tuple(c.shape)
        if any(d != 1 for i, d in enumerate(shape) if i != axis):
            return None
        n = shape[axis]
        vec = np.asarray(c, np.float64).reshape(-1) if n > 1 else np.full((1,), float(np.asarray(c, np.float64).reshape(-1)[0]))
        op = node.op
        if op == "Mul":
            aff = formula.Affine(vec, np.zeros_like(vec))
        elif op == "Add":
            aff = formula.Affine(np.ones_like(vec), vec)
        elif op == "Sub":
            aff = formula.Affine(np.ones_like(vec), -vec) if xi == 0 else formula.Affine(-np.ones_like(vec), vec)
        else:  # Div
            if xi != 0 or np.any(vec == 0):
                return None
            aff = formula.Affine(1.0 / vec, np.zeros_like(vec))
        if producer.op == "MatMul" and np.any(aff.shift != 0):
            return None  # that Add is the MatMul's bias: nothing to fold
        y = node.outputs[0]
        label = _node_label(node)
        try:
            into = self._fold_into_producer(graph, producer, aff, channel_axis=axis, rank=rank)
        except _Skip as s:
            return FoldEntry(bn=label, status="skipped", reason=s.code, message=s.message, op=op, graph=gname)
        writer = x.inputs[0]
        writer.outputs[_index(writer.outputs, x)] = y
        self.remove_node(graph, node)
        return FoldEntry(bn=label, status="folded", into=into, direction="backward",
                         message=f"per-channel {op} by a constant folded into {into}", op=op, graph=gname,
                         into_layer=self.layer(producer))

    def _producer_axis(self, producer: gs.Node, out: gs.Tensor) -> tuple[int | None, int | None]:
        """(rank, channel axis) of a producer's output."""
        if producer.op in ("Conv", "ConvTranspose"):
            w = self.const(producer.inputs[1]) if len(producer.inputs) > 1 else None
            if w is None:
                r = self.rank(out)
                return r, 1
            return w.ndim, 1
        if producer.op == "Gemm":
            return 2, 1
        r = self.rank(out)
        return r, (r - 1 if r is not None else None)

    # ---------------------------------------------------------------- producers
    def _is_producer(self, node: gs.Node) -> bool:
        if (node.domain or "") not in ("", "ai.onnx"):
            return False
        if node.op in PRODUCERS:
            return True
        return self._matmul_add(node) is not None

    def _matmul_add(self, node: gs.Node):
        """For ``Add(MatMul(x, W), bias)`` return (matmul, bias input index); else None."""
        if node.op != "Add" or len(node.inputs) != 2:
            return None
        for i in (0, 1):
            t = node.inputs[i]
            if t.inputs and t.inputs[0].op == "MatMul" and self.uses(t) == 1 and self.const(node.inputs[1 - i]) is not None:
                return t.inputs[0], 1 - i
        return None

    def _weight(self, node: gs.Node, idx: int, what: str) -> np.ndarray:
        w = self.const(node.inputs[idx]) if idx < len(node.inputs) else None
        if w is None:
            raise _Skip("producer_weight_not_constant", f"the {what} of {_node_label(node)} depends on graph inputs")
        if not _is_float(w.dtype):
            raise _Skip("unsupported_dtype", f"the {what} of {_node_label(node)} is {w.dtype}, not floating point")
        return w

    def _optional(self, node: gs.Node, idx: int, what: str) -> np.ndarray | None:
        if idx >= len(node.inputs) or (not node.inputs[idx].name and not isinstance(node.inputs[idx], gs.Constant)):
            return None
        return self._weight(node, idx, what)

    @staticmethod
    def _vector_bias(b: np.ndarray | None, n: int, label: str) -> np.ndarray | None:
        """A conv bias must be 1-D with one value per output channel. An all-zero bias of another shape (the
        dynamo exporter builds one for bias-less Conv3d with optimize=False) is the same as no bias."""
        if b is None or b.shape == (n,):
            return b
        if not np.any(np.asarray(b, np.float64)):
            return None
        raise _Skip("channel_count_mismatch", f"the bias of {label} has shape {tuple(b.shape)}, expected ({n},)")

    @staticmethod
    def _gemm_bias(c: np.ndarray | None, n: int, label: str) -> None:
        if c is not None and (c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n))):
            raise _Skip("channel_count_mismatch", f"the bias C of {label} has shape {tuple(c.shape)}, "
                        f"which does not broadcast to {n} output features")

    @staticmethod
    def _channels(affine: formula.Affine, n: int, where: str) -> formula.Affine:
        if affine.channels == n:
            return affine
        if affine.channels == 1:
            return formula.Affine(np.repeat(affine.scale, n), np.repeat(affine.shift, n))
        raise _Skip("channel_count_mismatch", f"{affine.channels} channels but {where} has {n}")

    @staticmethod
    def _fold_cast(w, b, affine, layout, groups, label):
        try:
            return formula.fold_backward(w, b, affine, layout=layout, groups=groups, dtype=w.dtype)
        except formula.CastOverflow as exc:
            raise _Skip("cast_overflow", f"{label} {exc}") from None

    @staticmethod
    def _cast(pairs, label):
        try:
            return [formula.cast_checked(v, dt, what=f"{label} {what}") for v, dt, what in pairs]
        except formula.CastOverflow as exc:
            raise _Skip("cast_overflow", str(exc)) from None

    def _fold_into_producer(self, graph, p: gs.Node, affine, *, channel_axis: int, rank: int | None) -> str:
        label = _node_label(p)
        op = p.op
        if op in ("Conv", "ConvTranspose"):
            w = self._weight(p, 1, "weight")
            b = self._optional(p, 2, "bias")
            if channel_axis != 1:
                raise _Skip("channel_axis_mismatch", f"channel axis {channel_axis} is not the {op} channel axis")
            groups = int(p.attrs.get("group", 1))
            b = self._vector_bias(b, w.shape[0] if op == "Conv" else w.shape[1] * groups, label)
            if op == "Conv":
                affine = self._channels(affine, w.shape[0], label)
                layout = "out_in"
            else:
                affine = self._channels(affine, w.shape[1] * groups, label)
                layout = "in_out"
            w_new, b_new = self._fold_cast(w, b, affine, layout, groups, label)
            self.set_input(p, 1, w_new, f"{label}_W")
            self.set_input(p, 2, b_new, f"{label}_B")
            return label
        if op == "Gemm":
            if channel_axis != 1:
                raise _Skip("channel_axis_mismatch", "Gemm output channel axis is 1")
            w = self._weight(p, 1, "weight (B)")
            if w.ndim != 2:
                raise _Skip("channel_axis_mismatch", "Gemm weight is not 2-D")
            c = self._optional(p, 2, "bias (C)")
            trans_b = int(p.attrs.get("transB", 0))
            beta = float(p.attrs.get("beta", 1.0))
            n = w.shape[0] if trans_b else w.shape[1]
            affine = self._channels(affine, n, label)
            self._gemm_bias(c, n, label)
            bias = None if c is None else beta * np.asarray(c, np.float64)
            w_new, c_new = formula.fold_backward(w, bias, affine, layout="out_in" if trans_b else "in_out")
            w_new, c_new = self._cast([(w_new, w.dtype, "weight"), (c_new, w.dtype, "bias")], label)
            self.set_input(p, 1, w_new, f"{label}_B")
            self.set_input(p, 2, c_new, f"{label}_C")
            p.attrs["beta"] = 1.0
            return label
        mm_add = self._matmul_add(p) if op == "Add" else None
        mm = p if op == "MatMul" else (mm_add[0] if mm_add else None)
        if mm is None:
            raise _Skip("no_foldable_neighbour", f"{op} cannot absorb it", applicable=False)
        mlabel = _node_label(mm)
        if mm.inputs[0] is not None and self.const(mm.inputs[0]) is not None and self.const(mm.inputs[1]) is None:
            raise _Skip("channel_axis_mismatch", f"{mlabel} multiplies a constant by a tensor: the channel axis "
                        "is not its weight's feature axis")
        w = self._weight(mm, 1, "weight")
        if w.ndim != 2:
            raise _Skip("channel_axis_mismatch", f"{mlabel} weight is {w.ndim}-D; only a 2-D weight has one feature axis")
        if rank is None:
            raise _Skip("unknown_rank", f"the rank of {mlabel}'s output is unknown; the channel axis cannot be checked")
        if channel_axis != rank - 1:
            raise _Skip("channel_axis_mismatch",
                        f"the channel axis ({channel_axis}) is not {mlabel}'s feature axis ({rank - 1}) "
                        f"of its {rank}-D output")
        affine = self._channels(affine, w.shape[1], mlabel)
        if mm_add is not None:
            bias = self.const(p.inputs[mm_add[1]])
            w_new, b_new = formula.fold_backward(w, bias, affine, layout="in_out")
            w_new, b_new = self._cast([(w_new, w.dtype, "weight"), (b_new, w.dtype, "bias")], mlabel)
            self.set_input(mm, 1, w_new, f"{mlabel}_W")
            self.set_input(p, mm_add[1], b_new, f"{mlabel}_bias")
            return f"{mlabel}+{_node_label(p)}"
        w_new, b_new = formula.fold_backward(w, None, affine, layout="in_out")
        w_new, b_new = self._cast([(w_new, w.dtype, "weight"), (b_new, w.dtype, "bias")], mlabel)
        self.set_input(mm, 1, w_new, f"{mlabel}_W")
        if not np.any(b_new):
            return mlabel
        # MatMul has no bias input: add one after it. The new Add takes over the MatMul's output tensor.
        out = mm.outputs[0]
        base = mm.name or out.name
        mid = gs.Variable(self.unique(f"{base}_nobias"), dtype=out.dtype, shape=out.shape)
        add = gs.Node("Add", self.unique(f"{base}_bias_add"), attrs={"broadcast": 1} if self.opset < 7 else {},
                      inputs=[mid, gs.Constant(self.unique(f"{base}_bias"), b_new)], outputs=[])
        mm.outputs[0] = mid
        add.outputs.append(out)
        self.insert_after(graph, mm, add)
        return f"{mlabel}+{add.name}"

    # ---------------------------------------------------------------- consumers
    def _fold_into_consumer(self, graph, q: gs.Node, affine, *, rank: int | None) -> str:
        label = _node_label(q)
        if q.op == "Conv":
            w = self._weight(q, 1, "weight")
            b = self._optional(q, 2, "bias")
            groups = int(q.attrs.get("group", 1))
            b = self._vector_bias(b, w.shape[0], label)
            kernel = w.shape[2:]
            dil = q.attrs.get("dilations", [1] * len(kernel))
            pads = list(q.attrs.get("pads", [0] * 2 * len(kernel)))
            auto_pad = q.attrs.get("auto_pad", "NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            # SAME_* pads (k-1)*d+1 - stride-aligned remainder: never anything for a kernel extent of 1.
            extent_one = all((k - 1) * d == 0 for k, d in zip(kernel, dil))
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                padded = not extent_one
            else:
                padded = auto_pad != "VALID" and any(pads)
            if padded:
                raise _Skip("consumer_padded", f"{label} zero-pads its input: the padded zeros would not see the "
                            "BatchNorm shift, so a forward fold would not be exact")
            affine = self._channels(affine, w.shape[1] * groups, label)
            w_new, b_new = formula.fold_forward(w, b, affine, layout="out_in", groups=groups)
            w_new, b_new = self._cast([(w_new, w.dtype, "weight"), (b_new, w.dtype, "bias")], label)
            self.set_input(q, 1, w_new, f"{label}_W")
            self.set_input(q, 2, b_new, f"{label}_B")
            return label
        if q.op == "Gemm":
            if int(q.attrs.get("transA", 0)):
                raise _Skip("channel_axis_mismatch", f"{label} has transA=1: the BatchNorm channels are its rows")
            w = self._weight(q, 1, "weight (B)")
            c = self._optional(q, 2, "bias (C)")
            trans_b = int(q.attrs.get("transB", 0))
            self._gemm_bias(c, w.shape[0] if trans_b else w.shape[1], label)
            alpha = float(q.attrs.get("alpha", 1.0))
            beta = float(q.attrs.get("beta", 1.0))
            affine = self._channels(affine, w.shape[1] if trans_b else w.shape[0], label)
            w_new, delta = formula.fold_forward(w, None, affine, layout="out_in" if trans_b else "in_out")
            c_new = alpha * delta + (0.0 if c is None else beta * np.asarray(c, np.float64))
            w_new, c_new = self._cast([(w_new, w.dtype, "weight"), (c_new, w.dtype, "bias")], label)
            self.set_input(q, 1, w_new, f"{label}_B")
            self.set_input(q, 2, c_new, f"{label}_C")
            q.attrs["beta"] = 1.0
            return label
        # MatMul
        w = self._weight(q, 1, "weight")
        if w.ndim != 2:
            raise _Skip("channel_axis_mismatch", f"{label} weight is {w.ndim}-D")
        if rank is None:
            raise _Skip("unknown_rank", f"the rank of {label}'s input is unknown; the channel axis cannot be checked")
        if rank != 2:
            raise _Skip("channel_axis_mismatch", f"the BatchNorm channel axis (1) is not {label}'s contraction "
                        f"axis ({rank - 1}) of its {rank}-D input")
        affine = self._channels(affine, w.shape[0], label)
        w_new, delta = formula.fold_forward(w, None, affine, layout="in_out")
        out = q.outputs[0]
        nxt = out.outputs[0] if len(out.outputs) == 1 and id(out) not in self.all_outputs else None
        if nxt is not None and self.in_graph(nxt, graph) and self._matmul_add(nxt) is not None and self._matmul_add(nxt)[0] is q:
            bidx = self._matmul_add(nxt)[1]
            bias = np.asarray(self.const(nxt.inputs[bidx]), np.float64)
            b_new = bias + delta
            w_new, b_new = self._cast([(w_new, w.dtype, "weight"), (b_new, w.dtype, "bias")], label)
            self.set_input(q, 1, w_new, f"{label}_W")
            self.set_input(nxt, bidx, b_new, f"{label}_bias")
            return f"{label}+{_node_label(nxt)}"
        w_new, b_new = self._cast([(w_new, w.dtype, "weight"), (delta, w.dtype, "bias")], label)
        self.set_input(q, 1, w_new, f"{label}_W")
        if not np.any(b_new):
            return label
        base = q.name or out.name
        mid = gs.Variable(self.unique(f"{base}_nobias"), dtype=out.dtype, shape=out.shape)
        add = gs.Node("Add", self.unique(f"{base}_bias_add"), attrs={"broadcast": 1} if self.opset < 7 else {},
                      inputs=[mid, gs.Constant(self.unique(f"{base}_bias"), b_new)], outputs=[])
        q.outputs[0] = mid
        add.outputs.append(out)
        self.insert_after(graph, q, add)
        return f"{label}+{add.name}"

    # ---------------------------------------------------------------- export
    def export(self) -> onnx.ModelProto:
        for graph in self.graphs:
            graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
        # Large constants go through onnx-graphsurgeon as data-less stubs and are written into the output once,
        # tensor by tensor (a new weight's array is freed as soon as it is written): the fold holds the source
        # model plus about one copy of the weights, instead of three.
        payload: dict[str, object] = {}
        owners: dict[str, set[int]] = {}
        for graph in self.graphs:
            for t in graph.tensors().values():
                if isinstance(t, gs.Constant) and t.name:
                    owners.setdefault(t.name, set()).add(id(t))
        for graph in self.graphs:
            for t in graph.tensors().values():
                # a name two different constants share (sibling subgraphs may each hold their own 'W') is
                # left to graphsurgeon: the payload is keyed by name
                if isinstance(t, gs.Constant) and t.name and t.name not in payload and len(owners[t.name]) == 1:
                    stub = _stub(t)
                    if stub is not None:
                        payload[t.name] = t._values.tensor if isinstance(t._values, LazyValues) else t._values
                        t._values = LazyValues(stub)
        out = gs.export_onnx(self.root, do_type_check=False)
        remaining: dict[str, int] = {}
        for graph_proto in _walk_graphs(out.graph):
            for init in graph_proto.initializer:
                remaining[init.name] = remaining.get(init.name, 0) + 1
        for graph_proto in _walk_graphs(out.graph):
            for init in graph_proto.initializer:
                data = payload.get(init.name)
                if data is None:
                    continue
                remaining[init.name] -= 1
                if remaining[init.name] == 0:
                    del payload[init.name]  # the last copy: free a new weight's array right away
                if isinstance(data, onnx.TensorProto):
                    init.CopyFrom(data)
                else:
                    init.raw_data = np.ascontiguousarray(data).tobytes()
                del data
        src = self.model
        _copy_node_metadata(src, out)
        out.ir_version = src.ir_version
        del out.opset_import[:]
        out.opset_import.extend(src.opset_import)
        for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            setattr(out, field, getattr(src, field))
        del out.functions[:]
        out.functions.extend(src.functions)
        del out.metadata_props[:]
        out.metadata_props.extend(p for p in src.metadata_props if p.key != METADATA_KEY)
        # Old IR (< 4) lists initializers among the graph inputs: keep those that still exist, in order, and
        # list the initializers the fold created too.
        inits = {t.name: t for t in out.graph.initializer}
        present = {i.name for i in out.graph.input}
        missing = [vi for vi in src.graph.input if vi.name in inits and vi.name not in present]
        if missing:
            order = {vi.name: k for k, vi in enumerate(src.graph.input)}
            new_inputs = list(out.graph.input) + missing
            new_inputs.sort(key=lambda vi: order.get(vi.name, len(order)))
            del out.graph.input[:]
            out.graph.input.extend(new_inputs)
        if src.ir_version < 4:
            present = {i.name for i in out.graph.input}
            for name, t in inits.items():
                if name not in present:
                    out.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        return out


_STUB_MIN_BYTES = 1024


def _raise_if_malformed(model: onnx.ModelProto, name: str) -> None:
    from bnfold.check import checker_error

    err = checker_error(model)
    if err is not None:
        raise BnfoldError(f"{name or 'model'}: not a valid ONNX model ({err[:300]}); fix or re-export it")
    for node in _walk_nodes(model.graph):  # nor check that string attributes are text
        for a in node.attribute:
            for raw in ([a.s] if a.type == onnx.AttributeProto.STRING else list(a.strings)):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise BnfoldError(f"{name or 'model'}: attribute '{a.name}' of node '{node.name or node.op_type}' "
                                      "is not valid UTF-8 text; the file is corrupted") from None
    for graph in _walk_graphs(model.graph):  # the checker does not compare tensor data with its dims
        for t in graph.initializer:
            try:
                numpy_helper.to_array(t)
            except Exception as exc:
                raise BnfoldError(f"{name or 'model'}: initializer '{t.name}' is corrupted ({str(exc)[:200]}); "
                                  "fix or re-export the model") from None


def _stub(t: gs.Constant) -> onnx.TensorProto | None:
    """A data-less TensorProto with ``t``'s name, dims and dtype, for a constant worth not copying."""
    v = t._values
    if isinstance(v, LazyValues):
        src = v.tensor
        if not isinstance(src, onnx.TensorProto) or src.data_location == onnx.TensorProto.EXTERNAL \
                or len(src.raw_data) < _STUB_MIN_BYTES:
            return None
        return _empty_tensor(t.name, src.data_type, list(src.dims))
    arr = np.asarray(v)
    if arr.nbytes < _STUB_MIN_BYTES or arr.dtype.byteorder == ">":
        return None
    try:
        dtype = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
    except (KeyError, ValueError, TypeError):
        return None
    return _empty_tensor(t.name, dtype, list(arr.shape))


def _empty_tensor(name: str, data_type: int, dims: list[int]) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name = name
    t.data_type = data_type
    t.dims.extend(dims)
    return t


def _walk_graphs(graph: onnx.GraphProto):
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.HasField("g"):
                yield from _walk_graphs(a.g)
            for g in a.graphs:
                yield from _walk_graphs(g)


def _walk_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.HasField("g"):
                yield from _walk_nodes(a.g)
            for g in a.graphs:
                yield from _walk_nodes(g)


def _copy_node_metadata(src: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """onnx-graphsurgeon drops nodes' metadata_props (where exporters record source layers): copy them back,
    matching nodes by name, else by first output."""
    by_name, by_output = {}, {}
    for n in _walk_nodes(src.graph):
        if n.metadata_props:
            if n.name:
                by_name[n.name] = n.metadata_props
            if n.output:
                by_output[n.output[0]] = n.metadata_props
    if not by_name and not by_output:
        return
    for n in _walk_nodes(out.graph):
        if n.metadata_props:
            continue
        props = by_name.get(n.name) if n.name else None
        if props is None and n.output:
            props = by_output.get(n.output[0])
        if props is not None:
            n.metadata_props.extend(props)


def _index(items, item) -> int:
    return next(i for i, x in enumerate(items) if x is item)


def _source_layers(model: onnx.ModelProto) -> dict[str, str]:
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
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for g in a.graphs:
                    walk(g)

    walk(model.graph)
    return layers


def _evaluate(node: gs.Node, inputs: list, opset: int) -> list:
    """Evaluate one node on constant inputs with onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)]
    attrs = {}
    for k, v in node.attrs.items():
        if isinstance(v, gs.Constant):
            v = numpy_helper.from_array(np.asarray(v.values), k)
        attrs[k] = v
    outs = [f"o{k}" for k in range(len(node.outputs))]
    proto = onnx.helper.make_node(node.op, names, outs, **attrs)
    feeds = {n: v for n, v in zip(names, inputs) if n}
    ev = ReferenceEvaluator(onnx.helper.make_model(
        onnx.helper.make_graph([proto], "eval", [], [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in outs]),
        opset_imports=[onnx.helper.make_opsetid("", opset)]))
    return [np.asarray(r) for r in ev.run(None, feeds)]


def fold_model(model: onnx.ModelProto, options: FoldOptions | None = None, *,
               dry_run: bool = False, name: str = "") -> tuple[onnx.ModelProto | None, FoldReport]:
    """Fold the BatchNorms of ``model``. Returns ``(folded_model, report)``; the folded model is None for a
    dry run. ``model`` itself is never modified. Raises :class:`BnfoldError` on invalid statistics or a
    malformed model."""
    options = options or FoldOptions()
    try:
        folder = _Folder(model, options)
    except BnfoldError:
        raise
    except Exception as exc:
        _raise_if_malformed(model, name)
        raise BnfoldError(f"{name or 'model'}: cannot read the graph ({type(exc).__name__}: {exc})") from None
    try:
        folder.run()
        report = FoldReport(entries=folder.entries, model=name, dry_run=dry_run)
        if dry_run:
            return None, report
        out = folder.export()
    except BnfoldError:
        raise
    except Exception:
        # A malformed model (which onnx.checker rejects) is bad input, reported as such; on a valid model an
        # unexpected exception is a bug in bnfold and propagates.
        _raise_if_malformed(model, name)
        raise
    meta = {"version": __version__, "bn_total": report.bn_total, "folded": report.folded,
            "skipped": report.skipped, "affine_folded": report.affine_folded,
            "entries": [{k: v for k, v in (("bn", e.bn), ("status", e.status), ("into", e.into),
                                           ("direction", e.direction), ("reason", e.reason), ("layer", e.layer),
                                           ("into_layer", e.into_layer)) if v is not None}
                        for e in report.entries]}
    out.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta, separators=(",", ":")))
    return out, report


def materialize_params(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace weights and biases of Conv/ConvTranspose/Gemm/MatMul that the graph computes from constants
    (torch's dynamo exporter builds a zero bias for every bias-less conv at run time when ``optimize=False``)
    with initializers, dropping all-zero conv biases. BatchNorms are left alone. Returns the new model and the
    number of inputs rewritten. This gives runtimes the same constants for an original and its folded model,
    so that their own Conv+BN fusion can apply and latency comparisons are fair."""
    folder = _Folder(model, FoldOptions())
    changed = 0
    for graph in folder.graphs:
        for node in list(graph.nodes):
            if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or (node.domain or "") not in ("", "ai.onnx"):
                continue
            for idx in range(1, min(len(node.inputs), 3)):
                t = node.inputs[idx]
                if isinstance(t, gs.Constant) or not t.name:
                    continue
                value = folder.const(t)
                if value is None:
                    continue
                if idx == 2 and node.op in ("Conv", "ConvTranspose") and not np.any(np.asarray(value, np.float64)):
                    node.inputs.pop()  # an all-zero bias is no bias
                else:
                    node.inputs[idx] = gs.Constant(folder.unique(f"{t.name}_const"), value)
                changed += 1
    return folder.export(), changed


def inspect_model(model: onnx.ModelProto, options: FoldOptions | None = None, *, name: str = "") -> FoldReport:
    """What :func:`fold_model` would do to each BatchNorm, without changing anything."""
    return fold_model(model, options, dry_run=True, name=name)[1]


def count_bn(model: onnx.ModelProto) -> int:
    """Number of BatchNormalization nodes, subgraphs included."""
    def walk(g):
        n = 0
        for node in g.node:
            n += node.op_type == "BatchNormalization"
            for a in node.attribute:
                if a.HasField("g"):
                    n += walk(a.g)
                for sg in a.graphs:
                    n += walk(sg)
        return n
    return walk(model.graph) + sum(n.op_type == "BatchNormalization" for f in model.functions for n in f.node)
