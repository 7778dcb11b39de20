"""verify(): run both models on the same inputs, compare every output, locate a divergence."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.data import Dataset
from bnfold.errors import BnfoldError
from bnfold.outputs import printable
from bnfold.runtime import resolve_input_shapes
from bnfold.verify.channels import _Graph
from bnfold.verify.compare import _argmax_scores, _tie_flips, compare_output
from bnfold.verify.data import _data_batches, _override_values, _random_feeds, overridable_initializers
from bnfold.verify.localize import locate_divergence
from bnfold.verify.power import check_power
from bnfold.verify.result import VerifyResult
from bnfold.verify.runners import OnnxParamRunner, TorchParamRunner, _as_model, _OnnxRunner, _TorchRunner
from bnfold.verify.tolerance import DRAWS, candidate_dtype, rounding_spread, unit_roundoff


def verify(reference, candidate, *, input_shapes: list | None = None, data: Dataset | None = None,
           ep: str = "cpu", atol: float | None = None, rtol: float | None = None, batch: int = 8,
           batch_size: int = 64, max_samples: int | None = 2000, seed: int = 0, candidate_opt_level: str = "all",
           locate: bool = True, layout: str = "nchw", budget: bool = True, power: bool = True) -> VerifyResult:
    """Compare ``candidate`` (folded ONNX: ModelProto or path) with ``reference`` (ONNX ModelProto/path, run with
    optimizations off, or a torch ``nn.Module``, run eagerly). See the package docstring for the rules.
    ``layout`` is the layout of ``data``'s image arrays (``nchw`` or ``nhwc``). ``budget``: judge against the
    model's own rounding (unless ``atol``/``rtol`` are given; False: the fixed rule). ``power``: on a pass, ask
    whether dropping a BatchNorm would have been seen (:mod:`bnfold.verify.power`)."""
    cand_model = _as_model(candidate)
    argmax = _argmax_scores(cand_model)
    cand = _OnnxRunner(cand_model, ep, candidate_opt_level, "candidate")
    ref_model = device = None
    if _is_module(reference):
        import torch
        device = "cuda" if ep != "cpu" and torch.cuda.is_available() else "cpu"
        ref = _TorchRunner(reference, device)
    else:
        ref_model = _as_model(reference)
        _check_same_inputs(ref_model, cand_model)
        ref = _OnnxRunner(ref_model, ep, "off", "reference", extra_outputs=sorted({s for s, *_ in argmax.values()}))
    shapes = resolve_input_shapes(cand.inputs, input_shapes or [], batch)
    if data is None:
        batches = [(_random_feeds(cand, shapes, seed), None)]
        source = f"random, seed {seed}"
    else:
        batches = _data_batches(cand, data, shapes, batch_size, max_samples, layout)
        source = data.name
    all_feeds, outs_ref, outs_cand, extras, samples = [], [], [], [], 0
    for feeds, _ in batches:
        all_feeds.append(feeds)
        r, ex = ref.run(feeds)
        outs_ref.append(r)
        extras.append(ex)
        outs_cand.append(cand.run(feeds)[0])
        samples += len(next(iter(feeds.values())))
    first_feeds = all_feeds[0]
    names = cand.output_names
    if len(outs_ref[0]) != len(names):
        raise BnfoldError(f"the reference has {len(outs_ref[0])} outputs, the candidate {len(names)}")
    graph = _Graph(cand_model, {i.name: s for i, s in zip(cand.inputs, shapes)})

    # the tolerance: the model's own rounding, unless --atol/--rtol (or budget=False) ask for the fixed rule
    notes: list[str] = []
    params = None
    if (budget and atol is None and rtol is None) or power:
        try:
            params = OnnxParamRunner(ref_model, ep) if ref_model is not None else TorchParamRunner(reference, device)
        except BnfoldError as exc:
            notes.append(f"the reference cannot be run with perturbed parameters ({exc}): fixed tolerance used")
    spreads = None
    if budget and atol is None and rtol is None and params is not None:
        dtype = compute_dtype(cand_model, ref_model if ref_model is not None else params.params)
        u = unit_roundoff(dtype)
        spreads = _spreads(params, all_feeds, u, seed)
        tolerance = {"kind": "rounding", "dtype": dtype, "draws": DRAWS,
                     "why": f"{DRAWS} perturbed runs of the reference"}
    elif atol is not None or rtol is not None:
        tolerance = {"kind": "fixed", "atol": atol, "rtol": rtol, "why": "fixed, from --atol/--rtol"}
    else:
        tolerance = {"kind": "fixed", "why": "fixed rule per dtype"}
    budget_dtype = tolerance.get("dtype")

    def compare_all(o_ref, o_cand, o_extra, o_spread=None):
        stats, cat = {}, []
        for k, name in enumerate(names):
            r = np.concatenate([o[k] for o in o_ref]) if len(o_ref) > 1 else o_ref[0][k]
            c = np.concatenate([o[k] for o in o_cand]) if len(o_cand) > 1 else o_cand[0][k]
            sp = None
            pieces = [o[k] for o in o_spread] if o_spread is not None else []
            if pieces and all(np.shape(p)[1:] == np.shape(pieces[0])[1:] and np.ndim(p) for p in pieces):
                sp = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
                sp = sp if np.shape(sp) == np.shape(r) else None
            elif len(pieces) == 1:
                sp = pieces[0] if np.shape(pieces[0]) == np.shape(r) else None
            cat.append((r, c))
            excused = None
            if name in argmax and argmax[name][0] in o_extra[0]:
                s_name, axis, keep, _ = argmax[name]
                scores = np.concatenate([e[s_name] for e in o_extra]) if len(o_extra) > 1 else o_extra[0][s_name]
                if np.shape(r) == np.shape(c):
                    excused = _tie_flips(np.asarray(r), np.asarray(c), scores, axis, keep, argmax[name][3])
            axes = graph.channel_axes(name) if np.ndim(r) >= 1 else None
            stats[name] = compare_output(r, c, atol=atol, rtol=rtol, channel_axes=axes, excused=excused,
                                         spread=sp, budget_dtype=budget_dtype)
        return stats, cat

    stats, cat = compare_all(outs_ref, outs_cand, extras, spreads)
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
                          samples=samples, inputs=source, notes=notes, tolerance=tolerance)
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
            ov_spread = None
            if spreads is not None:
                ov_spread = [rounding_spread(lambda p: params.run(feeds, p), params.params,
                                             unit_roundoff(budget_dtype), seed=seed)]
            ov_stats, _ = compare_all([r], [c], [ex], ov_spread)
            result.overridden = {"initializers": sorted(values), "outputs": ov_stats}
            if not all(s.passed for s in ov_stats.values()):
                result.passed = False
                if all(s.passed for s in stats.values()):
                    failing_feeds = feeds
    if not result.passed and locate:
        try:
            loc_ref = ref_model if ref_model is not None else _export_reference(reference, failing_feeds, cand)
            result.first_divergence = locate_divergence(loc_ref, cand_model, failing_feeds, ep=ep, atol=atol,
                                                        rtol=rtol, budget_dtype=budget_dtype, seed=seed)
        except Exception as exc:  # localisation is best effort; the verdict stands without it
            result.notes.append(f"could not locate the divergence: {str(exc).strip()[:300]}")
    if result.passed and power and params is not None:
        axes = [graph.channel_axes(n) for n in names]
        result.power, result.unproven = check_power(params, first_feeds, params.run(first_feeds, params.params), axes)
    return result


def _spreads(params, all_feeds: list[dict], u: float, seed: int) -> list[list[np.ndarray]]:
    """The rounding spread per batch, measured on the first :data:`SPREAD_SAMPLES` samples; the later batches
    take the elementwise largest spread measured (the budget is per channel: a channel's largest spread over
    the samples measured)."""
    out, n = [], 0
    for f in all_feeds:
        if n >= SPREAD_SAMPLES:
            break
        out.append(rounding_spread(lambda p, f=f: params.run(f, p), params.params, u, seed=seed))
        n += len(next(iter(f.values())))
    if len(out) < len(all_feeds):
        template = []
        for k in range(len(out[0])):
            same = {np.shape(o[k]) for o in out}
            template.append(np.max(np.stack([o[k] for o in out]), axis=0) if len(same) == 1 else None)
        for f in all_feeds[len(out):]:
            b = len(next(iter(f.values())))
            out.append([t[:b] if t is not None and np.ndim(t) and len(t) >= b else np.zeros(0) for t in template])
    return out


_ELEM_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64"}
_ORDER = ["float64", "float32", "float16", "bfloat16"]  # finest to coarsest
#: samples the rounding spread is measured on (3 extra runs of the reference each)
SPREAD_SAMPLES = 256


def _float_params(model) -> list[tuple[str, int]]:
    if isinstance(model, onnx.ModelProto):
        return [(_ELEM_DTYPES[t.data_type], int(np.prod(t.dims)) if len(t.dims) else 1)
                for t in model.graph.initializer if t.data_type in _ELEM_DTYPES]
    return [(str(a.dtype), int(a.size)) for a in model.values() if str(a.dtype) in _ORDER]


def compute_dtype(candidate: onnx.ModelProto, reference) -> str:
    """The precision the budget is taken at: the coarser of the two models' compute dtypes (from their float
    parameters, :func:`bnfold.verify.tolerance.candidate_dtype`); ``reference`` is a ModelProto or the torch
    reference's parameter dict."""
    dts = [candidate_dtype(_float_params(candidate)), candidate_dtype(_float_params(reference))]
    return max(dts, key=_ORDER.index)


def _fmt_inputs(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        dt = _ELEM_DTYPES.get(tt.elem_type) or onnx.TensorProto.DataType.Name(tt.elem_type).lower()
        out.append(f"'{printable(vi.name)}' {dt}[{dims}]")
    return ", ".join(out) or "none"


def _check_same_inputs(ref: onnx.ModelProto, cand: onnx.ModelProto) -> None:
    """Both models must take the same inputs: names, element types and every fixed dimension."""
    inits_r, inits_c = {t.name for t in ref.graph.initializer}, {t.name for t in cand.graph.initializer}
    ri = [vi for vi in ref.graph.input if vi.name not in inits_r]
    ci = [vi for vi in cand.graph.input if vi.name not in inits_c]

    def clash(a, b) -> bool:
        ta, tb = a.type.tensor_type, b.type.tensor_type
        if a.name != b.name or ta.elem_type != tb.elem_type:
            return True
        if not (ta.HasField("shape") and tb.HasField("shape")):
            return False
        if len(ta.shape.dim) != len(tb.shape.dim):
            return True
        return any(x.HasField("dim_value") and y.HasField("dim_value") and x.dim_value != y.dim_value
                   for x, y in zip(ta.shape.dim, tb.shape.dim))
    if len(ri) != len(ci) or any(clash(a, b) for a, b in zip(ri, ci)):
        raise BnfoldError(f"the two models take different inputs: reference {_fmt_inputs(ref)}; candidate "
                          f"{_fmt_inputs(cand)}. verify compares a model with its fold, which takes the same inputs")


def _is_module(obj) -> bool:
    """A torch ``nn.Module``, told without importing torch for ONNX references (paths, ModelProtos)."""
    if obj is None or isinstance(obj, (str, bytes, onnx.ModelProto)) or hasattr(obj, "__fspath__"):
        return False
    import torch
    return isinstance(obj, torch.nn.Module)


def _export_reference(module, feeds: dict, cand: _OnnxRunner) -> onnx.ModelProto:
    """A PyTorch reference exported with BatchNorm kept, for the localizer."""
    import torch

    from bnfold.export import export_onnx

    inputs = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values() if True)
    inputs = inputs[:len(cand.inputs)]
    import copy
    m = copy.deepcopy(module).cpu().eval()
    return export_onnx(m, inputs, input_names=[i.name for i in cand.inputs], dynamic_batch=False, keep_bn=True)
