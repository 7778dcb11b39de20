"""bnfold.rules.branch_merge: Add/Sub/Sum of branches affine in one tensor -> one Conv. Structure: one Conv, no BN
left; numbers: ORT (optimizations off) against the branched original within the tolerance of tests/helpers.py
(assert_folds); validity: onnx.checker full check. Refusals: the Add entry's reason, and the model is byte for byte
the input (assert_skip_unchanged)."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold import FoldOptions, count_bn, fold_model, inspect_model
from bnfold.report import REASONS

from ..helpers import G, assert_close, assert_folds, assert_skip_unchanged, random_feeds, run_ort


def ops(model):
    return [n.op_type for n in model.graph.node]


def merges(report):
    return [e for e in report.entries if e.direction == "merged" and e.op != "BatchNormalization"]


def conv_bn(g, x, cin, cout, k, group=1, name=None, **attrs):
    pad = (k - 1) // 2
    attrs.setdefault("pads", [pad] * 4)
    return g.bn(g.conv(x, cin, cout, k=k, group=group, bias=False, name=name, **attrs), cout)


@pytest.mark.parametrize("order", ["kxk_first", "identity_first"])
def test_repvgg_block_becomes_one_conv(order):
    g = G(seed=1)
    x = g.input("x", [2, 4, 7, 7])
    a = conv_bn(g, x, 4, 4, 3, name="c3")
    b = conv_bn(g, x, 4, 4, 1, name="c1")
    i = g.bn(x, 4, name="bn_id")
    s = g.node("Add", [a, b], name="add1")
    s = g.node("Add", [s, i] if order == "kxk_first" else [i, s], name="add2")
    model = g.model([g.node("Relu", [s])])
    folded, report = assert_folds(model, expect_folded=3)
    assert ops(folded) == ["Conv", "Relu"]
    conv = folded.graph.node[0]
    assert conv.input[0] == "x" and len(conv.input) == 3
    assert [(e.bn, e.status, e.into) for e in merges(report)] == [("add1", "folded", "c3"), ("add2", "folded", "c3")]
    assert "identity via bn_id" in merges(report)[1].message
    bn_id = next(e for e in report.entries if e.bn == "bn_id")
    assert (bn_id.status, bn_id.direction, bn_id.into) == ("folded", "merged", "c3")
    assert report.branches_merged == 2 and report.bn_total == 3


def test_repvgg_stride2_without_identity():
    g = G(seed=2)
    x = g.input("x", [2, 4, 8, 8])
    a = conv_bn(g, x, 4, 6, 3, name="c3", strides=[2, 2])
    b = conv_bn(g, x, 4, 6, 1, name="c1", strides=[2, 2])
    model = g.model([g.node("Add", [a, b], name="add")])
    folded, report = assert_folds(model, expect_folded=2)
    assert ops(folded) == ["Conv"]


@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_mobileone_k_branches_scale_and_identity(depthwise):
    c, k_branches = 6, 3
    group = c if depthwise else 1
    g = G(seed=3)
    x = g.input("x", [2, c, 6, 6])
    scale = conv_bn(g, x, c, c, 1, group=group, name="scale")
    ident = g.bn(x, c, name="bn_id")
    out = g.node("Add", [scale, ident], name="add_s")
    for i in range(k_branches):
        out = g.node("Add", [out, conv_bn(g, x, c, c, 3, group=group, name=f"k{i}")], name=f"add_{i}")
    model = g.model([g.node("Relu", [out])])
    folded, report = assert_folds(model, expect_folded=k_branches + 2)
    assert ops(folded) == ["Conv", "Relu"]
    conv = folded.graph.node[0]
    assert next(a.i for a in conv.attribute if a.name == "group") == group
    assert len(merges(report)) == k_branches + 1


def test_repvit_repvggdw_then_bn_after_add():
    c = 8
    g = G(seed=4)
    x = g.input("x", [2, c, 5, 5])
    a = conv_bn(g, x, c, c, 3, group=c, name="dw3")
    b = g.conv(x, c, c, k=1, group=c, bias=True, name="dw1")
    s = g.node("Add", [g.node("Add", [a, b], name="add1"), x], name="add2")
    y = g.bn(s, c, name="bn_after")
    model = g.model([y])
    folded, report = assert_folds(model, expect_folded=2)
    assert ops(folded) == ["Conv"]
    after = next(e for e in report.entries if e.bn == "bn_after")
    assert (after.status, after.direction, after.into) == ("folded", "backward", "dw3")


def test_sum_node():
    g = G(seed=5)
    x = g.input("x", [1, 4, 6, 6])
    a = conv_bn(g, x, 4, 4, 3, name="c3")
    b = conv_bn(g, x, 4, 4, 1, name="c1")
    model = g.model([g.node("Sum", [a, b, g.bn(x, 4, name="bn_id")], name="sum")])
    folded, report = assert_folds(model, expect_folded=3)
    assert ops(folded) == ["Conv"]
    assert [(e.op, e.status) for e in merges(report)] == [("Sum", "folded")]


def test_5x5_3x3_1x1_centred_and_bias_less_host_gets_a_bias():
    g = G(seed=6)
    x = g.input("x", [2, 3, 9, 9])
    k5 = g.conv(x, 3, 5, k=5, bias=False, pads=[2, 2, 2, 2], name="k5")
    k3 = conv_bn(g, x, 3, 5, 3, name="k3")
    k1 = conv_bn(g, x, 3, 5, 1, name="k1")
    model = g.model([g.node("Add", [g.node("Add", [k1, k3]), k5], name="add")])
    folded, _ = assert_folds(model, expect_folded=2)
    assert ops(folded) == ["Conv"]
    conv = folded.graph.node[0]
    assert conv.name == "k5" and len(conv.input) == 3  # the largest kernel hosts; the BN shifts became its bias


def test_fastvit_repmixer_tree():
    """x + gamma * (mixer(x) - norm(x)): mixer = dw3x3+BN + dw1x1+BN + BN(x), norm = BN(x), gamma per channel."""
    c = 6
    g = G(seed=7)
    x = g.input("x", [2, c, 6, 6])
    mixer = g.node("Add", [g.node("Add", [conv_bn(g, x, c, c, 1, group=c), g.bn(x, c, name="m_id")]),
                           conv_bn(g, x, c, c, 3, group=c, name="m3")])
    diff = g.node("Sub", [mixer, g.bn(x, c, name="norm")], name="sub")
    scaled = g.node("Mul", [diff, g.const(g.rand(c, 1, 1))], name="gamma")
    model = g.model([g.node("Add", [x, scaled], name="residual")])
    folded, report = assert_folds(model, expect_folded=4)
    assert ops(folded) == ["Conv"]
    assert {e.bn for e in merges(report) if e.status == "folded"} >= {"sub", "residual"}


def test_gamma_on_identity_only_and_constant_shift():
    """Per-channel Mul/Add by constants on x itself are part of the affine form."""
    g = G(seed=8)
    x = g.input("x", [1, 4, 5, 5])
    scaled_x = g.node("Add", [g.node("Mul", [x, g.const(g.rand(1, 4, 1, 1))], name="mul_x"),
                              g.const(g.rand(4, 1, 1))], name="add_c")
    model = g.model([g.node("Sub", [conv_bn(g, x, 4, 4, 3), scaled_x], name="sub")])
    folded, _ = assert_folds(model, expect_folded=1)
    assert ops(folded) == ["Conv"]


def test_dense_and_depthwise_branches_make_a_dense_conv():
    g = G(seed=9)
    x = g.input("x", [2, 4, 6, 6])
    model = g.model([g.node("Add", [conv_bn(g, x, 4, 4, 3, group=4, name="dw"), conv_bn(g, x, 4, 4, 3, name="dense"),
                                    ], name="add")])
    folded, _ = assert_folds(model, expect_folded=2)
    assert ops(folded) == ["Conv"]
    assert next(a.i for a in folded.graph.node[0].attribute if a.name == "group") == 1


def test_grouped_branches_merge_with_the_gcd_of_their_groups():
    g = G(seed=10)
    x = g.input("x", [2, 8, 6, 6])
    model = g.model([g.node("Add", [conv_bn(g, x, 8, 8, 3, group=4, name="g4"), conv_bn(g, x, 8, 8, 1, group=8),
                                    ], name="add")])
    folded, _ = assert_folds(model, expect_folded=2)
    assert ops(folded) == ["Conv"]
    assert next(a.i for a in folded.graph.node[0].attribute if a.name == "group") == 4


def test_dilated_kernel_with_1x1_and_identity():
    g = G(seed=11)
    x = g.input("x", [1, 4, 9, 9])
    a = conv_bn(g, x, 4, 4, 3, name="d2", dilations=[2, 2], pads=[2, 2, 2, 2])
    model = g.model([g.node("Add", [g.node("Add", [a, conv_bn(g, x, 4, 4, 1)]), x], name="add")])
    folded, _ = assert_folds(model, expect_folded=2)
    assert ops(folded) == ["Conv"]


def test_1d_convs_merge():
    g = G(seed=12)
    x = g.input("x", [2, 4, 10])
    a = g.bn(g.conv(x, 4, 4, k=3, bias=False, nd=1, pads=[1, 1]), 4)
    b = g.bn(g.conv(x, 4, 4, k=1, bias=False, nd=1), 4)
    model = g.model([g.node("Add", [a, b], name="add")])
    folded, _ = assert_folds(model, expect_folded=2)
    assert ops(folded) == ["Conv"]


def test_no_merge_keeps_branches_and_reports_nothing_merged():
    g = G(seed=13)
    x = g.input("x", [2, 4, 6, 6])
    s = g.node("Add", [g.node("Add", [conv_bn(g, x, 4, 4, 3), conv_bn(g, x, 4, 4, 1)]), g.bn(x, 4, name="bn_id")])
    model = g.model([s])
    folded, report = assert_folds(model, expect_bn=1, options=FoldOptions(merge_branches=False), expect_folded=2)
    assert ops(folded).count("Conv") == 2 and not merges(report)
    assert next(e for e in report.entries if e.bn == "bn_id").reason == "no_foldable_neighbour"


def test_inspect_plans_the_merge_and_changes_nothing():
    g = G(seed=14)
    x = g.input("x", [2, 4, 6, 6])
    model = g.model([g.node("Add", [conv_bn(g, x, 4, 4, 3, name="c3"), g.bn(x, 4, name="bn_id")], name="add")])
    before = model.SerializeToString()
    report = inspect_model(model)
    assert model.SerializeToString() == before
    assert [(e.status, e.direction, e.into) for e in report.entries] == [
        ("folded", "backward", "c3"), ("folded", "merged", "c3"), ("folded", "merged", "c3")]
    assert [e.bn for e in report.entries][1:] == ["bn_id", "add"]
    assert report.to_dict()["branches_merged"] == 1


def test_residual_conv_plus_other_tensor_is_not_a_candidate():
    """ResNet's ``bn(conv(h)) + x``: not a merge, not reported; the BN folds as before."""
    g = G(seed=15)
    x = g.input("x", [2, 4, 6, 6])
    h = g.node("Relu", [conv_bn(g, x, 4, 4, 3)])
    model = g.model([g.node("Add", [conv_bn(g, h, 4, 4, 3), x], name="add")])
    folded, report = assert_folds(model, expect_folded=2)
    assert ops(folded).count("Conv") == 2 and not merges(report)


# ------------------------------------------------------------------------------------------------- refusals
def _refused(model, reason):
    report = assert_skip_unchanged(model, reason, op=model.graph.node[-1].op_type)
    assert reason in REASONS
    assert merges(report)[0].status == "skipped"
    return report


def test_misaligned_pads_refused():
    g = G(seed=20)
    x = g.input("x", [1, 4, 6, 6])
    a = g.conv(x, 4, 4, k=3, pads=[1, 1, 1, 1], name="centred")
    b = g.conv(x, 4, 4, k=3, pads=[2, 2, 0, 0], name="shifted")
    _refused(g.model([g.node("Add", [a, b], name="add")]), "branch_pads_misaligned")


def test_different_dilations_refused():
    g = G(seed=21)
    x = g.input("x", [1, 4, 8, 8])
    a = g.conv(x, 4, 4, k=3, pads=[1, 1, 1, 1])
    b = g.conv(x, 4, 4, k=3, pads=[2, 2, 2, 2], dilations=[2, 2])
    _refused(g.model([g.node("Add", [a, b], name="add")]), "branch_dilations_differ")


def test_different_strides_refused():
    g = G(seed=22)
    x = g.input("x", [1, 4, 4, 4])
    a = g.conv(x, 4, 4, k=3)  # 4 -> 2
    b = g.conv(x, 4, 4, k=1, strides=[3, 3])  # 4 -> 2
    _refused(g.model([g.node("Add", [a, b], name="add")]), "branch_strides_differ")


def test_different_inputs_refused():
    g = G(seed=23)
    x1, x2 = g.input("x1", [1, 4, 5, 5]), g.input("x2", [1, 4, 5, 5])
    a = g.conv(x1, 4, 4, k=3, pads=[1, 1, 1, 1])
    b = g.conv(x2, 4, 4, k=1)
    _refused(g.model([g.node("Add", [a, b], name="add")]), "branch_inputs_differ")


@pytest.mark.parametrize("where", ["graph_output", "other_consumer", "bn_branch"])
def test_branch_read_elsewhere_refused(where):
    g = G(seed=24)
    x = g.input("x", [1, 4, 5, 5])
    a = g.conv(x, 4, 4, k=3, pads=[1, 1, 1, 1])
    b = g.conv(x, 4, 4, k=1, name="c1")
    if where == "bn_branch":
        b = g.node("Mul", [x, g.const(g.rand(1, 4, 1, 1))], name="mul")
    outs = [g.node("Add", [a, b], name="add")]
    if where == "graph_output":
        outs.append(b)
    else:
        outs.append(g.node("Relu", [b]))
    model = g.model(outs)
    report = assert_skip_unchanged(model, "branch_output_shared", op="Add")
    assert ("mul" if where == "bn_branch" else "c1") in report.entries[-1].message


def test_identity_with_channel_change_is_refused():
    g = G(seed=25)
    x = g.input("x", [1, 4, 5, 5])
    a = g.conv(x, 4, 1, k=3, pads=[1, 1, 1, 1])  # 1 output channel broadcasts against x's 4
    _refused(g.model([g.node("Add", [a, x], name="add")]), "channel_count_mismatch")


def test_numbers_kept_when_merge_refused_but_bns_fold():
    """A refused merge leaves the Add; the branches' own BNs still fold (numbers checked)."""
    g = G(seed=26)
    x = g.input("x", [2, 4, 6, 6])
    a = conv_bn(g, x, 4, 4, 3, pads=[2, 2, 0, 0])
    b = conv_bn(g, x, 4, 4, 3)
    folded, report = assert_folds(g.model([g.node("Add", [a, b], name="add")]), expect_folded=2)
    assert ops(folded) == ["Conv", "Conv", "Add"]
    assert merges(report)[0].reason == "branch_pads_misaligned"


def test_merged_fp16_model_rounds_once():
    g = G(seed=27, dtype=np.float16)
    x = g.input("x", [1, 4, 6, 6])
    s = g.node("Add", [g.node("Add", [conv_bn(g, x, 4, 4, 3), conv_bn(g, x, 4, 4, 1)]), g.bn(x, 4)])
    model = g.model([s])
    folded, _ = assert_folds(model)
    assert ops(folded) == ["Conv"]
    # reference in float64 from the float16 parameters: within the fp16 tolerance
    feeds = random_feeds(model)
    assert_close(run_ort(folded, feeds)[0], run_ort(model, feeds)[0], low_precision=True)
    assert count_bn(folded) == 0
    assert fold_model(model)[1].branches_merged == 2


def test_residual_whose_input_is_a_conv_output_is_not_reported():
    """FastViT's ``x + mlp(x)`` where ``x`` is itself a (merged) conv's output, read by the mlp too: a plain
    residual, not a branch read elsewhere."""
    g = G(seed=28)
    inp = g.input("x", [2, 4, 6, 6])
    x = g.conv(inp, 4, 4, k=3, pads=[1, 1, 1, 1], name="prev")
    h = g.node("Relu", [g.conv(x, 4, 8, k=1, name="fc1")])
    model = g.model([g.node("Add", [x, g.conv(h, 8, 4, k=1, name="fc2")], name="add")])
    folded, report = fold_model(model)
    assert not merges(report) and ops(folded) == ops(model)


@pytest.mark.parametrize("seed", range(24))
def test_random_branch_sets_merge_exactly_or_are_refused_unchanged(seed):
    """Random branch sets (kernels 1/3/5, dilation 1/2, centred or shifted pads, dense or depthwise, with or
    without their own BN, identity as x / BN(x) / c*x, stride 1 or 2, Add chain / Sum / Sub): the fold always
    matches the original (numbers, checker); every centred set with aligned dilations becomes one Conv."""
    import onnx

    rng = np.random.default_rng(seed)
    c, h = 4, 7
    g = G(seed=100 + seed)
    x = g.input("x", [2, c, h, h])
    stride = int(rng.choice([1, 2]))
    dil = int(rng.choice([1, 2]))
    aligned = True
    branches = []
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.choice([1, 3, 5]))
        d = dil if k > 1 else 1
        p = (k - 1) * d // 2
        shift = int(rng.choice([0, 0, 1])) if p else 0
        aligned &= shift == 0
        group = int(rng.choice([1, c]))
        y = g.conv(x, c, c, k=k, group=group, bias=bool(rng.integers(2)), pads=[p + shift] * 2 + [p - shift] * 2,
                   strides=[stride] * 2, dilations=[d] * 2)
        branches.append(g.bn(y, c) if rng.integers(2) else y)
    if stride == 1 and rng.integers(2):
        kind = int(rng.integers(3))
        branches.append(x if kind == 0 else g.bn(x, c) if kind == 1 else g.node("Mul", [x, g.const(g.rand(c, 1, 1))]))
    if len(branches) > 1 and rng.integers(3) == 0:
        out = g.node("Sum", branches)
    elif len(branches) > 1 and rng.integers(2):
        out = g.node("Sub", [branches[0], g.node("Sum", branches[1:]) if len(branches) > 2 else branches[1]])
    else:
        out = branches[0]
        for b in branches[1:]:
            out = g.node("Add", [out, b])
    model = g.model([g.node("Relu", [out])])
    folded, report = fold_model(model)
    onnx.checker.check_model(folded, full_check=True)
    feeds = random_feeds(model)
    assert_close(run_ort(folded, feeds)[0], run_ort(model, feeds)[0])
    if aligned and len(branches) > 1:
        assert ops(folded) == ["Conv", "Relu"], report.to_dict()
    assert (ops(folded) == ["Conv", "Relu"]) == (len(branches) == 1 or bool(merges(report))
                                                 and all(e.status == "folded" for e in merges(report)))


def test_merge_inside_if_branches_with_shadowed_names():
    """Each If branch holds its own RepVGG block on the outer x, with initializers of the same names: each
    merges with its own values."""
    import onnx
    from onnx import TensorProto, helper

    def branch(name, seed):
        sub = G(seed=seed, prefix=f"{name}_")
        a = sub.bn(sub.node("Conv", ["x", sub.const(sub.rand(4, 4, 3, 3), name="W3")], pads=[1, 1, 1, 1]), 4)
        b = sub.bn(sub.node("Conv", ["x", sub.const(sub.rand(4, 4, 1, 1), name="W1")]), 4)
        out = sub.node("Add", [sub.node("Add", [a, b]), sub.bn("x", 4)], name=f"{name}_add")
        return helper.make_graph(sub.nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                                 initializer=sub.inits)
    g = G()
    g.input("x", [1, 4, 6, 6])
    cond = g.input("cond", [], dtype=np.float32)
    b = g.node("Greater", [cond, g.const(np.array(0.0, np.float32))])
    model = g.model([g.node("If", [b], then_branch=branch("then", 1), else_branch=branch("else", 2))])
    folded, report = fold_model(model)
    onnx.checker.check_model(folded, full_check=True)
    assert count_bn(folded) == 0 and report.branches_merged == 4
    for attr in folded.graph.node[-1].attribute:
        assert [n.op_type for n in attr.g.node] == ["Conv"]
    for c in (1.0, -1.0):
        feeds = {"x": random_feeds(model)["x"], "cond": np.array(c, np.float32)}
        assert_close(run_ort(folded, feeds)[0], run_ort(model, feeds)[0])


def test_dilated_3x3_inside_a_5x5_merges_into_the_5x5():
    """A 3x3 with dilation 2 reads taps -2, 0, 2: inside the window of a 5x5 (same span): the 5x5 hosts."""
    g = G(seed=29)
    x = g.input("x", [1, 4, 9, 9])
    a = g.conv(x, 4, 4, k=3, pads=[2, 2, 2, 2], dilations=[2, 2], name="d2")
    b = g.conv(x, 4, 4, k=5, pads=[2, 2, 2, 2], name="k5")
    folded, report = assert_folds(g.model([g.node("Add", [a, b], name="add")]))
    assert ops(folded) == ["Conv"] and merges(report)[0].into == "k5"


def test_projection_shortcut_is_not_a_candidate():
    """ResNet's downsample block ``bn(conv(h)) + bn(conv(x))`` with ``h`` computed from ``x``: not parallel
    branches, so not reported (the BNs fold as before)."""
    g = G(seed=30)
    x = g.input("x", [2, 4, 6, 6])
    h = g.node("Relu", [conv_bn(g, x, 4, 8, 3, strides=[2, 2])])
    model = g.model([g.node("Add", [conv_bn(g, h, 8, 8, 3), conv_bn(g, x, 4, 8, 1, strides=[2, 2])], name="add")])
    folded, report = assert_folds(model, expect_folded=3)
    assert not merges(report) and ops(folded).count("Conv") == 3
