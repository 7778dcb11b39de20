"""bnfold.rules.reshape_backward: MatMul[+Add] -> Reshape(.., C) -> BN (LeViT's Linear -> flatten(0,1) -> BN1d)."""

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
