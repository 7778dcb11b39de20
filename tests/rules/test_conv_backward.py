"""bnfold.rules.conv_backward: Conv / ConvTranspose -> BN. Numbers: ORT (optimizations off) within the tolerance
of tests/helpers.py; validity: onnx.checker full check (inside assert_folds)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import fold_model
from bnfold.planner import plan

from ..helpers import (
    G,
    assert_close,
    assert_folds,
    assert_skip_unchanged,
    random_feeds,
    round_bf16_reference,
    run_ort,
)


@pytest.mark.parametrize("transpose,group", [(False, 1), (False, 3), (True, 1), (True, 3)])
def test_folds_and_plan_changes_nothing(transpose, group):
    g = G(seed=21)
    x = g.input("x", [2, 6, 5, 5])
    y = g.bn(g.conv(x, 6, 9, group=group, transpose=transpose, name="conv", pads=[1, 1, 1, 1]), 9, name="bn")
    model = g.model([y])
    before = model.SerializeToString()
    p = plan(model)
    assert model.SerializeToString() == before
    assert [(s.entry.bn, s.entry.into, s.entry.direction) for s in p.steps] == [("bn", "conv", "backward")]
    folded, _ = assert_folds(model, expect_folded=1)
    assert [n.op_type for n in folded.graph.node] == ["ConvTranspose" if transpose else "Conv"]
    # the conv's own weight initializer was rewritten in place (same name), the BN parameters are gone
    assert {t.name for t in folded.graph.initializer} == {i for i in folded.graph.node[0].input[1:]}


def test_overridable_weight_is_skipped_and_inputs_kept():
    """IR >= 4: an initializer listed in graph.input is a default the caller may override: not a constant."""
    g = G(seed=3)
    x = g.input("x", [1, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4, name="conv"), 4)
    model = g.model([y])
    w = model.graph.node[0].input[1]
    t = next(t for t in model.graph.initializer if t.name == w)
    model.graph.input.append(helper.make_tensor_value_info(w, TensorProto.FLOAT, list(t.dims)))
    report = assert_skip_unchanged(model, "overridable_initializer")
    assert w in report.entries[0].message
    feeds = random_feeds(model)
    feeds[w] = np.random.default_rng(0).standard_normal(list(t.dims)).astype(np.float32)
    folded, _ = fold_model(model)
    assert_close(run_ort(folded, feeds)[0], run_ort(model, feeds)[0])


def test_quantized_weight_is_skipped_and_stays_int8():
    g = G(seed=4)
    x = g.input("x", [1, 3, 5, 5])
    wq = g.const(np.random.default_rng(1).integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), name="w_q")
    scale = g.const(np.array(0.01, np.float32))
    w = g.node("DequantizeLinear", [wq, scale], name="dq")
    y = g.bn(g.node("Conv", [x, w], name="conv"), 4)
    model = g.model([y])
    report = assert_skip_unchanged(model, "quantized_weight")
    assert "graph inputs" not in report.entries[0].message
    folded, _ = fold_model(model)
    assert next(t for t in folded.graph.initializer if t.name == "w_q").data_type == TensorProto.INT8


def test_weight_shared_with_another_conv_gets_a_private_copy():
    g = G(seed=5)
    x = g.input("x", [1, 3, 5, 5])
    w = g.const(g.rand(4, 3, 3, 3), name="shared")
    a = g.bn(g.node("Conv", [x, w], name="a"), 4)
    b = g.node("Conv", [x, w], name="b")
    model = g.model([a, b])
    folded, _ = assert_folds(model, expect_folded=1)
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(inits["shared"], numpy_helper.to_array(model.graph.initializer[0]))
    assert next(n for n in folded.graph.node if n.name == "a").input[1] != "shared"


def test_dtype_only_use_of_the_conv_output_is_not_a_consumer():
    """CastLike(c, conv_out) reads only the dtype: the conv output still has one consumer (the BN); after the fold
    the CastLike reads the BN's output name, which has the same dtype."""
    g = G(seed=6)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 4, name="conv", pads=[1, 1, 1, 1])
    y = g.bn(c, 4)
    half = g.node("CastLike", [g.const(np.array(0.5, np.float64)), c], name="castlike")
    model = g.model([g.node("Add", [g.node("Relu", [y]), half])])
    folded, _ = assert_folds(model, expect_folded=1)
    cl = next(n for n in folded.graph.node if n.op_type == "CastLike")
    assert cl.input[1] == y


def test_bf16_weights_are_the_float64_fold_rounded_once():
    """Bit for bit: every folded bf16 value is the correctly rounded float64 fold (a double rounding through
    float32 is off by one ULP on ties, as it was before)."""
    import ml_dtypes

    from bnfold import formula
    g = G(opset=22, seed=7)
    x = g.input("x", [1, 3, 6, 6])
    conv = g.conv(x, 3, 64, pads=[1, 1, 1, 1])
    g.inits[1].CopyFrom(numpy_helper.from_array(np.r_[1.0, g.rand(63)].astype(np.float32), g.inits[1].name))
    gamma, beta, mean, var = g.bn_params(64)
    # channel 0: bias' = 1 + 2**-8 + 2**-30 exactly, just above a bf16 tie: rounded once it is 1 + 2**-7, through
    # float32 (which drops the 2**-30) it would round to even, 1.0
    gamma[0], var[0], beta[0], mean[0] = 1.0, 1.0, 2.0**-8, -(2.0**-30)
    y = g.bn(conv, 64, params=[gamma, beta, mean, var], epsilon=0.0)
    m = g.model([y])
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(ml_dtypes.bfloat16), t.name))
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    folded, report = fold_model(m)
    assert report.folded == 1
    onnx.checker.check_model(folded, full_check=True)
    src = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    conv = m.graph.node[0]
    bn = m.graph.node[1]
    gamma, beta, mean, var = (src[n] for n in bn.input[1:5])
    aff = formula.bn_affine(gamma, beta, mean, var, 0.0)
    exact_w = src[conv.input[1]] * aff.scale[:, None, None, None]
    exact_b = src[conv.input[2]] * aff.scale + aff.shift
    out = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    fc = folded.graph.node[0]
    for got, exact in ((out[fc.input[1]], exact_w), (out[fc.input[2]], exact_b)):
        want = round_bf16_reference(exact).reshape(got.shape)
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("shared", [False, True])
def test_large_weight_is_read_when_applied(shared):
    """A weight over 64 KiB is not held by the plan: it is read again when the plan is applied (the same numbers
    either way; a shared large weight still gets a private copy)."""
    g = G(seed=8)
    x = g.input("x", [1, 64, 6, 6])
    w = g.const(g.rand(96, 64, 3, 3, scale=0.05), name="big_w")
    a = g.bn(g.node("Conv", [x, w], name="a", pads=[1, 1, 1, 1]), 96)
    b = g.bn(g.node("Relu", [a]), 96)
    outs = [g.conv(b, 96, 8, k=1, name="c")]
    if shared:
        outs.append(g.node("Conv", [x, w], name="other"))
    model = g.model(outs)
    assert model.graph.initializer[0].ByteSize() > 1 << 16
    folded, report = assert_folds(model, expect_folded=2)
    assert [e.direction for e in report.entries] == ["backward", "forward"]
    conv_a = next(n for n in folded.graph.node if n.name == "a")
    assert (conv_a.input[1] == "big_w") == (not shared)  # rewritten in place unless another conv reads it
