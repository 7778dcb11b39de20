"""bnfold.rules.gemm_backward: Gemm -> BN (alpha, beta, transA/B, C of any broadcastable shape)."""

from __future__ import annotations

import pytest
from onnx import helper

from ..helpers import G, assert_folds, assert_skip_unchanged


@pytest.mark.parametrize("tb", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (3, 1), (3, 5)])
def test_folds_and_sets_beta_one(tb, c_shape):
    g = G(seed=8)
    x = g.input("x", [3, 4])
    ins = [x, g.const(g.rand(*((5, 4) if tb else (4, 5))))]
    if c_shape is not None:
        ins.append(g.const(g.rand(*c_shape)))
    y = g.node("Gemm", ins, name="fc", alpha=0.7, beta=1.3, transB=tb)
    folded, report = assert_folds(g.model([g.bn(y, 5)]), expect_folded=1)
    gemm = folded.graph.node[0]
    assert [n.op_type for n in folded.graph.node] == ["Gemm"] and report.entries[0].into == "fc"
    assert helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "beta")) == 1.0


def test_output_also_used_elsewhere_is_skipped():
    g = G(seed=9)
    x = g.input("x", [3, 4])
    y = g.node("Gemm", [x, g.const(g.rand(4, 5))], name="fc")
    assert_skip_unchanged(g.model([g.bn(y, 5), g.node("Relu", [y])]), "producer_output_shared")
