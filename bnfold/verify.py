"""Verify: prove a folded model computes what the original computes, and say which fold broke when it does not.

The reference (an ONNX model, run by ONNX Runtime with graph optimizations *off* so the runtime cannot fold BN
for us, or a PyTorch module, run eagerly) and the candidate (the folded ONNX model) get the same inputs: seeded
random tensors, or real data. Per output we report max/mean/p99 absolute error, max relative error and cosine
similarity, and pass when every element satisfies ``|cand - ref| <= atol + rtol * |ref|``.

Default tolerances follow the output dtype; the default ``atol`` scales with the output's magnitude
(``atol = atol_scale * max(1, max|ref|)``), an explicit ``atol`` is absolute:

=========  ==========  =====
dtype      atol_scale  rtol
=========  ==========  =====
fp32/fp64  1e-4        1e-3
fp16       5e-3        1e-2
bf16       2e-2        5e-2
=========  ==========  =====

These are loose enough for healthy runs on any provider (TF32 on CUDA included) and orders of magnitude below
what a wrong fold produces (a wrong channel scale shows up at the scale of the output itself).

On failure, intermediate tensors the two graphs share (a folded producer writes the BatchNorm's output tensor,
a folded consumer keeps its own) are compared in graph order, and the first fold whose output diverges is
named, with its source layer when the model records it.
"""

from __future__ import annotations

import json
import logging
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

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def verdict(self) -> str:
        worst = max(self.outputs.items(), key=lambda kv: kv[1].max_abs / max(kv[1].atol, 1e-30))
        name, st = worst
        parts = [f"{len(self.outputs)} output(s)", f"worst '{name}': max_abs {st.max_abs:.3g} "
                 f"(tol {st.atol:.3g} + {st.rtol:.0e}*|ref|), cosine {st.cosine:.6f}"]
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


def compare_output(ref: np.ndarray, cand: np.ndarray, *, atol: float | None, rtol: float | None) -> OutputStats:
    dtype = str(np.asarray(cand).dtype)
    a_scale, r_default = TOLERANCES.get(dtype, TOLERANCES["float32"])
    ref64 = np.asarray(ref, np.float64)
    cand64 = np.asarray(cand, np.float64)
    if ref64.shape != cand64.shape:
        raise BnfoldError(f"output shapes differ: reference {ref64.shape}, candidate {cand64.shape}")
    with np.errstate(invalid="ignore"):
        diff = np.where(ref64 == cand64, 0.0, np.abs(cand64 - ref64))  # identical infinities agree
    finite = np.isfinite(ref64)
    scale = max(1.0, float(np.max(np.abs(ref64[finite])))) if finite.any() else 1.0
    atol_v = float(atol) if atol is not None else a_scale * scale
    rtol_v = float(rtol) if rtol is not None else r_default
    nan_mismatch = bool(np.any(np.isnan(ref64) != np.isnan(cand64)))
    both = ~(np.isnan(ref64) & np.isnan(cand64))
    with np.errstate(invalid="ignore"):
        within = np.where(np.isfinite(ref64), diff <= atol_v + rtol_v * np.abs(ref64), ref64 == cand64)
    ok = bool(np.all(within[both])) and not nan_mismatch
    d = diff[both] if diff.size else diff
    with np.errstate(invalid="ignore", over="ignore"):
        rel = d / np.maximum(np.abs(ref64[both]), 1e-12) if d.size else d
    keep = np.isfinite(ref64.reshape(-1)) & np.isfinite(cand64.reshape(-1))
    r, c = ref64.reshape(-1)[keep], cand64.reshape(-1)[keep]
    denom = np.linalg.norm(r) * np.linalg.norm(c)
    cosine = float(np.dot(r, c) / denom) if denom > 0 else (1.0 if np.array_equal(r, c) else 0.0)
    return OutputStats(
        max_abs=float(d.max()) if d.size else 0.0, max_rel=float(rel.max()) if rel.size else 0.0,
        mean_abs=float(d.mean()) if d.size else 0.0, p99_abs=float(np.percentile(d, 99)) if d.size else 0.0,
        cosine=cosine, atol=atol_v, rtol=rtol_v, passed=ok, dtype=dtype, shape=list(ref64.shape))


# ------------------------------------------------------------------------------------------------ runners
class _OnnxRunner:
    def __init__(self, model, ep: str, opt_level: str):
        self.model = model
        self.sess = make_session(model, ep=ep, opt_level=opt_level)
        self.inputs = self.sess.get_inputs()
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.providers = self.sess.get_providers()

    def run(self, feeds: dict) -> list[np.ndarray]:
        return self.sess.run(None, feeds)


class _TorchRunner:
    def __init__(self, module, device: str):
        import copy

        import torch
        self.torch = torch
        current = next((p.device.type for p in module.parameters()), "cpu")
        # never move the caller's module: run a copy when it lives on another device
        self.module = (module if current == device else copy.deepcopy(module).to(device)).eval()
        self.device = device
        self.providers = [f"torch-{device}"]

    def run(self, feeds: dict) -> list[np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            out = self.module(*[torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for v in feeds.values()])
        if isinstance(out, torch.Tensor):
            out = [out]
        elif isinstance(out, dict):
            out = list(out.values())
        return [o.detach().float().cpu().numpy() if o.dtype == torch.bfloat16 else o.detach().cpu().numpy()
                for o in out]


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


def _data_batches(cand: _OnnxRunner, data: Dataset, shapes: list[tuple], batch_size: int, max_samples: int | None):
    names = [i.name for i in cand.inputs]
    if set(names) <= set(data.inputs):
        arrays = {n: data.inputs[n] for n in names}
    elif len(names) == 1 and len(data.inputs) == 1:
        arrays = {names[0]: next(iter(data.inputs.values()))}
    else:
        raise BnfoldError(f"the data has arrays {sorted(data.inputs)} but the model's inputs are {names}: "
                          "name the .npz arrays after the inputs")
    for (n, a), inp, shape in zip(list(arrays.items()), cand.inputs, shapes):
        arrays[n] = fit_to_shape(np.asarray(a), shape[1:]).astype(ort_dtype(inp.type))
    total = len(data) if max_samples is None else min(len(data), max_samples)
    static_batch = [d for d in (cand.inputs[0].shape[:1]) if isinstance(d, int) and d > 0]
    step = static_batch[0] if static_batch else batch_size
    usable = (total // step) * step if static_batch else total
    if usable == 0:
        raise BnfoldError(f"the data has {total} samples, fewer than the model's fixed batch of {step}")
    for start in range(0, usable, step):
        yield {n: a[start:start + step] for n, a in arrays.items()}, slice(start, min(start + step, usable))


def verify(reference, candidate, *, input_shapes: list | None = None, data: Dataset | None = None,
           ep: str = "cpu", atol: float | None = None, rtol: float | None = None, batch: int = 8,
           batch_size: int = 64, max_samples: int | None = 2000, seed: int = 0, candidate_opt_level: str = "all",
           locate: bool = True) -> VerifyResult:
    """Compare ``candidate`` (folded ONNX: ModelProto or path) with ``reference`` (ONNX ModelProto/path, run with
    optimizations off, or a torch ``nn.Module``, run eagerly). See the module docstring for the rules."""
    import torch

    cand = _OnnxRunner(candidate, ep, candidate_opt_level)
    if isinstance(reference, torch.nn.Module):
        device = "cuda" if ep != "cpu" and torch.cuda.is_available() else "cpu"
        ref = _TorchRunner(reference, device)
    else:
        ref = _OnnxRunner(reference, ep, "off")
        ref_names = [i.name for i in ref.inputs]
        if ref_names != [i.name for i in cand.inputs]:
            raise BnfoldError(f"reference inputs {ref_names} differ from candidate inputs "
                              f"{[i.name for i in cand.inputs]}: are these the same model?")
    shapes = resolve_input_shapes(cand.inputs, input_shapes or [], batch)
    if data is None:
        batches = [(_random_feeds(cand, shapes, seed), None)]
        source = f"random, seed {seed}"
    else:
        batches = _data_batches(cand, data, shapes, batch_size, max_samples)
        source = data.name
    outs_ref, outs_cand, samples, first_feeds = [], [], 0, None
    for feeds, _ in batches:
        first_feeds = first_feeds or feeds
        outs_ref.append(ref.run(feeds))
        outs_cand.append(cand.run(feeds))
        samples += len(next(iter(feeds.values())))
    names = cand.output_names
    if len(outs_ref[0]) != len(names):
        raise BnfoldError(f"the reference has {len(outs_ref[0])} outputs, the candidate {len(names)}")
    stats = {}
    cat_ref, cat_cand = [], []
    for k, name in enumerate(names):
        r = np.concatenate([o[k] for o in outs_ref]) if len(outs_ref) > 1 else outs_ref[0][k]
        c = np.concatenate([o[k] for o in outs_cand]) if len(outs_cand) > 1 else outs_cand[0][k]
        cat_ref.append(r)
        cat_cand.append(c)
        stats[name] = compare_output(r, c, atol=atol, rtol=rtol)
    top1 = accuracy = None
    logits = [(r, c) for r, c in zip(cat_ref, cat_cand) if r.ndim == 2 and r.shape[1] > 1]
    if logits:
        r, c = logits[0]
        pr, pc = r.argmax(1), c.argmax(1)
        top1 = float((pr == pc).mean())
        if data is not None and data.labels is not None:
            labels = data.labels[:len(pr)]
            accuracy = {"reference": float((pr == labels).mean()), "candidate": float((pc == labels).mean())}
            accuracy["delta"] = accuracy["candidate"] - accuracy["reference"]
    passed = all(s.passed for s in stats.values())
    result = VerifyResult(passed=passed, outputs=stats, top1_agreement=top1, accuracy=accuracy,
                          providers={"reference": ref.providers, "candidate": cand.providers}, samples=samples,
                          inputs=source)
    if not passed and locate and isinstance(ref, _OnnxRunner):
        try:
            result.first_divergence = locate_divergence(_as_model(reference), _as_model(candidate), first_feeds,
                                                        ep=ep, atol=atol, rtol=rtol)
        except BnfoldError:
            raise
        except Exception as exc:  # localisation is best effort; the verdict stands without it
            result.notes.append(f"could not locate the divergence: {exc}")
    return result


def _as_model(m) -> onnx.ModelProto:
    return m if isinstance(m, onnx.ModelProto) else onnx.load(str(m))


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n not in existing and n in types:
            m.graph.output.append(types[n])
    return m


def locate_divergence(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict, *, ep: str = "cpu",
                      atol: float | None = None, rtol: float | None = None) -> dict | None:
    """The first tensor, in the candidate's graph order, that both graphs compute and that differs beyond
    tolerance; with the candidate node that computes it, the fold that touched it and its source layer."""
    from bnfold.onnx_fold import METADATA_KEY, _source_layers

    ref_out = {o for n in reference.graph.node for o in n.output if o}
    order = [(n, o) for n in candidate.graph.node for o in n.output[:1] if o and o in ref_out]
    names = [o for _, o in order]
    if not names:
        return None
    r_sess = make_session(_with_outputs(reference, names), ep=ep, opt_level="off")
    c_sess = make_session(_with_outputs(candidate, names), ep=ep, opt_level="off")
    r_vals = dict(zip([o.name for o in r_sess.get_outputs()], r_sess.run(None, feeds)))
    c_vals = dict(zip([o.name for o in c_sess.get_outputs()], c_sess.run(None, feeds)))
    meta = {p.key: p.value for p in candidate.metadata_props}
    entries = json.loads(meta[METADATA_KEY])["entries"] if METADATA_KEY in meta else []
    layers = _source_layers(reference)
    cand_layers = _source_layers(candidate)
    for node, name in order:
        if name not in r_vals or name not in c_vals:
            continue
        st = compare_output(r_vals[name], c_vals[name], atol=atol, rtol=rtol)
        if st.passed:
            continue
        label = node.name or f"{node.op_type}@{name}"
        fold = next((e for e in entries if e.get("status") == "folded" and e.get("into")
                     and label in str(e["into"]).split("+")), None)
        if fold is None:  # a backward fold writes the BN's output tensor: find the BN by its output name
            bn_nodes = {n.output[0]: n for n in reference.graph.node if n.op_type == "BatchNormalization"}
            if name in bn_nodes:
                bn = bn_nodes[name]
                fold = next((e for e in entries if e.get("bn") in (bn.name, f"BatchNormalization@{name}")), None)
        layer = (fold or {}).get("into_layer") or cand_layers.get(name) or layers.get(name)
        return {"tensor": name, "node": label, "op": node.op_type, "layer": layer,
                "fold": None if fold is None else (fold.get("layer") or fold.get("bn")),
                "fold_direction": None if fold is None else fold.get("direction"),
                "max_abs": st.max_abs, "atol": st.atol}
    return None
