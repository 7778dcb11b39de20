"""Loading and saving: clear errors on bad files, atomic writes, external data kept and confined."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold import BnfoldError, count_bn, fold_onnx_file
from bnfold.onnx_io import load_model, save_model

from .helpers import G, assert_close, random_feeds, run_ort


def small_model(c=64):
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    return g.model([g.node("Relu", [g.bn(g.conv(x, 3, c, pads=[1, 1, 1, 1]), c)])])


@pytest.mark.parametrize("content,match", [
    (b"", "empty file"),
    (b"this is not a protobuf \xff\xfe", "not an ONNX model"),
])
def test_bad_files_are_refused(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(BnfoldError, match=match):
        load_model(p)


def test_truncated_model_is_refused(tmp_path):
    p = tmp_path / "t.onnx"
    data = small_model().SerializeToString()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BnfoldError, match="not an ONNX model|empty"):
        load_model(p)


def test_missing_file_and_empty_graph(tmp_path):
    with pytest.raises(BnfoldError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    m = small_model()
    del m.graph.node[:]
    p = tmp_path / "empty.onnx"
    onnx.save(m, p)
    with pytest.raises(BnfoldError, match="graph is empty"):
        load_model(p)


def test_unsupported_opset_is_refused(tmp_path):
    m = small_model()
    m.opset_import[0].version = 999
    p = tmp_path / "o.onnx"
    onnx.save(m, p)
    with pytest.raises(BnfoldError, match="opset 999 is not supported"):
        load_model(p)


def test_output_equal_to_input_is_refused_unless_in_place(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(small_model(), p)
    before = p.read_bytes()
    with pytest.raises(BnfoldError, match="is the input file"):
        fold_onnx_file(p, p)
    assert p.read_bytes() == before
    report = fold_onnx_file(p, tmp_path / "." / "m.onnx", in_place=True)
    assert report.folded == 1 and count_bn(onnx.load(p)) == 0


def test_input_is_never_modified_and_no_temp_files_left(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(small_model(), p)
    before = p.read_bytes()
    fold_onnx_file(p, tmp_path / "out.onnx")
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "out.onnx"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(OSError):
        save_model(small_model(), tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []


def test_dry_run_writes_nothing(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(small_model(), p)
    report = fold_onnx_file(p, tmp_path / "out.onnx", dry_run=True)
    assert report.dry_run and report.folded == 1
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_external_data_is_kept(tmp_path):
    m = small_model()
    src = tmp_path / "src"
    src.mkdir()
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(m)  # onnx.save_model moves tensors to external data in place
    onnx.save_model(on_disk, src / "m.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    out = tmp_path / "out"
    out.mkdir()
    fold_onnx_file(src / "m.onnx", out / "f.onnx")
    names = sorted(os.listdir(out))  # the data file has a fresh name per write: f.onnx.<12 hex>.data
    assert len(names) == 2 and names[0] == "f.onnx" and re.fullmatch(r"f\.onnx\.[0-9a-f]{12}\.data", names[1])
    folded = onnx.load(out / "f.onnx")
    assert count_bn(folded) == 0
    feeds = random_feeds(m)
    assert_close(run_ort(folded, feeds)[0], run_ort(m, feeds)[0])


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "link/w.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(4, np.float32).tobytes())
    d = tmp_path / "model"
    d.mkdir()
    (d / "link").symlink_to(tmp_path)  # a symlink pointing out of the model folder
    (tmp_path / "w.bin").write_bytes(np.ones(4, np.float32).tobytes())
    m = small_model()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    del t.float_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    t.external_data.add(key="location", value=location)
    onnx.save(m, d / "m.onnx")
    with pytest.raises(BnfoldError, match="outside the model's folder"):
        load_model(d / "m.onnx")


def test_save_roundtrip_keeps_values(tmp_path):
    m = small_model()
    save_model(m, tmp_path / "a.onnx", external_data=True)
    back = onnx.load(tmp_path / "a.onnx")
    for a, b in zip(m.graph.initializer, back.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    # the caller's model was not converted to external data
    assert all(not t.external_data for t in m.graph.initializer)


def test_checker_failure_only_in_output_aborts_the_write(tmp_path, monkeypatch):
    p = tmp_path / "m.onnx"
    onnx.save(small_model(), p)
    import bnfold.fold as fold_mod
    real = fold_mod.fold_model

    def broken(model, *a, **k):
        folded, report = real(model, *a, **k)
        folded.graph.node[0].input[1] = "no_such_tensor"  # what a buggy rewrite could leave behind
        return folded, report
    monkeypatch.setattr(fold_mod, "fold_model", broken)
    from bnfold.errors import InternalError
    with pytest.raises(InternalError, match="fails onnx.checker"):
        fold_onnx_file(p, tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_input_that_fails_the_checker_is_refused(tmp_path):
    """A model onnx.checker rejects is bad input: refused with the checker's message, nothing written. (It used to
    be folded with a warning; issue 12: such a model could be folded wrongly with exit 0.)"""
    m = small_model()
    m.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE  # Relu makes float: already invalid
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    with pytest.raises(BnfoldError, match="not a valid ONNX model.*elem type"):
        fold_onnx_file(p, tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
