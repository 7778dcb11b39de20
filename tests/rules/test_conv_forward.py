"""bnfold.rules.conv_forward: BN -> Conv, exact only without padding."""

from __future__ import annotations

import numpy as np
import pytest

from ..helpers import G, assert_folds, assert_skip_unchanged


@pytest.mark.parametrize("group", [1, 2])
def test_folds_into_an_unpadded_conv(group):
    g = G(seed=14)
    x = g.input("x", [2, 4, 6, 6])
    y = g.bn(g.node("Relu", [x]), 4, name="bn")
    out = g.conv(y, 4, 6, k=3, group=group, name="conv", strides=[2, 2])
    folded, report = assert_folds(g.model([out]), expect_folded=1)
    assert (report.entries[0].direction, report.entries[0].into) == ("forward", "conv")
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Conv"]


def test_zero_bias_computed_from_the_bn_output_dtype_folds():
    """torch's dynamo exporter: Conv(y, W, Expand(CastLike(0, y), [C])): the CastLike reads only y's dtype, so
    the BN output has one consumer; the computed bias becomes an initializer and its chain goes away."""
    g = G(seed=15)
    x = g.input("x", [2, 4, 6, 6])
    y = g.bn(g.node("Relu", [x]), 4)
    zero = g.node("CastLike", [g.const(np.array(0.0, np.float64)), y], name="castlike")
    bias = g.node("Expand", [zero, g.const(np.array([6], np.int64))], name="expand")
    out = g.node("Conv", [y, g.const(g.rand(6, 4, 1, 1)), bias], name="conv")
    folded, _ = assert_folds(g.model([out]), expect_folded=1)
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Conv"]


def test_padded_conv_is_skipped():
    g = G(seed=16)
    x = g.input("x", [2, 4, 6, 6])
    y = g.bn(g.node("Relu", [x]), 4)
    assert_skip_unchanged(g.model([g.conv(y, 4, 6, pads=[1, 1, 1, 1])]), "consumer_padded")
