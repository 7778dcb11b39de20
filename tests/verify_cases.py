"""Models for verify's rounding-budget tests (issue 21): a deep network with activations ~1e8, two channels of
~1e4 that cancel, a YOLO-style head; and an fp16 candidate made from a folded model. Built as ONNX graphs
(no torch), folded by bnfold's ONNX pass."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold import fold_model

from .helpers import G, run_ort


def deep_inception_like(blocks: int = 31, width: int = 16, gain: float = 0.35, seed: int = 1) -> onnx.ModelProto:
    """An Inception-v3-sized network (94 BatchNorms: a stem and ``blocks`` blocks of three) with randomized
    statistics whose activations reach ~1e8: each block concatenates a 1x1 branch and a 1x1->3x3 branch; the
    BNs' scales are log-uniform (0.1..10) times ``gain``. The classifier's bias centres the logits (minus their
    mean over random inputs), so they are smaller than the features they sum and cross zero: their error is the
    rounding of those large terms."""
    g = G(seed=seed)
    r = g.rng
    x = g.input("input", [None, 3, 8, 8])

    def cbr(x, cin, cout, k):
        w = g.rand(cout, cin, k, k, scale=(2.0 / (cin * k * k)) ** 0.5)
        gamma = np.exp(r.uniform(np.log(0.1), np.log(10.0), cout)) * gain
        params = [gamma, r.normal(0, 1.0, cout), r.normal(0, 0.5, cout), np.exp(r.uniform(np.log(0.1), 0, cout))]
        c = g.node("Conv", [x, g.const(w), g.const(g.rand(cout))], pads=[k // 2] * 4)
        return g.node("Relu", [g.bn(c, cout, params=params)])

    h = cbr(x, 3, width, 3)
    for _ in range(blocks):
        a = cbr(h, width, width // 2, 1)
        b = cbr(cbr(h, width, width // 2, 1), width // 2, width // 2, 3)
        h = g.node("Concat", [a, b], axis=1)
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
    feats = run_ort(g.model([flat]), {"input": np.random.default_rng(123).standard_normal((16, 3, 8, 8))
                                      .astype(np.float32)})[0].astype(np.float64)
    w = g.rand(width, 10, scale=0.3)
    bias = -(feats @ w.astype(np.float64)).mean(0)
    out = g.node("Gemm", [flat, g.const(w), g.const(bias.astype(np.float32))], name="fc")
    return g.model([out])


def cancelling(seed: int = 0) -> onnx.ModelProto:
    """Two channels of ~1e4 that cancel into an output of ~1: the conv's raw output is ~1e6, its BN subtracts a
    mean of ~1e6 (the unfolded fp32 model is itself off by ~1e-1 from a float64 evaluation)."""
    g = G(seed=seed)
    x = g.input("input", [2, 1, 8, 8])
    w = np.array([[[[3.0]]], [[[2.0]]]], np.float32)
    c = g.node("Conv", [x, g.const(w), g.const(np.array([1.3e6, 1.1e6], np.float32))], name="conv")
    params = [np.array([1.0, 1.0]), np.array([0.0, 0.0]), np.array([1.3e6 - 1e4, 1.1e6 - 1e4]), np.array([1.0, 1.0])]
    y = g.bn(c, 2, params=params, name="bn")
    diff = np.array([[[[1.0]], [[-1.0]]]], np.float32)
    out = g.node("Conv", [y, g.const(diff)], name="head")
    return g.model([out])


def yolo_head(classes: int = 3, anchors: int = 2, prob_shift: float = 0.0, seed: int = 0) -> onnx.ModelProto:
    """A YOLO-style head over two scales: conv-BN backbone, per scale a 1x1 conv to ``anchors * (4 + classes)``
    channels, reshaped to (N, anchors*H*W, 4 + classes); box coordinates (pixels: 320 + 640 x sigmoid, in the
    hundreds) and class probabilities side by side on the last axis (Concat axis -1), the scales concatenated
    over anchors (axis 1). ``prob_shift`` is added to every probability (a wrong model)."""
    g = G(seed=seed)
    k = 4 + classes
    x = g.input("input", [2, 3, 16, 16])
    h = g.node("Relu", [g.bn(g.conv(x, 3, 8, pads=[1] * 4), 8)])
    scales = []
    for s, stride in enumerate((1, 2)):
        f = g.node("Relu", [g.bn(g.conv(h, 8, 8, pads=[1] * 4, strides=[stride] * 2), 8)])
        side = 16 // stride
        p = g.conv(f, 8, anchors * k, k=1, name=f"head{s}")
        p = g.node("Reshape", [p, g.const(np.array([2, anchors, k, side, side], np.int64))])
        p = g.node("Transpose", [p], perm=[0, 1, 3, 4, 2])
        p = g.node("Reshape", [p, g.const(np.array([2, anchors * side * side, k], np.int64))])
        box = g.node("Slice", [p, g.const(np.array([0], np.int64)), g.const(np.array([4], np.int64)),
                               g.const(np.array([2], np.int64))])
        cls = g.node("Slice", [p, g.const(np.array([4], np.int64)), g.const(np.array([k], np.int64)),
                               g.const(np.array([2], np.int64))])
        box = g.node("Mul", [g.node("Sigmoid", [box]), g.const(np.array(640.0, np.float32))])
        box = g.node("Add", [box, g.const(np.array(320.0, np.float32))])
        cls = g.node("Sigmoid", [cls])
        if prob_shift:
            cls = g.node("Add", [cls, g.const(np.array(prob_shift, np.float32))])
        scales.append(g.node("Concat", [box, cls], axis=-1))
    out = g.node("Concat", scales, axis=1, name="detections")
    return g.model([out])


def folded(model: onnx.ModelProto) -> onnx.ModelProto:
    m, report = fold_model(model)
    assert report.folded == report.bn_total > 0
    return m


def shift_bias(model: onnx.ModelProto, node_name: str, channels, shift: float) -> onnx.ModelProto:
    """A copy of ``model`` with ``shift`` added to the bias of ``node_name``'s output ``channels``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.name == node_name)
    t = next(t for t in m.graph.initializer if t.name == node.input[2])
    b = numpy_helper.to_array(t).copy()
    b[list(channels)] += shift
    t.CopyFrom(numpy_helper.from_array(b, t.name))
    return m


def to_fp16(model: onnx.ModelProto, dtype: str = "float16") -> onnx.ModelProto:
    """A reduced-precision copy of a (folded) fp32 model: every float initializer rounded once to ``dtype``,
    Casts to ``dtype`` after each fp32 input and back to fp32 before each output (the IO stays fp32)."""
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.BFLOAT16
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            a = numpy_helper.to_array(t)
            if dtype == "float16":
                t.CopyFrom(numpy_helper.from_array(a.astype(np.float16), t.name))
            else:
                t.CopyFrom(helper.make_tensor(t.name, elem, a.shape, _bf16_bits(a), raw=False))
    ins = [i.name for i in g.input if i.type.tensor_type.elem_type == TensorProto.FLOAT]
    outs = [o.name for o in g.output if o.type.tensor_type.elem_type == TensorProto.FLOAT]
    rename = {n: f"{n}__lp" for n in ins + outs}
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in ins:
                n.input[k] = rename[i]
        for k, o in enumerate(n.output):
            if o in outs:
                n.output[k] = rename[o]
    head = [helper.make_node("Cast", [i], [rename[i]], to=elem, name=f"cast_in_{i}") for i in ins]
    tail = [helper.make_node("Cast", [rename[o]], [o], to=TensorProto.FLOAT, name=f"cast_out_{o}") for o in outs]
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    del m.metadata_props[:]
    onnx.checker.check_model(m)
    return m


def _bf16_bits(a: np.ndarray) -> list[int]:
    """bfloat16 bit patterns of ``a`` (round to nearest even), as ints for TensorProto.int32_data."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return [int(v) for v in rounded.reshape(-1)]
