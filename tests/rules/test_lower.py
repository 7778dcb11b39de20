"""bnfold.rules.lower: a BN with no foldable neighbour becomes Mul+Add (opt-in)."""

from __future__ import annotations

from bnfold import FoldOptions

from ..helpers import G, assert_folds, assert_skip_unchanged


def test_lowered_on_request_only():
    g = G(seed=25)
    x = g.input("x", [2, 3, 5, 5])
    model = g.model([g.node("Sigmoid", [g.bn(g.node("Relu", [x]), 3)])])
    assert_skip_unchanged(model, "no_foldable_neighbour")
    folded, report = assert_folds(model, options=FoldOptions(lower_standalone=True), expect_folded=1)
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Mul", "Add", "Sigmoid"]
    assert report.entries[0].direction == "lowered"
