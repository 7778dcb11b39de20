"""bnfold.rules.gemm_forward: BN -> Gemm/MatMul, directly or through Flatten(axis=1) (the classifier head)."""

from __future__ import annotations

import pytest

from ..helpers import G, assert_folds, assert_skip_unchanged


@pytest.mark.parametrize("op,tb", [("Gemm", 0), ("Gemm", 1), ("MatMul", 0)])
def test_bn_flatten_layer_folds_forward(op, tb):
    g = G(seed=17)
    x = g.input("x", [2, 3, 2, 2])
    y = g.bn(g.node("Relu", [x]), 3, name="bn")
    f = g.node("Flatten", [y], name="flatten", axis=1)
    if op == "Gemm":
        out = g.node("Gemm", [f, g.const(g.rand(*((5, 12) if tb else (12, 5)))), g.const(g.rand(5))], name="fc",
                     transB=tb, alpha=0.5, beta=2.0)
    else:
        out = g.node("MatMul", [f, g.const(g.rand(12, 5))], name="fc")
    folded, report = assert_folds(g.model([out]), expect_folded=1)
    e = report.entries[0]
    assert (e.direction, e.into.split("+")[0]) == ("forward", "fc")
    assert [n.op_type for n in folded.graph.node][:3] == ["Relu", "Flatten", op]
    assert folded.graph.node[1].input[0] == folded.graph.node[0].output[0]


def test_flatten_from_axis_2_is_skipped():
    g = G(seed=18)
    x = g.input("x", [2, 3, 2, 2])
    y = g.bn(g.node("Relu", [x]), 3)
    f = g.node("Flatten", [y], axis=2)
    out = g.node("MatMul", [f, g.const(g.rand(4, 5))])
    assert_skip_unchanged(g.model([out]), "channel_axis_mismatch")


def test_gemm_transa_is_skipped():
    g = G(seed=19)
    x = g.input("x", [4, 3])
    y = g.bn(g.node("Relu", [x]), 3)
    assert_skip_unchanged(g.model([g.node("Gemm", [y, g.const(g.rand(4, 5))], transA=1)]), "channel_axis_mismatch")
