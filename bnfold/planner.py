"""Plan, then apply.

:func:`plan` visits every BatchNormalization (and, with ``affine_chains``, every Mul/Add/Sub/Div) in graph order,
main graph first, then every subgraph, and asks the rules (:mod:`bnfold.rules`) what to do with it: fold it
backward into its producer, else forward into its consumer, else lower it (on request), else skip it with a reason.
With ``merge_branches``, every Add/Sub/Sum whose
branches are each affine in one tensor (convs, BNs left standing, identity, per-channel constants) becomes one
Conv (:mod:`bnfold.rules.branch_merge`): the largest branch conv, which then writes the sum, so a BN after it
folds into it backward and a later sum can merge it again. Planning changes nothing; it is what ``inspect`` and
``--dry-run`` show. Rules see the plan so far, so a second BN
on the same layer (``Conv -> BN -> BN``, ``Conv -> Mul -> Add``, ``BN -> Conv -> BN``) composes with the first in
float64, and the layer is rounded to its dtype once.

:func:`apply` carries a plan out on the very ModelProto it was made from, in place: it rewires the touched nodes,
rewrites the touched initializers (in place when the layer is their only user, else as a private copy), inserts
the few new nodes (a MatMul's bias Add, lowering's Mul+Add), and removes what became unused because of the fold
(the BN, its parameters, the constant chains that computed a replaced parameter). Everything else (unknown
attributes, types, functions, metadata, training_info, doc strings, node order) is left as it was.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from bnfold import formula, protofile
from bnfold.graph import (
    Binding,
    ModelGraph,
    NodeKey,
    NotConst,
    is_default_domain,
    is_float_dtype,
    source_layers,
)
from bnfold.report import FoldEntry, FoldReport
from bnfold.rules import (
    affine_chain,
    branch_merge,
    concat_backward,
    conv_forward,
    gemm_forward,
    layers,
    lower,
    reshape_backward,
)
from bnfold.rules.base import BIAS_ADD, Context, Match, Skip, not_const_skip

log = logging.getLogger(__name__)

_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}
FORWARD_OPS = ("Conv", "Gemm", "MatMul", "Flatten")


@dataclass
class PlanOptions:
    forward: bool = True
    affine_chains: bool = True
    lower_standalone: bool = False
    merge_branches: bool = True


@dataclass
class Step:
    entry: FoldEntry
    match: Match | None = None
    #: a BatchNorm left in place: (its input, its affine map), which a branch merge may still take in
    standalone: tuple | None = None


@dataclass
class Plan:
    """What :func:`apply` will do, BatchNorm by BatchNorm (``steps``), with the computed parameters."""

    graph: ModelGraph
    context: Context
    steps: list[Step] = field(default_factory=list)

    @property
    def entries(self) -> list[FoldEntry]:
        return [s.entry for s in self.steps]

    def report(self, *, name: str = "", dry_run: bool = False) -> FoldReport:
        return FoldReport(entries=self.entries, model=name, dry_run=dry_run)


# ================================================================================================ planning
def plan(model: onnx.ModelProto, options=None) -> Plan:
    """Decide, for every BatchNorm (and per-channel affine op), what the fold will do. Changes nothing."""
    options = options or PlanOptions()
    mg = ModelGraph(model)
    ctx = Context(mg)
    result = Plan(mg, ctx)
    src_layers = source_layers(model)
    # the ops a step may start at (every other node is only read, by the rules)
    sites = {"BatchNormalization"} | (set(affine_chain.OPS) if options.affine_chains else set()) \
        | (set(branch_merge.OPS) if options.merge_branches else set())
    for g in mg.graphs:
        gname = mg.graph_name(g.index)
        for i, node in enumerate(g.nodes):
            op = node.op_type
            if op not in sites:
                continue
            key = NodeKey(g.index, i)
            if key in ctx.removed or not is_default_domain(node):
                continue
            if op == "BatchNormalization":
                step = _plan_bn(ctx, key, options, gname)
            else:
                step = None
                if op in affine_chain.OPS and options.affine_chains:
                    step = _plan_affine(ctx, key, gname)
                if step is None and op in branch_merge.OPS and options.merge_branches:
                    step = _plan_merge(ctx, key, gname, result, src_layers)
                if step is None:
                    continue
            if step.standalone is not None:
                ctx.standalone[key] = (*step.standalone, len(result.steps))
            if src_layers:  # (exporter metadata: most models have none)
                step.entry.layer = src_layers.get(node.output[0]) if node.output else None
                if step.match is not None and step.match.into_node is not None:
                    into = mg.node(step.match.into_node)
                    step.entry.into_layer = src_layers.get(into.output[0]) if into.output else None
            result.steps.append(step)
    for fn in model.functions:
        for n in fn.node:
            if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx"):
                result.steps.append(Step(FoldEntry(
                    bn=f"{fn.name}/{n.name or n.output[0]}", status="skipped", reason="inside_function",
                    message=f"inside model-local function '{fn.name}', which bnfold does not rewrite", graph=fn.name)))
    return result


def _commit(ctx: Context, match: Match) -> None:
    """Check the new values fit their dtype (raises Skip), then record the match in the plan so far."""
    for a in match.absorbs:
        label = ctx.mg.label(a.node)
        for slot, p in a.params.items():
            p.check_cast(f"{label} {'weight' if slot == 1 else 'bias'}")
    for a in match.absorbs:
        for slot, p in a.params.items():
            ctx.params[(a.node, slot)] = p
        if a.attrs:
            ctx.attrs.setdefault(a.node, {}).update(a.attrs)
    ctx.removed.update(match.remove)
    for key, slot, name in match.set_input:
        ctx.inputs[(key, slot)] = name
    if match.produced is not None:
        ctx.producers[match.produced[0]] = match.produced[1]


def _plan_bn(ctx: Context, key: NodeKey, options, gname: str) -> Step:
    mg = ctx.mg
    label = mg.label(key)
    node = mg.node(key)

    def skip(code, message):
        return Step(FoldEntry(bn=label, status="skipped", reason=code, message=message, graph=gname))

    a = mg.attrs(key)
    if int(a.get("training_mode", 0)) == 1:
        return skip("training_mode", "training_mode=1: it normalises with batch statistics; re-export the model in "
                    "eval mode")
    if ctx.opset < 7 and int(a.get("is_test", 0)) == 0:
        return skip("training_mode", "is_test=0 (opset < 7): the node is declared in training mode")
    if len(node.output) > 1 and any(o for o in node.output[1:]):
        return skip("extra_outputs", "it outputs running/saved statistics: only an inference-mode "
                    "BatchNormalization with one output can be folded")
    if int(a.get("spatial", 1)) == 0:
        return skip("spatial_disabled", "spatial=0: statistics are per channel and position, not a per-channel "
                    "affine map")
    if len(node.input) < 5 or not node.input[0]:
        return skip("non_constant_parameters", "malformed node: fewer than 5 inputs")
    values, missing = [], []
    inputs = node.input
    for slot, what in zip(range(1, 5), ("scale", "B", "mean", "var")):
        name = inputs[slot]  # (mg.input_binding: five inputs, checked above)
        v = mg.const(mg.resolve(key.graph, name) if name else None)
        if isinstance(v, NotConst):
            missing.append((what, v))
        values.append(v)
    if missing:
        s = not_const_skip(missing[0][1], ", ".join(w for w, _ in missing), weight=False)
        return skip(s.code, s.message)
    if not all(is_float_dtype(v.dtype) for v in values):
        return skip("unsupported_dtype", "parameters are not floating point")
    gamma, beta, mean, var = values
    affine = formula.bn_affine(gamma, beta, mean, var, float(a.get("epsilon", 1e-5)), name=label)
    x, y = mg.input_binding(key, 0), mg.output_binding(key, 0)
    if x is None or y is None:
        return skip("no_foldable_neighbour", "the input or output is not bound")
    tried: list[Skip] = []
    attempts = [("backward", lambda: _backward(ctx, key, x, y, affine, channel_axis=1))]
    if options.forward:
        attempts.append(("forward", lambda: _forward(ctx, key, x, y, affine)))
    if options.lower_standalone:
        attempts.append(("lowered", lambda: lower.match(ctx, key, x, y, affine)))
    for direction, attempt in attempts:
        try:
            m = attempt()
            _commit(ctx, m)
        except Skip as s:
            tried.append(s)
            continue
        msg = f"no foldable neighbour; lowered to {m.into}" if direction == "lowered" else \
            f"folded {direction} into {m.into}"
        return Step(FoldEntry(bn=label, status="folded", into=m.into, direction=direction, message=msg,
                              graph=gname), m)
    informative = [s for s in tried if s.applicable]
    if informative:
        step = skip(informative[0].code, informative[0].message)
    else:
        p = mg.producer(x)
        prod = mg.node(p[0]).op_type if p is not None else "a graph input"
        cons = ", ".join(sorted({mg.graphs[u.graph].nodes[u.node].op_type for u in mg.real_uses(y)
                                 if u.node is not None})) or "a graph output"
        step = skip("no_foldable_neighbour", f"produced by {prod} and consumed by {cons}; neither can absorb it")
    step.standalone = (x, affine)
    return step


def _plan_affine(ctx: Context, key: NodeKey, gname: str) -> Step | None:
    found = affine_chain.affine_of(ctx, key)
    if found is None:
        return None
    x, axis, aff = found
    mg = ctx.mg
    label, op = mg.label(key), mg.node(key).op_type
    y = mg.output_binding(key)
    try:
        m = _backward(ctx, key, x, y, aff, channel_axis=axis)
        _commit(ctx, m)
    except Skip as s:
        return Step(FoldEntry(bn=label, status="skipped", reason=s.code, message=s.message, op=op, graph=gname))
    return Step(FoldEntry(bn=label, status="folded", into=m.into, direction="backward",
                          message=f"per-channel {op} by a constant folded into {m.into}", op=op, graph=gname), m)


def _plan_merge(ctx: Context, key: NodeKey, gname: str, result: Plan, src_layers: dict) -> Step | None:
    """An Add/Sub/Sum of branches that are each affine in one tensor: merged into one Conv, or refused (an
    entry either way), or not a merge candidate (None: left alone, not reported)."""
    form = branch_merge.candidate(ctx, key)
    if form is None:
        return None
    mg = ctx.mg
    label, op = mg.label(key), mg.node(key).op_type
    try:
        m, bns, message = branch_merge.match(ctx, key, form)
        _commit(ctx, m)
    except Skip as s:
        if not s.applicable:
            return None
        return Step(FoldEntry(bn=label, status="skipped", reason=s.code, message=s.message, op=op, graph=gname,
                              direction="merged"))
    for r in m.remove:  # convs merged away: their planned parameters are not written
        for slot in (1, 2):
            ctx.params.pop((r, slot), None)
        ctx.attrs.pop(r, None)
    host_out = mg.node(m.into_node).output[0]
    for bn in bns:
        _, _, idx = ctx.standalone.pop(bn)
        e = result.steps[idx].entry
        e.status, e.reason, e.direction, e.into = "folded", None, "merged", m.into
        e.into_layer = src_layers.get(host_out)
        e.message = f"identity branch merged (by {label}) into {m.into}"
    return Step(FoldEntry(bn=label, status="folded", into=m.into, direction="merged", message=message, op=op,
                          graph=gname), m)


def _backward(ctx: Context, site: NodeKey, x: Binding, y: Binding, affine, *, channel_axis: int) -> Match:
    mg = ctx.mg
    if x.graph != site.graph:
        raise Skip("no_foldable_neighbour", "its input comes from an enclosing graph", applicable=False)
    p = ctx.producer(x)
    if p is None:
        raise Skip("no_foldable_neighbour", "input is a graph input", applicable=False)
    pkey, pslot = p
    pnode = mg.node(pkey)
    special = pnode.op_type in ("Concat", "Reshape", "Transpose") and is_default_domain(pnode)
    mod = None if special else layers.module_for(ctx, pkey)
    if not special and mod is None:
        raise Skip("no_foldable_neighbour", f"producer {pnode.op_type} cannot absorb it", applicable=False)
    if len(mg.real_uses(x)) != 1:
        raise Skip("producer_output_shared", f"the output of {mg.label(pkey)} is also used elsewhere (or is a graph "
                   "output); folding would change what the other users see")
    if pnode.op_type == "Concat":
        return concat_backward.match(ctx, pkey, site, x, y, affine, mg.rank(x), out_slot=pslot)
    if pnode.op_type in reshape_backward.OPS:
        return reshape_backward.match(ctx, pkey, site, x, y, affine, out_slot=pslot)
    rank = mg.rank(x) if pnode.op_type in ("MatMul", "Add") else None
    absorbs, into = layers.absorb_backward(ctx, pkey, affine, channel_axis=channel_axis, rank=rank, mod=mod)
    rule = mod.__name__.rsplit(".", 1)[-1]
    return Match(rule, "backward", into, pkey if pnode.op_type != "Add" else absorbs[0].node,
                 absorbs=absorbs, remove=[site], set_output=[(pkey, pslot, y.name)], redirect_dtype=(x, y.name),
                 produced=(y, (pkey, pslot)))


def _forward(ctx: Context, site: NodeKey, x: Binding, y: Binding, affine) -> Match:
    mg = ctx.mg
    uses = mg.real_uses(y)

    def foldable(u):
        if u.node is None or u.graph != y.graph:
            return False
        n = mg.graphs[u.graph].nodes[u.node]
        return n.op_type in FORWARD_OPS and is_default_domain(n)
    if not any(foldable(u) for u in uses):
        raise Skip("no_foldable_neighbour", "no consumer can absorb it", applicable=False)
    if len(uses) != 1 or not foldable(uses[0]):
        raise Skip("consumer_output_shared", "its output has several consumers or is a graph output, so it cannot "
                   "fold forward")
    q = NodeKey(uses[0].graph, uses[0].node)
    if q in ctx.removed:
        raise Skip("no_foldable_neighbour", "its consumer is folded away", applicable=False)
    op = ctx.op(q)
    if uses[0].slot != 0:
        raise Skip("channel_axis_mismatch", f"it feeds the weight/bias of {op}, not its data input")
    if op == "Flatten":
        axis = int(ctx.attr(q, "axis", 1))
        if axis < 0:
            r = mg.rank(x)
            axis = axis + r if r is not None else axis
        if axis != 1:
            raise Skip("channel_axis_mismatch", f"{mg.label(q)} flattens from axis {axis}, not 1")
        z = mg.output_binding(q)
        zuses = mg.real_uses(z) if z is not None else []
        if not zuses or not all(foldable(u) and mg.graphs[u.graph].nodes[u.node].op_type in ("Gemm", "MatMul")
                                for u in zuses):
            raise Skip("no_foldable_neighbour", f"{mg.label(q)} does not feed a Gemm or MatMul", applicable=False)
        if len(zuses) != 1:
            raise Skip("consumer_output_shared", f"the output of {mg.label(q)} has several consumers")
        q2 = NodeKey(zuses[0].graph, zuses[0].node)
        if zuses[0].slot != 0:
            raise Skip("channel_axis_mismatch", f"{mg.label(q)} feeds the weight of {ctx.op(q2)}")
        absorbs, into = gemm_forward.absorb(ctx, q2, affine, flattened=True)
        into_node, rule = q2, "gemm_forward"
    elif op == "Conv":
        absorbs, into = conv_forward.absorb(ctx, q, affine)
        into_node, rule = q, "conv_forward"
    else:
        absorbs, into = gemm_forward.absorb(ctx, q, affine, rank=mg.rank(x) if op == "MatMul" else None)
        into_node, rule = q, "gemm_forward"
    return Match(rule, "forward", into, into_node, absorbs=absorbs, remove=[site],
                 set_input=[(q, 0, x.name)], redirect_dtype=(y, x.name))


# ================================================================================================ applying
class _Editor:
    def __init__(self, plan_: Plan):
        self.mg = plan_.graph
        self.ctx = plan_.context
        self.delta: dict[Binding, int] = {}  #: uses added (+) or removed (-) so far, per tensor
        self.candidates: set[Binding] = set()
        self.removed: set[NodeKey] = set()
        self.inserts: dict[NodeKey, list] = defaultdict(list)
        self.touched_graphs: set[int] = set()
        self.written: set[Binding] = set()
        self.legacy_inputs = self.mg.ir_version < 4

    def uses_left(self, b: Binding) -> int:
        return len(self.mg.uses.get(b, ())) + self.delta.get(b, 0)

    def dec(self, graph: int, name: str) -> None:
        b = self.mg.resolve(graph, name) if name else None
        if b is not None:
            self.delta[b] = self.delta.get(b, 0) - 1
            self.candidates.add(b)

    def inc(self, graph: int, name: str) -> None:
        b = self.mg.resolve(graph, name) if name else None
        if b is not None:
            self.delta[b] = self.delta.get(b, 0) + 1

    def set_input(self, key: NodeKey, slot: int, name: str) -> None:
        n = self.mg.node(key)
        while len(n.input) <= slot:
            n.input.append("")
        self.dec(key.graph, n.input[slot])
        n.input[slot] = name
        self.inc(key.graph, name)

    def add_initializer(self, graph: int, name: str, arr: np.ndarray | protofile.Computed) -> None:
        g = self.mg.graphs[graph]
        t = g.proto.initializer.add()
        t.CopyFrom(_tensor(arr, name))
        if self.legacy_inputs and graph == 0:
            g.proto.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))

    def write_param(self, key: NodeKey, slot: int, arr: np.ndarray | protofile.Computed, base: str) -> None:
        mg = self.mg
        n = mg.node(key)
        old = n.input[slot] if slot < len(n.input) else ""
        b = mg.resolve(key.graph, old) if old else None
        if b is not None and b not in self.written and old in mg.graphs[b.graph].inits \
                and not mg.is_overridable(b) and self.uses_left(b) == 1:
            t = mg.graphs[b.graph].inits[old]
            doc = t.doc_string
            meta = [onnx.StringStringEntryProto(key=e.key, value=e.value) for e in t.metadata_props] \
                if len(t.metadata_props) else None
            protofile.set_tensor(t, arr, old)  # (as t.CopyFrom(_tensor(arr, old)))
            t.doc_string = doc  # (set even when empty, as always: the written bytes do not change)
            if meta:
                t.metadata_props.extend(meta)
            self.written.add(b)
            if self.legacy_inputs and b.graph == 0:
                for vi in mg.graphs[0].proto.input:
                    if vi.name == old:
                        vi.CopyFrom(helper.make_tensor_value_info(old, t.data_type, list(t.dims)))
            return
        name = mg.unique(f"{old or base}_bnfold")
        self.add_initializer(key.graph, name, arr)
        self.set_input(key, slot, name)

    def remove_dead(self) -> None:
        mg = self.mg
        drop_inits: dict[int, set[str]] = defaultdict(set)
        queue = list(self.candidates)
        while queue:
            b = queue.pop()
            if self.uses_left(b) > 0:
                continue
            g = mg.graphs[b.graph]
            if b.name in g.inits:
                if b.name in g.inputs and (not self.legacy_inputs or b.graph != 0):
                    continue  # a graph input: never changed
                drop_inits[b.graph].add(b.name)
                continue
            p = mg.producer(b)
            if p is None or p[0] in self.removed:
                continue
            key = p[0]
            n = mg.node(key)
            if b.name not in n.output or not is_default_domain(n) or n.op_type in _NONDETERMINISTIC \
                    or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                continue
            if any(o and self.uses_left(Binding(key.graph, o)) > 0 for o in n.output):
                continue
            self.removed.add(key)
            self.touched_graphs.add(key.graph)
            for i in n.input:
                if i:
                    self.dec(key.graph, i)
                    queue.append(mg.resolve(key.graph, i))
        for gi, names in drop_inits.items():
            proto = mg.graphs[gi].proto
            # a stable sort moves the dropped ones to the end, in order, then one cut: deleting them one by one
            # moved the rest of the list each time (quadratic in a model with thousands of BNs)
            inits = proto.initializer
            n = len(inits) - sum(1 for t in inits if t.name in names)
            inits.sort(key=lambda t: t.name in names)
            del inits[n:]
            if self.legacy_inputs and gi == 0:
                for idx in reversed([k for k, vi in enumerate(proto.input) if vi.name in names]):
                    del proto.input[idx]

    def rebuild_nodes(self) -> None:
        # innermost graphs first (a subgraph's index is larger than its parent's): rebuilding a graph copies its
        # nodes, subgraph attributes included, so the subgraphs must be final by then
        for gi in sorted(self.touched_graphs, reverse=True):
            g = self.mg.graphs[gi]
            new = []
            for i, n in enumerate(g.nodes):
                key = NodeKey(gi, i)
                if key not in self.removed:
                    new.append(n)
                new.extend(self.inserts.get(key, ()))
            del g.proto.node[:]
            g.proto.node.extend(new)


def _tensor(arr: np.ndarray | protofile.Computed, name: str) -> onnx.TensorProto:
    # from_array, or a reference to the array or recipe while a file is folded (bnfold.protofile)
    return protofile.new_tensor(arr, name)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    new = helper.make_attribute(name, value)
    for a in node.attribute:
        if a.name == name:
            a.CopyFrom(new)
            return
    node.attribute.append(new)


def apply(plan_: Plan, *, materialize=None) -> None:
    """Carry out ``plan_`` on the ModelProto it was made from, in place. ``materialize(graph, node, slot, param,
    what)``, when given, may return the array to write for a folded parameter (e.g. rounded straight to a
    reduced-precision dtype, :mod:`bnfold.precision`); None keeps the default (the model's dtype), written from
    its recipe (:meth:`bnfold.rules.base.Param.recipe`: computed when the file is written, one tensor at a
    time, inside :func:`bnfold.protofile.deferred_tensors`)."""
    mg, ctx = plan_.graph, plan_.context
    ed = _Editor(plan_)
    lazy = protofile.deferring()  # new tensors are references now: their values are computed when written
    for step in plan_.steps:
        m = step.match
        if m is None:
            continue
        for key, slot, name in m.set_output:
            mg.node(key).output[slot] = name
        for key, slot, name in m.set_input:
            ed.set_input(key, slot, name)
        if m.redirect_dtype is not None:
            old, new = m.redirect_dtype
            for u in mg.dtype_uses(old):
                ed.set_input(NodeKey(u.graph, u.node), u.slot, new)
        for key in m.remove:
            for i in mg.node(key).input:
                ed.dec(key.graph, i)
            ed.removed.add(key)
            ed.touched_graphs.add(key.graph)
        for anchor, node, consts in m.new_nodes:
            ed.inserts[anchor].append(node)
            for name, arr in consts.items():
                ed.add_initializer(anchor.graph, name, arr)
            for i in node.input:
                ed.inc(anchor.graph, i)
    for (key, slot), p in ctx.params.items():
        n = mg.node(key)
        label = mg.label(key)
        what = f"{label} {'weight' if slot == 1 else 'bias'}"
        arr = None if materialize is None else materialize(mg, key, slot, p, what)
        if slot == BIAS_ADD:
            if arr is None:
                arr = p.materialize(what)  # a vector: whether it is all zero decides the Add
            if not np.any(arr):
                continue
            add_name, mid = ctx.bias_add_names.get(key) or (mg.unique(f"{n.name or n.output[0]}_bias_add"),
                                                            mg.unique(f"{n.name or n.output[0]}_nobias"))
            bias = mg.unique(f"{n.name or n.output[0]}_bias")
            out = n.output[0]
            n.output[0] = mid
            attrs = {"broadcast": 1} if mg.opset < 7 else {}
            ed.inserts[key].append(helper.make_node("Add", [mid, bias], [out], name=add_name, **attrs))
            ed.add_initializer(key.graph, bias, arr)
            ed.touched_graphs.add(key.graph)
            continue
        base = f"{label}_W" if slot == 1 else f"{label}_B"
        if arr is None:
            arr = p.recipe(what) if lazy else p.materialize(what)
        ed.write_param(key, slot, arr, base)
    for key, attrs in ctx.attrs.items():
        for name, value in attrs.items():
            _set_attr(mg.node(key), name, value)
    ed.remove_dead()
    ed.rebuild_nodes()
