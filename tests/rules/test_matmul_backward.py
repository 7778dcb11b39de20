"""bnfold.rules.matmul_backward: MatMul[+Add] -> BN, only when the BN channel axis is the feature axis."""

from __future__ import annotations

from ..helpers import G, assert_folds, assert_skip_unchanged


def test_inserts_a_bias_add():
    g = G(seed=10)
    x = g.input("x", [3, 4])
    y = g.node("MatMul", [x, g.const(g.rand(4, 6))], name="mm")
    folded, report = assert_folds(g.model([g.bn(y, 6)]), expect_folded=1)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    assert report.entries[0].into == f"mm+{folded.graph.node[1].name}"


def test_existing_bias_add_absorbs_the_shift():
    g = G(seed=11)
    x = g.input("x", [3, 4])
    y = g.node("Add", [g.const(g.rand(6)), g.node("MatMul", [x, g.const(g.rand(4, 6))], name="mm")], name="bias")
    folded, report = assert_folds(g.model([g.bn(y, 6)]), expect_folded=1)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"] and report.entries[0].into == "mm+bias"


def test_two_bns_in_a_row_compose_into_one_matmul():
    g = G(seed=12)
    x = g.input("x", [3, 4])
    y = g.node("MatMul", [x, g.const(g.rand(4, 6))], name="mm")
    folded, report = assert_folds(g.model([g.bn(g.bn(y, 6), 6)]), expect_folded=2)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]


def test_3d_output_is_channel_axis_mismatch():
    g = G(seed=13)
    x = g.input("x", [2, 6, 4])
    y = g.node("MatMul", [x, g.const(g.rand(4, 6))], name="mm")
    assert_skip_unchanged(g.model([g.bn(y, 6)]), "channel_axis_mismatch")


def test_one_channel_bn_after_3d_matmul_folds_whatever_the_axis():
    """A 1-channel BN is a scalar affine map: the channel axis does not matter (torch's fuse_linear_bn_eval)."""
    g = G(seed=14)
    x = g.input("x", [2, 1, 4])
    y = g.node("MatMul", [x, g.const(g.rand(4, 6))], name="mm")
    folded, report = assert_folds(g.model([g.bn(y, 1)]), expect_folded=1)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    g = G(seed=15)
    x = g.input("x", [2, 1, 4])
    y = g.node("Add", [g.node("MatMul", [x, g.const(g.rand(4, 6))], name="mm"), g.const(g.rand(6))], name="b")
    folded, _ = assert_folds(g.model([g.bn(y, 1)]), expect_folded=1)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
