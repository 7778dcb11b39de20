"""With ``BNFOLD_IDENTITY_AUDIT=1``, every in-process fold of a file in the test suite is audited: the reader/writer
(:mod:`bnfold.protofile`) must give the bytes the fully loaded model gives.

Every tensor of 64 bytes or more is made a reference (not only those of 4 KiB or more), so that nearly every
model the tests fold goes through the reader/writer. For each fold of a skeleton (``bnfold.fold.fold_model`` called on a model with references), the input is also
loaded whole with ``onnx.load`` and folded with the same options; the folded skeleton, with its references filled
in, must serialize to the same bytes as that independent result, and every file the writer writes without
external data must be the serialization of the model it was given, loaded whole. Mismatches fail the test that caused them. Commands run in subprocesses
are not audited, nor models over 1 GB (protobuf cannot serialize them whole). Run: ``BNFOLD_IDENTITY_AUDIT=1 python -m pytest -q -p no:cacheprovider``.
"""

from __future__ import annotations

import os

import pytest

AUDIT = os.environ.get("BNFOLD_IDENTITY_AUDIT") == "1"
AUDITED: list[str] = []
AUDITED_WRITES: list[str] = []


@pytest.fixture(autouse=True)
def _identity_audit(monkeypatch):
    if not AUDIT:
        yield
        return
    import onnx

    import bnfold.fold
    from bnfold import protofile
    from bnfold.onnx_fold import fold_model

    problems: list[str] = []
    # every tensor of 64 bytes or more becomes a reference: the reader/writer serves (nearly) every test model
    monkeypatch.setattr(protofile, "SKELETON_BYTES", 64)
    monkeypatch.setattr(protofile, "INDEX_MIN_FILE", 0)

    def audited_fold(model, options=None, *, dry_run=False, name="", inplace=False, source_path=None):
        from bnfold.onnx_io import tensor_bytes

        if dry_run or not protofile.has_references(model) or tensor_bytes(model) > 1 << 30:  # (protobuf: 2 GB)
            return fold_model(model, options, dry_run=dry_run, name=name, inplace=inplace, source_path=source_path)
        src, _ = next(protofile._ref_of(t) for t in model.graph.initializer if protofile.is_reference(t))
        whole = onnx.load(str(src.path))
        legacy, legacy_report = fold_model(whole, options, name=name, inplace=True)
        folded, report = fold_model(model, options, name=name, inplace=inplace, source_path=source_path)
        full = protofile.materialize(folded)
        legacy = protofile.materialize(legacy)  # (inside the fold, computed tensors are references too)
        if full.SerializeToString() != legacy.SerializeToString():
            problems.append(f"{src.path}: the folded skeleton differs from the fold of the whole model")
        if report.to_dict() != legacy_report.to_dict():
            problems.append(f"{src.path}: reports differ")
        AUDITED.append(str(src.path))
        return folded, report

    real_write = protofile.write_embedded

    def audited_write(model, dst):
        real_write(model, dst)
        with open(dst, "rb") as fh:
            if fh.read() != protofile.materialize(model).SerializeToString():
                problems.append(f"{dst}: the written file differs from the model loaded whole")
        AUDITED_WRITES.append(str(dst))

    monkeypatch.setattr(bnfold.fold, "fold_model", audited_fold)
    monkeypatch.setattr(protofile, "write_embedded", audited_write)
    yield
    assert not problems, problems


def pytest_terminal_summary(terminalreporter):
    if AUDIT:
        terminalreporter.write_line(f"identity audit: {len(AUDITED)} skeleton folds compared byte for byte with "
                                    f"the fold of the fully loaded model; {len(AUDITED_WRITES)} written files with "
                                    "the serialization of the model loaded whole")
