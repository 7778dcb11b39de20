"""Issue 12, "never a silent change": every case either folds with outputs equal to the original's for every feed
it accepts (overriding inputs included) and the same graph inputs, or is skipped with its reason and left
byte-identical, or is refused (exit 2, nothing written). Numbers: ORT with graph optimizations off, tolerance of
tests/helpers.py; validity: onnx.checker full check."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bnfold import BnfoldError, count_bn, fold_model, inspect_model
from bnfold.cli.main import main

from .helpers import (
    G,
    assert_close,
    assert_folds,
    assert_skip_unchanged,
    random_feeds,
    run_ort,
    strip_fold_metadata,
)


# ------------------------------------------------------------------------------------------- scoping
def _branch(name, seed, *, bn=True, inner=None, w_shape=(4, 3, 3, 3)):
    """A branch graph: Conv with its own initializer named 'W' (the same name as everywhere else) on the outer
    'x', optionally followed by a BN, optionally with a nested If whose branches are ``inner``."""
    sub = G(seed=seed, prefix=f"{name}_")
    w = sub.const(sub.rand(*w_shape), name="W")
    y = sub.node("Conv", ["x", w], name=f"{name}_conv", pads=[1, 1, 1, 1])
    if bn:
        y = sub.bn(y, w_shape[0], name=f"{name}_bn")
    if inner is not None:
        z = sub.node("If", ["b"], name=f"{name}_if", then_branch=inner[0], else_branch=inner[1])
        y = sub.node("Add", [y, z])
    out = sub.node("Identity", [y], name=f"{name}_out")
    return helper.make_graph(sub.nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                             initializer=sub.inits)


def _if_model(then_b, else_b, *, main_bn=True):
    g = G(seed=30)
    g.input("x", [1, 3, 6, 6])
    cond = g.input("cond", [], dtype=np.float32)
    g.nodes.append(helper.make_node("Greater", [cond, g.const(np.array(0.0, np.float32))], ["b"], name="greater"))
    w = g.const(g.rand(4, 3, 3, 3), name="W")  # the main graph's own W
    main = g.node("Conv", ["x", w], name="main_conv", pads=[1, 1, 1, 1])
    if main_bn:
        main = g.bn(main, 4, name="main_bn")
    y = g.node("If", ["b"], name="if", then_branch=then_b, else_branch=else_b)
    return g.model([g.node("Add", [main, y])], out_shapes=[[1, 4, 6, 6]])


def _assert_same_outputs(model, folded):
    x = random_feeds(model)["x"]
    for c in (1.0, -1.0):
        feeds = {"x": x, "cond": np.array(c, np.float32)}
        assert_close(run_ort(folded, feeds)[0], run_ort(model, feeds)[0], what=f"cond={c}")


def test_sibling_shadowing_without_bn_changes_nothing():
    """The issue's repro: two If branches each with their own 'W', the main graph also uses 'W', no BN at all."""
    model = _if_model(_branch("then", 1, bn=False), _branch("else", 2, bn=False), main_bn=False)
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_model(model)
    assert report.bn_total == 0
    assert strip_fold_metadata(folded).SerializeToString() == model.SerializeToString()
    _assert_same_outputs(model, folded)


def test_sibling_shadowing_with_bn_folds_each_into_its_own_w():
    model = _if_model(_branch("then", 1), _branch("else", 2))
    folded, report = fold_model(model)
    assert report.folded == 3 and count_bn(folded) == 0
    onnx.checker.check_model(folded, full_check=True)
    _assert_same_outputs(model, folded)
    # each scope still holds exactly one W of its own
    assert [t.name for t in folded.graph.initializer].count("W") == 1
    for a in folded.graph.node[-2].attribute:
        assert [t.name for t in a.g.initializer].count("W") == 1


@pytest.mark.parametrize("inner_bn", [False, True])
def test_nested_shadowing(inner_bn):
    """An If inside a branch: the innermost 'W' shadows the branch's 'W', which shadows the main graph's."""
    inner = (_branch("in_then", 5, bn=inner_bn), _branch("in_else", 6, bn=inner_bn))
    model = _if_model(_branch("then", 3, inner=inner), _branch("else", 4, bn=False))
    folded, report = fold_model(model)
    assert report.folded == report.bn_total == 2 + 2 * inner_bn
    onnx.checker.check_model(folded, full_check=True)
    _assert_same_outputs(model, folded)


def test_subgraph_read_of_the_conv_output_is_a_use():
    """A branch reading the conv output 'c' from the enclosing graph is a second user: no backward fold."""
    g = G(seed=31)
    x = g.input("x", [1, 3, 6, 6])
    cond = g.input("cond", [], dtype=np.float32)
    c = g.conv(x, 3, 4, pads=[1, 1, 1, 1], name="conv")
    y = g.bn(c, 4, name="bn")
    b = g.node("Greater", [cond, g.const(np.array(0.0, np.float32))])
    branch = helper.make_graph([helper.make_node("Relu", [c], ["r"])], "br", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", [y], ["i"])], "br2", [],
                              [helper.make_tensor_value_info("i", TensorProto.FLOAT, None)])
    z = g.node("If", [b], then_branch=branch, else_branch=other)
    model = g.model([g.node("Add", [y, z])], out_shapes=[[1, 4, 6, 6]])
    feeds = random_feeds(model)
    feeds["cond"] = np.array(1.0, np.float32)
    assert_skip_unchanged(model, "producer_output_shared", feeds=feeds)


# ------------------------------------------------------------------------------------------- overridable inputs
def _with_overridable(model, names):
    for t in model.graph.initializer:
        if t.name in names:
            model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def test_overridable_bn_parameter_is_skipped_and_stays_an_input():
    g = G(seed=32)
    x = g.input("x", [1, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4), 4, name="bn")
    model = g.model([y])
    scale = model.graph.node[1].input[1]
    model = _with_overridable(model, {scale})
    report = assert_skip_unchanged(model, "overridable_initializer")
    assert "scale" in report.entries[0].message
    folded, _ = fold_model(model)
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]
    feeds = random_feeds(model)
    feeds[scale] = np.full(4, 3.0, np.float32)  # a caller overriding the default
    assert_close(run_ort(folded, feeds)[0], run_ort(model, feeds)[0])


def test_overridable_initializers_elsewhere_do_not_block_the_fold():
    """keep_initializers_as_inputs=True on an unrelated tensor: the BN still folds; the graph inputs are the same."""
    g = G(seed=33)
    x = g.input("x", [1, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1]), 4)
    k = g.const(np.array([2.0], np.float32), name="k")
    model = _with_overridable(g.model([g.node("Mul", [g.node("Relu", [y]), k])]), {"k"})
    folded, _ = assert_folds(model, expect_folded=1)
    assert [i.name for i in folded.graph.input] == ["x", "k"]


# ------------------------------------------------------------------------------------------- checker gate
def _bad_models():
    g = G(seed=34)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 4, pads=[1, 1, 1, 1])
    m = g.model([g.bn(c, 4)])
    rank = onnx.ModelProto()
    rank.CopyFrom(m)
    rank.graph.value_info.append(helper.make_tensor_value_info(c, TensorProto.FLOAT, [1, 4, 5]))  # really 4-D
    cycle = onnx.ModelProto()
    cycle.CopyFrom(m)
    cycle.graph.node[0].input[0] = cycle.graph.node[1].output[0]
    dup = onnx.ModelProto()
    dup.CopyFrom(m)
    dup.graph.node.append(helper.make_node("Relu", [x], [m.graph.output[0].name], name="dup"))
    return {"value_info_rank": rank, "cycle": cycle, "duplicate_output": dup}


@pytest.mark.parametrize("case", ["value_info_rank", "cycle", "duplicate_output"])
def test_model_the_checker_rejects_is_refused(case, tmp_path):
    model = _bad_models()[case]
    with pytest.raises(Exception):  # noqa: B017  (ValidationError or InferenceError)
        onnx.checker.check_model(model, full_check=True)
    with pytest.raises(BnfoldError, match="not a valid ONNX model"):
        fold_model(model)
    with pytest.raises(BnfoldError, match="not a valid ONNX model"):
        inspect_model(model)
    src = tmp_path / "bad.onnx"
    onnx.save(model, src)
    r = CliRunner().invoke(main, ["fold", str(src), "-o", str(tmp_path / "out.onnx")])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not a valid ONNX model" in lines[0]
    assert not (tmp_path / "out.onnx").exists()


# ------------------------------------------------------------------------------------------- preservation
def _rich_model():
    """Conv -> BN -> Optional -> OptionalGetElement, plus metadata, doc strings, a local function, training_info
    and an unused custom-domain node whose TENSORS attribute graphsurgeon cannot represent."""
    g = G(opset=18, seed=35, ir_version=9)
    x = g.input("x", [1, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1], name="conv"), 4, name="bn")
    o = g.node("Optional", [y], name="opt")
    g.vinfo.append(helper.make_value_info(o, helper.make_optional_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 4, 5, 5]))))
    z = g.node("OptionalGetElement", [o], name="get")
    m = g.model([z], out_shapes=[[1, 4, 5, 5]])
    m.doc_string = "model doc"
    m.graph.doc_string = "graph doc"
    m.graph.node[0].doc_string = "conv doc"
    m.graph.node[0].metadata_props.add(key="source", value="layer1.conv")
    m.metadata_props.add(key="author", value="someone")
    m.functions.append(helper.make_function("local", "Twice", ["X"], ["Y"], [helper.make_node("Add", ["X", "X"], ["Y"])],
                                            [helper.make_opsetid("", 18)]))
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    custom = helper.make_node("Tag", [x], ["tagged"], name="tag", domain="com.example")
    custom.attribute.append(helper.make_attribute("ts", [numpy_helper.from_array(np.ones(2, np.float32), "t0")]))
    m.graph.node.append(custom)
    ti = m.training_info.add()
    ti.algorithm.name = "algo"
    ti.algorithm.output.append(helper.make_tensor_value_info("nothing", TensorProto.FLOAT, [1]))
    ti.algorithm.node.append(helper.make_node("Constant", [], ["nothing"], value_floats=[1.0]))
    return m


def test_apply_touches_only_the_folded_nodes():
    model = _rich_model()
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_model(model)
    assert report.folded == 1
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Optional", "OptionalGetElement", "Tag"]
    for a, b in zip(model.graph.node[2:], folded.graph.node[1:]):  # untouched nodes: byte for byte
        assert a.SerializeToString() == b.SerializeToString()
    conv = folded.graph.node[0]
    assert conv.doc_string == "conv doc" and conv.metadata_props[0].value == "layer1.conv"
    for field in ("doc_string", "ir_version", "producer_name", "functions", "training_info", "opset_import"):
        assert getattr(folded, field) == getattr(model, field), field
    assert list(folded.graph.value_info) == list(model.graph.value_info)
    assert folded.graph.doc_string == "graph doc"
    assert [p.key for p in folded.metadata_props] == ["author", "bnfold"]
    # numbers: ORT cannot run the custom node; drop it (it feeds nothing) from both and compare
    runnable = []
    for m in (model, folded):
        r = onnx.ModelProto()
        r.CopyFrom(m)
        del r.graph.node[-1]
        del r.training_info[:]
        runnable.append(r)
    feeds = random_feeds(model)
    assert_close(run_ort(runnable[1], feeds)[0], run_ort(runnable[0], feeds)[0])


def test_json_stdout_is_json_only(tmp_path):
    p = tmp_path / "m.onnx"
    model = _rich_model()
    onnx.save(model, p)
    r = subprocess.run([sys.executable, "-c", "from bnfold.cli.main import main; main()", "fold", str(p), "-o", str(tmp_path / "o.onnx"),
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["folded"] == 1
    out = onnx.load(tmp_path / "o.onnx")
    tag = next(n for n in out.graph.node if n.op_type == "Tag")
    assert tag.attribute[0].type == onnx.AttributeProto.TENSORS


# ------------------------------------------------------------------------------------------- bounded constants
def _bn_with_scale(make_scale):
    g = G(seed=36)
    x = g.input("x", [1, 8, 3, 3])
    c = g.conv(x, 8, 8, k=1)
    scale = make_scale(g)
    _, beta, mean, var = g.bn_params(8)
    p = [scale] + [g.const(v.astype(np.float32)) for v in (beta, mean, var)]
    return g.model([g.node("BatchNormalization", [c] + p, name="bn")], out_shapes=[[1, 8, 3, 3]])


def test_huge_computed_scale_is_not_evaluated():
    """The issue's repro: scale = ReduceMax(ConstantOfShape([5e7, 8])), a 1.6 GB tensor from a tiny file."""
    def scale(g):
        shape = g.const(np.array([50_000_000, 8], np.int64))
        big = g.node("ConstantOfShape", [shape], value=numpy_helper.from_array(np.ones(1, np.float32), "v"))
        return g.node("ReduceMax", [big], axes=[0], keepdims=0)
    model = _bn_with_scale(scale)
    tracemalloc.start()
    try:
        report = assert_skip_unchanged(model, "non_constant_parameters", run=False)
        inspect_model(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert "ReduceMax" in report.entries[0].message


def test_computed_scale_beyond_the_size_bound_is_skipped():
    def scale(g):
        big = g.node("Expand", [g.const(np.ones(1, np.float32)), g.const(np.array([50_000_000], np.int64))])
        return g.node("Slice", [big, g.const(np.array([0], np.int64)), g.const(np.array([8], np.int64))])
    model = _bn_with_scale(scale)
    tracemalloc.start()
    try:
        report = assert_skip_unchanged(model, "constant_too_large", run=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert "bound" in report.entries[0].message


def test_small_computed_scale_is_evaluated():
    def scale(g):
        ones = g.node("ConstantOfShape", [g.const(np.array([8], np.int64))],
                      value=numpy_helper.from_array(np.full(1, 1.5, np.float32), "v"))
        return g.node("Cast", [ones], to=TensorProto.FLOAT)
    assert_folds(_bn_with_scale(scale), expect_folded=1)
