"""Reduced precision (bnfold.precision): one rounding from float64, the range certificate, fp32 kept where the
range demands it (never clamped), the conversion of the rest of the model, and the model running in ONNX
Runtime's CPU provider.

Tolerance: outputs against a float64 evaluation of the original model (ONNX Runtime, the model cast to
double) within fp16's accuracy as the helpers define it: |out - ref| <= 1e-2 * max(1, max|ref|) + 1e-2 * |ref|.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli.main import main
from bnfold.precision import (
    FP16_OPS,
    PrecisionOptions,
    RangeCheckFailed,
    fold_to_dtype,
)

from .helpers import G, random_feeds, round_bf16_reference, run_ort, run_reference

F16, BF16 = TensorProto.FLOAT16, TensorProto.BFLOAT16


def to_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in float64 (initializers, constants, Cast targets, io and value_info, subgraphs too)."""
    from bnfold.onnx_io import walk_graphs

    m = onnx.ModelProto()
    m.CopyFrom(model)
    D = TensorProto.DOUBLE
    for g in walk_graphs(m.graph):
        for t in g.initializer:
            if t.data_type == TensorProto.FLOAT:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
        for n in g.node:
            for a in list(n.attribute):
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64)))
                elif a.name == "value_float":
                    n.attribute.remove(a)
                    n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.float64(a.f))))
                elif n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = D
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
                vi.type.tensor_type.elem_type = D
    return m


def reference(model, feeds):
    """float64 evaluation (onnx's reference evaluator: ONNX Runtime's CPU provider has no double Conv)."""
    return run_reference(to_double(model), {k: v.astype(np.float64) if v.dtype.kind == "f" else v
                                            for k, v in feeds.items()})


def close_fp16(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    big = max(1.0, float(np.abs(ref).max()))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=1e-2 * big, rtol=1e-2)


def inits(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def assert_valid(model):
    onnx.checker.check_model(model, full_check=True)
    for t in model.graph.initializer:
        if t.data_type in (TensorProto.FLOAT, F16, BF16):
            assert np.isfinite(numpy_helper.to_array(t).astype(np.float64)).all(), t.name
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    return sess


def bn_fold64(w, b, gamma, beta, mean, var, eps=1e-5):
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    w64 = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    b64 = (b.astype(np.float64) - mean.astype(np.float64)) * scale + beta.astype(np.float64)
    return w64, b64


def conv_bn_model(params=None, wscale=0.3, seed=0, w=None):
    g = G(seed=seed)
    x = g.input("x", [2, 3, 6, 6])
    w = g.rand(8, 3, 3, 3, scale=wscale) if w is None else w
    b = g.rand(8)
    p = [np.asarray(v, np.float32) for v in (params or g.bn_params(8))]
    y = g.node("Conv", [x, g.const(w, "W"), g.const(b, "B")], name="conv", pads=[1, 1, 1, 1])
    y = g.node("BatchNormalization", [y] + [g.const(v) for v in p], name="bn")
    y = g.node("Relu", [y], name="relu")
    return g.model([y]), w, b, p


# ------------------------------------------------------------------------------------------ one rounding
def _direct(dtype):
    return (lambda a: np.asarray(a, np.float64).astype(np.float16)) if dtype == "fp16" else round_bf16_reference


def _via_fp32(dtype):
    return lambda a: np.asarray(a, np.float64).astype(np.float32).astype(
        np.float16 if dtype == "fp16" else ml_dtypes.bfloat16)


def double_rounding_weight(scale: float, dtype: str) -> np.float32:
    """An fp32 weight whose float64 product with ``scale`` rounds to ``dtype`` differently straight than through
    fp32: the product lies just past a tie of the target, and its fp32 rounding lands on the tie."""
    direct, via = _direct(dtype), _via_fp32(dtype)
    grid = np.float16 if dtype == "fp16" else ml_dtypes.bfloat16
    a = np.array(0.3, grid)
    for _ in range(200):
        b = np.nextafter(a.astype(np.float32), np.float32(1)).astype(grid) if dtype == "bf16" else \
            np.nextafter(a, np.float16(1))
        if b == a:  # bf16 nextafter through fp32 stays on a: step by the bf16 ulp
            b = (a.astype(np.float32).view(np.uint32) + np.uint32(0x10000)).view(np.float32).astype(grid)
        m = (float(a) + float(b)) / 2
        w0 = np.float32(m / scale)
        for k in range(-4, 5):
            w = np.float32(w0 + k * np.spacing(w0))
            p = np.float64(w) * scale
            if direct([p]).view(np.uint16)[0] != via([p]).view(np.uint16)[0]:
                return w
        a = b
    raise AssertionError("no double-rounding case found")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_folded_weights_are_one_rounding_of_the_float64_fold(dtype):
    params = [np.linspace(0.3, 3.1, 8), np.linspace(-1, 1, 8), np.linspace(-0.5, 0.7, 8), np.linspace(0.01, 2.0, 8)]
    p32 = [np.asarray(v, np.float32) for v in params]
    scale = p32[0].astype(np.float64) / np.sqrt(p32[3].astype(np.float64) + 1e-5)
    w = (np.random.default_rng(0).standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    for c in range(8):  # one weight per channel where rounding twice would give another value
        w[c, 0, 0, 0] = double_rounding_weight(scale[c], dtype)
    model, w, b, p = conv_bn_model(params=params, w=w)
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype=dtype))
    assert report.folded == 1
    w64, b64 = bn_fold64(w, b, *p)
    ref = _direct(dtype)
    wi, bi = inits(out)["W"], inits(out)["B"]
    assert wi.data_type == (F16 if dtype == "fp16" else BF16)
    got_w, got_b = numpy_helper.to_array(wi), numpy_helper.to_array(bi)
    assert np.array_equal(got_w.reshape(-1).view(np.uint16), ref(w64).reshape(-1).view(np.uint16))
    assert np.array_equal(got_b.reshape(-1).view(np.uint16), ref(b64).reshape(-1).view(np.uint16))
    # a double rounding (float64 -> fp32 -> target) differs on the 8 planted weights: the test can tell
    twice = _via_fp32(dtype)(w64).reshape(-1).view(np.uint16)
    assert (got_w.reshape(-1).view(np.uint16) != twice).sum() >= 8
    assert_valid(out)
    f = random_feeds(model)
    close_fp16(run_ort(out, f)[0], reference(model, f)[0])


def test_gemm_and_matmul_bias_add_are_rounded_once():
    g = G(seed=3)
    x = g.input("x", [4, 6])
    wg = g.rand(5, 6)
    y = g.node("Gemm", [x, g.const(wg, "Wg"), g.const(g.rand(5), "Bg")], name="gemm", transB=1)
    p1 = g.bn_params(5)
    y = g.node("BatchNormalization", [y] + [g.const(np.asarray(v, np.float32)) for v in p1], name="bn1")
    wm = g.rand(5, 7)
    y = g.node("MatMul", [y, g.const(wm, "Wm")], name="mm")
    p2 = g.bn_params(7)
    y = g.node("BatchNormalization", [y] + [g.const(np.asarray(v, np.float32)) for v in p2], name="bn2")
    model = g.model([y])
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    assert report.folded == 2
    f64 = [np.asarray(v, np.float32).astype(np.float64) for v in p2]
    scale = f64[0] / np.sqrt(f64[3] + 1e-5)
    want_w = (wm.astype(np.float64) * scale).astype(np.float16)
    want_b = (f64[1] - f64[2] * scale).astype(np.float16)
    mm = next(n for n in out.graph.node if n.op_type == "MatMul")
    add = next(n for n in out.graph.node if n.op_type == "Add")
    got_w = numpy_helper.to_array(inits(out)[mm.input[1]])
    got_b = numpy_helper.to_array(inits(out)[add.input[1]])
    assert np.array_equal(got_w.view(np.uint16), want_w.view(np.uint16))
    assert np.array_equal(got_b.view(np.uint16), want_b.view(np.uint16))
    assert_valid(out)
    f = random_feeds(model)
    close_fp16(run_ort(out, f)[0], reference(model, f)[0])


# ------------------------------------------------------------------------------------------ range
def test_weights_that_overflow_fp16_stay_fp32_and_outputs_keep_fp16_accuracy():
    # gamma 400, variance 1e-6: scale ~1.2e5, folded weights past 65504
    model, w, b, p = conv_bn_model(params=[np.full(8, 400.0), np.zeros(8), np.zeros(8), np.full(8, 1e-6)],
                                   wscale=1.0)
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    prec = report.extra["precision"]
    conv = next(x for x in prec["layers"] if x["node"] == "conv")
    assert conv["runs_in"] == "fp32" and conv["reason"] == "fp16_overflow"
    assert conv["weight_max"] > 65504
    assert inits(out)["W"].data_type == TensorProto.FLOAT  # kept, not clamped
    w64, _ = bn_fold64(w, b, *p)
    assert np.array_equal(numpy_helper.to_array(inits(out)["W"]), w64.astype(np.float32))
    assert {"node": "conv", "op": "Conv", "reason": "fp16_overflow"}.items() <= prec["kept_fp32"][0].items()
    assert prec["clamped"] == 0
    assert_valid(out)
    f = random_feeds(model)
    close_fp16(run_ort(out, f)[0], reference(model, f)[0])


def test_activation_that_bn_scales_down_overflows_unfolded_fp16_but_not_the_fold():
    # the conv's raw output reaches ~1e5; BN (gamma 1e-4) scales it back to ~10
    w = (np.clip(np.random.default_rng(0).standard_normal((8, 3, 3, 3)), -2, 2) * 3e4).astype(np.float32)
    assert np.abs(w).max() < 65504  # the weights fit fp16; the conv's output does not
    model, _, _, p = conv_bn_model(params=[np.full(8, 1e-4), np.zeros(8), np.zeros(8), np.ones(8)], w=w)
    f = random_feeds(model)
    ref = reference(model, f)[0]
    # the unfolded model converted naively (every tensor fp16): the conv output, an fp16 tensor, overflows (shown
    # as a graph output: on the CPU provider ORT computes Conv and BN in fp32 between Casts it fuses away)
    naive = onnx.ModelProto()
    naive.CopyFrom(model)
    for t in naive.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(naive.graph.input) + list(naive.graph.output):
        vi.type.tensor_type.elem_type = F16
    naive.graph.output.append(helper.make_tensor_value_info(naive.graph.node[0].output[0], F16, None))
    conv_out = run_ort(naive, {k: v.astype(np.float16) for k, v in f.items()})[1]
    assert not np.isfinite(conv_out.astype(np.float64)).all()
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    conv = next(x for x in report.extra["precision"]["layers"] if x["node"] == "conv")
    assert conv["runs_in"] == "fp16" and conv["output_max"] < 100
    assert inits(out)["W"].data_type == F16
    assert_valid(out)
    close_fp16(run_ort(out, f)[0], ref)


def test_a_folded_layer_kept_fp32_holds_the_fold_rounded_once_to_fp32():
    """BN scales the conv by 1e4: the folded weights fit fp16 but the output (~5e4, x4 headroom) does not, so the
    conv runs in fp32. Its folded weight and bias are then the float64 fold rounded once to fp32, as an unfolded
    layer kept fp32 keeps its own parameters, not an fp16 rounding cast up at run time (which added a rounding to
    a layer that computes in fp32: preact_resnet with wide BN statistics, 0.83x bnfold's error without it)."""
    model, w, b, p = conv_bn_model(params=[np.full(8, 1e4), np.zeros(8), np.zeros(8), np.ones(8)], wscale=0.5)
    w64, b64 = bn_fold64(w, b, *p)
    assert np.abs(w64).max() < 65504  # the folded weights fit fp16: only the activation keeps the layer fp32
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    prec = report.extra["precision"]
    rows = {x["node"]: x for x in prec["layers"]}
    assert rows["conv"]["runs_in"] == "fp32" and rows["conv"]["reason"] == "fp16_activation_overflow"
    assert rows["conv"]["folded"]
    wi, bi = inits(out)["W"], inits(out)["B"]
    assert wi.data_type == bi.data_type == TensorProto.FLOAT
    assert np.array_equal(numpy_helper.to_array(wi).view(np.uint32), w64.astype(np.float32).view(np.uint32))
    assert np.array_equal(numpy_helper.to_array(bi).view(np.uint32), b64.astype(np.float32).view(np.uint32))
    assert not [n for n in out.graph.node if n.op_type == "Cast" and set(n.input) & {"W", "B"}]
    assert {t["name"]: t["stored"] for t in prec["tensors"]}["W"] == "fp32"
    assert prec["tensors"][0]["folded"] and prec["clamped"] == 0
    assert_valid(out)
    # numbers: nothing of this model runs in fp16 now, so its output has fp32's accuracy against float64 (an
    # fp16 weight is off by up to 2^-11 relative: the output of a Cast-up fp16 weight was 2e-4 off, 70x this)
    f = random_feeds(model)
    got, ref = run_ort(out, f)[0].astype(np.float64), reference(model, f)[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=3e-6 * np.abs(ref).max())


def test_unfolded_activation_overflow_keeps_the_node_fp32():
    # no BN to scale it down: the conv output (~1e6) itself cannot be fp16
    g = G(seed=1)
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.const(np.clip(g.rand(4, 3, 3, 3), -2, 2) * 3e4, "W")], name="conv")
    y = g.node("Relu", [y], name="relu")
    model = g.model([y])
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    rows = {x["node"]: x for x in report.extra["precision"]["layers"]}
    assert rows["conv"]["reason"] == "fp16_activation_overflow"
    assert rows["relu"]["reason"] == "fp16_activation_overflow"
    assert_valid(out)
    f = random_feeds(model)
    np.testing.assert_allclose(run_ort(out, f)[0], reference(model, f)[0], rtol=1e-2, atol=1e-2 * 1e6)
    with pytest.raises(RangeCheckFailed, match="conv"):
        fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16", strict_range=True))


def test_value_moving_ops_next_to_fp32_nodes_stay_fp32_so_the_cpu_rounds_no_activation():
    """A Transpose read only by an fp32-kept conv and a Flatten reading from an fp32-kept conv stay fp32
    (``follows_fp32``): the Cast to fp16 sits right before the next compute node (the Gemm), not before the
    Flatten. The values an fp16 runtime computes are identical; ONNX Runtime's CPU provider, which runs the fp16
    Gemm in fp32 between Casts of its own, then drops the Cast pair, so no activation is rounded, as in a model
    converted whole (before: the Flatten, which has an fp16 CPU kernel, stored the conv's output in fp16)."""
    g = G(seed=3)
    x = g.input("x", [2, 3, 6, 6])
    t = g.node("Transpose", [x], name="transpose", perm=[0, 1, 3, 2])
    y = g.node("Conv", [t, g.const(np.clip(g.rand(8, 3, 3, 3), -2, 2) * 2e4, "W1")], name="conv1")  # ~1e5
    y = g.node("Conv", [y, g.const(g.rand(4, 8, 1, 1) * 1e-3, "W2")], name="conv2")  # input ~1e5: kept
    y = g.node("Flatten", [y], name="flatten")
    w3, b3 = g.rand(5, 4 * 4 * 4), g.rand(5)
    y = g.node("Gemm", [y, g.const(w3, "W3"), g.const(b3, "B3")], name="gemm", transB=1)
    model = g.model([y])
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    rows = {r["node"]: r for r in report.extra["precision"]["layers"]}
    assert rows["conv1"]["reason"] == rows["conv2"]["reason"] == "fp16_activation_overflow"
    assert rows["transpose"]["reason"] == rows["flatten"]["reason"] == "follows_fp32"
    assert {k["node"] for k in report.extra["precision"]["kept_fp32"]} == {"transpose", "conv1", "conv2", "flatten"}
    assert rows["gemm"]["runs_in"] == "fp16"
    produced = {o: n for n in out.graph.node for o in n.output}
    gemm = next(n for n in out.graph.node if n.name == "gemm")
    cast = produced[gemm.input[0]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == F16 and produced[cast.input[0]].name == "flatten"
    assert assert_valid(out) is not None
    f = random_feeds(model)
    got = run_ort(out, f)[0]
    close_fp16(got, reference(model, f)[0])
    # on the CPU: exactly the fp32 model with the Gemm's parameters rounded to fp16, no activation rounded
    params = onnx.ModelProto()
    params.CopyFrom(model)
    for t in params.graph.initializer:
        if t.name in ("W3", "B3"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16).astype(np.float32),
                                               t.name))
    want = run_ort(params, f)[0]
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_a_float_constant_read_by_an_fp32_kept_node_is_listed_with_a_reason():
    """A Constant whose reader stays fp32 stays fp32 too, listed as ``follows_fp32`` (before: listed with no
    reason, and the report's summary failed sorting None against the other reasons)."""
    g = G(seed=4)
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.const(np.clip(g.rand(4, 3, 3, 3), -2, 2) * 3e4, "W")], name="conv")  # ~1e6
    c = g.node("Constant", [], name="half", value=numpy_helper.from_array(np.array(0.5, np.float32)))
    y = g.node("Max", [y, c], name="max")  # not an affine op: not folded into the conv
    model = g.model([y])
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    p = report.extra["precision"]
    kept = {k["node"]: k["reason"] for k in p["kept_fp32"]}
    assert kept == {"conv": "fp16_activation_overflow", "half": "follows_fp32", "max": "fp16_activation_overflow"}
    assert "follows_fp32 1" in p["summary"]
    assert_valid(out)
    f = random_feeds(model)
    np.testing.assert_allclose(run_ort(out, f)[0], reference(model, f)[0], rtol=1e-2, atol=1e-2 * 1e6)


def test_underflow_is_counted_with_its_worst_channel():
    gamma = np.ones(8)
    gamma[5] = 1e-6  # channel 5's folded weights fall below fp16's normal range (6.1e-5), some to zero
    model, w, b, p = conv_bn_model(params=[gamma, np.zeros(8), np.zeros(8), np.ones(8)])
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    w64, b64 = bn_fold64(w, b, *p)

    def under(v):
        r = v.astype(np.float16).astype(np.float64)
        return int(((r != 0) & (np.abs(r) < 6.103515625e-05)).sum()), int(((r == 0) & (v != 0)).sum())
    (ws, wz), (bs, bz) = under(w64), under(b64)
    assert ws > 0 and wz > 0
    prec = report.extra["precision"]
    conv = next(x for x in prec["layers"] if x["node"] == "conv")
    assert (conv["subnormal"], conv["zero"], conv["worst_channel"]) == (ws + bs, wz + bz, 5)
    t = next(t for t in prec["tensors"] if t["name"] == "W")
    assert (t["subnormal"], t["zero"]) == (ws, wz)
    assert t["folded"] and t["worst_channel_underflow"] == ws + wz and t["stored"] == "fp16"
    assert prec["subnormal"] == ws + bs and f"{prec['subnormal']} weights subnormal" in prec["summary"]


def test_overflowing_constant_and_unfolded_weight_are_never_written_as_inf():
    g = G(seed=2)
    x = g.input("x", [1, 2, 4, 4])
    y = g.node("Conv", [x, g.const(np.float32([2e5, 1, -3, 0.5]).reshape(2, 2, 1, 1), "Wbig")], name="conv")
    g.nodes.append(helper.make_node("Constant", [], ["k"], name="kconst",
                                    value=numpy_helper.from_array(np.float32([1e6]))))
    y = g.node("Min", [y, "k"], name="min")  # not an affine op: nothing folds here
    model = g.model([y])
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16", headroom=1.0))
    assert report.folded == 0 and report.affine_folded == 0
    rows = {x["node"]: x for x in report.extra["precision"]["layers"]}
    assert rows["conv"]["reason"] == "fp16_overflow" and rows["kconst"]["reason"] == "fp16_overflow"
    assert inits(out)["Wbig"].data_type == TensorProto.FLOAT
    k = next(n for n in out.graph.node if n.op_type == "Constant")
    assert k.attribute[0].t.data_type == TensorProto.FLOAT
    assert_valid(out)
    f = random_feeds(model)
    close_fp16(run_ort(out, f)[0], reference(model, f)[0])


# ------------------------------------------------------------------------------------------ the rest
def test_io_boundary_casts_and_io_dtype():
    model, *_ = conv_bn_model()
    out, _ = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    assert [i.type.tensor_type.elem_type for i in out.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in out.graph.output] == [TensorProto.FLOAT]
    assert out.graph.node[0].op_type == "Cast" and out.graph.node[-1].op_type == "Cast"
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["Cast", "Conv", "Relu", "Cast"]
    both, _ = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16", io_dtype=True))
    assert [i.type.tensor_type.elem_type for i in both.graph.input] == [F16]
    assert [o.type.tensor_type.elem_type for o in both.graph.output] == [F16]
    assert "Cast" not in [n.op_type for n in both.graph.node]
    sess = assert_valid(both)
    f = random_feeds(model)
    close_fp16(sess.run(None, {"x": f["x"].astype(np.float16)})[0], reference(model, f)[0])


def test_constants_casts_value_info_and_subgraphs_are_converted():
    g = G(seed=4)
    x = g.input("x", [1, 3, 4, 4])
    c = g.input("c", [], dtype=None)
    g.inputs[-1] = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = g.node("Conv", [x, g.const(g.rand(4, 3, 1, 1), "W")], name="conv")
    y = g.bn(y, 4, name="bn")
    g.nodes.append(helper.make_node("Constant", [], ["two"], name="two", value_float=2.0))
    y = g.node("Max", [y, "two"], name="max")
    z = g.node("Cast", [y], name="cast", to=TensorProto.FLOAT)
    g.vinfo.append(helper.make_tensor_value_info(z, TensorProto.FLOAT, [1, 4, 4, 4]))
    # an If whose branches read z from the enclosing graph; one holds its own Conv+BN
    sub = G(seed=5, prefix="t_")
    sy = sub.node("Conv", [z, sub.const(sub.rand(4, 4, 1, 1), "Wt")], name="t_conv")
    sy = sub.bn(sy, 4, name="t_bn")
    then_g = helper.make_graph(sub.nodes, "then", [], [helper.make_tensor_value_info(sy, TensorProto.FLOAT, None)],
                               initializer=sub.inits)
    else_g = helper.make_graph([helper.make_node("Neg", [z], ["e_out"], name="e_neg")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    y = g.node("If", [c], name="if", then_branch=then_g, else_branch=else_g)
    model = g.model([y], out_shapes=[[1, 4, 4, 4]])
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    assert report.folded == 2
    nodes = {n.name: n for n in out.graph.node}
    two = nodes["two"].attribute[0]
    assert two.name == "value" and two.t.data_type == F16
    assert nodes["cast"].attribute[0].i == F16
    assert [v.type.tensor_type.elem_type for v in out.graph.value_info if v.name == z] == [F16]
    then_out = nodes["if"].attribute[0].g if nodes["if"].attribute[0].name == "then_branch" else \
        nodes["if"].attribute[1].g
    assert {t.name: t.data_type for t in then_out.initializer}["Wt"] == F16
    assert [n.op_type for n in then_out.node][-1] == "Cast"  # the body's output keeps its dtype
    rows = {x["node"]: x for x in report.extra["precision"]["layers"]}
    assert rows["if"]["reason"] == "control_flow" and rows["t_conv"]["runs_in"] == "fp16"
    assert report.extra["precision"]["subgraphs_measured"] is False
    sess = assert_valid(out)
    f = random_feeds(model)
    for cond in (True, False):
        feeds = {"x": f["x"], "c": np.array(cond)}
        close_fp16(sess.run(None, feeds)[0], reference(model, feeds)[0])


@pytest.mark.parametrize("op,n", [("Conv", 2), ("Relu", 1), ("Add", 2), ("MatMul", 2), ("Sigmoid", 1),
                                  ("GlobalAveragePool", 1), ("Softmax", 1), ("Concat", 2)])
def test_fp16_ops_run_on_the_cpu_provider_and_bf16_arithmetic_does_not(op, n):
    """The kernel tables: an op in FP16_OPS runs in float16 on ONNX Runtime's CPU provider; bfloat16
    arithmetic has no CPU kernel (why BF16_OPS is empty). A newer runtime that adds one fails this test."""
    assert op in FP16_OPS
    shape = [2, 2] if op == "MatMul" else [1, 2, 3, 3]
    attrs = {"axis": 1} if op == "Concat" else {}

    def model(elem):
        ins = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, shape) for i in range(n)]
        nodes = [helper.make_node("Cast", [f"x{i}"], [f"c{i}"], to=elem) for i in range(n)]
        nodes += [helper.make_node(op, [f"c{i}" for i in range(n)], ["y"], **attrs),
                  helper.make_node("Cast", ["y"], ["z"], to=TensorProto.FLOAT)]
        g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m
    feeds = {f"x{i}": np.ones(shape, np.float32) for i in range(n)}
    run_ort(model(F16), feeds)
    if op not in ("Concat",):
        with pytest.raises(Exception, match="NOT_IMPLEMENTED|INVALID_GRAPH|implementation"):  # noqa: B017
            run_ort(model(BF16), feeds)


def test_bf16_stores_weights_rounded_once_and_computes_fp32():
    model, w, b, p = conv_bn_model()
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="bf16"))
    prec = report.extra["precision"]
    assert {x["reason"] for x in prec["kept_fp32"]} == {"no_bf16_kernel"}
    assert inits(out)["W"].data_type == BF16
    assert_valid(out)
    f = random_feeds(model)
    ref = reference(model, f)[0]
    got = run_ort(out, f)[0]
    big = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, atol=2e-2 * big, rtol=2e-2)


def test_caller_model_is_not_modified():
    model, *_ = conv_bn_model()
    before = model.SerializeToString()
    fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    assert model.SerializeToString() == before


# ------------------------------------------------------------------------------------------ zoo
@pytest.mark.parametrize("name", ["small_resnet", "mobilenet", "bn_head"])
def test_zoo_models_fold_to_fp16_within_fp16_accuracy(name):
    torch = pytest.importorskip("torch")
    from bnfold.export import export_onnx
    from bnfold.models import zoo

    torch.manual_seed(0)
    net = zoo.randomize_bn(zoo.create(name), seed=0).eval()
    shape = zoo.get(name).input_shape
    model = export_onnx(net, (torch.zeros(shape),), keep_bn=True)
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    assert report.folded == report.bn_total
    assert_valid(out)
    f = random_feeds(model, batch=shape[0])
    with torch.no_grad():
        ref = net.double()(torch.from_numpy(next(iter(f.values())).astype(np.float64))).numpy()
    close_fp16(run_ort(out, f)[0], ref)


# ------------------------------------------------------------------------------------------ command line
def test_cli_fold_dtype_report_strict_range_and_inspect(tmp_path):
    model, *_ = conv_bn_model(params=[np.full(8, 400.0), np.zeros(8), np.zeros(8), np.full(8, 1e-6)], wscale=1.0)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    runner = CliRunner()
    dst, rep = tmp_path / "m16.onnx", tmp_path / "r.json"
    r = runner.invoke(main, ["fold", str(src), "-o", str(dst), "--dtype", "fp16", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    assert "fp16_overflow" in r.output and "random normal inputs" in r.output
    prec = json.loads(rep.read_text())["precision"]
    assert [x["node"] for x in prec["kept_fp32"]] == ["conv", "relu"]
    assert_valid(onnx.load(dst))
    strict = tmp_path / "strict.onnx"
    r = runner.invoke(main, ["fold", str(src), "-o", str(strict), "--dtype", "fp16", "--strict-range"])
    assert r.exit_code == 1 and "conv (fp16_overflow)" in r.output and not strict.exists()
    r = runner.invoke(main, ["inspect", str(src), "--dtype", "fp16", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["precision"]["dtype"] == "fp16"
    r = runner.invoke(main, ["fold", str(src), "-o", str(tmp_path / "x.onnx"), "--strict-range"])
    assert r.exit_code == 2 and "--dtype" in r.output


def test_cli_export_dtype(tmp_path):
    pytest.importorskip("torch")
    dst = tmp_path / "e.onnx"
    r = CliRunner().invoke(main, ["export", "small_resnet", "--input-shape", "1x3x32x32", "-o", str(dst),
                                  "--dtype", "fp16", "--json"])
    assert r.exit_code == 0, r.output
    m = onnx.load(dst)
    assert_valid(m)
    assert any(t.data_type == F16 for t in m.graph.initializer)
    assert json.loads(r.stdout)["precision"]["dtype"] == "fp16"


def test_activations_are_measured_on_the_given_data():
    model, *_ = conv_bn_model()
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    prec = report.extra["precision"]
    assert prec["activations_from"].startswith("random normal inputs") and not prec["kept_fp32"]
    from bnfold.data import Dataset
    big = Dataset({"x": np.random.default_rng(0).standard_normal((6, 3, 6, 6)).astype(np.float32) * 1e5}, None, "big")
    out, report = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16", data=big))
    prec = report.extra["precision"]
    assert prec["activations_from"] == "data (big, 6 samples)"  # 3 runs of the fixed batch 2
    assert {x["reason"] for x in prec["kept_fp32"]} == {"fp16_activation_overflow"}
    assert prec["activations"]["x"] > 1e5
    assert_valid(out)


def test_resize_scales_stay_exact_fp32():
    g = G(seed=6)
    x = g.input("x", [1, 3, 6, 6])
    y = g.node("Conv", [x, g.const(g.rand(4, 3, 1, 1), "W")], name="conv")
    y = g.bn(y, 4, name="bn")
    scales = np.float32([1, 1, 1.3333334, 1.3333334])  # fp16 would round 1.3333334 to 1.333: another size
    g.nodes.append(helper.make_node("Constant", [], ["scales"], name="scales",
                                    value=numpy_helper.from_array(scales)))
    g.inits.append(numpy_helper.from_array(np.float32([1, 1, 1.6666666, 1.6666666]), "scales2"))
    y = g.node("Resize", [y, "", "scales"], name="resize", mode="nearest")
    y = g.node("Resize", [y, "", "scales2"], name="resize2", mode="nearest")
    model = g.model([y])
    out, _ = fold_to_dtype(model, precision=PrecisionOptions(dtype="fp16"))
    k = next(n for n in out.graph.node if n.op_type == "Constant")
    assert np.array_equal(numpy_helper.to_array(k.attribute[0].t), scales)
    assert inits(out)["scales2"].data_type == TensorProto.FLOAT
    for n in out.graph.node:
        if n.op_type == "Resize":
            assert n.input[2] in ("scales", "scales2")
    assert_valid(out)
    f = random_feeds(model)
    got, ref = run_ort(out, f)[0], run_ort(model, f)[0]
    assert got.shape == ref.shape
    close_fp16(got, ref)
