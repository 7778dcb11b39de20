"""The PyTorch front end: fold the BatchNorms of any ``nn.Module`` at module level.

The dataflow comes from a trace: ``torch.export`` (non-strict), falling back to ``torch.fx`` symbolic tracing
(with conv/linear/BN as leaf modules). Every call of a conv/linear/BN module becomes a *call*: the trace nodes
inside that module call, its one data input and its one output. A BN call folds

* backward into the call that produced its input, when that is a Conv/ConvTranspose (any dims, any groups) or a
  Linear whose output is 2-D, nothing else uses that output, the layer module is called once and its
  parameters are not tied to another module;
* forward into the call that consumes its output otherwise: a Linear on a 2-D input, or a Conv that reads no
  padding.

Folding rewrites the layer's weight and bias (float64 math, one cast) and replaces the BN module by
``nn.Identity``; the model's own classes and every other parameter name are kept. The caller's model is not
modified unless ``inplace=True``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from bnfold import formula
from bnfold.errors import BnfoldError
from bnfold.report import FoldEntry, FoldReport

log = logging.getLogger(__name__)

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _kind(module: nn.Module) -> str | None:
    """'conv', 'conv_t', 'linear', 'bn', 'frozen_bn', 'bn_subclass' or None. Exact types only: a subclass may
    do more than its base (timm's BatchNormAct2d applies an activation inside)."""
    t = type(module)
    if t in CONV:
        return "conv"
    if t in CONV_T:
        return "conv_t"
    if t is nn.Linear:
        return "linear"
    if t in PLAIN_BN:
        return "bn"
    # a subclass that computes exactly what its base computes (torchvision's Conv3DSimple: only __init__)
    for bases, kind in ((CONV, "conv"), (CONV_T, "conv_t"), ((nn.Linear,), "linear"), (PLAIN_BN, "bn")):
        base = next((b for b in bases if isinstance(module, b)), None)
        if base is not None and _inherits_compute(t, base):
            return kind
    if t.__name__ == "FrozenBatchNorm2d" and all(
            isinstance(getattr(module, k, None), torch.Tensor) for k in ("weight", "bias", "running_mean", "running_var")):
        # torchvision.ops.FrozenBatchNorm2d: a BN with frozen statistics (buffers only)
        if t.__module__.startswith("torchvision.") or t.forward.__qualname__.startswith("FrozenBatchNorm2d"):
            return "frozen_bn"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn_subclass"
    if _bn_like_with_children(module):
        return "bn_subclass"  # timm's FrozenBatchNormAct2d: BN statistics as buffers, then drop/act children
    return None


def _bn_like_with_children(module: nn.Module) -> bool:
    """A module that is not a torch BatchNorm but carries a BN's statistics, affine parameters and eps as its own
    attributes, and has child modules (the work it may do after normalising): a candidate for the
    BN-then-tail fold, which then checks what its forward does."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return False  # InstanceNorm and kin: not BatchNorms
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if not (isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and mean.dim() == 1
            and var.shape == mean.shape):
        return False
    if not all(getattr(module, k, None) is None or (isinstance(getattr(module, k), torch.Tensor)
                                                    and getattr(module, k).shape == mean.shape)
               for k in ("weight", "bias")):
        return False
    return isinstance(getattr(module, "eps", None), (int, float)) and next(module.children(), None) is not None


_COMPUTE = ("forward", "_conv_forward", "_output_padding", "_check_input_dim", "__call__", "_call_impl")


def _inherits_compute(t: type, base: type) -> bool:
    """Whether class ``t`` (a subclass of ``base``) overrides nothing that takes part in the forward pass."""
    return all(getattr(t, name, None) is getattr(base, name, None) for name in _COMPUTE)


def is_batchnorm(module: nn.Module) -> bool:
    return _kind(module) in ("bn", "frozen_bn", "bn_subclass")


@dataclass
class _Call:
    fqn: str
    kind: str
    key: str
    nodes: list = field(default_factory=list)
    data_in: list = field(default_factory=list)  # fx nodes outside the call feeding it data
    outputs: list = field(default_factory=list)  # fx nodes of the call used outside it

    @property
    def node_set(self):
        return set(self.nodes)


@dataclass
class TorchFoldResult:
    """A folded module, its report, and where each original parameter/buffer went."""

    module: nn.Module
    report: FoldReport
    param_map: dict[str, list[str]]
    tracer: str


def _check_bn_modules(model: nn.Module) -> None:
    for name, m in model.named_modules():
        k = _kind(m)
        if k not in ("bn", "bn_subclass"):
            continue
        if m.training:
            raise BnfoldError(f"BatchNorm '{name}' is in training mode: call model.eval() first")
        if not getattr(m, "track_running_stats", True) or m.running_mean is None or m.running_var is None:
            raise BnfoldError(
                f"BatchNorm '{name}' has no running statistics (track_running_stats=False): it normalises with "
                "batch statistics at inference too, so it cannot be folded; recalibrate it with running "
                "statistics (bnfold calibrate) first")


# ------------------------------------------------------------------------------------------------ tracing
def _trace_export(model: nn.Module, example_inputs: tuple, kinds: dict[str, str]):
    ep = torch.export.export(model, example_inputs, strict=False)
    sig = ep.graph_signature
    non_data = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(
        getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    calls: dict[str, _Call] = {}
    order: list[_Call] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        hit = None
        for key, (fqn, _t) in stack.items():  # outermost to innermost: keep the innermost module of interest
            if fqn in kinds:
                hit = (key, fqn)
        if hit is None:
            continue
        key, fqn = hit
        if key not in calls:
            calls[key] = _Call(fqn=fqn, kind=kinds[fqn], key=key)
            order.append(calls[key])
        calls[key].nodes.append(node)

    def is_data(n):
        return isinstance(n, fx.Node) and not (n.op == "placeholder" and n.name in non_data) and n.op != "get_attr"

    for call in order:
        s = call.node_set
        for n in call.nodes:
            for a in n.all_input_nodes:
                if a not in s and is_data(a) and a not in call.data_in:
                    call.data_in.append(a)
            if any(u not in s for u in n.users):
                call.outputs.append(n)
    targets = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    param_users = {targets[n.name]: list(n.users) for n in ep.graph.nodes
                   if n.op == "placeholder" and n.name in targets}
    return ep.graph, order, param_users


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m, qualname):
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def _trace_fx(model: nn.Module, example_inputs: tuple, kinds: dict[str, str]):
    tracer = _LeafTracer(set(kinds))
    graph = tracer.trace(model)
    gm = fx.GraphModule(model, graph)
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(*example_inputs)
    order, seen = [], {}
    param_users: dict[str, list] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":  # leaf modules read their own parameters inside the call: any get_attr is outside
            param_users.setdefault(str(node.target), []).extend(node.users)
        if node.op == "call_module" and node.target in kinds:
            seen[node.target] = seen.get(node.target, 0) + 1
            key = node.target if seen[node.target] == 1 else f"{node.target}@{seen[node.target] - 1}"
            data = [a for a in node.all_input_nodes if a.op != "get_attr"]
            order.append(_Call(fqn=node.target, kind=kinds[node.target], key=key, nodes=[node], data_in=data,
                               outputs=[node]))
    return gm.graph, order, param_users


def _rank(node) -> int | None:
    val = node.meta.get("val")
    if val is None:
        tm = node.meta.get("tensor_meta")
        return len(tm.shape) if tm is not None and hasattr(tm, "shape") else None
    return val.dim() if hasattr(val, "dim") else None


# ------------------------------------------------------------------------------------------------ folding
class _Skip(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


def _tied(model: nn.Module, fqn: str) -> str | None:
    """Another module sharing a parameter of module ``fqn``, if any."""
    module = model.get_submodule(fqn)
    own = {id(p) for p in module.parameters(recurse=False)}
    for name, m in model.named_modules(remove_duplicate=False):
        if name == fqn or m is module:
            continue
        if any(id(p) in own for p in m.parameters(recurse=False)):
            return name
    return None


def _bn_affine_of(bn: nn.Module, name: str) -> formula.Affine:
    def arr(t):
        return None if t is None else t.detach().to("cpu", torch.float64).numpy()
    weight = getattr(bn, "weight", None)
    bias = getattr(bn, "bias", None)
    eps = getattr(bn, "eps", None)
    if eps is None:  # a frozen BN that keeps no eps (maskrcnn-benchmark's uses none at all): read its map
        return _probe_affine(bn, name)
    return formula.bn_affine(arr(weight), arr(bias), arr(bn.running_mean), arr(bn.running_var), float(eps),
                             name=name)


def _probe_affine(bn: nn.Module, name: str) -> formula.Affine:
    """The per-channel affine map a frozen BN module computes, read from its forward in float64: shift = f(0),
    scale = f(1) - f(0), then checked on random inputs; a module that is not such a map is skipped."""
    c = int(bn.running_mean.shape[0])
    try:
        m = copy.deepcopy(bn).to("cpu", torch.float64).eval()
        with torch.no_grad():
            zero = m(torch.zeros(1, c, 1, 1, dtype=torch.float64)).reshape(c)
            one = m(torch.ones(1, c, 1, 1, dtype=torch.float64)).reshape(c)
            scale, shift = one - zero, zero
            x = torch.randn(2, c, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            y = m(x)
    except Exception as exc:
        raise _Skip("unknown_eps", f"the module has no eps attribute and its forward could not be read as a "
                    f"per-channel affine map ({type(exc).__name__}: {str(exc)[:100]})") from None
    expect = x * scale.reshape(1, c, 1, 1) + shift.reshape(1, c, 1, 1)
    if y.shape != x.shape or not torch.allclose(y, expect, rtol=1e-12, atol=1e-12 * float(expect.abs().max() + 1)):
        raise _Skip("unknown_eps", "the module has no eps attribute and its forward is not a per-channel affine "
                    "map of its input")
    if not (torch.isfinite(scale).all() and torch.isfinite(shift).all()):
        raise _Skip("unknown_eps", f"BatchNorm '{name}' computes non-finite scales (no eps attribute)")
    return formula.Affine(scale.numpy().copy(), shift.numpy().copy())


def _to_param_dtype(values: np.ndarray, like: torch.Tensor, what: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(values)).to(dtype=like.dtype)
    finite_in = torch.from_numpy(np.isfinite(values))
    if bool((finite_in & ~torch.isfinite(t.double())).any()):
        raise _Skip("cast_overflow", f"{what}: a folded value overflows {like.dtype}")
    return t.to(like.device)


def _apply(model: nn.Module, folds: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Write each layer's folded weight and bias; every value is cast (and checked) before the first write, so a
    cast overflow leaves every layer as it was."""
    cast = []
    for layer_fqn, w_new, b_new in folds:
        layer = model.get_submodule(layer_fqn)
        w = layer.weight
        cast.append((layer, _to_param_dtype(w_new, w, f"{layer_fqn}.weight"),
                     _to_param_dtype(b_new, w, f"{layer_fqn}.bias")))
    with torch.no_grad():
        for layer, w_t, b_t in cast:
            layer.weight.copy_(w_t)
            if layer.bias is None:
                layer.bias = nn.Parameter(b_t, requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.copy_(b_t)


@dataclass
class _Plan:
    """A fold: the layers that absorb the BN (one, or several whose outputs a channel concat joins) and the
    name shown as where it went (``into_layer``: that layer, or the module that concatenates)."""

    folds: list[tuple[str, np.ndarray, np.ndarray]]
    into_layer: str

    @property
    def layers(self) -> list[str]:
        return [f for f, _, _ in self.folds]


def _replace_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _replace_with_identity(model: nn.Module, fqn: str) -> None:
    _replace_module(model, fqn, nn.Identity())


# ------------------------------------------------------------------------------------------------ BN + tail
@dataclass
class _Tail:
    """What a BN subclass computes after normalising, as a module of its own children (timm's BatchNormAct2d:
    ``drop`` then ``act``): it replaces the BN module once the BN's affine map is folded."""

    module: nn.Module
    names: list[str]
    identity: bool  # passes its input through unchanged in eval mode: a forward fold is possible too


def _is_eval_identity(m: nn.Module) -> bool:
    return not _has_hooks(m) and (type(m) is nn.Identity or (
        isinstance(m, nn.modules.dropout._DropoutNd) and not m.training))


def _tail_module(module: nn.Module, names: list[str]) -> nn.Module:
    from collections import OrderedDict
    children = dict(module.named_children())
    if all(type(children[n]) is nn.Identity and not _has_hooks(children[n]) for n in names):
        return nn.Identity()
    return nn.Sequential(OrderedDict((n, children[n]) for n in names))


def _plan_tail(model, bn_name: str, module: nn.Module, call: _Call, affine: formula.Affine, param_users) -> _Tail:
    """Whether the BN subclass ``module`` computes ``tail(BatchNorm(x))`` with ``tail`` its child modules applied
    in order, and nothing else: decided from its traced forward (the normalisation reads the input and the BN's
    own parameters; each child reads only the previous step's output; nothing follows the last child) and
    checked on random inputs in float64. Raises :class:`_Skip` (``not_plain_batchnorm``) otherwise."""
    cls = type(module).__qualname__
    names = [n for n, _ in module.named_children()]
    bad = [n for n in names if _kind(getattr(module, n)) is not None]
    if bad:
        raise _Skip("not_plain_batchnorm", f"{cls} holds a conv/linear/BatchNorm child ({bad[0]}): not a "
                    "normalisation followed by parameter-free work")
    if any("nn_module_stack" in n.meta for n in call.nodes):  # torch.export: the forward's own steps are visible
        _check_tail_structure(bn_name, module, call, names, param_users)
    _check_tail_numerically(bn_name, module, names, affine, _shape(call.data_in[0]))
    return _Tail(module=_tail_module(module, names), names=names,
                 identity=all(_is_eval_identity(getattr(module, n)) for n in names))


def _child_of(bn_name: str, node) -> str | None:
    """The direct child of module ``bn_name`` whose call computed ``node`` (None: the module's own code)."""
    prefix = bn_name + "." if bn_name else ""
    for fqn, _t in (node.meta.get("nn_module_stack") or {}).values():  # outermost first
        if fqn != bn_name and fqn.startswith(prefix):
            return fqn[len(prefix):].split(".")[0]
    return None


def _check_tail_structure(bn_name, module, call: _Call, names, param_users) -> None:
    cls = type(module).__qualname__

    def refuse(what):
        raise _Skip("not_plain_batchnorm", f"{cls}'s forward {what}: only a normalisation followed by its own "
                    "child modules, one after the other, folds")

    x = call.data_in[0]
    inside = call.node_set
    own = [n for n in call.nodes if _child_of(bn_name, n) is None]
    own_set = set(own)
    groups: dict[str, list] = {}
    for n in call.nodes:
        c = _child_of(bn_name, n)
        if c is not None:
            groups.setdefault(c, []).append(n)
    for pname, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        full = f"{bn_name}.{pname}" if bn_name else pname
        if any(u in inside and u not in own_set for u in param_users.get(full, [])):
            refuse(f"reads its BatchNorm parameter '{pname}' inside a child module")
    if any(u in inside and u not in own_set for u in x.users):
        refuse("passes its un-normalised input to a child module")
    if any(a in inside and a not in own_set for n in own for a in n.all_input_nodes):
        refuse("does more of its own work after calling a child module")
    normalised = [n for n in own if any(u not in own_set for u in n.users)]
    if len(normalised) != 1:
        refuse("does not compute one normalised tensor")
    order = list(groups)
    if order != [n for n in names if n in groups]:
        refuse(f"calls its children in another order ({', '.join(order)}) than they are registered")
    prev = normalised[0]
    for name in order:
        g = set(groups[name])
        if any(u not in g for u in prev.users):
            refuse(f"uses an intermediate result outside its child '{name}'")
        feeds = {a for n in g for a in n.all_input_nodes if (a in inside or a is x) and a not in g}
        if feeds != {prev}:
            refuse(f"feeds its child '{name}' more than the previous step's output")
        outs = [n for n in g if any(u not in g for u in n.users)]
        if len(outs) != 1:
            refuse(f"uses several results of its child '{name}'")
        prev = outs[0]
    if call.outputs != [prev]:
        refuse("returns something other than its last child's output")


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        tm = node.meta.get("tensor_meta")
        shape = getattr(tm, "shape", None)
    try:
        return None if shape is None else tuple(int(d) for d in shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def _check_tail_numerically(bn_name, module, names, affine: formula.Affine, shape) -> None:
    """``module(x) == tail(scale * x + shift)`` on random inputs spread like the BN's statistics, in float64."""
    cls = type(module).__qualname__
    c = affine.channels
    if shape is None or len(shape) < 2 or shape[1] != c:
        shape = (2, c, 5, 5) if shape is None or len(shape) < 2 else shape
    if shape[1] != c:
        raise _Skip("not_plain_batchnorm", f"{cls} reads {shape[1]} channels on axis 1 but holds statistics for {c}")
    try:
        m = copy.deepcopy(module).to("cpu", torch.float64).eval()
        tail = _tail_module(m, names).eval()
        view = (1, c) + (1,) * (len(shape) - 2)
        mean = m.running_mean.detach().reshape(view)
        std = (m.running_var.detach().clamp(min=0) + float(m.eps)).sqrt().reshape(view)
        g = torch.Generator().manual_seed(0)
        x = mean + 2 * std * torch.randn(shape, dtype=torch.float64, generator=g)
        scale = torch.from_numpy(affine.scale).reshape(view)
        shift = torch.from_numpy(affine.shift).reshape(view)
        with torch.no_grad():
            got = m(x.clone())
            expect = tail(x * scale + shift)
    except Exception as exc:
        raise _Skip("not_plain_batchnorm", f"{cls}'s forward could not be checked as a normalisation followed by "
                    f"its children ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not isinstance(got, torch.Tensor) or got.shape != expect.shape:
        raise _Skip("not_plain_batchnorm", f"{cls}'s forward does not return its children's output")
    tol = 1e-9 * (1.0 + float((x * scale).abs().max()) + float(shift.abs().max()))
    err = float((got - expect).abs().max()) if got.numel() else 0.0
    if not err <= tol:
        raise _Skip("not_plain_batchnorm", f"{cls}'s forward is not its BatchNorm followed by its children "
                    f"({', '.join(names) or 'none'}): on random inputs they differ by up to {err:.3g}")


def fold_module(model: nn.Module, example_inputs, *, inplace: bool = False, forward: bool = True,
                tracer: str = "auto") -> TorchFoldResult:
    """Fold every BatchNorm of ``model`` that can be folded exactly; return the folded module, the report and
    the map from original parameter/buffer names to where their values went.

    ``example_inputs`` is a tensor or a tuple of tensors used to trace the dataflow. ``tracer`` is
    ``"auto"`` (torch.export, then torch.fx), ``"export"`` or ``"fx"``.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    _check_bn_modules(model)
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as exc:
            raise BnfoldError(f"cannot copy the model to fold it ({type(exc).__name__}: {str(exc)[:200]}); "
                              "fold it in place instead (inplace=True)") from None
    kinds = {name: k for name, m in model.named_modules() if (k := _kind(m)) is not None}
    graph, calls, used, param_users = None, None, None, {}
    errors = []
    for name in (("export", "fx") if tracer == "auto" else (tracer,)):
        try:
            with torch.no_grad():
                graph, calls, param_users = (_trace_export if name == "export" else _trace_fx)(
                    model, example_inputs, kinds)
            used = "torch.export" if name == "export" else "torch.fx"
            break
        except Exception as exc:  # tracing failures are expected for some models: try the next tracer
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(f"{name}: {msg}")
            log.info("tracing with %s failed: %s", name, msg)
    if calls is None:
        raise BnfoldError("cannot trace the model to find its dataflow (" + "; ".join(errors) + "); "
                          "check that it runs on the given --input-shape")

    by_fqn: dict[str, list[_Call]] = {}
    producer_of: dict = {}
    call_of: dict = {}
    for c in calls:
        by_fqn.setdefault(c.fqn, []).append(c)
        for o in c.outputs:
            producer_of[o] = c
        for n in c.nodes:
            call_of[n] = c
    output_nodes = [n for n in graph.nodes if n.op == "output"]
    graph_outputs = set()
    for o in output_nodes:
        graph_outputs.update(o.all_input_nodes)

    entries: list[FoldEntry] = []
    param_map: dict[str, list[str]] = {k: [k] for k in model.state_dict()}
    folded_layers: set[str] = set()
    bn_names = [n for n, k in kinds.items() if k in ("bn", "frozen_bn", "bn_subclass")]

    for bn_name in bn_names:
        module = model.get_submodule(bn_name)
        kind = kinds[bn_name]
        op_name = type(module).__name__

        def skip(code, message, _bn=bn_name, _op=op_name):
            entries.append(FoldEntry(bn=_bn, status="skipped", reason=code, message=message, op=_op, layer=_bn))

        if _has_hooks(module):
            skip("module_has_hooks", "the BatchNorm has forward hooks, which replacing it would drop")
            continue
        elsewhere = _used_elsewhere(bn_name, module, by_fqn, param_users)
        if elsewhere:
            skip("parameters_used_elsewhere", f"its parameter/buffer {elsewhere} is also read outside the module call")
            continue
        bn_calls = by_fqn.get(bn_name, [])
        if not bn_calls:
            skip("not_called", "the module is never called in the traced forward pass")
            continue
        if len(bn_calls) > 1:
            skip("module_reused", f"the BatchNorm module is called {len(bn_calls)} times")
            continue
        call = bn_calls[0]
        if len(call.data_in) != 1 or len(call.outputs) != 1:
            skip("no_foldable_neighbour", "the BatchNorm call does not have exactly one data input and one output")
            continue
        try:
            affine = _bn_affine_of(module, bn_name)
            tail = _plan_tail(model, bn_name, module, call, affine, param_users) if kind == "bn_subclass" else None
        except _Skip as sk:
            skip(sk.code, sk.message)
            continue
        x, y = call.data_in[0], call.outputs[0]
        attempts = []
        for direction in ("backward", "forward"):
            if direction == "forward" and not forward:
                continue
            if direction == "forward" and tail is not None and not tail.identity:
                attempts.append(_Skip("no_foldable_neighbour", f"its {'/'.join(tail.names)} after the "
                                      "normalisation stand(s) between it and any consumer"))
                continue
            try:
                plan = (_plan_backward if direction == "backward" else _plan_forward)(
                    model, call, x, y, affine, by_fqn, producer_of if direction == "backward" else call_of,
                    graph_outputs, param_users)
                _apply(model, plan.folds)
            except _Skip as s:
                attempts.append(s)
                continue
            _replace_module(model, bn_name, nn.Identity() if tail is None else tail.module)
            layers = plan.layers
            folded_layers.update(layers)
            own = {n for n, _ in module.named_parameters(recurse=False)} | {
                n for n, _ in module.named_buffers(recurse=False)}
            for k in list(param_map):
                if k.startswith(bn_name + ".") and k[len(bn_name) + 1:] in own:  # a tail child's keep their names
                    leaf = k[len(bn_name) + 1:]
                    param_map[k] = ([] if leaf == "num_batches_tracked" else
                                    [f"{la}.bias" for la in layers] if leaf in ("bias", "running_mean")
                                    and direction == "backward" else
                                    [f"{la}.{p}" for la in layers for p in ("weight", "bias")])
            into = "+".join(layers)
            message = f"folded {direction} into {into}"
            if len(layers) > 1:
                message += f" (the channel slices of their concat in {plan.into_layer})"
            if tail is not None and tail.names:
                message += (f"; the rest of its forward ({', '.join(tail.names)}) stays as {bn_name} "
                            f"({type(tail.module).__name__})")
            entries.append(FoldEntry(bn=bn_name, status="folded", into=into, direction=direction,
                                     message=message, op=type(module).__name__, layer=bn_name,
                                     into_layer=plan.into_layer))
            break
        else:
            informative = [a for a in attempts if a.code != "no_foldable_neighbour"]
            if informative:
                skip(informative[0].code, informative[0].message)
            else:  # neither direction: say why for both
                skip("no_foldable_neighbour", "; ".join(a.message for a in attempts))
    report = FoldReport(entries=entries, model=type(model).__name__, extra={"tracer": used})
    return TorchFoldResult(module=model, report=report, param_map=param_map, tracer=used)


def _layer_checks(model, layer_call: _Call, by_fqn, role: str, param_users):
    fqn = layer_call.fqn
    module = model.get_submodule(fqn)
    if len(by_fqn.get(fqn, [])) > 1:
        raise _Skip("module_reused", f"the {role} {fqn} is called {len(by_fqn[fqn])} times: folding would change "
                    "its other calls")
    tied = _tied(model, fqn)
    if tied is not None:
        raise _Skip("parameters_tied", f"the parameters of {fqn} are shared with {tied}")
    if _has_hooks(module):
        raise _Skip("module_has_hooks", f"the {role} {fqn} has forward hooks: its call computes more than the "
                    "layer")
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(module):
        raise _Skip("parametrized_weight", f"the weight of {fqn} is computed by a parametrization (e.g. weight "
                    "norm): writing it would be undone")
    elsewhere = _used_elsewhere(fqn, module, by_fqn, param_users)
    if elsewhere:
        raise _Skip("parameters_used_elsewhere", f"{elsewhere} is also read outside the {role}'s call "
                    "(e.g. a functional call): folding would change that use")
    if len(layer_call.nodes) != 1:
        raise _Skip("module_has_hooks", f"the call of {fqn} computes more than its {layer_call.kind}")


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(module, "_forward_hooks_with_kwargs", None))


def _used_elsewhere(fqn: str, module: nn.Module, by_fqn, param_users) -> str | None:
    """A parameter/buffer of ``fqn`` that some node outside the module's own calls reads."""
    inside = {n for c in by_fqn.get(fqn, []) for n in c.nodes}
    for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        full = f"{fqn}.{name}" if fqn else name
        if any(u not in inside for u in param_users.get(full, [])):
            return full
    return None


def _layer_arrays(model: nn.Module, fqn: str):
    """The layer module and its weight and bias as float64 numpy arrays (bias None when absent)."""
    layer = model.get_submodule(fqn)
    w = layer.weight.detach().to("cpu", torch.float64).numpy()
    b = None if layer.bias is None else layer.bias.detach().to("cpu", torch.float64).numpy()
    return layer, w, b


def _plan_backward(model, call, x, y, affine, by_fqn, producer_of, graph_outputs, param_users) -> _Plan:
    prod = producer_of.get(x)
    parts = None if prod is not None else _concat_parts(x, producer_of)
    if parts is None and (prod is None or prod.kind not in ("conv", "conv_t", "linear")):
        raise _Skip("no_foldable_neighbour", "its input does not come straight from a Conv/ConvTranspose/Linear "
                    "(or a channel concat of them)")
    users_outside = [u for u in x.users if u not in call.node_set]
    if users_outside or x in graph_outputs:
        what = prod.fqn if prod is not None else "the concat"
        raise _Skip("producer_output_shared", f"the output of {what} is also used by something besides the "
                    "BatchNorm: folding would change what it sees")
    if parts is None:
        w_new, b_new = _fold_into_producer(model, prod, x, affine, by_fqn, param_users)
        return _Plan([(prod.fqn, w_new, b_new)], prod.fqn)
    # a channel concat of layer outputs (timm's MixedConv2d): each layer absorbs its slice of the channels
    for node, p in parts:
        if len(node.users) != 1 or node in graph_outputs:
            raise _Skip("producer_output_shared", f"the output of {p.fqn} is also used besides the concat")
    sizes = [_out_channels(model, p) for _, p in parts]
    if sum(sizes) != affine.channels:
        raise _Skip("channel_count_mismatch", f"{affine.channels} channels but the concatenated layers have "
                    f"{sum(sizes)}")
    folds, start = [], 0
    for (node, p), n in zip(parts, sizes):
        piece = formula.Affine(affine.scale[start:start + n], affine.shift[start:start + n])
        folds.append((p.fqn, *_fold_into_producer(model, p, node, piece, by_fqn, param_users)))
        start += n
    if len({f for f, _, _ in folds}) != len(folds):
        raise _Skip("module_reused", "the same layer feeds the concat twice")
    stack = x.meta.get("nn_module_stack") or {}
    owner = list(stack.values())[-1][0] if stack else ""
    return _Plan(folds, owner or "+".join(f for f, _, _ in folds))


def _concat_parts(x, producer_of):
    """``[(input node, producing call)]`` when ``x`` is a concat along axis 1 of conv/linear call outputs."""
    if x.op != "call_function":
        return None
    target = x.target
    name = getattr(target, "__name__", str(target))
    if name not in ("cat", "cat.default", "concat", "concatenate") or not x.args:
        return None
    inputs = x.args[0]
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", x.kwargs.get("axis", 0))
    r = _rank(x)
    if not isinstance(inputs, (list, tuple)) or len(inputs) < 1 or not isinstance(dim, int) or r is None:
        return None
    if dim % r != 1:
        return None
    parts = []
    for node in inputs:
        p = producer_of.get(node)
        if p is None or p.kind not in ("conv", "conv_t", "linear"):
            return None
        parts.append((node, p))
    return parts


def _out_channels(model, call: _Call) -> int:
    layer = model.get_submodule(call.fqn)
    if call.kind == "conv_t":
        return int(layer.weight.shape[1] * layer.groups)
    return int(layer.weight.shape[0])


def _fold_into_producer(model, prod: _Call, x, affine, by_fqn, param_users):
    _layer_checks(model, prod, by_fqn, "producer", param_users)
    layer, w, b = _layer_arrays(model, prod.fqn)
    if prod.kind == "linear":
        r = _rank(x)
        if r != 2:
            raise _Skip("channel_axis_mismatch", f"{prod.fqn} output is {r}-D: BatchNorm normalises axis 1, the "
                        "Linear's features are the last axis")
        out_channels, layout, groups = w.shape[0], "out_in", 1
    elif prod.kind == "conv":
        out_channels, layout, groups = w.shape[0], "out_in", 1
    else:
        groups = layer.groups
        out_channels, layout = w.shape[1] * groups, "in_out"
    if affine.channels != out_channels:
        raise _Skip("channel_count_mismatch", f"{affine.channels} channels but {prod.fqn} has {out_channels}")
    return formula.fold_backward(w, b, affine, layout=layout, groups=groups)


def _identity_in_eval(model: nn.Module, node) -> bool:
    """A trace node that passes its first input through unchanged: dropout in eval (``aten.dropout(x, p,
    False)``, a Dropout module not in training), ``nn.Identity``, ``aten.clone``/``alias``."""
    if node.op == "call_function":
        target = node.target
        name = getattr(target, "__name__", str(target))
        if name.startswith(("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")):
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", node.kwargs.get("training"))
            return train is False
        return name in ("clone.default", "alias.default", "clone", "alias")
    if node.op == "call_module":
        try:
            m = model.get_submodule(node.target)
        except AttributeError:
            return False
        if type(m) is nn.Identity:
            return True
        return isinstance(m, nn.modules.dropout._DropoutNd) and not m.training and not _has_hooks(m)
    return False


def _through_identities(model, y, call_of, graph_outputs):
    """Follow ``y`` through a chain of eval-mode identities (Dropout) that are its only user."""
    for _ in range(100):
        users = list(y.users)
        if len(users) != 1 or y in graph_outputs:
            return y
        u = users[0]
        if call_of.get(u) is not None or not u.all_input_nodes or u.all_input_nodes[0] is not y:
            return y
        if not _identity_in_eval(model, u):
            return y
        y = u
    return y


def _plan_forward(model, call, x, y, affine, by_fqn, call_of, graph_outputs, param_users):
    y = _through_identities(model, y, call_of, graph_outputs)
    users = list(y.users)
    consumers = {id(c): c for u in users for c in [call_of.get(u)] if c is not None}
    if y in graph_outputs or len(consumers) != 1 or any(call_of.get(u) is None for u in users):
        foldable = any(c.kind in ("conv", "linear") for c in consumers.values())
        raise _Skip("consumer_output_shared" if foldable else "no_foldable_neighbour",
                    "its output is used by several nodes or is a graph output" if foldable else
                    "its output does not go straight into a Conv/Linear")
    cons = next(iter(consumers.values()))
    if cons.kind not in ("conv", "linear") or cons.data_in != [y]:
        raise _Skip("no_foldable_neighbour", "its output does not go straight into a Conv/Linear")
    _layer_checks(model, cons, by_fqn, "consumer", param_users)
    layer, w, b = _layer_arrays(model, cons.fqn)
    if cons.kind == "linear":
        r = _rank(y)
        if r != 2:
            raise _Skip("channel_axis_mismatch", f"the BatchNorm output is {r}-D: its channel axis is not the "
                        f"feature axis of {cons.fqn}")
        groups = 1
    else:
        padding = layer.padding
        pads = [0] if padding == "valid" else ([(k - 1) * d for k, d in zip(layer.kernel_size, layer.dilation)]
                                               if padding == "same" else list(padding))
        if any(pads):
            raise _Skip("consumer_padded", f"{cons.fqn} zero-pads its input: the padded zeros would not see the "
                        "BatchNorm shift, so a forward fold would not be exact")
        groups = layer.groups
    if affine.channels != w.shape[1] * groups:
        raise _Skip("channel_count_mismatch", f"{affine.channels} channels but {cons.fqn} reads {w.shape[1] * groups}")
    w_new, b_new = formula.fold_forward(w, b, affine, layout="out_in", groups=groups)
    return _Plan([(cons.fqn, w_new, b_new)], cons.fqn)


def count_foldable_bn(model: nn.Module) -> int:
    """BatchNorm modules still in ``model`` (plain, frozen or subclasses)."""
    return sum(is_batchnorm(m) for m in model.modules())


def strip_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm replaced by ``nn.Identity``: the same architecture without BN,
    the latency floor no fold can beat (its outputs differ from the model's, of course)."""
    model = copy.deepcopy(model)
    for name in [n for n, m in model.named_modules() if n and is_batchnorm(m)]:
        try:
            m = model.get_submodule(name)
        except AttributeError:  # already replaced with its parent
            continue
        # a BN subclass keeps what it does after normalising (timm's BatchNormAct2d: its drop and act)
        names = [n for n, _ in m.named_children()] if _kind(m) == "bn_subclass" else []
        _replace_module(model, name, _tail_module(m, names) if names else nn.Identity())
    return model


def record_module_folds(onnx_model, report: FoldReport) -> None:
    """Write the module-level fold record into ``onnx_model``'s metadata (key ``bnfold.module_folds``): for
    each BatchNorm folded at module level, the BN and the layer it went into (module paths), the direction and
    the tensor that layer computes in the exported model (found through the exporter's name scopes). The
    verifier's localizer compares that tensor with the original BN's output. Call it on the exported model,
    before the fold report is merged with the ONNX pass's."""
    import json

    from bnfold.verify import MODULE_FOLDS_KEY, _layer_output, source_layers

    layers = source_layers(onnx_model)
    entries = []
    for e in report.entries:
        if e.status != "folded" or not e.into_layer:
            continue
        entries.append({"bn": e.bn, "status": "folded", "into_layer": e.into_layer, "direction": e.direction,
                        "tensor": _layer_output(onnx_model, layers, e.into_layer)})
    for p in list(onnx_model.metadata_props):
        if p.key == MODULE_FOLDS_KEY:
            onnx_model.metadata_props.remove(p)
    onnx_model.metadata_props.add(key=MODULE_FOLDS_KEY,
                                  value=json.dumps({"entries": entries}, separators=(",", ":")))


# ------------------------------------------------------------------------------------------------ deploy switches
#: Methods by which a module turns itself into its deployed form, in the order they are tried (timm's
#: ``reparameterize_model``: ``fuse`` returns the replacement module, ``reparameterize``/``switch_to_deploy``
#: change the module in place); ``fuse_model`` is torchvision's quantizable models' (in place).
DEPLOY_SWITCHES = ("fuse", "reparameterize", "switch_to_deploy", "fuse_model")


@dataclass
class DeploySwitch:
    """A module that carries its own deploy switch: its path, class and the method that switches it."""

    module: str
    cls: str
    method: str

    def to_dict(self) -> dict:
        return {"module": self.module, "class": self.cls, "method": self.method}


def _switch_of(m: nn.Module) -> str | None:
    import inspect

    for name in DEPLOY_SWITCHES:
        fn = getattr(m, name, None)
        if not callable(fn) or isinstance(fn, nn.Module):
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in sig.parameters.values()):
            return name  # callable without arguments
    return None


def find_deploy_switches(model: nn.Module) -> list[DeploySwitch]:
    """Every module of ``model`` (the model itself included) with a deploy switch callable without arguments
    (:data:`DEPLOY_SWITCHES`), outermost first."""
    return [DeploySwitch(name, type(m).__qualname__, method) for name, m in model.named_modules()
            if (method := _switch_of(m)) is not None]


def reparameterize(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, list[DeploySwitch]]:
    """Call every module's own deploy switch, outermost first (as timm's ``reparameterize_model``): a ``fuse()``
    that returns a module replaces it; the others switch in place. Children are visited after their parent
    has switched (the children it has then). Returns the model and the switches called; the caller's model
    is not modified unless ``inplace``."""
    if model.training:
        raise BnfoldError("the model is in training mode: call model.eval() before reparameterizing it")
    if not inplace:
        model = copy.deepcopy(model)
    called: list[DeploySwitch] = []

    def switch(m: nn.Module, name: str) -> nn.Module:
        method = _switch_of(m)
        if method is None:
            return m
        try:
            with torch.no_grad():
                out = getattr(m, method)()
        except Exception as exc:
            raise BnfoldError(f"{type(m).__qualname__}.{method}() of module '{name or '(model)'}' failed "
                              f"({type(exc).__name__}: {str(exc)[:200]}); fold without --reparameterize") from None
        called.append(DeploySwitch(name, type(m).__qualname__, method))
        if method == "fuse" and isinstance(out, nn.Module):
            out.eval()
            return out
        return m

    def walk(m: nn.Module, prefix: str) -> None:
        for child_name, child in list(m.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            new = switch(child, name)
            if new is not child:
                setattr(m, child_name, new)
            walk(new, name)

    root = switch(model, "")
    if root is not model and not isinstance(root, nn.Module):  # pragma: no cover - switch returns modules
        root = model
    walk(root, "")
    return root, called


def describe_switches(switches: list[dict]) -> str:
    """``"18 module(s): 17 RepVggBlock.reparameterize(), 1 Head.fuse()"`` for a report's switch list."""
    from collections import Counter

    counts = Counter(f"{s['class']}.{s['method']}()" for s in switches)
    return f"{len(switches)} module(s)" + (": " + ", ".join(f"{n} {k}" for k, n in counts.most_common())
                                            if counts else "")
