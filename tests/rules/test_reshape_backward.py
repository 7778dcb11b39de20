"""bnfold.rules.reshape_backward: MatMul[+Add] -> Reshape(.., C) (-> Transpose) -> BN (LeViT's Linear ->
flatten(0,1) -> BN1d; features moved to axis 1 for a BatchNorm1d)."""

from __future__ import annotations

import numpy as np

from ..helpers import G, assert_folds, assert_skip_unchanged


def _model(shape, channels, with_add=True):
    g = G(seed=22)
    x = g.input("x", [2, 3, 4])
    y = g.node("MatMul", [x, g.const(g.rand(4, 6))], name="mm")
    if with_add:
        y = g.node("Add", [y, g.const(g.rand(6))], name="bias")
    r = g.node("Reshape", [y, g.const(np.array(shape, np.int64))], name="flat")
    z = g.bn(r, channels, name="bn")
    back = g.node("Reshape", [z, g.const(np.array([2, 3, 6], np.int64))], name="back")
    return g.model([back])


def test_folds_through_the_reshape():
    for with_add in (True, False):
        folded, report = assert_folds(_model([-1, 6], 6, with_add), expect_folded=1)
        assert report.entries[0].into.startswith("mm+")
        assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Reshape", "Reshape"]


def test_reshape_that_moves_the_feature_axis_is_skipped():
    assert_skip_unchanged(_model([-1, 12], 12), "channel_axis_mismatch")


def _transposed(perm, reshape=None):
    g = G(seed=23)
    x = g.input("x", [2, 3, 4])
    y = g.node("MatMul", [x, g.const(g.rand(4, 6))], name="mm")
    if reshape is not None:
        y = g.node("Reshape", [y, g.const(np.array(reshape, np.int64))], name="split")
    t = g.node("Transpose", [y], name="t", perm=perm)
    c = 6 if perm[1] == len(perm) - 1 else 3
    return g.model([g.node("Relu", [g.bn(t, c, name="bn")])])


def test_folds_through_a_transpose():
    folded, report = assert_folds(_transposed([0, 2, 1]), expect_folded=1)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Transpose", "Relu"]


def test_folds_through_reshape_then_transpose():
    folded, _ = assert_folds(_transposed([0, 3, 1, 2], reshape=[2, 3, 1, 6]), expect_folded=1)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Reshape", "Transpose", "Relu"]


def test_transpose_that_does_not_bring_the_features_to_axis_1_is_skipped():
    assert_skip_unchanged(_transposed([2, 1, 0]), "channel_axis_mismatch")


def test_two_bns_in_a_row_after_reshape_and_after_transpose_compose():
    """Issue 19: BN -> BN after a Reshape or a Transpose crashed (ValueError: 'b1' is not in list)."""
    from bnfold import inspect_model

    for build in (lambda g, y: g.node("Reshape", [y, g.const(np.array([-1, 6], np.int64))], name="flat"),
                  lambda g, y: g.node("Transpose", [y], name="t", perm=[0, 2, 1])):
        g = G(seed=24)
        x = g.input("x", [2, 3, 4])
        y = build(g, g.node("MatMul", [x, g.const(g.rand(4, 6))], name="mm"))
        model = g.model([g.node("Relu", [g.bn(g.bn(y, 6, name="bn1"), 6, name="bn2")])])
        assert [e.status for e in inspect_model(model).entries] == ["folded", "folded"]
        folded, _ = assert_folds(model, expect_folded=2)
        assert [n.op_type for n in folded.graph.node][:2] == ["MatMul", "Add"]


def _trailing_ones(shape, channels=8):
    """ONNX Runtime's FuseMatmulBNWithOnlyReshape case: MatMul(X[N,16], W[16,8]) -> Reshape [N,8,1,1] -> BN(8)."""
    g = G(seed=25)
    x = g.input("x", [3, 16])
    y = g.node("MatMul", [x, g.const(g.rand(16, 8))], name="mm")
    r = g.node("Reshape", [y, g.const(np.array(shape, np.int64))], name="r")
    return g.model([g.node("Relu", [g.bn(r, channels, name="bn")])])


def test_reshape_to_trailing_ones_folds():
    for shape in ([3, 8, 1, 1], [-1, 8, 1], [0, 8, 1, 1, 1]):
        folded, report = assert_folds(_trailing_ones(shape), expect_folded=1)
        assert report.entries[0].into.startswith("mm")
        assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Reshape", "Relu"]


def test_reshape_that_splits_the_features_is_skipped():
    # [3, 4, 2, 1]: axis 1 holds feature // 2, not the feature
    assert_skip_unchanged(_trailing_ones([3, 4, 2, 1], channels=4), "channel_axis_mismatch")


