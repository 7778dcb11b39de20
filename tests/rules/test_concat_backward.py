"""bnfold.rules.concat_backward: Concat(axis=1) of layer outputs -> BN folds slice by slice into each layer."""

from __future__ import annotations

from ..helpers import G, assert_folds, assert_skip_unchanged


def _model(shared=False, relu=False, axis=1):
    g = G(seed=20)
    x = g.input("x", [2, 3, 6, 6])
    a = g.conv(x, 3, 2, k=1, name="a")
    b = g.conv(x, 3, 3, k=3, pads=[1, 1, 1, 1], name="b", bias=False)
    c = g.conv(x, 3, 4, k=2, transpose=True, strides=[1, 1], name="c", pads=[0, 0, 1, 1])
    if relu:
        c = g.node("Relu", [c])
    cat = g.node("Concat", [a, b, c], name="cat", axis=axis)
    y = g.bn(cat, 9, name="bn")
    return g.model([y, b] if shared else [y])


def test_folds_per_slice():
    folded, report = assert_folds(_model(), expect_folded=1)
    assert report.entries[0].into == "a+b+c"
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv", "ConvTranspose", "Concat"]


def test_an_input_used_elsewhere_is_skipped():
    assert_skip_unchanged(_model(shared=True), "producer_output_shared")


def test_an_input_from_a_non_layer_is_skipped():
    assert_skip_unchanged(_model(relu=True), "no_foldable_neighbour")


def test_two_bns_in_a_row_after_concat_compose():
    """Issue 19: the second BN looked up the Concat's output by the name the first BN only renamed in the plan
    (ValueError: 'b1' is not in list, exit 3) in fold and inspect."""
    from bnfold import inspect_model

    g = G(seed=21)
    x = g.input("x", [2, 3, 6, 6])
    cat = g.node("Concat", [g.conv(x, 3, 2, k=1, name="a"), g.conv(x, 3, 3, k=1, name="b")], name="cat", axis=1)
    model = g.model([g.bn(g.bn(cat, 5, name="bn1"), 5, name="bn2")])
    assert [e.status for e in inspect_model(model).entries] == ["folded", "folded"]
    folded, report = assert_folds(model, expect_folded=2)
    assert [e.into for e in report.entries] == ["a+b", "a+b"]
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv", "Concat"]
