"""bnfold.rules.affine_chain: per-channel Mul/Add/Sub/Div after a layer, with legacy (opset < 7) broadcasting
honoured: ``Gemm -> Mul(broadcast=1, axis=0)`` is a per-row scale, not per-column, and must not fold."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold import fold_model

from ..helpers import G, assert_folds, strip_fold_metadata


def test_tf_style_chain_folds():
    g = G(seed=23)
    x = g.input("x", [2, 3, 6, 6])
    c = g.conv(x, 3, 4, pads=[1, 1, 1, 1], name="conv")
    y = g.node("Add", [g.node("Mul", [c, g.const(g.rand(4, 1, 1))]), g.const(g.rand(1, 4, 1, 1))])
    folded, report = assert_folds(g.model([g.node("Relu", [y])]))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"] and report.affine_folded == 2


def _legacy_gemm_mul(axis):
    g = G(opset=6, ir_version=3, seed=24)
    x = g.input("x", [4, 4])
    y = g.node("Gemm", [x, g.const(g.rand(4, 4)), g.const(g.rand(4))], name="fc", broadcast=1)
    attrs = {"broadcast": 1} if axis is None else {"broadcast": 1, "axis": axis}
    out = g.node("Mul", [y, g.const(g.rng.uniform(0.5, 2.0, 4).astype(np.float32))], name="scale", **attrs)
    m = g.model([out], out_shapes=[[4, 4]])
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _legacy_numpy(model, x):
    """The opset-6 semantics by hand: Gemm (alpha=beta=1, C broadcast over rows), then Mul with B aligned at
    ``axis`` (default trailing)."""
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    gemm, mul = model.graph.node
    y = x.astype(np.float64) @ init[gemm.input[1]] + init[gemm.input[2]]
    s = init[mul.input[1]]
    axis = next((a.i for a in mul.attribute if a.name == "axis"), None)
    return y * (s[:, None] if axis == 0 else s[None, :])


def test_legacy_per_row_scale_is_left_alone():
    model = _legacy_gemm_mul(axis=0)
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_model(model)
    assert report.entries == []
    assert strip_fold_metadata(folded).SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("axis", [None, 1])
def test_legacy_per_column_scale_folds(axis):
    model = _legacy_gemm_mul(axis)
    folded, report = fold_model(model)
    assert report.affine_folded == 1 and [n.op_type for n in folded.graph.node] == ["Gemm"]
    onnx.checker.check_model(folded, full_check=True)
    x = np.random.default_rng(0).standard_normal((4, 4))
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in folded.graph.initializer}
    gemm = folded.graph.node[0]
    got = x @ init[gemm.input[1]] + init[gemm.input[2]]
    np.testing.assert_allclose(got, _legacy_numpy(model, x), rtol=1e-5, atol=1e-5)
