"""Issue #13, files: a model and its external data change as one unit (a crash at any instant leaves the old
pair or the new pair), concurrent writers to one output end with one complete result, nothing depends on the
working directory, and SIGINT/SIGTERM/SIGKILL leave no (or one recognisable, later cleaned) temporary.

Crashes are injected in a forked child: every filesystem call that changes or syncs something (open, write
syncs, rename/replace, unlink, mkdir, rmdir) is counted and the child dies with ``os._exit`` at the k-th one,
for every k until the save completes, so no ``finally`` block runs: a real crash, at every instant."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold import count_bn, fold_onnx_file
from bnfold.errors import Terminated
from bnfold.onnx_io import save_model
from bnfold.outputs import TMP_SUFFIX, critical_section, external_data_files, handle_signals

from .helpers import G, crash_in_child, random_feeds, run_ort

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (POSIX)")

FS_CALLS = ("open", "replace", "rename", "unlink", "remove", "rmdir", "mkdir", "fsync")
DATA_RE = re.compile(r"out\.onnx\.[0-9a-f]{12}\.data")


def model(seed: int, c: int = 32):
    g = G(seed=seed)
    x = g.input("x", [1, 3, 8, 8])
    y = g.bn(g.conv(x, 3, c, pads=[1, 1, 1, 1], name="conv"), c, name="bn")
    return g.model([g.node("Relu", [y])])


def weights(m: onnx.ModelProto) -> dict:
    return {t.name: numpy_helper.to_array(t).copy() for t in m.graph.initializer}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def loaded_weights(path: Path) -> dict:
    """The weights of the model at ``path`` read with its external data (raises if the pair is broken)."""
    m = onnx.load(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return weights(m)


def temps(folder: Path) -> list[str]:
    return [e for e in os.listdir(folder) if e.endswith(TMP_SUFFIX)]


def in_child(fn, crash_at: int | None, mode: str = "exit") -> int:
    """Run ``fn`` in a forked child whose k-th filesystem call crashes it (``exit``: os._exit, no cleanup;
    ``raise``: an OSError, so cleanup runs). Returns the child's exit code (0 = completed)."""
    return crash_in_child(fn, crash_at, FS_CALLS, mode)


@pytest.mark.parametrize("mode", ["exit", "raise"])
@pytest.mark.parametrize("old", ["legacy", "bnfold"])
def test_a_crash_at_any_instant_leaves_old_or_new_pair(tmp_path, mode, old):
    old_m, new_m = model(1), model(2)
    out = tmp_path / "out.onnx"
    seen = set()
    orphans, leftovers = [], []
    for k in range(200):
        for e in os.listdir(tmp_path):
            (tmp_path / e).unlink() if not (tmp_path / e).is_dir() else shutil.rmtree(tmp_path / e)
        if old == "legacy":  # as exporters write it: out.onnx + out.onnx.data
            m = onnx.ModelProto()
            m.CopyFrom(old_m)
            onnx.save_model(m, out, save_as_external_data=True, location="out.onnx.data", size_threshold=0)
        else:
            save_model(old_m, out, external_data=True)
        code = in_child(lambda: save_model(new_m, out, external_data=True), k, mode)
        got = loaded_weights(out)
        is_old, is_new = same(got, weights(old_m)), same(got, weights(new_m))
        assert is_old != is_new, f"crash at call {k}: a mix of old and new"
        seen.add("new" if is_new else "old")
        if code == 0:
            assert is_new
            break
        if mode == "raise":
            assert temps(tmp_path) == [], k  # an exception cleans up
        # the next run cleans whatever the crash left, and ends with exactly one model + one data file
        save_model(new_m, out, external_data=True)
        names = sorted(os.listdir(tmp_path))
        used = {f.name for f in external_data_files(out)}
        for e in list(names):
            if e != "out.onnx" and e not in used and (e == "out.onnx.data" or DATA_RE.fullmatch(e)):
                # killed between the renames, or after the switch before the old data file was removed: it
                # stays, unreferenced (a write removes only the data files the model it replaces refers to,
                # never one that a renamed or copied earlier result may still use)
                names.remove(e)
                orphans.append(k)
        if not (len(names) == 2 and names[0] == "out.onnx" and DATA_RE.fullmatch(names[1])):
            leftovers.append((k, names))
        assert same(loaded_weights(out), weights(new_m))
    else:
        pytest.fail("the save never completed")
    assert not leftovers  # after the next run: one model, one data file, no temporaries
    assert seen == {"old", "new"}, seen  # both sides of the switch were hit
    assert k >= 5  # several instants were tried
    # two instants at most leave an unreferenced data file behind: between the data file's rename and the model's
    # (the new data), and after the switch before the old data is removed (the old data); never a mix
    assert len(orphans) <= 2


def test_a_crash_during_an_in_place_fold_never_leaves_wrong_values(tmp_path):
    """The issue's worst case: --in-place on an external-data model, a crash between the renames left the
    old model pointing at the new data, and the input computed wrong values."""
    src = model(3, c=64)
    feeds = random_feeds(src)
    expected = run_ort(src, feeds)[0]
    p = tmp_path / "out.onnx"
    for k in range(200):
        for e in os.listdir(tmp_path):
            (tmp_path / e).unlink() if not (tmp_path / e).is_dir() else shutil.rmtree(tmp_path / e)
        m = onnx.ModelProto()
        m.CopyFrom(src)
        onnx.save_model(m, p, save_as_external_data=True, location="out.onnx.data", size_threshold=0)
        code = in_child(lambda: fold_onnx_file(p, p, in_place=True, check=False), k)
        now = onnx.load(str(p))
        assert count_bn(now) in (0, 1)
        np.testing.assert_allclose(run_ort(now, feeds)[0], expected, rtol=1e-4, atol=1e-4)
        if code == 0:
            assert count_bn(now) == 0
            break
    else:
        pytest.fail("the fold never completed")


def _writer(out: str, seed: int, barrier):
    barrier.wait()
    save_model(model(seed), out, external_data=True)


def test_concurrent_writers_end_with_one_complete_result(tmp_path):
    """60 trials, 3 processes each writing a different model with external data to the same path."""
    ctx = mp.get_context("fork")
    expected = {s: weights(model(s)) for s in range(3)}
    winners = set()
    leftovers = []
    for trial in range(60):
        out = tmp_path / f"t{trial}" / "out.onnx"
        out.parent.mkdir()
        save_model(model(99), out, external_data=True)  # an existing output to replace
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=_writer, args=(str(out), s, barrier)) for s in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        got = loaded_weights(out)
        match = [s for s, w in expected.items() if same(got, w)]
        assert len(match) == 1, f"trial {trial}: the result is no single writer's model"
        winners.add(match[0])
        names = sorted(os.listdir(out.parent))
        if not (len(names) == 2 and DATA_RE.fullmatch(names[1])):
            leftovers.append((trial, names))
    assert not leftovers  # one model, one data file, no temporaries
    assert winners  # (which writer wins is up to the scheduler)


def test_concurrent_folds_from_threads(tmp_path):
    """50 trials, 3 threads folding different external-data models into one output."""
    srcs = []
    for s in range(3):
        d = tmp_path / f"src{s}"
        d.mkdir()
        m = model(10 + s)
        onnx.save_model(m, d / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
        srcs.append(d / "m.onnx")
    folded = [weights(onnx.load(str(fold_onnx_file(p, tmp_path / f"ref{i}.onnx").extra["output"])))
              for i, p in enumerate(srcs)]
    for trial in range(50):
        out = tmp_path / f"t{trial}" / "out.onnx"
        out.parent.mkdir()
        barrier = threading.Barrier(3)
        errors = []

        def work(p, out=out, barrier=barrier, errors=errors):
            try:
                barrier.wait()
                fold_onnx_file(p, out, check=False)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(p,)) for p in srcs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        got = loaded_weights(out)
        assert sum(same(got, f) for f in folded) == 1, trial
        assert len(os.listdir(out.parent)) == 2


def test_reruns_and_in_place_work_from_any_working_directory(tmp_path, monkeypatch):
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    m = model(5)
    onnx.save_model(m, src_dir / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    monkeypatch.chdir(out_dir)  # the output's folder: onnx's "data file exists" check looked here
    for _ in range(3):
        fold_onnx_file(src_dir / "m.onnx", "f.onnx")
        assert count_bn(onnx.load("f.onnx")) == 0
        assert len(os.listdir(out_dir)) == 2
    monkeypatch.chdir(src_dir)  # --in-place from the model's folder, twice
    for _ in range(2):
        fold_onnx_file("m.onnx", "m.onnx", in_place=True)
        assert len(os.listdir(src_dir)) == 2
    assert count_bn(onnx.load(src_dir / "m.onnx")) == 0


def test_symlinked_or_special_targets_are_refused_by_the_library(tmp_path):
    from bnfold.errors import BnfoldError
    from bnfold.onnx_io import write_text_atomic
    (tmp_path / "real.txt").write_text("keep")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "real.txt")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(BnfoldError, match="symbolic link"):
        save_model(model(1), tmp_path / "link.onnx")
    with pytest.raises(BnfoldError, match="FIFO"):
        write_text_atomic(tmp_path / "fifo.json", "{}")
    assert (tmp_path / "real.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------------ signals
def test_signals_are_deferred_inside_a_commit():
    with handle_signals():
        with pytest.raises(Terminated):
            with critical_section():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                done = True  # the section ran to its end before the signal acted
        assert done
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)


SLOW_SAVE = """
import sys, time, onnx
import bnfold.protofile as pf
flag = sys.argv[1]
def slowed(real):
    def slow(*a, **k):
        real(*a, **k)
        open(flag, "w").close()  # the temporary model is written: now signal us
        time.sleep(300)
    return slow
onnx.save_model = slowed(onnx.save_model)  # whichever writes the model: onnx, or the reader/writer
pf.write_external = slowed(pf.write_external)
pf.write_embedded = slowed(pf.write_embedded)
from bnfold.cli.main import main
sys.argv = ["bnfold"] + sys.argv[2:]
main()
"""


def _start_slow_fold(tmp_path):
    src = tmp_path / "in"
    work = tmp_path / "work"
    src.mkdir()
    work.mkdir()
    m = model(7, c=64)
    onnx.save_model(m, src / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SAVE)
    flag = tmp_path / "written.flag"
    p = subprocess.Popen([sys.executable, str(script), str(flag), "fold", str(src / "m.onnx"), "-o",
                          str(work / "out.onnx"), "--report", str(work / "r.json")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not flag.exists():
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline, "the fold never reached its save"
        time.sleep(0.1)
    assert os.listdir(work), "a temporary exists while the model is written"
    return p, src, work


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_sigint_and_sigterm_remove_temporaries(tmp_path, sig, code, word):
    p, src, work = _start_slow_fold(tmp_path)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert word in err and "Aborted" not in err and "Traceback" not in err
    assert os.listdir(work) == []  # no temporary, no partial output, no report
    assert sorted(os.listdir(src)) == ["m.onnx", "m.onnx.data"]


def test_sigkill_leaves_one_recognisable_temporary_that_the_next_run_cleans(tmp_path):
    from click.testing import CliRunner

    from bnfold.cli.main import main
    p, src, work = _start_slow_fold(tmp_path)
    p.kill()
    p.communicate(timeout=120)
    left = os.listdir(work)
    assert len(left) == 1 and left[0].endswith(TMP_SUFFIX) and left[0].startswith(".out.onnx."), left
    r = CliRunner().invoke(main, ["fold", str(src / "m.onnx"), "-o", str(work / "out.onnx")])
    assert r.exit_code == 0, r.output
    names = sorted(os.listdir(work))
    assert len(names) == 2 and names[0] == "out.onnx" and DATA_RE.fullmatch(names[1]), names
