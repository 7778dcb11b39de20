"""Name the first layer whose output diverges, by the fold record the folded model carries."""

from __future__ import annotations

import ast
import json

import numpy as np
import onnx

from bnfold.runtime import make_session
from bnfold.verify.channels import _Graph
from bnfold.verify.compare import compare_output
from bnfold.verify.runners import OnnxParamRunner, _with_outputs
from bnfold.verify.tolerance import rounding_spread, unit_roundoff

#: metadata key of the module-level fold record (written by :func:`bnfold.torch_fold.record_module_folds`)
MODULE_FOLDS_KEY = "bnfold.module_folds"
#: metadata key of the ONNX pass's record (written by :func:`bnfold.onnx_fold.fold_model`)
ONNX_FOLDS_KEY = "bnfold"

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
                      atol: float | None = None, rtol: float | None = None, budget_dtype: str | None = None,
                      seed: int = 0) -> dict | None:
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
    r_model = _with_outputs(reference, r_names)
    r_sess = make_session(r_model, ep=ep, opt_level="off")
    c_sess = make_session(_with_outputs(candidate, c_names), ep=ep, opt_level="off")
    r_feeds = {i.name: feeds[i.name] for i in r_sess.get_inputs() if i.name in feeds}
    r_feeds.update({i.name: feeds[i.name] for i in r_sess.get_overridable_initializers() if i.name in feeds})
    c_feeds = {i.name: feeds[i.name] for i in c_sess.get_inputs() if i.name in feeds}
    c_feeds.update({i.name: feeds[i.name] for i in c_sess.get_overridable_initializers() if i.name in feeds})
    r_vals = dict(zip([o.name for o in r_sess.get_outputs()], r_sess.run(None, r_feeds)))
    c_vals = dict(zip([o.name for o in c_sess.get_outputs()], c_sess.run(None, c_feeds)))
    spreads: dict[str, np.ndarray] = {}
    if budget_dtype is not None and atol is None and rtol is None:  # each tensor's own rounding budget
        params = OnnxParamRunner(r_model, ep)
        spread = rounding_spread(lambda p: params.run(r_feeds, p), params.params, unit_roundoff(budget_dtype),
                                 seed=seed)
        spreads = dict(zip(params.runner.output_names, spread))
    graph = _Graph(candidate, {k: np.shape(v) for k, v in feeds.items()})
    for node, name in order:
        r_name, mfold = pairs[name]
        if name not in c_vals or r_name not in r_vals:
            continue
        rv, cv = r_vals[r_name], c_vals[name]
        if np.shape(rv) != np.shape(cv):
            continue
        sp = spreads.get(r_name)
        st = compare_output(rv, cv, atol=atol, rtol=rtol, channel_axes=graph.channel_axes(name),
                            spread=sp if np.shape(sp) == np.shape(rv) else None, budget_dtype=budget_dtype)
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
