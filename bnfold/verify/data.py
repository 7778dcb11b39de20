"""The inputs both models get: seeded random tensors, real data shaped for the model, overridable initializers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from bnfold.data import Dataset, fit_to_shape
from bnfold.errors import BnfoldError
from bnfold.runtime import ort_dtype, resolve_input_shapes

if TYPE_CHECKING:
    from bnfold.verify.runners import _OnnxRunner


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


def overridable_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers that are also graph inputs (IR >= 4): defaults a caller may override."""
    if model.ir_version < 4:
        return []
    inputs = {i.name for i in model.graph.input}
    return [t.name for t in model.graph.initializer if t.name in inputs]


def _override_values(model: onnx.ModelProto, names: list[str], seed: int) -> dict:
    """Random values for the float overridable initializers: each default scaled elementwise by U(0.5, 1.5) plus
    noise of a tenth of its RMS; a default without negative values stays non-negative (a variance stays a
    variance). Integer initializers (shapes, indices) keep their defaults."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed + 7919)
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in names:
        a = numpy_helper.to_array(inits[n])
        if a.dtype.kind != "f" or a.size == 0:
            continue
        a64 = a.astype(np.float64)
        rms = float(np.sqrt(np.mean(a64 ** 2))) if a64.size else 0.0
        v = a64 * rng.uniform(0.5, 1.5, a64.shape) + rng.standard_normal(a64.shape) * 0.1 * max(rms, 1e-3)
        if not np.any(a64 < 0):
            v = np.abs(v)
        out[n] = v.astype(a.dtype)
    return out


def _data_batches(cand: _OnnxRunner, data: Dataset, shapes: list[tuple], batch_size: int, max_samples: int | None,
                  layout: str = "nchw"):
    arrays = fit_dataset(data, [(i.name, s, ort_dtype(i.type)) for i, s in zip(cand.inputs, shapes)], layout=layout)
    total = len(data) if max_samples is None else min(len(data), max_samples)
    static_batch = [d for d in (cand.inputs[0].shape[:1]) if isinstance(d, int) and d > 0]
    step = static_batch[0] if static_batch else batch_size
    usable = (total // step) * step if static_batch else total
    if usable == 0:
        raise BnfoldError(f"the data has {total} samples, fewer than the model's fixed batch of {step}")
    for start in range(0, usable, step):
        yield {n: a[start:start + step] for n, a in arrays.items()}, slice(start, min(start + step, usable))


def fit_dataset(data: Dataset, inputs: list[tuple], *, layout: str = "nchw") -> dict[str, np.ndarray]:
    """The dataset's arrays shaped and typed for the model's inputs ``[(name, shape, dtype), ...]`` (the shape
    with its batch dimension); raises :class:`BnfoldError` when they do not fit (see
    :func:`bnfold.data.fit_to_shape` for ``layout``)."""
    names = [n for n, _, _ in inputs]
    if set(names) <= set(data.inputs):
        arrays = {n: data.inputs[n] for n in names}
    elif len(names) == 1 and len(data.inputs) == 1:
        arrays = {names[0]: next(iter(data.inputs.values()))}
    else:
        raise BnfoldError(f"the data has arrays {sorted(data.inputs)} but the model's inputs are {names}: "
                          "name the .npz arrays after the inputs")
    return {n: fit_to_shape(np.asarray(arrays[n]), tuple(shape[1:]), layout=layout).astype(dt)
            for n, shape, dt in inputs}


def model_input_shapes(model: onnx.ModelProto, input_shapes: list | None = None, batch: int = 1) -> list[tuple]:
    """``[(name, shape, numpy dtype), ...]`` of an ONNX model's data inputs, dynamic batch set to ``batch``
    (other dynamic dimensions need ``input_shapes``)."""
    from bnfold.runtime import ort_dtype as _dt

    inits = {t.name for t in model.graph.initializer}

    class _Arg:  # what resolve_input_shapes reads from a session input
        def __init__(self, vi):
            self.name = vi.name
            tt = vi.type.tensor_type
            self.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            self.type = f"tensor({_ONNX_TYPE_NAMES.get(tt.elem_type, 'float')})"

    args = [_Arg(vi) for vi in model.graph.input if vi.name not in inits]
    shapes = resolve_input_shapes(args, input_shapes or [], batch)
    return [(a.name, s, _dt(a.type)) for a, s in zip(args, shapes)]


_ONNX_TYPE_NAMES = {1: "float", 11: "double", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 3: "int8",
                    2: "uint8", 9: "bool"}


def load_data_for(spec, model, *, input_shapes: list | None = None, layout: str = "nchw") -> Dataset:
    """``--data`` (digits, .npz, image folder) loaded for an ONNX ``model`` (ModelProto or path): image folders
    resized to its input, arrays shaped channels-first for it (``layout``: how the arrays are laid out).
    Raises :class:`BnfoldError` when the data does not fit."""
    from bnfold.data import load_for_model

    proto = model if isinstance(model, onnx.ModelProto) else _load_structure(model)
    try:
        inputs = [(n, s) for n, s, _ in model_input_shapes(proto, input_shapes)]
    except BnfoldError:  # dynamic dimensions without --input-shape: verify itself will say so
        inputs = None
    return load_for_model(spec, inputs, layout=layout)


def _load_structure(path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BnfoldError(f"{path}: not a readable ONNX model ({str(exc).strip()[:200]})") from None


def check_data(inputs: list[tuple], data: Dataset) -> None:
    """Raise :class:`BnfoldError` unless ``data`` (channels-first) fits the model inputs ``[(name, shape,
    dtype), ...]``; writes nothing."""
    fit_dataset(data, inputs)
