"""Branch merge: an ``Add``/``Sub``/``Sum`` whose operands are each an affine function of the same tensor ``x``
becomes one Conv (RepVGG, MobileOne, RepViT, FastViT's RepMixer, RepGhost).

The algebra, not the names: every operand is resolved into a linear form of ``x``
``sum_i coef_i * Conv_i(x) + a * x + c`` (``coef``, ``a``, ``c`` per channel), walking down through

* ``Conv`` nodes (with the parameters the plan has given them so far, so a conv's own BN is already in it),
* ``BatchNormalization`` nodes that nothing else could absorb (``a = scale``, ``c = shift``),
* per-channel ``Mul``/``Add``/``Sub``/``Div`` by a constant (the scale/shift of the sub-form),
* nested ``Add``/``Sub``/``Sum`` of non-constant operands,

each of whose outputs must be read by the tree alone. A tensor reached otherwise is ``x`` itself (identity).
The whole form is one convolution of ``x`` when every conv reads ``x`` with the same stride, its taps fit in the
window of the largest conv (dilations and pads aligned: a smaller kernel sits zero-padded inside the largest),
and all produce the same output size; the identity part (``a * x``) needs stride 1, a window that contains the
centre tap and as many output as input channels. The merged conv takes the largest conv's window and the gcd of
the groups (a grouped kernel inside a dense one is exact: the other blocks are zero). Kernels and biases are
summed in float64 and rounded once, when the plan is applied; the largest conv (the first, on a tie) becomes the
merged conv and writes the Add's output, so a BatchNorm after the Add then folds into it backward.

Refused (nothing changed, reason code in :data:`bnfold.report.REASONS`): ``branch_strides_differ``,
``branch_dilations_differ``, ``branch_pads_misaligned``, ``branch_inputs_differ`` (two or more operands are
convs/BNs of unrelated tensors; a residual ``conv(h) + x`` or ``conv(h) + conv(x)`` with ``h`` computed from ``x``
is a block with a shortcut, not parallel branches, and is neither merged nor reported),
``branch_output_shared``, ``channel_count_mismatch``, and the parameter codes (a conv whose weight is not a
constant, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bnfold.graph import Binding, NodeKey, NotConst, is_default_domain, is_float_dtype

from .base import Absorb, Context, Match, Param, Skip

NAME = "branch_merge"
OPS = ("Add", "Sub", "Sum")
_AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
_MAX_DEPTH = 64


@dataclass
class _Conv:
    node: NodeKey
    x: Binding
    coef: np.ndarray  #: per output channel (or a scalar)


@dataclass
class _Ident:
    x: Binding
    scale: np.ndarray  #: per channel (or a scalar)
    via: list = field(default_factory=list)  #: labels of the nodes on the way (BN, Mul, ...)


@dataclass
class _Form:
    convs: list = field(default_factory=list)
    idents: list = field(default_factory=list)
    shift: np.ndarray = field(default_factory=lambda: np.zeros(1))
    remove: list = field(default_factory=list)  #: intermediate nodes (not convs) the merge deletes
    bns: list = field(default_factory=list)  #: standalone BatchNorms taken in
    shared: list = field(default_factory=list)  #: labels of branch outputs also read elsewhere

    def scaled(self, v: np.ndarray) -> _Form:
        return _Form([_Conv(c.node, c.x, _mul(c.coef, v)) for c in self.convs],
                     [_Ident(i.x, _mul(i.scale, v), i.via) for i in self.idents], _mul(self.shift, v),
                     self.remove, self.bns, self.shared)

    def plus(self, other: _Form) -> _Form:
        return _Form(self.convs + other.convs, self.idents + other.idents, _add(self.shift, other.shift),
                     self.remove + other.remove, self.bns + other.bns, self.shared + other.shared)


def _add(a, b):
    a, b = _same(a, b)
    return a + b


def _mul(a, b):
    a, b = _same(a, b)
    return a * b


def _same(a, b):
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    if a.size == 1 or b.size == 1 or a.shape == b.shape:
        return a, b
    raise Skip("channel_count_mismatch", f"per-channel values for {a.size} and {b.size} channels meet in one sum")


def _vec(v, m: int, what: str) -> np.ndarray:
    v = np.asarray(v, np.float64).reshape(-1)
    if v.size == 1:
        return np.full(m, v[0])
    if v.size != m:
        raise Skip("channel_count_mismatch", f"{what} has {v.size} channels, the merged convolution {m}")
    return v


def _only_use(ctx: Context, b: Binding) -> bool:
    return len(ctx.mg.real_uses(b)) == 1 and not ctx.mg.dtype_uses(b)


def _channel_vector(ctx: Context, c: np.ndarray, b: Binding) -> np.ndarray | None:
    """A constant operand as one value per channel of ``b`` (axis 1), or None when it broadcasts otherwise."""
    if not is_float_dtype(c.dtype):
        return None
    if c.size == 1:
        return np.asarray(c, np.float64).reshape(1)
    rank = ctx.mg.rank(b)
    if rank is None or c.ndim > rank or rank < 2:
        return None
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return np.asarray(c, np.float64).reshape(-1)


def _resolve(ctx: Context, b: Binding, graph: int, depth: int = 0) -> _Form:
    """The linear form of tensor ``b`` (read by the tree only, checked by the caller)."""
    mg = ctx.mg
    p = ctx.producer(b)
    plain = _Form(idents=[_Ident(b, np.ones(1))])
    if p is None or p[0].graph != graph or depth > _MAX_DEPTH:
        return plain
    key, _ = p
    node = mg.node(key)
    if not is_default_domain(node):
        return plain
    op = node.op_type
    sole = _only_use(ctx, b)
    if op == "Conv":
        x = ctx.input(key, 0)
        if x is None:
            return plain
        if not sole:
            return _shared(mg.label(key), b, x)
        return _Form(convs=[_Conv(key, x, np.ones(1))])
    if op == "BatchNormalization" and key in ctx.standalone:
        x, aff, _ = ctx.standalone[key]
        if not sole:
            return _shared(mg.label(key), b, x)
        inner = _resolve_operand(ctx, x, graph, depth)
        form = inner.scaled(aff.scale)
        form.shift = _add(form.shift, aff.shift)
        form.remove = form.remove + [key]
        form.bns = form.bns + [key]
        for i in form.idents:
            i.via = i.via + [mg.label(key)]
        return form
    ins = [mg.resolve(key.graph, n) if n else None for n in node.input]
    if op in _AFFINE_OPS and len(ins) == 2 and None not in ins and len(node.output) == 1:
        values = [ctx.const(i) for i in ins]
        is_c = [not isinstance(v, NotConst) for v in values]
        if is_c[0] != is_c[1]:
            xi = 1 if is_c[0] else 0
            vec = _channel_vector(ctx, np.asarray(values[1 - xi]), b)
            if vec is None or (op == "Div" and (xi != 0 or np.any(vec == 0))) or ctx.opset < 7:
                return plain
            if not sole:
                return _shared(mg.label(key), b, ins[xi])
            inner = _resolve_operand(ctx, ins[xi], graph, depth)
            if op == "Mul":
                form = inner.scaled(vec)
            elif op == "Div":
                form = inner.scaled(1.0 / vec)
            elif op == "Add":
                form = inner.scaled(np.ones(1))
                form.shift = _add(form.shift, vec)
            elif xi == 0:  # Sub(x, c)
                form = inner.scaled(np.ones(1))
                form.shift = _add(form.shift, -vec)
            else:  # Sub(c, x)
                form = inner.scaled(-np.ones(1))
                form.shift = _add(form.shift, vec)
            form.remove = form.remove + [key]
            for i in form.idents:
                i.via = i.via + [mg.label(key)]
            return form
        if not any(is_c) and op in ("Add", "Sub"):
            if not sole:
                return _shared(mg.label(key), b, None)
            return _combine(ctx, key, ins, op, graph, depth)
    if op == "Sum" and ins and None not in ins and len(node.output) == 1:
        if any(not isinstance(ctx.const(i), NotConst) for i in ins):
            return plain
        if not sole:
            return _shared(mg.label(key), b, None)
        return _combine(ctx, key, ins, op, graph, depth)
    return plain


def _shared(label: str, b: Binding, x: Binding | None) -> _Form:
    """A node (a conv, BN or per-channel op of ``x``) whose output ``b`` is also read elsewhere: plain ``b``,
    noted. When other branches read ``x`` it is a branch read elsewhere, and the merge is refused; otherwise
    ``b`` is just a tensor (the merge's input, or an unrelated one: a residual)."""
    return _Form(idents=[_Ident(b, np.ones(1))], shared=[(label, b, x)])


def _resolve_operand(ctx: Context, b: Binding, graph: int, depth: int) -> _Form:
    return _resolve(ctx, b, graph, depth + 1)


def _combine(ctx: Context, key: NodeKey, ins: list, op: str, graph: int, depth: int) -> _Form:
    form = _Form()
    for k, b in enumerate(ins):
        sub = _resolve_operand(ctx, b, graph, depth)
        form = form.plus(sub.scaled(-np.ones(1)) if op == "Sub" and k == 1 else sub)
    form.remove = form.remove + [key]
    return form


# ---------------------------------------------------------------------------------------------- geometry
@dataclass
class _Geo:
    node: NodeKey | None
    kernel: tuple
    strides: tuple
    dilations: tuple
    begin: tuple
    end: tuple

    def taps(self, dim: int) -> list[int]:
        """Input offsets (relative to output position times stride) read along spatial ``dim``."""
        return [-self.begin[dim] + j * self.dilations[dim] for j in range(self.kernel[dim])]

    def extent(self, dim: int) -> int:
        return self.begin[dim] + self.end[dim] - (self.kernel[dim] - 1) * self.dilations[dim]

    def span(self) -> int:
        return math.prod((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))


def _geometry(ctx: Context, key: NodeKey, wshape: tuple) -> _Geo:
    label = ctx.mg.label(key)
    nd = len(wshape) - 2
    kernel = tuple(int(k) for k in wshape[2:])
    strides = tuple(int(s) for s in (ctx.attr(key, "strides", None) or [1] * nd))
    dil = tuple(int(d) for d in (ctx.attr(key, "dilations", None) or [1] * nd))
    auto_pad = ctx.attr(key, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID", ""):
        raise Skip("branch_pads_misaligned", f"{label} pads with auto_pad={auto_pad}, whose pads depend on the input "
                   "size: the branches' alignment cannot be proved")
    pads = [0] * 2 * nd if auto_pad == "VALID" else [int(p) for p in (ctx.attr(key, "pads", None) or [0] * 2 * nd)]
    if len(strides) != nd or len(dil) != nd or len(pads) != 2 * nd:
        raise Skip("channel_axis_mismatch", f"{label} has attributes for another number of spatial dimensions")
    return _Geo(key, kernel, strides, dil, tuple(pads[:nd]), tuple(pads[nd:]))


def _fit(host: _Geo, leaf: _Geo, dim: int) -> tuple[int, int] | None:
    """(first tap index in the host's window, index step) where ``leaf``'s taps along ``dim`` sit, or None."""
    taps = leaf.taps(dim)
    d = host.dilations[dim]
    first = taps[0] + host.begin[dim]
    step = (leaf.dilations[dim] if len(taps) > 1 else d)
    if first % d or step % d:
        return None
    first, step = first // d, step // d
    last = first + step * (len(taps) - 1)
    if first < 0 or last > host.kernel[dim] - 1:
        return None
    return first, step


# ---------------------------------------------------------------------------------------------- the rule
def candidate(ctx: Context, key: NodeKey) -> _Form | None:
    """The linear form of the Add/Sub/Sum ``key`` when it is a branch merge candidate (worth an entry), else
    None (a residual ``conv(h) + x``, an Add of two unrelated tensors, an Add with a constant: not reported)."""
    mg = ctx.mg
    node = mg.node(key)
    if not is_default_domain(node) or len(node.output) != 1 or not node.output[0]:
        return None
    ins = [mg.resolve(key.graph, n) if n else None for n in node.input]
    if not ins or None in ins or (node.op_type != "Sum" and len(ins) != 2):
        return None
    if any(not isinstance(ctx.const(i), NotConst) for i in ins):
        return None
    try:
        form = _combine(ctx, key, ins, node.op_type, key.graph, 0)
    except Skip:
        return None
    if not form.convs:
        return None
    inputs = {c.x for c in form.convs} | {i.x for i in form.idents if i.via}
    form.shared = [(label, b, x) for label, b, x in form.shared if x is not None and x in inputs]
    shared = {b for _, b, _ in form.shared}
    groups: dict[Binding, int] = {}
    for c in form.convs:
        groups[c.x] = groups.get(c.x, 0) + 1
    for i in form.idents:
        groups[i.x] = groups.get(i.x, 0) + bool(i.via or i.x in shared)
    structured = [x for x, n in groups.items() if n]
    if len(groups) > 1 and len(structured) < 2:
        return None
    branch_inputs = [x for x in structured if x not in shared]
    if len(branch_inputs) > 1:
        up = {b: _ancestors(ctx, b) for b in branch_inputs}
        if any(a in up[b] for a in branch_inputs for b in branch_inputs if a != b):
            return None  # one branch's input is computed from another's: a block with a projection shortcut
            # (ResNet's downsample), not parallel branches: not a candidate, not reported
    return form


def _ancestors(ctx: Context, b: Binding, limit: int = 2000) -> set[Binding]:
    """Tensors (of ``b``'s graph) that ``b`` is computed from, up to ``limit`` of them."""
    mg = ctx.mg
    seen: set[Binding] = set()
    todo = [b]
    while todo and len(seen) < limit:
        p = mg.producer(todo.pop())
        if p is None:
            continue
        for name in mg.node(p[0]).input:
            a = mg.resolve(p[0].graph, name) if name else None
            if a is not None and a.graph == b.graph and a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def match(ctx: Context, key: NodeKey, form: _Form) -> tuple[Match, list[NodeKey], str]:
    """Merge the candidate ``key`` (its form from :func:`candidate`): the match, the standalone BNs it takes
    in and a message naming the branches. Raises :class:`Skip` when the merge would not be exact."""
    mg = ctx.mg
    label = mg.label(key)
    xs = {c.x for c in form.convs} | {i.x for i in form.idents}
    if form.shared:
        raise Skip("branch_output_shared", f"the output of {', '.join(n for n, _, _ in form.shared)} (a branch of {label}) is also "
                   "read elsewhere (another node or a graph output): merging would change what it sees")
    if len(xs) > 1:
        raise Skip("branch_inputs_differ", f"the branches of {label} read different tensors "
                   f"({', '.join(sorted(repr(x.name) for x in xs))}): their sum is not one function of one input")
    if not form.convs:
        raise Skip("no_foldable_neighbour", f"{label} has no convolution branch", applicable=False)
    if len({c.node for c in form.convs}) != len(form.convs):
        raise Skip("branch_output_shared", f"a convolution is read twice by {label}")
    (x,) = xs
    weights, biases, geos = [], [], []
    for c in form.convs:
        w = ctx.param(c.node, 1, "weight")
        b = ctx.param(c.node, 2, "bias", optional=True)
        if len(w.shape) < 3:
            raise Skip("channel_axis_mismatch", f"the weight of {mg.label(c.node)} has {len(w.shape)} dimensions")
        weights.append(w)
        biases.append(b)
        geos.append(_geometry(ctx, c.node, tuple(w.shape)))
    ranks = {len(w.shape) for w in weights}
    if len(ranks) != 1:
        raise Skip("channel_axis_mismatch", f"the branches of {label} convolve over different numbers of axes")
    dtypes = {w.dtype for w in weights}
    if len(dtypes) != 1:
        raise Skip("unsupported_dtype", f"the convolutions of {label} have different dtypes ({sorted(map(str, dtypes))})")
    outs = {w.shape[0] for w in weights}
    groups = [int(ctx.attr(c.node, "group", 1)) for c in form.convs]
    ins = {w.shape[1] * g for w, g in zip(weights, groups)}
    if len(outs) != 1 or len(ins) != 1:
        raise Skip("channel_count_mismatch", f"the convolutions of {label} have different channel counts "
                   f"(outputs {sorted(outs)}, inputs {sorted(ins)})")
    (m,), (cin,) = outs, ins
    if any(m % g for g in groups):
        raise Skip("channel_count_mismatch", f"{m} output channels do not split into the groups of {label}'s branches")
    nd = len(weights[0].shape) - 2
    strides = {g.strides for g in geos}
    if len(strides) != 1:
        raise Skip("branch_strides_differ", f"the branches of {label} have different strides {sorted(strides)}")
    ident = [i for i in form.idents]
    if ident:
        if next(iter(strides)) != (1,) * nd:
            raise Skip("branch_strides_differ", f"{label} adds its input to a convolution of stride "
                       f"{next(iter(strides))}: an identity branch needs stride 1")
        if m != cin:
            raise Skip("channel_count_mismatch", f"{label} adds its {cin}-channel input to {m}-channel convolutions")
        geos_all = geos + [_Geo(None, (1,) * nd, (1,) * nd, (1,) * nd, (0,) * nd, (0,) * nd)]
    else:
        geos_all = list(geos)
    order = sorted(range(len(geos)), key=lambda i: (-geos[i].span(), i))
    # the host: the first conv (largest window first) whose window holds every branch's taps
    host_i = next((i for i in order if all(_fit(geos[i], g, d) is not None for g in geos_all for d in range(nd))),
                  order[0])
    host = geos[host_i]
    for g in geos_all:
        who = "the identity branch" if g.node is None else mg.label(g.node)
        for dim in range(nd):
            if g.extent(dim) != host.extent(dim):
                raise Skip("branch_pads_misaligned", f"{who} and {mg.label(host.node)} produce outputs of different "
                           f"sizes along spatial axis {dim} (pads do not centre the kernels)")
            if _fit(host, g, dim) is None:
                if g.kernel[dim] > 1 and g.dilations[dim] != host.dilations[dim]:
                    raise Skip("branch_dilations_differ", f"{who} (dilation {g.dilations[dim]}) does not fit the window "
                               f"of {mg.label(host.node)} (dilation {host.dilations[dim]}) along spatial axis {dim}")
                raise Skip("branch_pads_misaligned", f"the pads of {who} shift its taps off the window of "
                           f"{mg.label(host.node)} along spatial axis {dim}: the outputs are not aligned")
    big = 0
    for g in groups:
        big = math.gcd(big, g)
    cg = cin // big  # input channels per group of the merged conv
    mg_ = m // big
    kw = np.zeros((m, cg) + host.kernel)
    bias = np.zeros(m)
    for c, w, b, g, geo in zip(form.convs, weights, biases, groups, geos):
        coef = _vec(c.coef, m, f"the scale of {mg.label(c.node)}")
        win = tuple(slice(f, f + s * (k - 1) + 1, s) for f, s, k in
                    ((*_fit(host, geo, d), geo.kernel[d]) for d in range(nd)))
        w64 = w.f64()
        mo, ci = m // g, cin // g
        for r in range(g):
            rows = slice(r * mo, (r + 1) * mo)
            off = r * ci - ((r * mo) // mg_) * cg
            kw[(rows, slice(off, off + ci)) + win] += coef[rows].reshape((-1,) + (1,) * (nd + 1)) * w64[rows]
        if b is not None:
            if b.shape != (m,):
                if np.any(b.f64()):
                    raise Skip("channel_count_mismatch", f"the bias of {mg.label(c.node)} has shape {b.shape}")
            else:
                bias += coef * b.f64()
    if ident:
        a = np.zeros(m)
        for i in ident:
            a = a + _vec(i.scale, m, "the identity branch")
        centre = tuple(_fit(host, geos_all[-1], d)[0] for d in range(nd))
        ch = np.arange(m)
        kw[(ch, ch - (ch // mg_) * cg) + centre] += a
    bias = bias + _vec(form.shift, m, f"a per-channel constant in {label}'s branches")
    hkey = form.convs[host_i].node
    dtype = weights[host_i].dtype
    attrs = {}
    if big != groups[host_i]:
        attrs["group"] = big
    absorb = Absorb(hkey, {1: Param(dtype, value=kw), 2: Param(dtype, value=bias)}, attrs)
    y = mg.output_binding(key)
    hout = _current_output(ctx, hkey)
    remove = [key] + [c.node for c in form.convs if c.node != hkey] + form.remove
    seen, uniq = set(), []
    for r in remove:
        if r not in seen:
            seen.add(r)
            uniq.append(r)
    parts = []
    for c, geo in zip(form.convs, geos):
        k = "x".join(map(str, geo.kernel))
        grp = int(ctx.attr(c.node, "group", 1))
        parts.append(f"{mg.label(c.node)} ({k}{', groups ' + str(grp) if grp != 1 else ''})")
    for i in ident:
        parts.append("identity" + (f" via {'/'.join(i.via)}" if i.via else ""))
    into = mg.label(hkey)
    msg = f"{len(parts)} branches merged into {into}: " + ", ".join(parts)
    m_ = Match(NAME, "merged", into, hkey, absorbs=[absorb], remove=uniq,
               set_output=[(hkey, 0, y.name)], redirect_dtype=(hout, y.name) if hout is not None else None,
               produced=(y, (hkey, 0)))
    return m_, list(form.bns), msg


def _current_output(ctx: Context, key: NodeKey) -> Binding | None:
    """The tensor conv ``key`` writes as planned so far (its own output, or the last BN output it took over)."""
    out = ctx.mg.output_binding(key)
    for b, (k, slot) in ctx.producers.items():
        if k == key and slot == 0:
            out = b
    return out
