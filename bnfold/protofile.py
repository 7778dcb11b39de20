"""Reading and writing ONNX files record by record: the fold never builds or serializes the whole model.

* **Reading.** The file is opened once and its protobuf records are indexed (read with ``pread``, skipping
  over tensor data). The large initializers of the main graph and of every subgraph (raw data of at least
  :data:`SKELETON_BYTES` bytes, not int32/int64, which shape inference may read) are not copied: the model is
  parsed as a *skeleton* in which each of them keeps its name, dtype, dims, doc string and metadata, but whose
  data is a reference (``data_location=EXTERNAL``, location ``bnfold-ref-<token>``, offset ``<n>``: the n-th
  reference of that source) to its bytes in the source. :func:`tensor_array` (what
  :meth:`bnfold.graph.ModelGraph.read` and ``const`` use) reads a referenced tensor on demand;
  :func:`tensor_size` is its full serialized size. The index checks that each referenced tensor's data has
  exactly the size its dims and dtype give (``onnx.checker`` on the skeleton cannot see it); a file where it does
  not goes the old way (loaded whole), with the old result. A model whose tensors live in external data files is
  read the same way: its main graph's tensors from :data:`SKELETON_BYTES` up are references into the data file,
  every other one is read in, as ``onnx.load`` does.
* **Writing.** A skeleton (folded or not) is written by serializing it (small: nodes, small tensors, references)
  and splicing each untouched reference back as the source's own record, copied from file to file by the kernel
  (``copy_file_range``) without passing through Python. The tensors the fold computes are references too
  (:func:`new_tensor` of a :class:`Computed` inside :func:`deferred_tensors`): a recipe (the stored weight times a
  per-channel factor, read from the source), its dtype and its shape; the writer evaluates each one when it
  encodes it, in blocks of rows of about :data:`BLOCK_BYTES` (each read alone from the source), and drops it
  afterwards, so that a fold holds one block of one computed tensor at a time, never the model's new weights
  together. A later read (:func:`tensor_array`, :func:`materialize`) evaluates the recipe again. With
  external data, the referenced tensors' bytes are streamed into the new data file in the order and at
  the offsets ``onnx.save_model`` gives them. The output is byte-identical to ``onnx.save_model`` of the fully
  loaded folded model whenever the source file is in protobuf's canonical encoding (every file that protobuf,
  and so onnx/torch, writes); otherwise it is identical in content.
* Anything the index does not understand (protobuf groups, tensors with both raw and typed data, external data
  in attribute tensors, ...) is not an error: :func:`open_model` returns None and the caller loads the model
  whole as before.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

SKELETON_BYTES = 4096  #: raw data from this size up stays in the source file (a reference in the skeleton)
INDEX_MIN_FILE = 4 << 20  #: a smaller model file is parsed whole (cheaper than indexing records one by one)
EXTERNAL_MIN = 1024  #: tensors written to an external data file (onnx's and bnfold's threshold)
_REF_PREFIX = "bnfold-ref-"
_REF_RE = re.compile(rb"bnfold-ref-([0-9a-f]{12})")
_INT_TYPES = (onnx.TensorProto.INT32, onnx.TensorProto.INT64)
_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1,
             onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT16: 2, onnx.TensorProto.INT32: 4,
             onnx.TensorProto.INT64: 8, onnx.TensorProto.BOOL: 1, onnx.TensorProto.FLOAT16: 2,
             onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.UINT32: 4, onnx.TensorProto.UINT64: 8,
             onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.COMPLEX64: 8, onnx.TensorProto.COMPLEX128: 16}

# field numbers (onnx.proto)
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_T_DIMS, _T_TYPE, _T_FLOATS, _T_INT32S, _T_STRINGS, _T_INT64S = 1, 2, 4, 5, 6, 7
_T_RAW, _T_DOUBLES, _T_UINT64S, _T_EXTERNAL, _T_LOCATION, _T_SEGMENT = 9, 10, 11, 13, 14, 3
_TYPED = {_T_FLOATS, _T_INT32S, _T_STRINGS, _T_INT64S, _T_DOUBLES, _T_UINT64S, _T_SEGMENT}


class Unsupported(Exception):
    """The index cannot take this file; the caller loads it whole."""


# ------------------------------------------------------------------------------------------------ wire format
def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Unsupported("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


_WINDOW = 1 << 18


def _records(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field, wire type, record start, value start, value end)`` of each record in ``buf[start:end]``; for a
    varint the value is ``buf[value start:value end]`` encoded. ``buf`` is bytes-like or a :class:`_Paged` file,
    read through a window (headers are parsed in bytes, values are skipped without being read)."""
    paged = isinstance(buf, _Paged)
    wstart, win = (start, buf[start:min(end, start + _WINDOW)]) if paged else (0, buf)
    wend = wstart + len(win)
    pos = start
    while pos < end:
        if paged and pos + 24 > wend and wend < end:
            wstart, win = pos, buf[pos:min(end, pos + _WINDOW)]
            wend = wstart + len(win)
        rec = pos
        lim = min(end, wend) - wstart
        key, p = _varint(win, pos - wstart, lim)
        fno, wt = key >> 3, key & 7
        if fno == 0:
            raise Unsupported("field number 0")
        if wt == 0:
            _, q = _varint(win, p, lim)
            vs, vend = p + wstart, q + wstart
        elif wt == 2:
            n, q = _varint(win, p, lim)
            vs = q + wstart
            vend = vs + n
        elif wt == 1:
            vs, vend = p + wstart, p + wstart + 8
        elif wt == 5:
            vs, vend = p + wstart, p + wstart + 4
        else:
            raise Unsupported("protobuf groups")
        if vend > end:
            raise Unsupported("truncated record")
        yield fno, wt, rec, vs, vend
        pos = vend


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(fno: int, wt: int) -> bytes:
    return _encode_varint((fno << 3) | wt)


# ------------------------------------------------------------------------------------------------ references
@dataclass
class Ref:
    """Where a referenced tensor's bytes are: ``data`` (offset, length) in ``file`` (an index into
    :attr:`Source.files`); ``record`` (offset, length) of the whole TensorProto in the model file when the
    tensor is stored in it (None for a tensor from an external data file). A tensor the fold computed
    (:func:`new_tensor`) has its recipe in ``computed`` instead (``data`` is then ``(0, its byte size)``)."""

    file: int
    data: tuple[int, int]
    record: tuple[int, int] | None
    computed: Computed | None = None


@dataclass(frozen=True)
class Computed:
    """A tensor the fold computes, as a recipe: ``compute()`` returns its values (an array of exactly ``dtype``
    and ``shape``), each call afresh (``fresh``) or the same held array (an array given as such)."""

    compute: Callable[[], np.ndarray]
    dtype: np.dtype
    shape: tuple[int, ...]
    fresh: bool = True
    #: the same values in blocks (C order, each of ``dtype``), so that the writer holds one block at a time
    blocks: Callable[[], Iterator[np.ndarray]] | None = None

    @classmethod
    def held(cls, arr: np.ndarray) -> Computed:
        """An array already computed, held as it is."""
        arr = np.ascontiguousarray(arr)
        return cls(lambda: arr, arr.dtype, tuple(arr.shape), fresh=False)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __call__(self) -> np.ndarray:
        arr = np.ascontiguousarray(self.compute())
        if arr.dtype != self.dtype or tuple(arr.shape) != self.shape:
            raise AssertionError(f"a computed tensor gave {arr.dtype}{list(arr.shape)}, its recipe says "
                                 f"{self.dtype}{list(self.shape)}")
        return arr

    def pieces(self) -> Iterator[np.ndarray]:
        """The values, in C order: block by block when the recipe has blocks, else whole."""
        if self.blocks is None:
            yield self()
            return
        done = 0
        for b in self.blocks():
            b = np.ascontiguousarray(b)
            if b.dtype != self.dtype:
                raise AssertionError(f"a computed tensor's block is {b.dtype}, its recipe says {self.dtype}")
            done += b.nbytes
            yield b
        if done != self.nbytes:
            raise AssertionError(f"a computed tensor's blocks hold {done} bytes, its recipe says {self.nbytes}")


@dataclass
class Source:
    """An open, indexed model file: the skeleton, and the references into its open files."""

    path: Path
    skeleton: onnx.ModelProto
    external: bool  #: the model keeps its tensors in external data files
    token: str = field(default_factory=lambda: os.urandom(6).hex())
    refs: list[Ref] = field(default_factory=list)
    files: list[tuple[int, _Paged | None]] = field(default_factory=list)  #: (fd, map) per file
    _closed: bool = False

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _SOURCES.pop(self.token, None)
        for fd, mm in self.files:
            if mm is not None:
                mm.close()
            if fd >= 0:
                os.close(fd)

    def data(self, ref: Ref, start: int = 0, n: int | None = None) -> bytes | memoryview:
        """The tensor's bytes (``n`` of them from ``start``, by default all): read from its file (not through the
        map: no page of it stays in the process)."""
        if ref.computed is not None:
            return _bytes_of(ref.computed())[start:None if n is None else start + n]
        if self._closed:  # a recipe read after its source was closed: its descriptor may be another file's now
            raise RuntimeError(f"{self.path}: a tensor refers to a model file that was closed")
        fd, _ = self.files[ref.file]
        off, size = ref.data
        n = size - start if n is None else n
        if start < 0 or n < 0 or start + n > size:
            raise ValueError(f"bytes {start}:{start + n} of a tensor of {size}")
        off += start
        out = bytearray(n)
        view = memoryview(out)
        done = 0
        while done < n:
            got = os.preadv(fd, [view[done:]], off + done)
            if got <= 0:
                raise OSError(f"{self.path}: file shorter than its index")
            done += got
        return bytes(out) if n < 1 << 20 else view

    @property
    def location(self) -> str:
        return f"{_REF_PREFIX}{self.token}"

    def reference(self, t: onnx.TensorProto, ref: Ref) -> None:
        """Make ``t``'s data a reference to ``ref``."""
        self.refs.append(ref)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        t.external_data.add(key="location", value=self.location)
        t.external_data.add(key="offset", value=str(len(self.refs) - 1))

    def materialize(self, model: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """:func:`materialize` of ``model``, by default of this source's skeleton."""
        return materialize(self.skeleton if model is None else model)


_SOURCES: dict[str, Source] = {}


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A full copy of ``model``: every reference replaced by its data, as ``onnx.load`` would give it. For what
    needs the whole model (running it with ONNX Runtime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in _iter_initializers(out.graph):
        found = _ref_of(t)
        if found is not None:
            src, ref = found
            _fill(t, bytes(src.data(ref)), from_data_file=ref.record is None and ref.computed is None)
    return out


def _ref_of(t: onnx.TensorProto) -> tuple[Source, Ref] | None:
    if t.data_location != onnx.TensorProto.EXTERNAL or len(t.external_data) != 2:
        return None
    loc, off = t.external_data
    if loc.key != "location" or not loc.value.startswith(_REF_PREFIX) or off.key != "offset":
        return None
    src = _SOURCES.get(loc.value[len(_REF_PREFIX):])
    if src is None:
        raise RuntimeError(f"tensor '{t.name}' refers to a model file that was closed")
    return src, src.refs[int(off.value)]


def is_reference(t: onnx.TensorProto) -> bool:
    """Whether ``t`` is a skeleton's reference to data left in the source."""
    return _ref_of(t) is not None


def _fill(t: onnx.TensorProto, raw: bytes, *, from_data_file: bool = False) -> None:
    """Turn a reference into the tensor ``onnx.load`` gives (raw data inline; the source's own fields; a tensor
    read from an external data file keeps ``data_location=DEFAULT``, as onnx sets it)."""
    del t.external_data[:]
    if from_data_file:
        t.data_location = onnx.TensorProto.DEFAULT
    else:
        t.ClearField("data_location")
    t.raw_data = raw


_PLAIN = {onnx.TensorProto.FLOAT: np.dtype(np.float32), onnx.TensorProto.DOUBLE: np.dtype(np.float64),
          onnx.TensorProto.FLOAT16: np.dtype(np.float16), onnx.TensorProto.INT64: np.dtype(np.int64),
          onnx.TensorProto.INT32: np.dtype(np.int32)}


_LITTLE = sys.byteorder == "little"


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """The values of a stored tensor, reading a reference from its source (one copy): what
    ``numpy_helper.to_array`` gives for the tensor loaded whole (its own code for plain dtypes in raw data)."""
    found = _ref_of(t) if t.data_location == onnx.TensorProto.EXTERNAL else None
    if found is None:
        plain = _PLAIN.get(t.data_type) if _LITTLE else None
        if plain is not None and t.HasField("raw_data") and not t.HasField("segment") \
                and t.data_location != onnx.TensorProto.EXTERNAL:
            arr = np.frombuffer(t.raw_data, dtype=plain)
            dims = tuple(t.dims)
            return arr if len(dims) == 1 and dims[0] == arr.size else arr.reshape(dims)
        return numpy_helper.to_array(t)
    return _read_ref(*found, t)


def _read_ref(src: Source, ref: Ref, t: onnx.TensorProto) -> np.ndarray:
    """The values of the reference ``ref`` (of ``src``), whose tensor's name, dtype and dims ``t`` holds."""
    if ref.computed is not None:
        arr = ref.computed()
        return arr if ref.computed.fresh else arr.copy()
    raw = src.data(ref)
    plain = _PLAIN.get(t.data_type) if sys.byteorder == "little" else None
    if plain is not None:
        return np.frombuffer(raw, dtype=plain).reshape(t.dims)  # over the bytes read: no second copy
    full = onnx.TensorProto()
    full.CopyFrom(t)
    _fill(full, bytes(raw))
    return numpy_helper.to_array(full)


BLOCK_BYTES = 1 << 20  #: a computed weight is read, computed and written in blocks of about this size


class Loader:
    """Reads a reference's values as they are now (what :func:`tensor_array` gives), from its source, even after
    the tensor itself is rewritten (a folded weight written in place of the weight it is computed from);
    :meth:`rows` reads a block of rows of axis 0 alone."""

    def __init__(self, src: Source, ref: Ref, t: onnx.TensorProto):
        self.src, self.ref = src, ref
        self.head = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)

    def __call__(self) -> np.ndarray:
        return _read_ref(self.src, self.ref, self.head)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """``values[start:stop]`` (axis 0); read alone from the file for plain dtypes."""
        dims = list(self.head.dims)
        plain = _PLAIN.get(self.head.data_type) if sys.byteorder == "little" else None
        if plain is None or self.ref.computed is not None or not dims:
            return self()[start:stop]
        stop = min(stop, dims[0])
        row = int(np.prod(dims[1:], dtype=np.int64)) * plain.itemsize
        raw = self.src.data(self.ref, start * row, max(0, stop - start) * row)
        return np.frombuffer(raw, dtype=plain).reshape([max(0, stop - start)] + dims[1:])


def tensor_loader(t: onnx.TensorProto) -> Loader | None:
    """A :class:`Loader` of the reference ``t``; None for a tensor whose data is in the message."""
    found = _ref_of(t)
    return None if found is None else Loader(*found, t)


def tensor_size(t: onnx.TensorProto) -> int:
    """The serialized size of ``t`` as stored in the full model (a reference counts its data)."""
    found = _ref_of(t)
    if found is None:
        return t.ByteSize()
    src, ref = found
    if ref.record is not None:
        return ref.record[1]
    entries = sum(1 + len(_encode_varint(e.ByteSize())) + e.ByteSize() for e in t.external_data)
    n = ref.data[1]  # loaded whole: raw data instead of the entries (data_location kept, set to DEFAULT,
    location = 2 if ref.computed is not None else 0  # but for a computed tensor, which has none)
    return t.ByteSize() - entries - location + 1 + len(_encode_varint(n)) + n


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of stored data (raw or typed); a reference counts its data."""
    found = _ref_of(t)
    if found is not None:
        return found[1].data[1]
    return len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (len(t.int64_data)
                                                                                + len(t.double_data))


def _iter_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers of a graph and of its subgraphs, in the order ``onnx.save_model`` writes external data."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _iter_initializers(attr.g)
            for g in attr.graphs:
                yield from _iter_initializers(g)


# ------------------------------------------------------------------------------------------------ computed tensors
_LOCAL = threading.local()  # per thread: the stack of deferred_tensors() sources (threads fold independently)


def _deferred() -> list[Source]:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def deferring() -> bool:
    """Whether :func:`new_tensor` gives references now (inside :func:`deferred_tensors`)."""
    return bool(_deferred())


_SIMPLE = {np.dtype(d) for d in (np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.uint16,
                                 np.int32, np.int64, np.uint32, np.uint64, np.bool_)}


@contextlib.contextmanager
def deferred_tensors() -> Iterator[None]:
    """While active, :func:`new_tensor` gives large tensors as references to their recipes (or arrays), so that
    a fold's new weights are computed and encoded one at a time when written, never held as a whole model."""
    src = Source(Path("<computed>"), onnx.ModelProto(), external=False)
    _SOURCES[src.token] = src
    _deferred().append(src)
    try:
        yield
    finally:
        _deferred().remove(src)
        src.close()


_TENSOR_DTYPE = {d: onnx.helper.np_dtype_to_tensor_dtype(d) for d in _SIMPLE}


def set_tensor(t: onnx.TensorProto, value: np.ndarray | Computed, name: str) -> None:
    """``t.CopyFrom(new_tensor(value, name))`` without the intermediate message when ``value`` is a small array
    of a plain dtype (the fields ``from_array`` sets, set on ``t`` itself: the same message)."""
    if isinstance(value, np.ndarray) and value.nbytes < SKELETON_BYTES and value.dtype in _TENSOR_DTYPE \
            and _LITTLE:
        t.Clear()
        t.dims.extend(value.shape)
        if name:
            t.name = name
        t.raw_data = value.tobytes()
        t.data_type = _TENSOR_DTYPE[value.dtype]
        return
    t.CopyFrom(new_tensor(value, name))


def new_tensor(value: np.ndarray | Computed, name: str) -> onnx.TensorProto:
    """``numpy_helper.from_array(value, name)`` (a :class:`Computed` evaluated first), or, inside
    :func:`deferred_tensors`, for large tensors of plain dtypes (written the same way by from_array), a
    reference to ``value`` that is written as that tensor: a recipe is evaluated when the tensor is written or
    read, and not held."""
    if isinstance(value, Computed):
        comp, dtype, nbytes = value, value.dtype, value.nbytes
    else:
        value = np.ascontiguousarray(value)
        comp, dtype, nbytes = None, value.dtype, value.nbytes
    stack = _deferred()
    if not stack or nbytes < SKELETON_BYTES or dtype not in _SIMPLE or sys.byteorder != "little":
        return numpy_helper.from_array(value() if comp is not None else value, name)
    if comp is None:
        comp = Computed.held(value)
    src = stack[-1]
    t = onnx.TensorProto()
    t.dims.extend(comp.shape)
    if name:
        t.name = name
    t.data_type = onnx.helper.np_dtype_to_tensor_dtype(comp.dtype)
    src.reference(t, Ref(-1, (0, nbytes), None, comp))
    return t


def _expected_bytes(data_type: int, dims: list[int]) -> int | None:
    size = _ITEMSIZE.get(data_type)
    if size is None:
        return None
    return int(np.prod(dims, dtype=np.int64)) * size if dims else size


# ------------------------------------------------------------------------------------------------ reading
class _Paged:
    """The file's bytes, read on demand with ``pread`` through a one-block cache: ``buf[i]`` and ``buf[a:b]``
    as on bytes. Not a memory map: with large page-cache folios, touching one byte of a mapping maps megabytes
    of the tensor around it into the process; ``pread`` copies only what is asked."""

    BLOCK = 1 << 16

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self._block, self._data = -1, b""

    def __len__(self) -> int:
        return self.size

    def _load(self, block: int) -> None:
        self._data = os.pread(self.fd, self.BLOCK, block * self.BLOCK)
        self._block = block

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop = i.start or 0, min(self.size, self.size if i.stop is None else i.stop)
            block = start // self.BLOCK
            if block == self._block and stop <= (block + 1) * self.BLOCK:
                base = block * self.BLOCK
                return self._data[start - base:stop - base]
            out = os.pread(self.fd, stop - start, start)
            if len(out) != stop - start:
                raise Unsupported("file changed while read")
            return out
        block = i // self.BLOCK
        if block != self._block:
            self._load(block)
        try:
            return self._data[i - block * self.BLOCK]
        except IndexError:
            raise Unsupported("file changed while read") from None

    def close(self) -> None:
        self._data = b""


def _map(path: Path) -> tuple[int, _Paged | None]:
    """The file, open, with its paged reader for the index (None for an empty file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return fd, (_Paged(fd, size) if size else None)
    except BaseException:
        os.close(fd)
        raise


def _bytes_of(arr: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def _tensor_fields(buf, start: int, end: int):
    """(data_type, dims, raw data (offset, length, record start) or None, has other data/location fields) of a
    TensorProto's bytes."""
    data_type, dims, raw, other = 0, [], None, False
    for fno, wt, _rec, vs, ve in _records(buf, start, end):
        if fno == _T_TYPE and wt == 0:
            data_type = _varint(buf, vs, ve)[0]
        elif fno == _T_DIMS:
            if wt == 0:
                dims.append(_varint(buf, vs, ve)[0])
            elif wt == 2:
                p = vs
                while p < ve:
                    d, p = _varint(buf, p, ve)
                    dims.append(d)
            else:
                other = True
        elif fno == _T_RAW and wt == 2:
            if raw is not None:
                other = True  # repeated raw_data: protobuf keeps the last one; not worth indexing
            raw = (vs, ve - vs, _rec)
        elif fno in _TYPED or fno in (_T_EXTERNAL, _T_LOCATION):
            other = True
    dims = [d - (1 << 64) if d >= 1 << 63 else d for d in dims]
    return data_type, dims, raw, other


def open_model(path: str | os.PathLike, *, min_bytes: int | None = None) -> Source | None:
    """Index the model file at ``path`` and parse its skeleton. None when there is nothing to gain (a file under
    :data:`INDEX_MIN_FILE`, no tensor of ``min_bytes`` or more) or the index cannot take the file (the caller then loads it whole). Raises
    what ``onnx.load`` raises on a file that does not parse."""
    p = Path(path)
    min_bytes = SKELETON_BYTES if min_bytes is None else min_bytes
    if os.stat(p).st_size < INDEX_MIN_FILE:
        return None
    fd, mm = _map(p)
    src = Source(p, onnx.ModelProto(), external=False)
    src.files.append((fd, mm))
    _SOURCES[src.token] = src
    try:
        if mm is None:
            raise Unsupported("empty file")
        skeleton = _skeleton_bytes(src, mm, min_bytes)
        if skeleton is None:
            src.close()
            return None
        src.skeleton = onnx.ModelProto.FromString(skeleton)
        if any(t.data_location == onnx.TensorProto.EXTERNAL and not is_reference(t)
               for t in iter_model_tensors(src.skeleton)):
            raise Unsupported("the model uses external data")  # see open_external_model
        return src
    except Exception:  # anything the index cannot read (a corrupted file too): loaded whole, refused there
        src.close()
        return None
    except BaseException:
        src.close()
        raise


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for g in attr.graphs:
                yield from _graph_tensors(g)


def iter_model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the model: initializers and tensor attributes, in subgraphs and functions too."""
    yield from _graph_tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t


# The messages on the way from the model to its initializers: (message kind, field) -> kind of the submessage.
_PATH = {("model", _MODEL_GRAPH): "graph", ("graph", 1): "node", ("graph", _GRAPH_INITIALIZER): "tensor",
         ("node", 5): "attribute", ("attribute", 6): "graph", ("attribute", 11): "graph"}


def _skeleton_bytes(src: Source, mm: _Paged, min_bytes: int) -> bytes | None:
    found = [False]

    def message(kind: str, start: int, end: int) -> list:
        """``kind``'s records in ``mm[start:end]``, large initializers replaced by references; a record that
        is not on the way to an initializer, or too small to hold a large one, is kept as it is."""
        parts: list = []
        for fno, wt, rec, vs, ve in _records(mm, start, end):
            sub = _PATH.get((kind, fno)) if wt == 2 else None
            if sub is None or ve - vs < min_bytes:
                parts.append(mm[rec:ve])
            elif sub == "tensor":
                parts.append(tensor(rec, vs, ve))
            else:
                body = b"".join(message(sub, vs, ve))
                parts.append(_key(fno, 2) + _encode_varint(len(body)) + body)
        return parts

    def tensor(rec: int, vs: int, ve: int) -> bytes:
        data_type, dims, raw, other = _tensor_fields(mm, vs, ve)
        if raw is None or other or raw[1] < min_bytes or data_type in _INT_TYPES:
            return mm[rec:ve]
        want = _expected_bytes(data_type, dims)
        if want is not None and want != raw[1]:
            raise Unsupported("tensor data does not match its dims")  # loaded whole: refused there
        n = len(src.refs)
        src.refs.append(Ref(0, raw[:2], (vs, ve - vs)))
        found[0] = True
        # the record without its raw data, plus the reference
        body = bytes(mm[vs:raw[2]]) + bytes(mm[raw[0] + raw[1]:ve]) + _reference_fields(src.location, n)
        return _key(_GRAPH_INITIALIZER, 2) + _encode_varint(len(body)) + body

    out = b"".join(message("model", 0, len(mm)))
    return out if found[0] else None


def _entry(key: bytes, value: bytes) -> bytes:
    entry = _key(1, 2) + _encode_varint(len(key)) + key + _key(2, 2) + _encode_varint(len(value)) + value
    return _key(_T_EXTERNAL, 2) + _encode_varint(len(entry)) + entry


def _reference_fields(location: str, n: int) -> bytes:
    return _entry(b"location", location.encode()) + _entry(b"offset", str(n).encode()) + _key(_T_LOCATION, 0) + b"\x01"


def open_external_model(model: onnx.ModelProto, path: str | os.PathLike,
                        *, min_bytes: int | None = None) -> Source | None:
    """A skeleton of ``model`` (parsed without its external data, locations already checked to stay in its
    folder) whose main-graph tensors in external files are references into the data files;
    every other external tensor is read in, as ``onnx.load`` does. None when something is unusual (the caller
    loads the data whole). ``model`` becomes the skeleton."""
    p = Path(path)
    min_bytes = SKELETON_BYTES if min_bytes is None else min_bytes
    src = Source(p, model, external=True)
    _SOURCES[src.token] = src
    maps: dict[str, int] = {}

    def locate(t: onnx.TensorProto) -> Ref:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if set(info) - {"location", "offset", "length"} or not loc:
            raise Unsupported("external data with checksum or basepath")
        if loc not in maps:
            maps[loc] = len(src.files)
            src.files.append(_map(p.parent / loc))
        _fd, mm = src.files[maps[loc]]
        size = len(mm) if mm is not None else 0
        off = int(info.get("offset", 0))
        n = int(info["length"]) if "length" in info else size - off
        if off + n > size:
            raise Unsupported("external data past the end of its file")
        want = _expected_bytes(t.data_type, list(t.dims))
        if want is not None and want != n:
            raise Unsupported("tensor data does not match its dims")  # loaded whole: refused there
        return Ref(maps[loc], (off, n), None)

    try:
        for t in model.graph.initializer:  # the main graph's large tensors: references
            if t.data_location != onnx.TensorProto.EXTERNAL or _has_typed_data(t):
                continue
            ref = locate(t)
            if ref.data[1] >= min_bytes and t.data_type not in _INT_TYPES:
                src.reference(t, ref)
        for t in iter_model_tensors(model):  # everything else: read in, as onnx.load does
            if t.data_location != onnx.TensorProto.EXTERNAL or is_reference(t):
                continue
            raw = bytes(src.data(locate(t))) if t.external_data else b""
            del t.external_data[:]  # as onnx.load_external_data_for_tensor + load_external_data_for_model
            t.raw_data = raw
            t.data_location = onnx.TensorProto.DEFAULT
        return src
    except Exception:  # anything unusual: the caller reads the external data whole, as before
        src.close()
        return None
    except BaseException:
        src.close()
        raise


def _has_typed_data(t: onnx.TensorProto) -> bool:
    return bool(t.raw_data or t.float_data or t.int32_data or t.int64_data or t.double_data or t.uint64_data
                or t.string_data)


@contextlib.contextmanager
def checkable(model: onnx.ModelProto | bytes) -> Iterator[str]:
    """A path to ``model`` (a skeleton, or its serialization) that ``onnx.checker.check_model`` can check: the
    skeleton in a private temporary folder, beside an empty file for each source its references name (the
    checker checks that external data is a regular file in the model's folder, not its contents: the index
    checked the sizes)."""
    import tempfile

    body = model if isinstance(model, bytes) else model.SerializeToString()
    with tempfile.TemporaryDirectory(prefix="bnfold-check-") as d:
        for token in {m.group(1).decode() for m in _REF_RE.finditer(body)}:
            open(os.path.join(d, _REF_PREFIX + token), "wb").close()
        path = os.path.join(d, "model.onnx")
        with open(path, "wb") as fh:
            fh.write(body)
        yield path


def has_references(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is a skeleton: some initializer (subgraphs included) is a reference."""
    return any(is_reference(t) for t in _iter_initializers(model.graph))


# ------------------------------------------------------------------------------------------------ writing
def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy_range(src_fd: int, mm, dst_fd: int, offset: int, n: int) -> None:
    """Copy ``n`` bytes at ``offset`` of the source to the end of ``dst_fd``, in the kernel when it can."""
    if hasattr(os, "copy_file_range"):
        try:
            while n > 0:
                done = os.copy_file_range(src_fd, dst_fd, n, offset)
                if done <= 0:
                    break
                offset += done
                n -= done
        except OSError:
            pass
    while n > 0:  # no copy_file_range (or it refused): through a buffer
        chunk = os.pread(src_fd, min(n, 16 << 20), offset)
        if not chunk:
            raise OSError("source file shorter than its index")
        _write_all(dst_fd, chunk)
        offset += len(chunk)
        n -= len(chunk)


def write_embedded(model: onnx.ModelProto, dst: str | os.PathLike) -> None:
    """Write ``model`` (a skeleton whose references all point into one source model file) to ``dst``, a new
    file: what ``onnx.save_model`` writes for the full model. Computed tensors are evaluated one at a time, as
    they are written."""
    body = model.SerializeToString()
    chunks = _splice(body)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        for c in chunks:
            if isinstance(c, tuple):
                src, off, n = c
                sfd, mm = src.files[0]
                _copy_range(sfd, mm, fd, off, n)
            elif isinstance(c, Computed):
                for block in c.pieces():  # evaluated here, block by block, dropped after
                    _write_all(fd, _bytes_of(block))
            else:
                _write_all(fd, c)
    finally:
        os.close(fd)


def _splice(body: bytes) -> list:
    """The chunks of the full model: ``body``'s records, each reference among the initializers (subgraphs
    included) replaced by its record: ``(source, offset, length)`` in the source file, or the tensor the fold
    computed, encoded around its :class:`Computed` (raw data evaluated by the writer)."""
    view = memoryview(body)

    def message(kind: str, start: int, end: int) -> tuple[list, int]:
        parts: list = []
        total = 0
        pending = start  # records are copied in runs, not one by one
        for fno, wt, rec, vs, ve in _records(body, start, end):
            sub = _PATH.get((kind, fno)) if wt == 2 else None
            if sub is None or _REF_RE.search(body, vs, ve) is None:
                continue
            if sub == "tensor":
                found = _ref_of(onnx.TensorProto.FromString(body[vs:ve]))
                if found is None:
                    continue
                src, ref = found
                if ref.computed is not None:
                    inner = _computed_record(body, vs, ve, ref.computed)
                    n = sum(len(c) for c in inner[:2] + inner[3:]) + ref.computed.nbytes
                elif ref.record is not None:
                    inner, n = [(src, ref.record[0], ref.record[1])], ref.record[1]
                else:
                    raise RuntimeError("a reference into an external data file in a model written without one")
            else:
                inner, n = message(sub, vs, ve)
            if rec > pending:
                parts.append(view[pending:rec])
                total += rec - pending
            head = _key(fno, 2) + _encode_varint(n)
            parts.append(head)
            parts += inner
            total += len(head) + n
            pending = ve
        if end > pending:
            parts.append(view[pending:end])
            total += end - pending
        return parts, total

    if _REF_RE.search(body) is None:
        return [body]
    return message("model", 0, len(body))[0]


def _computed_record(body: bytes, start: int, end: int, computed: Computed) -> list:
    """The record of a computed tensor from its reference's record: the reference's fields (external_data,
    data_location) dropped, raw_data put in its place among the fields (by field number, as protobuf does):
    ``[fields before, raw data's key and length, computed, fields after]``."""
    before, after = [], []
    for fno, _wt, rec, _vs, ve in _records(body, start, end):
        if fno in (_T_EXTERNAL, _T_LOCATION):
            continue
        (before if fno < _T_RAW else after).append(body[rec:ve])
    return [b"".join(before), _key(_T_RAW, 2) + _encode_varint(computed.nbytes), computed, b"".join(after)]


def write_external(model: onnx.ModelProto, dst: str | os.PathLike, data_path: str | os.PathLike) -> bool:
    """Write ``model`` (a skeleton) to ``dst`` with every initializer (subgraphs included) of
    :data:`EXTERNAL_MIN` bytes or more in ``data_path``, at the offsets ``onnx.save_model`` gives them after
    ``set_external_data(t, <data file name>)``. ``model``'s tensors are changed (references and raw data become
    references to the new file). Returns whether a data file was written."""
    name = Path(data_path).name
    fd = None
    offset = 0
    try:
        for t in _iter_initializers(model.graph):
            found = _ref_of(t)
            if found is not None and found[1].data[1] < EXTERNAL_MIN:  # small: inline, as onnx leaves it
                src, ref = found
                _fill(t, bytes(src.data(ref)), from_data_file=ref.record is None and ref.computed is None)
                continue
            if found is None and not (t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN):
                continue
            if fd is None:
                fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            if found is not None:
                src, ref = found
                if ref.computed is not None:
                    for block in ref.computed.pieces():  # evaluated here, block by block, dropped after
                        _write_all(fd, _bytes_of(block))
                else:
                    sfd, mm = src.files[ref.file]
                    _copy_range(sfd, mm, fd, ref.data[0], ref.data[1])
                n = ref.data[1]
            else:
                n = len(t.raw_data)
                _write_all(fd, t.raw_data)
                t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value=name)
            t.external_data.add(key="offset", value=str(offset))
            t.external_data.add(key="length", value=str(n))
            offset += n
    finally:
        if fd is not None:
            os.close(fd)
    with open(dst, "xb") as fh:
        fh.write(model.SerializeToString())
    return fd is not None


def locations_of(model: onnx.ModelProto) -> list[str]:
    """The external-data locations ``model``'s tensors refer to, each once, in order of first reference."""
    locs: dict[str, None] = {}  # (an ordered set: a model may have a data file per tensor)
    for t in iter_model_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    locs.setdefault(e.value)
    return list(locs)


def external_locations(path: str | os.PathLike) -> list[str] | None:
    """The external-data locations a model file refers to, from its index (no parse of the whole model);
    None when the file is not a model the index can read."""
    p = Path(path)
    try:
        fd, mm = _map(p)
    except OSError:
        return None
    try:
        if mm is None:
            return None
        return locations_of(onnx.ModelProto.FromString(_strip_large(mm)))
    except Exception:  # not a model
        return None
    finally:
        if mm is not None:
            mm.close()
        os.close(fd)


def _strip_large(mm) -> bytes:
    """The model file's bytes without the large main-graph initializers that hold raw data (enough to read
    every external-data entry)."""
    out: list[bytes] = []
    for fno, wt, rec, vs, ve in _records(mm, 0, len(mm)):
        if fno != _MODEL_GRAPH or wt != 2:
            out.append(mm[rec:ve])
            continue
        parts: list[bytes] = []
        for gf, gwt, grec, gvs, gve in _records(mm, vs, ve):
            if gf == _GRAPH_INITIALIZER and gwt == 2 and gve - gvs >= SKELETON_BYTES \
                    and _tensor_fields(mm, gvs, gve)[2] is not None:
                continue  # raw data in the file: not an external reference
            parts.append(mm[grec:gve])
        graph = b"".join(parts)
        out.append(_key(_MODEL_GRAPH, 2) + _encode_varint(len(graph)) + graph)
    return b"".join(out)
