"""Loading and saving ONNX models safely.

* Loading checks that the file exists, parses as an ONNX model with a non-empty graph and a supported opset,
  and that every external-data location stays inside the model's folder (no absolute paths, no ``..``, no
  symlink out) before any external data is read.
* Saving is atomic: everything is written into a temporary folder beside the output and renamed into place,
  so a failure leaves no partial file. Models that used external data, or that exceed protobuf's 2 GB limit,
  are saved with their tensors in ``<output>.<12 hex>.data`` next to the output (a fresh name per write, so
  that model and data switch as one unit: see :func:`save_model`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx.external_data_helper import set_external_data, uses_external_data

from bnfold import protofile
from bnfold.errors import BnfoldError
from bnfold.outputs import (  # noqa: F401 (write_*_atomic re-exported: they used to live here)
    check_target,
    clean_stale_temps,
    critical_section,
    folder_lock,
    fsync_file,
    model_companions,
    new_data_name,
    temp_name,
    write_bytes_atomic,
    write_text_atomic,
)
from bnfold.protofile import iter_model_tensors  # noqa: F401 (re-exported)

MIN_OPSET = 6
_2GB = 2**31 - 1


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path | None
    external_data: bool
    #: with ``load_model(skeleton=True)``: the open source file whose large tensors ``model`` refers to (see
    #: :mod:`bnfold.protofile`); close it (or use the LoadedModel as a context manager) when done
    source: protofile.Source | None = None

    def close(self) -> None:
        if self.source is not None:
            self.source.close()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _external_entries(t: onnx.TensorProto, label: str) -> dict[str, str]:
    """The external_data key/values of a tensor, validated: a location that is text without NUL, and
    offset/length that are non-negative decimal integers."""
    entries = {}
    for e in t.external_data:
        if isinstance(e.key, bytes) or isinstance(e.value, bytes):
            raise BnfoldError(f"{label}: tensor '{t.name}' has external-data fields that are not valid UTF-8; "
                              "the file is corrupted")
        entries[e.key] = e.value
    loc = entries.get("location", "")
    if "\x00" in loc:
        raise BnfoldError(f"{label}: tensor '{t.name}' has a NUL character in its external-data location "
                          f"{loc!r}; the file is corrupted")
    for key in ("offset", "length"):
        value = entries.get(key)
        if value is not None and not (value.isascii() and value.isdigit()):
            raise BnfoldError(f"{label}: tensor '{t.name}' has external-data {key} {value!r}, not a non-negative "
                              "integer; the file is corrupted")
    return entries


def _check_external_locations(model: onnx.ModelProto, base: Path, label: str = "model") -> None:
    base_real = base.resolve()
    for t in iter_model_tensors(model):
        if not uses_external_data(t) or protofile.is_reference(t):
            continue
        loc = _external_entries(t, label).get("location", "")
        p = Path(loc)
        if not loc or p.is_absolute() or ".." in p.parts or loc.startswith(("/", "\\")):
            raise BnfoldError(
                f"tensor '{t.name}' points at external data '{loc}' outside the model's folder; "
                "refusing to read it: move the data file next to the model and fix its location"
            )
        target = (base / p).resolve()
        if base_real != target and base_real not in target.parents:
            raise BnfoldError(
                f"tensor '{t.name}' external data '{loc}' resolves outside the model's folder (symlink?); "
                "refusing to read it"
            )
        if not target.is_file():
            raise BnfoldError(
                f"tensor '{t.name}' needs external data file '{loc}', which is missing next to the model "
                "(or is not a regular file)"
            )


def load_model(path: str | os.PathLike, *, skeleton: bool = False) -> LoadedModel:
    """Load and validate an ONNX model file; raise :class:`BnfoldError` with a one-line reason otherwise.

    With ``skeleton`` the model's large tensors stay in the file, as references that
    :func:`bnfold.protofile.tensor_array` reads on demand (:mod:`bnfold.protofile`); the same checks apply.
    Close the result when done."""
    p = Path(path)
    if not p.exists():
        raise BnfoldError(f"{p}: no such file")
    if not p.is_file():
        raise BnfoldError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise BnfoldError(f"{p}: empty file, not an ONNX model")
    from bnfold.filetype import not_onnx_message

    if (msg := not_onnx_message(p)) is not None:  # a torch/safetensors file: say so, and the fix
        raise BnfoldError(msg)
    source = None
    if skeleton:
        try:
            source = protofile.open_model(p)
        except OSError as exc:
            raise BnfoldError(f"{p}: cannot read it ({exc.strerror})") from None
    try:
        if source is not None:
            model = source.skeleton
        else:
            try:
                model = onnx.load(str(p), load_external_data=False)
            except Exception as exc:  # protobuf DecodeError, RuntimeWarning-turned-errors, ...
                raise BnfoldError(
                    f"{p}: not an ONNX model (protobuf parse failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                    "is the file truncated or corrupted?"
                ) from None
        validate_model(model, str(p))
        external = any(uses_external_data(t) and not protofile.is_reference(t) for t in iter_model_tensors(model))
        if external:
            _check_external_locations(model, p.parent, str(p))
            if skeleton:
                source = protofile.open_external_model(model, p)
            if source is None:
                try:
                    onnx.load_external_data_for_model(model, str(p.parent))
                except Exception as exc:
                    raise BnfoldError(f"{p}: cannot read external data ({exc})") from None
        return LoadedModel(model, p, external, source)
    except BaseException:
        if source is not None:
            source.close()
        raise


def validate_model(model: onnx.ModelProto, label: str = "model") -> None:
    """Cheap structural checks that catch files which parse but are not usable ONNX models."""
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise BnfoldError(f"{label}: not an ONNX model (no IR version or no graph); is the file corrupted?")
    if len(model.graph.node) == 0:
        raise BnfoldError(f"{label}: the graph is empty (no nodes); nothing to fold")
    _check_text_fields(model.graph, label)
    opset = default_opset(model)
    if opset is None:
        raise BnfoldError(f"{label}: the model imports no default-domain opset; re-export it with an opset >= {MIN_OPSET}")
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET or opset > newest:
        raise BnfoldError(
            f"{label}: opset {opset} is not supported (supported: {MIN_OPSET}..{newest}); "
            f"convert it with onnx.version_converter or re-export with a supported opset"
        )


def _check_text_fields(graph: onnx.GraphProto, label: str) -> None:
    """Names must be text: protobuf hands invalid UTF-8 back as bytes, which no tool can handle."""
    def bad(value) -> bool:
        return isinstance(value, bytes)
    for t in list(graph.initializer) + list(graph.input) + list(graph.output) + list(graph.value_info):
        if bad(t.name):
            raise BnfoldError(f"{label}: a tensor name is not valid UTF-8 ({t.name[:40]!r}); the file is corrupted")
    for n in graph.node:
        fields = (n.name, n.op_type, n.domain, *n.input, *n.output)
        if bytes in map(type, fields):  # bad(), for every field at C speed (a graph may have many nodes)
            raise BnfoldError(f"{label}: node {fields[0][:40]!r} has a name that is not valid UTF-8; "
                              "the file is corrupted")
        for a in n.attribute:
            if bad(a.name):
                raise BnfoldError(f"{label}: an attribute name is not valid UTF-8; the file is corrupted")
            if a.HasField("g"):
                _check_text_fields(a.g, label)
            for g in a.graphs:
                _check_text_fields(g, label)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False,
               copy: bool = True, validate: Callable[[Path | onnx.ModelProto], None] | None = None) -> Path:
    """Atomically write ``model`` to ``path``. Tensors go to ``<name>.<12 hex>.data`` beside it (a fresh
    name per write) when ``external_data`` is set or the model would not fit in one protobuf (2 GB). With
    ``copy=False`` the tensors of ``model`` may be moved to external storage in place (saves memory when the
    caller discards the model). ``validate`` is called before the result is renamed into place, with the
    written temporary file or (for a skeleton written without external data) with ``model`` itself; if it
    raises, nothing is written.

    ``model`` may be a skeleton (:func:`load_model` with ``skeleton=True``, folded or not): its references are
    written as the source's own bytes (:mod:`bnfold.protofile`), and the file is the one the fully loaded
    model would give.

    Model and data are one unit: both are written into a temporary folder beside the output, then, under a
    lock on the folder, the data file is renamed to its fresh name, the model renamed over ``path`` (the
    switch), and only then the data files the old model referred to removed (those no other model in the
    folder refers to: :func:`bnfold.outputs.model_companions`). A crash at any instant leaves the old model
    with its data or the new one with its data; concurrent writers to one path end with one complete result;
    nothing depends on the working directory."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise BnfoldError(f"{out}: output folder {parent} does not exist")
    check_target(out)
    if not external_data and tensor_bytes(model) > _2GB // 2:
        external_data = True
    skeleton = protofile.has_references(model)
    clean_stale_temps(parent)
    data_name = new_data_name(out)
    tmpdir = parent / temp_name(out)
    try:
        os.mkdir(tmpdir, 0o700)
    except OSError as exc:
        raise BnfoldError(f"{out}: cannot write in folder {parent} ({exc.strerror})") from None
    try:
        tmp_model = tmpdir / out.name
        checked: Path | onnx.ModelProto = tmp_model
        if external_data:
            # tensors are converted in place: work on a copy so the caller's model is unchanged
            if copy:
                m = onnx.ModelProto()
                m.CopyFrom(model)
            else:
                m = model
            for t in iter_model_tensors(m):  # drop stale external references from the source file
                if uses_external_data(t) and not protofile.is_reference(t):
                    raise AssertionError("model tensors must be loaded before saving")
            if skeleton:
                protofile.write_external(m, tmp_model, tmpdir / data_name)
            else:
                for t in _iter_initializers(m.graph):
                    if t.HasField("raw_data") and len(t.raw_data) >= protofile.EXTERNAL_MIN:
                        set_external_data(t, data_name)
                # (not save_as_external_data: its "data file exists" check looks in the working directory)
                onnx.save_model(m, str(tmp_model))
        elif skeleton:
            protofile.write_embedded(model, tmp_model)
            checked = model  # the skeleton: the same checks as the file, without reading its data back
        else:
            onnx.save_model(model, str(tmp_model))
        has_data = (tmpdir / data_name).exists()
        synced = _fsync_in_background(([tmpdir / data_name] if has_data else []) + [tmp_model])
        try:
            if validate is not None:
                validate(checked)
        finally:
            synced()
        with folder_lock(parent), critical_section():
            check_target(out)
            old = [f for f in model_companions(out) if f.name != data_name]
            if has_data:
                os.replace(tmpdir / data_name, parent / data_name)
            os.replace(tmp_model, out)
            for f in old:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def _fsync_in_background(files: list[Path]) -> Callable[[], None]:
    """fsync ``files`` in a thread (overlapping the check); the returned function waits and re-raises."""
    import threading

    errors: list[BaseException] = []

    def run():
        try:
            for f in files:
                fsync_file(f)
        except BaseException as exc:  # reported by wait()
            errors.append(exc)

    th = threading.Thread(target=run, name="bnfold-fsync", daemon=True)
    th.start()

    def wait():
        th.join()
        if errors:
            raise errors[0]
    return wait


def walk_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph below it (If/Loop/Scan bodies, nested), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from walk_graphs(attr.g)
            for g in attr.graphs:
                yield from walk_graphs(g)


def _iter_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers of a graph and of its subgraphs (what onnx stores externally)."""
    for g in walk_graphs(graph):
        yield from g.initializer


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data in the initializers (a skeleton's references count their data): a cheap lower bound
    of the serialized size."""
    return sum(protofile.tensor_nbytes(t) for t in model.graph.initializer)
