"""bnfold.planner: the planner composes folds into one layer; plan() changes nothing and predicts apply()."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import fold_model
from bnfold.planner import apply, plan

from .helpers import G, assert_folds


def test_forward_and_backward_into_the_same_conv_compose():
    """Relu -> BN1 -> Conv (no padding) -> BN2: BN1 folds forward and BN2 backward into the same conv, whose
    weight is rounded once."""
    g = G(seed=40)
    x = g.input("x", [2, 4, 6, 6])
    y = g.bn(g.node("Relu", [x]), 4, name="bn1")
    y = g.bn(g.conv(y, 4, 5, k=3, name="conv"), 5, name="bn2")
    folded, report = assert_folds(g.model([y]), expect_folded=2)
    assert [(e.bn, e.direction, e.into) for e in report.entries] == [("bn1", "forward", "conv"),
                                                                      ("bn2", "backward", "conv")]
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Conv"]


def test_chain_of_three_bns_folds_into_one_conv():
    g = G(seed=41)
    x = g.input("x", [2, 3, 6, 6])
    y = g.conv(x, 3, 4, pads=[1, 1, 1, 1], name="conv")
    for i in range(3):
        y = g.bn(y, 4, name=f"bn{i}")
    folded, report = assert_folds(g.model([y]), expect_folded=3)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert len(folded.graph.initializer) == 2


def test_composition_that_overflows_skips_only_the_second():
    g = G(seed=42, dtype=np.float16)
    x = g.input("x", [1, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4, name="conv"), 4, name="bn1")
    gamma, beta, mean, var = g.bn_params(4)
    gamma[0], var[0] = 60000.0, 1e-3
    y = g.bn(y, 4, name="bn2", params=[gamma, beta, mean, var])
    model = g.model([y])
    folded, report = fold_model(model)
    # numbers are not compared: the original itself overflows float16 there (that is the point)
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization"]
    assert [(e.bn, e.status, e.reason) for e in report.entries] == [("bn1", "folded", None),
                                                                     ("bn2", "skipped", "cast_overflow")]


def test_plan_predicts_apply_and_changes_nothing():
    g = G(seed=43)
    x = g.input("x", [2, 3, 6, 6])
    a = g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1]), 4, name="a")
    b = g.bn(g.node("Relu", [a]), 4, name="b")
    model = g.model([g.node("Sigmoid", [b])])
    before = model.SerializeToString()
    p = plan(model)
    assert model.SerializeToString() == before
    planned = [(e.bn, e.status, e.reason, e.into) for e in p.entries]
    _, report = fold_model(model)
    assert planned == [(e.bn, e.status, e.reason, e.into) for e in report.entries]
    apply(p)  # applying mutates the planned model itself
    assert model.SerializeToString() != before and sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 1


def test_deep_graph_does_not_recurse_through_non_constant_ops():
    """A Mul by a constant after 1,500 Relus: asking whether the Mul's other input is constant stops at the first
    op bnfold does not evaluate (it used to walk up the whole graph: RecursionError, and every weight read)."""
    g = G(seed=44)
    x = g.input("x", [1, 3, 4, 4])
    y = g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1]), 4)
    for _ in range(1500):
        y = g.node("Relu", [y])
    y = g.node("Mul", [y, g.const(np.full((4, 1, 1), 2.0, np.float32))])
    folded, report = assert_folds(g.model([y]), expect_folded=1)
    assert report.affine_folded == 0
