"""A fold's work grows linearly with the node count (issue 20: 3,000 Conv+BN pairs), checked without timing.

Timings on a shared machine prove nothing, so these tests count: every Python and C function call a file-to-file
fold makes, at N and 2N Conv+BN pairs (a call count may at most double); operations on a whole model or graph
(serializing, copying or sizing a ModelProto/GraphProto, the checker, shape inference, building the graph
facade), which must not be repeated per node; and the cyclic garbage collector's collections, each of which walks
every object the process holds (a fold pauses it). What call counts cannot see is work inside one C call, such as
``x in some_list``; the whole-model list covers the protobuf ones.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections import Counter

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bnfold import count_bn, outputs, protofile
from bnfold.cli.main import main
from bnfold.errors import BnfoldError
from bnfold.fold import cyclic_gc_paused, fold_onnx_file
from bnfold.graph import ModelGraph

#: whole-model and whole-graph operations: their number must not grow with the node count
WHOLE_MODEL_METHODS = {"ByteSize", "CopyFrom", "MergeFrom", "SerializeToString", "SerializePartialToString",
                       "ParseFromString", "FromString"}
WHOLE_MODEL_FUNCTIONS = {"check_model", "infer_shapes", "infer_shapes_path", "load_model", "load", "save_model"}


def chain(n: int, path, *, training: tuple[int, ...] = ()) -> None:
    """``n`` Conv(4->4, 1x1, bias) + BatchNormalization pairs (as ``benchmarks/fold_speed.py``'s chain, smaller);
    the BNs numbered in ``training`` are in training mode (skipped). The values repeat every 10 pairs, so that
    data-dependent branches (a scale above 1 needs a range check) are taken equally often at every size."""
    nodes, inits, x = [], [], "x"
    for i in range(n):
        rng = np.random.default_rng(i % 10)
        inits += [numpy_helper.from_array((rng.standard_normal((4, 4, 1, 1)) * 0.3).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), f"b{i}")]
        params = [f"s{i}", f"t{i}", f"m{i}", f"v{i}"]
        for name, v in zip(params, (rng.uniform(0.5, 1.5, 4), rng.normal(0, 0.1, 4), rng.normal(0, 0.1, 4),
                                    rng.uniform(0.5, 2.0, 4))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), name))
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}"))
        extra = {"training_mode": 1} if i in training else {}
        outs = [f"y{i}", f"rm{i}", f"rv{i}"] if i in training else [f"y{i}"]
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *params], outs, name=f"bn{i}", **extra))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 3, 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def count_calls(fn) -> tuple[Counter, Counter]:
    """``(calls, whole)``: every function call ``fn()`` makes (Python and C, by function, in every thread), and
    the calls of whole-model operations (by name)."""
    calls: Counter = Counter()
    whole: Counter = Counter()

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            calls[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
            if code.co_name in WHOLE_MODEL_FUNCTIONS and "onnx" in code.co_filename:
                whole[code.co_name] += 1
            if code.co_name == "__init__" and frame.f_locals.get("self").__class__ is ModelGraph:
                whole["ModelGraph"] += 1
        elif event == "c_call":
            name = getattr(arg, "__name__", "?")
            calls[("C", getattr(arg, "__qualname__", name))] += 1
            owner = getattr(arg, "__self__", None)
            if name in WHOLE_MODEL_METHODS and (isinstance(owner, (onnx.ModelProto, onnx.GraphProto))
                                                or owner in (onnx.ModelProto, onnx.GraphProto)):
                whole[f"{type(owner).__name__ if not isinstance(owner, type) else owner.__name__}.{name}"] += 1

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return calls, whole


def superlinear(small: Counter, large: Counter, slack: int = 4) -> dict:
    """The functions called more than twice as often (plus ``slack``) at 2N as at N."""
    return {k: (small.get(k, 0), v) for k, v in large.items() if v > 2 * small.get(k, 0) + slack}


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    d = tmp_path_factory.mktemp("chains")
    for n in (3, 150, 300):
        chain(n, d / f"chain_{n}.onnx")
    return d


def _fold(src, dst):
    def run():
        fold_onnx_file(src, dst)
    return run


def test_fold_work_is_linear_in_the_node_count(chains, tmp_path, monkeypatch):
    from bnfold import check
    monkeypatch.setattr(check, "_BACKGROUND_CHECK", False)  # the input's check counted here, not in a child
    fold_onnx_file(chains / "chain_3.onnx", tmp_path / "warm.onnx")  # lazy imports and first-call set-up
    small, whole_small = count_calls(_fold(chains / "chain_150.onnx", tmp_path / "o150.onnx"))
    large, whole_large = count_calls(_fold(chains / "chain_300.onnx", tmp_path / "o300.onnx"))
    assert count_bn(onnx.load(tmp_path / "o300.onnx")) == 0 and count_bn(onnx.load(tmp_path / "o150.onnx")) == 0
    assert not superlinear(small, large), superlinear(small, large)
    assert sum(large.values()) <= 2.02 * sum(small.values())
    # whole-model operations happen a fixed number of times (e.g. the checker on input and output, one facade)
    assert whole_small == whole_large, (whole_small, whole_large)
    assert whole_large["check_model"] == 2 and whole_large["ModelGraph"] == 1, whole_large


def test_the_count_check_catches_quadratic_work():
    """The check above can fail: a per-node scan of a per-node list, or a whole-model copy per node."""
    def per_node_scan(n):
        seen = []
        for i in range(n):
            if not any(s == i for s in seen):  # a Python-level scan: calls grow as n^2
                seen.append(i)

    def per_node_copy(n):
        m = onnx.ModelProto()
        for _ in range(n):
            onnx.ModelProto().CopyFrom(m)

    small, _ = count_calls(lambda: per_node_scan(50))
    large, _ = count_calls(lambda: per_node_scan(100))
    assert superlinear(small, large)
    _, whole_small = count_calls(lambda: per_node_copy(50))
    _, whole_large = count_calls(lambda: per_node_copy(100))
    assert whole_small != whole_large


def _as_the_pause_ends() -> bool:
    """Whether the collection now starting comes from leaving cyclic_gc_paused (its __exit__, called by the
    decorator's wrapper in bnfold/fold.py), not from the fold's own work."""
    try:
        f = sys._getframe(2)
    except ValueError:
        return False
    for _ in range(3):
        if f is None:
            return False
        if f.f_code.co_name == "cyclic_gc_paused":
            return True
        if f.f_code.co_name == "__exit__" and f.f_back is not None and f.f_back.f_code.co_name == "wrapper" \
                and f.f_back.f_code.co_filename.replace("\\", "/").endswith("bnfold/fold.py"):
            return True
        f = f.f_back
    return False


def test_a_fold_makes_no_cyclic_collections_and_restores_the_collector(chains, tmp_path):
    events: list = []

    def on_gc(phase, info):
        # the one collection that may come as the pause ends (the allocations counted while it lasted) is not
        # during the fold: it starts in cyclic_gc_paused itself, after gc.enable()
        if phase == "start" and not _as_the_pause_ends():
            events.append(info["generation"])
    assert gc.isenabled()
    gc.callbacks.append(on_gc)
    try:
        fold_onnx_file(chains / "chain_300.onnx", tmp_path / "o.onnx")
        assert events == []  # every automatic collection walks the whole heap: superlinear in a large fold
        assert gc.isenabled()
        with pytest.raises(BnfoldError):
            fold_onnx_file(tmp_path / "missing.onnx", tmp_path / "o2.onnx")
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(on_gc)


def test_gc_pauses_nest_and_keep_a_disabled_collector_disabled():
    with cyclic_gc_paused():
        with cyclic_gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer fold is still running
    assert gc.isenabled()
    gc.disable()
    try:
        with cyclic_gc_paused():
            pass
        assert not gc.isenabled()  # the caller's choice stands
    finally:
        gc.enable()


def test_fold_table_shows_every_skip_and_counts_the_rest(tmp_path):
    """A long report: at most 100 rows (rich lays a 3,000-row table out in about the fold's time), the skipped
    BatchNorms always among them, one row counting what is not shown; --json still lists every entry."""
    src = tmp_path / "long.onnx"
    chain(130, src, training=(120, 125))  # the skips come after the first 100 entries
    r = CliRunner().invoke(main, ["fold", str(src), "-o", str(tmp_path / "out.onnx")], terminal_width=160)
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if line.startswith("│") and line.split("│")[1].strip()]
    assert len(rows) == 101  # (a wrapped message continues on lines whose first cell is empty)
    assert any("bn120" in line and "training_mode" in line for line in rows)
    assert any("bn125" in line and "training_mode" in line for line in rows)
    assert any("30 more" in line and "30 folded" in line for line in rows)
    assert "FOLDED | 128/130 BatchNorm folded, 2 skipped" in r.output
    j = CliRunner().invoke(main, ["inspect", str(src), "--json"])
    import json
    assert len(json.loads(j.stdout)["entries"]) == 130


def test_small_files_are_read_whole_with_the_same_external_locations(tmp_path):
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
                          initializer=[numpy_helper.from_array(np.ones(64, np.float32), n) for n in "ab"])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0)
    p = tmp_path / "m.onnx"
    assert os.path.getsize(p) < protofile.INDEX_MIN_FILE
    expected = protofile.external_locations(p)
    assert len(expected) == 2
    assert outputs._read_locations(p) == expected
    assert outputs.external_data_files(p) == [tmp_path / loc for loc in expected]
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 10)
    assert outputs._read_locations(tmp_path / "junk.onnx") is None


def test_an_unchanged_input_is_read_once_a_changed_one_again(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    chain(2, src)
    reads: list = []
    real = outputs._read_locations
    monkeypatch.setattr(outputs, "_read_locations", lambda p: reads.append(p) or real(p))
    outputs.external_data_files(src)
    outputs.external_data_files(src)
    assert len(reads) == 2  # just written: not remembered until it has settled (2 s)
    monkeypatch.setattr(outputs, "_SETTLED_NS", -1)  # as if it had
    outputs.external_data_files(src)
    outputs.external_data_files(src)
    assert len(reads) == 3  # a command checks its input twice (its own plan, then the library's): one read
    chain(3, src)  # rewritten in place: another size, time and change time
    outputs.external_data_files(src)
    assert len(reads) == 4


def test_each_folded_parameter_is_computed_once(chains, tmp_path, monkeypatch):
    """Planning checks that a folded parameter fits its dtype by computing it; writing it reuses that value
    (it was computed twice: once to check, once to write)."""
    from bnfold import formula
    counts: Counter = Counter()
    for name in ("scale_cast", "cast_checked"):
        real = getattr(formula, name)
        monkeypatch.setattr(formula, name, lambda *a, _real=real, _name=name, **k: counts.update([_name]) or
                            _real(*a, **k))
    fold_onnx_file(chains / "chain_150.onnx", tmp_path / "o.onnx")
    assert counts == {"scale_cast": 150, "cast_checked": 150}, counts  # one weight and one bias per pair
    # and the values written are the float64 fold rounded once (2-D check on a few pairs)
    src, out = onnx.load(chains / "chain_150.onnx"), onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(out, full_check=True)
    w = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    o = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for i in (0, 7, 149):
        s = w[f"s{i}"].astype(np.float64) / np.sqrt(w[f"v{i}"].astype(np.float64) + 1e-5)
        ref_w = (w[f"w{i}"].astype(np.float64) * s[:, None, None, None]).astype(np.float32)
        ref_b = ((w[f"b{i}"] - w[f"m{i}"].astype(np.float64)) * s + w[f"t{i}"]).astype(np.float32)
        assert np.array_equal(o[f"w{i}"], ref_w) and np.array_equal(o[f"b{i}"], ref_b), i  # bit for bit


def test_small_files_without_external_data_are_not_walked(tmp_path, monkeypatch):
    """A model file with no external-data entry (no ``location`` key anywhere in its bytes) has no locations:
    found without walking its tensors in Python."""
    chain(20, tmp_path / "m.onnx")
    assert os.path.getsize(tmp_path / "m.onnx") < protofile.INDEX_MIN_FILE
    monkeypatch.setattr(protofile, "iter_model_tensors", lambda *a: (_ for _ in ()).throw(AssertionError("walked")))
    assert outputs._read_locations(tmp_path / "m.onnx") == []
