"""Fuzzing: mutate valid ONNX files (bytes and graph structure) and run inspect/fold on them. The only allowed
outcomes are success or a clean BnfoldError (exit 2 on the command line). When a mutant is still a valid,
runnable model and folding succeeds, the folded model must compute the same outputs (nothing folded wrongly).

``BNFOLD_FUZZ_N`` sets the number of mutants per kind (CI default 150; the long run in docs/reliability.md used
more)."""

from __future__ import annotations

import os
import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import BnfoldError, fold_model, fold_onnx_file, inspect_onnx_file

from .helpers import G, assert_close, random_feeds, run_ort

N = int(os.environ.get("BNFOLD_FUZZ_N", "150"))


def seeds() -> list[onnx.ModelProto]:
    out = []
    g = G(seed=1)
    x = g.input("x", [2, 3, 6, 6])
    y = g.node("Relu", [g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1]), 4)])
    y = g.bn(g.conv(y, 4, 4, k=1, group=2), 4)
    out.append(g.model([g.node("Add", [y, g.const(g.rand(4, 1, 1))])]))
    g = G(seed=2)
    x = g.input("x", [3, 5])
    y = g.bn(g.node("Gemm", [x, g.const(g.rand(6, 5)), g.const(g.rand(6))], transB=1, alpha=0.5), 6)
    y = g.node("MatMul", [g.bn(g.node("Relu", [y]), 6), g.const(g.rand(6, 4))])
    out.append(g.model([y]))
    g = G(seed=3)
    x = g.input("x", [1, 4, 5, 5])
    y = g.bn(g.conv(x, 4, 6, k=2, group=2, transpose=True, strides=[2, 2]), 6)
    out.append(g.model([g.node("Mul", [y, g.const(g.rand(1, 6, 1, 1))])]))
    return out


def extra_seeds() -> list[onnx.ModelProto]:
    """Issue 12's cases as fuzz seeds: If branches shadowing the main graph's 'W', overridable initializers, a
    Q/DQ weight."""
    out = []

    def branch(name, seed):
        sub = G(seed=seed, prefix=f"{name}_")
        w = sub.const(sub.rand(4, 3, 3, 3), name="W")
        y = sub.bn(sub.node("Conv", ["x", w], name=f"{name}_conv", pads=[1, 1, 1, 1]), 4)
        return helper.make_graph(sub.nodes, name, [], [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
                                 initializer=sub.inits)
    g = G(seed=4)
    g.input("x", [1, 3, 5, 5])
    cond = g.input("cond", [], dtype=np.float32)
    b = g.node("Greater", [cond, g.const(np.array(0.0, np.float32))])
    main = g.bn(g.node("Conv", ["x", g.const(g.rand(4, 3, 3, 3), name="W")], pads=[1, 1, 1, 1]), 4)
    y = g.node("If", [b], then_branch=branch("then", 5), else_branch=branch("else", 6))
    out.append(g.model([g.node("Add", [main, y])], out_shapes=[[1, 4, 5, 5]]))
    g = G(seed=7)
    x = g.input("x", [1, 3, 5, 5])
    y = g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1]), 4)
    y = g.bn(g.conv(g.node("Relu", [y]), 4, 4, k=1), 4)
    m = g.model([y])
    for t in list(m.graph.initializer)[::3]:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    out.append(m)
    g = G(seed=8)
    x = g.input("x", [1, 3, 5, 5])
    wq = g.const(np.random.default_rng(8).integers(-100, 100, (4, 3, 3, 3)).astype(np.int8))
    w = g.node("DequantizeLinear", [wq, g.const(np.array(0.02, np.float32))])
    out.append(g.model([g.bn(g.node("Conv", [x, w]), 4)]))
    return out


def run_tools(path, tmp_path, counters):
    """inspect + fold: success or BnfoldError, nothing else; a valid runnable mutant must fold correctly."""
    try:
        inspect_onnx_file(path)
        counters["inspect_ok"] += 1
    except BnfoldError:
        counters["inspect_refused"] += 1
    out = tmp_path / "out.onnx"
    if out.exists():
        out.unlink()
    try:
        fold_onnx_file(path, out)
        counters["fold_ok"] += 1
    except BnfoldError:
        counters["fold_refused"] += 1
        assert not out.exists(), "a refused fold left an output file"
        return
    _check_numbers(onnx.load(path), onnx.load(out), counters)


def _check_numbers(original, folded, counters):
    try:
        feeds = random_feeds(original)
        ref = run_ort(original, feeds)
    except Exception:
        return  # the mutant is not runnable: nothing to compare
    counters["compared"] += 1
    for r, o in zip(ref, run_ort(folded, feeds)):
        assert_close(o, r, what="folded mutant")


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:
        b = b[: rng.randrange(1, len(b))]
    elif kind == 2:
        pos = rng.randrange(len(b))
        b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        b[j:j] = b[i:i + rng.randint(1, 64)]
    return bytes(b)


def mutate_graph(model: onnx.ModelProto, rng: random.Random) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    names = [t.name for t in g.initializer] + [o for n in g.node for o in n.output] + [i.name for i in g.input]
    kind = rng.randrange(12)
    node = rng.choice(list(g.node))
    if kind == 0 and len(g.node) > 1:
        g.node.remove(node)
    elif kind == 1 and node.input:
        node.input[rng.randrange(len(node.input))] = rng.choice(names + ["", "nope"])
    elif kind == 2 and node.attribute:
        a = rng.choice(list(node.attribute))
        if a.type == onnx.AttributeProto.INT:
            a.i = rng.choice([-1, 0, 2, 3, 1 << 40])
        elif a.type == onnx.AttributeProto.INTS and a.ints:
            a.ints[rng.randrange(len(a.ints))] = rng.choice([-2, 0, 5])
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = rng.choice([float("nan"), -1.0, 0.0, 1e30])
    elif kind == 3 and g.initializer:
        t = rng.choice(list(g.initializer))
        if t.dims:
            t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, 2, 7])
    elif kind == 4 and g.initializer:
        rng.choice(list(g.initializer)).data_type = rng.choice([TensorProto.INT64, TensorProto.FLOAT16,
                                                                TensorProto.DOUBLE, TensorProto.STRING, 99])
    elif kind == 5 and g.initializer:
        g.initializer.remove(rng.choice(list(g.initializer)))
    elif kind == 6:
        m.opset_import[0].version = rng.choice([1, 5, 6, 8, 13, 21, 40])
    elif kind == 7:
        bn = [n for n in g.node if n.op_type == "BatchNormalization"]
        if bn:
            t = next((t for t in g.initializer if t.name == rng.choice(list(bn[0].input[1:]))), None)
            if t is not None:
                a = numpy_helper.to_array(t).copy()
                a[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -5.0, 0.0])
                t.CopyFrom(numpy_helper.from_array(a, t.name))
    elif kind == 8:
        node.output[0] = rng.choice(names)
    elif kind == 9:
        node.op_type = rng.choice(["BatchNormalization", "Conv", "Gemm", "MatMul", "Mul", "Frobnicate"])
    elif kind == 10:
        bn = [n for n in g.node if n.op_type == "BatchNormalization"]
        if bn:
            bn[0].attribute.append(helper.make_attribute(rng.choice(["training_mode", "spatial", "is_test"]),
                                                         rng.choice([0, 1])))
    else:
        t = rng.choice(list(g.initializer)) if g.initializer else None
        if t is not None:
            t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    return m


@pytest.mark.parametrize("kind", ["bytes", "graph"])
def test_fuzz_inspect_and_fold(tmp_path, kind):
    rng = random.Random(1234 if kind == "bytes" else 4321)
    counters = {k: 0 for k in ("inspect_ok", "inspect_refused", "fold_ok", "fold_refused", "compared")}
    bases = seeds() + extra_seeds()
    path = tmp_path / "mutant.onnx"
    for i in range(N):
        base = bases[i % len(bases)]
        if kind == "bytes":
            path.write_bytes(mutate_bytes(base.SerializeToString(), rng))
        else:
            path.write_bytes(mutate_graph(base, rng).SerializeToString())
        before = path.read_bytes()
        try:
            run_tools(path, tmp_path, counters)
        except BnfoldError:
            raise
        except Exception as exc:  # any other exception is a crash
            raise AssertionError(f"{kind} mutant {i} crashed bnfold: {type(exc).__name__}: {exc}") from exc
        assert path.read_bytes() == before, "the input was modified"
    print(f"\nfuzz[{kind}] {N} mutants: {counters}")
    assert counters["fold_ok"] + counters["fold_refused"] == N
    assert counters["fold_refused"] > 0 and (kind == "bytes" or counters["compared"] > 0)


def test_extra_seeds_are_valid_and_fold_correctly():
    for m in extra_seeds():
        onnx.checker.check_model(m, full_check=True)
        folded, report = fold_model(m)
        onnx.checker.check_model(folded, full_check=True)
        feeds = random_feeds(m)
        for r, o in zip(run_ort(m, feeds), run_ort(folded, feeds)):
            assert_close(o, r)


def test_seeds_are_valid_and_fold():
    for m in seeds():
        onnx.checker.check_model(m, full_check=True)
        folded, report = fold_model(m)
        assert report.skipped == 0
        feeds = random_feeds(m)
        for r, o in zip(run_ort(m, feeds), run_ort(folded, feeds)):
            assert_close(o, r)
    assert ort.get_device()
