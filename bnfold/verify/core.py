"""verify(): run both models on the same inputs, compare every output, locate a divergence."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.data import Dataset
from bnfold.errors import BnfoldError
from bnfold.runtime import resolve_input_shapes
from bnfold.verify.channels import _Graph
from bnfold.verify.compare import _argmax_scores, _tie_flips, compare_output
from bnfold.verify.data import _data_batches, _override_values, _random_feeds, overridable_initializers
from bnfold.verify.localize import locate_divergence
from bnfold.verify.result import VerifyResult
from bnfold.verify.runners import _as_model, _OnnxRunner, _TorchRunner


def verify(reference, candidate, *, input_shapes: list | None = None, data: Dataset | None = None,
           ep: str = "cpu", atol: float | None = None, rtol: float | None = None, batch: int = 8,
           batch_size: int = 64, max_samples: int | None = 2000, seed: int = 0, candidate_opt_level: str = "all",
           locate: bool = True, layout: str = "nchw") -> VerifyResult:
    """Compare ``candidate`` (folded ONNX: ModelProto or path) with ``reference`` (ONNX ModelProto/path, run with
    optimizations off, or a torch ``nn.Module``, run eagerly). See the module docstring for the rules.
    ``layout`` is the layout of ``data``'s image arrays (``nchw`` or ``nhwc``)."""
    cand_model = _as_model(candidate)
    argmax = _argmax_scores(cand_model)
    cand = _OnnxRunner(cand_model, ep, candidate_opt_level, "candidate")
    ref_model = None
    if _is_module(reference):
        import torch
        device = "cuda" if ep != "cpu" and torch.cuda.is_available() else "cpu"
        ref = _TorchRunner(reference, device)
    else:
        ref_model = _as_model(reference)
        ref = _OnnxRunner(ref_model, ep, "off", "reference", extra_outputs=sorted({s for s, *_ in argmax.values()}))
        ref_names = [i.name for i in ref.inputs]
        if ref_names != [i.name for i in cand.inputs]:
            raise BnfoldError(f"reference inputs {ref_names} differ from candidate inputs "
                              f"{[i.name for i in cand.inputs]}: are these the same model?")
    shapes = resolve_input_shapes(cand.inputs, input_shapes or [], batch)
    if data is None:
        batches = [(_random_feeds(cand, shapes, seed), None)]
        source = f"random, seed {seed}"
    else:
        batches = _data_batches(cand, data, shapes, batch_size, max_samples, layout)
        source = data.name
    outs_ref, outs_cand, extras, samples, first_feeds = [], [], [], 0, None
    for feeds, _ in batches:
        first_feeds = first_feeds or feeds
        r, ex = ref.run(feeds)
        outs_ref.append(r)
        extras.append(ex)
        outs_cand.append(cand.run(feeds)[0])
        samples += len(next(iter(feeds.values())))
    names = cand.output_names
    if len(outs_ref[0]) != len(names):
        raise BnfoldError(f"the reference has {len(outs_ref[0])} outputs, the candidate {len(names)}")
    graph = _Graph(cand_model, {i.name: s for i, s in zip(cand.inputs, shapes)})

    def compare_all(o_ref, o_cand, o_extra):
        stats, cat = {}, []
        for k, name in enumerate(names):
            r = np.concatenate([o[k] for o in o_ref]) if len(o_ref) > 1 else o_ref[0][k]
            c = np.concatenate([o[k] for o in o_cand]) if len(o_cand) > 1 else o_cand[0][k]
            cat.append((r, c))
            excused = None
            if name in argmax and argmax[name][0] in o_extra[0]:
                s_name, axis, keep, _ = argmax[name]
                scores = np.concatenate([e[s_name] for e in o_extra]) if len(o_extra) > 1 else o_extra[0][s_name]
                if np.shape(r) == np.shape(c):
                    excused = _tie_flips(np.asarray(r), np.asarray(c), scores, axis, keep, argmax[name][3])
            axes = graph.channel_axes(name) if np.ndim(r) >= 1 else None
            stats[name] = compare_output(r, c, atol=atol, rtol=rtol, channel_axes=axes, excused=excused)
        return stats, cat

    stats, cat = compare_all(outs_ref, outs_cand, extras)
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
                          samples=samples, inputs=source)
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
            ov_stats, _ = compare_all([r], [c], [ex])
            result.overridden = {"initializers": sorted(values), "outputs": ov_stats}
            if not all(s.passed for s in ov_stats.values()):
                result.passed = False
                if all(s.passed for s in stats.values()):
                    failing_feeds = feeds
    if not result.passed and locate:
        try:
            loc_ref = ref_model if ref_model is not None else _export_reference(reference, failing_feeds, cand)
            result.first_divergence = locate_divergence(loc_ref, cand_model, failing_feeds, ep=ep, atol=atol,
                                                        rtol=rtol)
        except Exception as exc:  # localisation is best effort; the verdict stands without it
            result.notes.append(f"could not locate the divergence: {str(exc).strip()[:300]}")
    return result


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
