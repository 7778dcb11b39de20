"""The input's onnx.checker pass runs in a forked child while the fold plans (the checker holds the GIL, so a
thread would not overlap it): the same verdicts and messages as checking in the process, nothing written before
the verdict, and a check in the process whenever a fork is not safe or the child fails."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import check, count_bn
from bnfold.errors import BnfoldError
from bnfold.fold import fold_onnx_file

from .helpers import G

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")


@pytest.fixture
def forks(monkeypatch) -> list:
    """The pids of the children ``os.fork`` makes while the test runs (as seen by the parent)."""
    pids: list = []
    real_fork = os.fork

    def fork():
        pid = real_fork()
        if pid:
            pids.append(pid)
        return pid
    monkeypatch.setattr(os, "fork", fork)
    return pids


@pytest.fixture(autouse=True)
def _background_for_small_graphs(monkeypatch):
    """These tests' graphs are small: check them in the background all the same (see the last test)."""
    monkeypatch.setattr(check, "BACKGROUND_MIN_NODES", 0)


def _valid(path):
    g = G()
    y = g.bn(g.conv(g.input("x", [1, 3, 8, 8]), 3, 8), 8)
    onnx.save(g.model([g.node("Relu", [y])]), path)


def _invalid(path):
    """Passes the structural checks bnfold makes itself, fails onnx.checker's strict shape inference (the
    BatchNorm's scale has 3 channels, its input 4)."""
    inits = [numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")]
    inits += [numpy_helper.from_array(np.ones(3, np.float32), n) for n in "sbmv"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("BatchNormalization", ["c", *"sbmv"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)


def test_background_verdicts_are_the_checkers(tmp_path, monkeypatch):
    _valid(tmp_path / "ok.onnx")
    _invalid(tmp_path / "bad.onnx")
    monkeypatch.setattr(check, "_fork_is_safe", lambda: True)
    calls: list = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda *a, **k: calls.append(os.getpid()) or real(*a, **k))
    for name in ("ok.onnx", "bad.onnx"):
        wait = check.checker_error_in_background(tmp_path / name)
        assert wait() == check.checker_error(tmp_path / name)
        assert wait() == wait()  # (asked twice: the same answer)
    assert check.checker_error(tmp_path / "ok.onnx") is None and check.checker_error(tmp_path / "bad.onnx")
    assert calls.count(os.getpid()) == 4  # only the four direct calls ran here: the background ones in children


def test_a_child_that_dies_is_replaced_by_a_check_here(tmp_path, monkeypatch):
    _invalid(tmp_path / "bad.onnx")
    monkeypatch.setattr(check, "_fork_is_safe", lambda: True)
    parent = os.getpid()
    real = check.checker_error
    monkeypatch.setattr(check, "checker_error", lambda m: os._exit(7) if os.getpid() != parent else real(m))
    assert check.checker_error_in_background(tmp_path / "bad.onnx")() == real(tmp_path / "bad.onnx")


def test_no_fork_where_threads_or_runtimes_run(monkeypatch):
    import sys
    import threading

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    if threading.active_count() == 1:
        assert check._fork_is_safe() is (sys.platform.startswith("linux"))
    monkeypatch.setitem(sys.modules, "onnxruntime", object())
    assert not check._fork_is_safe()
    monkeypatch.delitem(sys.modules, "onnxruntime")
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not check._fork_is_safe()
    finally:
        stop.set()
        t.join()


@pytest.mark.parametrize("background", [True, False])
def test_an_invalid_input_is_refused_with_the_checkers_message_and_nothing_written(tmp_path, monkeypatch,
                                                                                  background):
    _invalid(tmp_path / "bad.onnx")
    before = (tmp_path / "bad.onnx").read_bytes()
    monkeypatch.setattr(check, "_fork_is_safe", lambda: background)
    with pytest.raises(BnfoldError, match="not a valid ONNX model"):
        fold_onnx_file(tmp_path / "bad.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists() and (tmp_path / "bad.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_the_checkers_complaint_wins_over_a_planning_error(tmp_path, monkeypatch):
    """An invalid model may also make planning fail: the user is told what onnx.checker says."""
    from bnfold import planner

    _invalid(tmp_path / "bad.onnx")
    monkeypatch.setattr(check, "_fork_is_safe", lambda: True)
    monkeypatch.setattr(planner, "plan", lambda *a, **k: (_ for _ in ()).throw(BnfoldError("planner says no")))
    with pytest.raises(BnfoldError, match="not a valid ONNX model"):
        fold_onnx_file(tmp_path / "bad.onnx", tmp_path / "out.onnx")
    _valid(tmp_path / "ok.onnx")
    with pytest.raises(BnfoldError, match="planner says no"):
        fold_onnx_file(tmp_path / "ok.onnx", tmp_path / "out.onnx")


def test_a_valid_fold_with_the_background_check(tmp_path, monkeypatch):
    _valid(tmp_path / "ok.onnx")
    monkeypatch.setattr(check, "_fork_is_safe", lambda: True)
    fold_onnx_file(tmp_path / "ok.onnx", tmp_path / "out.onnx")
    out = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert count_bn(out) == 0
    import onnxruntime as ort  # numbers: the folded model computes what the original does (fp32 rounding)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                for p in (tmp_path / "ok.onnx", tmp_path / "out.onnx"))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_an_interrupt_abandons_the_check(tmp_path, monkeypatch, forks):
    """Ctrl-C while planning: the child is stopped and nothing is checked in this process (the interrupt is
    not delayed by a check), and no child is left behind."""
    from bnfold import planner

    _valid(tmp_path / "ok.onnx")
    monkeypatch.setattr(check, "_fork_is_safe", lambda: True)
    import time

    parent = os.getpid()
    here: list = []
    marker = tmp_path / "child-finished"

    def slow_check(m):  # the child's check takes a while, then leaves a mark
        if os.getpid() == parent:
            here.append(m)
            return None
        time.sleep(0.5)
        marker.write_text("done")
        return None
    monkeypatch.setattr(check, "checker_error", slow_check)
    monkeypatch.setattr(planner, "plan", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fold_onnx_file(tmp_path / "ok.onnx", tmp_path / "out.onnx")
    assert here == [] and not (tmp_path / "out.onnx").exists()
    assert len(forks) == 1
    with pytest.raises(ChildProcessError):
        os.waitpid(forks[0], os.WNOHANG)  # the child is gone and reaped (not running, not a zombie)
    time.sleep(1.0)
    assert not marker.exists()  # the child was stopped, not waited for


def test_a_small_graph_is_checked_here(tmp_path, monkeypatch, forks):
    """A fork costs more (~7 ms) than checking a small graph (~20 us a node): under BACKGROUND_MIN_NODES nodes
    the check runs in this process; from it on, in a child."""
    _valid(tmp_path / "ok.onnx")
    monkeypatch.setattr(check, "_fork_is_safe", lambda: True)
    monkeypatch.setattr(check, "BACKGROUND_MIN_NODES", 1000)
    fold_onnx_file(tmp_path / "ok.onnx", tmp_path / "out.onnx")
    assert forks == []
    monkeypatch.setattr(check, "BACKGROUND_MIN_NODES", 2)  # (the test graph has 3 nodes)
    fold_onnx_file(tmp_path / "ok.onnx", tmp_path / "out2.onnx")
    assert len(forks) == 1
    assert count_bn(onnx.load(tmp_path / "out2.onnx")) == 0
