"""What a command writes, checked against what it reads before anything is written; the mechanics of writing
without ever leaving a mix; and text that is safe to show.

* :class:`OutputPlan`: every path a command will write (model, report, checkpoint, plot, every file of an
  output folder, and the old external-data files a model write removes) is compared with every path it reads
  (model and its external data, weights, data files), by real path and by device+inode. A clash, a target that
  is a symlink, folder or special file (FIFO, device, socket), a missing or unwritable folder raises
  :class:`BnfoldError` before anything is written. ``in_place`` is the one exception, for the model itself.
* Temporary files are named ``.<name>.<pid>.<random>.bnfold-tmp``; any whose process is gone (killed) are
  removed by the next write into that folder (:func:`clean_stale_temps`).
* :func:`folder_lock` serialises the commit step (renames) of concurrent writers into one folder;
  :func:`critical_section` defers SIGINT/SIGTERM (when the command line's handlers are installed, see
  :func:`handle_signals`) until a commit is complete.
* :func:`printable` escapes control characters (C0, DEL, C1, bidi overrides), :func:`markdown_text` also
  markdown's active characters; :func:`strict_json` writes JSON without NaN/Infinity.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from bnfold.errors import BnfoldError, Terminated

log = logging.getLogger(__name__)

TMP_SUFFIX = ".bnfold-tmp"
_TMP_RE = re.compile(r"^\..*\.(\d+)\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX) + "$", re.S)
_DATA_TOKEN = r"\.[0-9a-f]{12}\.data"
FIGURE_SUFFIXES = (".png", ".svg", ".pdf")


# ------------------------------------------------------------------------------------------------ text
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]")


def _escape_char(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text) -> str:
    """``text`` with every control character (C0 including newline and ESC, DEL, C1, bidi and zero-width
    format characters) written as a ``\\xNN``/``\\uNNNN`` escape: safe to print on a terminal."""
    return _CONTROL.sub(_escape_char, str(text))


_MD_ACTIVE = re.compile(r"([\\`|<>\[\]])")


def markdown_text(text) -> str:
    """``text`` for a markdown table cell or line: control characters escaped, and the markdown characters
    that change structure (code spans, table cells, HTML, links) backslash-escaped so the text shows
    literally (emphasis characters are left alone: names like ``bn_1`` stay searchable)."""
    return _MD_ACTIVE.sub(r"\\\1", printable(text))


def _finite(obj, path: str, bad: list[str]):
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path or "/")
        return None
    if isinstance(obj, dict):
        return {k: _finite(v, f"{path}/{str(k).replace('~', '~0').replace('/', '~1')}", bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, f"{path}/{i}", bad) for i, v in enumerate(obj)]
    return obj


def strict_json(obj, *, indent: int | None = 2) -> str:
    """JSON that every parser accepts: NaN and +-Infinity become ``null``; a dict result then carries
    ``"non_finite"``, the JSON pointers (RFC 6901) of the values that were replaced."""
    bad: list[str] = []
    clean = _finite(obj, "", bad)
    if bad and isinstance(clean, dict):
        clean["non_finite"] = bad
    return json.dumps(clean, indent=indent, allow_nan=False)


# ------------------------------------------------------------------------------------------------ targets
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def check_target(path: str | os.PathLike, label: str = "output") -> None:
    """A file bnfold will replace must be absent or a regular file: never a symlink (it would be replaced,
    not followed), a folder, a FIFO, a device or a socket."""
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BnfoldError(f"{label} {p}: cannot inspect it ({exc.strerror})") from None
    if stat.S_ISREG(st.st_mode):
        return
    kind = _kind(st.st_mode)
    if kind == "folder":
        raise BnfoldError(f"{label} {p} is a folder: give a file path such as {p / 'out.onnx'}")
    raise BnfoldError(f"{label} {p} is a {kind}, not a regular file: bnfold only replaces regular files; "
                      "choose another path")


def _folder(p: Path) -> Path:
    return p.parent if str(p.parent) else Path(".")


def check_folder_writable(folder: Path, label: str, path: Path) -> None:
    """The folder exists and a file can be created in it (a probe file is created and removed at once)."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        raise BnfoldError(f"{label} {path}: folder {folder} does not exist") from None
    except OSError as exc:
        raise BnfoldError(f"{label} {path}: cannot reach folder {folder} ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BnfoldError(f"{label} {path}: {folder} is not a folder")
    probe = folder / f".bnfold-probe.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise BnfoldError(f"{label} {path}: folder {folder} is not writable ({exc.strerror}); "
                          "choose a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)


# ------------------------------------------------------------------------------------------------ the plan
def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def external_data_files(model_path: str | os.PathLike) -> list[Path]:
    """The external-data files an ONNX model file refers to (same folder rules as loading; unreadable or
    odd locations are left to the loader to refuse). Empty for a file that does not parse. Read from the
    file's record index: the model is not parsed whole."""
    p = Path(model_path)
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return []
    if not stat.S_ISREG(st.st_mode):
        return []
    files: list[Path] = []
    for loc in _locations(p, st, _read_locations):
        if isinstance(loc, str) and loc and "\x00" not in loc and not os.path.isabs(loc):
            f = _folder(p) / loc
            if f not in files:
                files.append(f)
    return files


_LOCATIONS: dict[tuple, list] = {}  #: (dev, inode, size, mtime, ctime) -> external-data locations of that file
_SETTLED_NS = 2_000_000_000


def _locations(p: Path, st: os.stat_result, read) -> list:
    """``read(p)`` (the locations of a model file), remembered while the file is unchanged: a command checks its
    input's paths twice (the CLI's plan, then the library's), and reading them walks every record of the file.
    Only a file untouched for the last 2 s is remembered, so that any later change (a rewrite in place
    included, whatever the file system's timestamp granularity) changes its key."""
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _LOCATIONS_LOCK:
        found = _LOCATIONS.get(key)
    if found is not None:
        return list(found)
    locs = read(p) or []
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS:
        with _LOCATIONS_LOCK:
            if len(_LOCATIONS) >= 64:
                _LOCATIONS.pop(next(iter(_LOCATIONS)))
            _LOCATIONS[key] = list(locs)
    return locs


_LOCATIONS_LOCK = threading.Lock()


def _read_locations(p: Path) -> list[str] | None:
    """:func:`bnfold.protofile.external_locations`, except that a file too small for the record index
    (:data:`bnfold.protofile.INDEX_MIN_FILE`) is parsed whole: protobuf parses it in C many times faster than
    Python walks its records (a 3,000-node model: 24,000 records). The same locations, in the same order."""
    from bnfold import protofile

    try:
        if os.stat(p).st_size >= protofile.INDEX_MIN_FILE:
            return protofile.external_locations(p)
        import onnx
        data = p.read_bytes()
        model = onnx.ModelProto.FromString(data)
        if b"location" not in data:  # every external-data entry holds that key: none here (no Python walk)
            return []
        return protofile.locations_of(model)
    except Exception:  # unreadable, or not a model
        return None


def _own_data_name(out: Path, f: Path) -> bool:
    """``f`` is named like a data file bnfold writes for a model at ``out``: ``<name>.<12 hex>.data`` beside
    it, or the ``<name>.data`` of earlier versions."""
    return f.parent == _folder(out) and (re.fullmatch(re.escape(out.name) + _DATA_TOKEN, f.name) is not None
                                         or f.name == out.name + ".data")


def model_companions(out: str | os.PathLike) -> list[Path]:
    """Files a model write to ``out`` removes once the new model is in place: the data files that the model it
    replaces refers to, when bnfold named them (``<name>.<12 hex>.data``, or ``<name>.data``), are regular
    files, and no other ``.onnx`` model in the folder refers to them (a renamed or copied earlier result keeps
    its data; so does every file the old model does not refer to)."""
    out = Path(out)
    candidates = []
    for f in external_data_files(out):
        if _own_data_name(out, f):
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(f).st_mode):
                    candidates.append(f)
    if not candidates:
        return []
    folder = _folder(out)
    try:
        others = [folder / e for e in os.listdir(folder) if e.lower().endswith(".onnx") and e != out.name]
    except OSError:
        return []  # cannot tell who else uses them: keep them
    for other in others:
        if not candidates:
            break
        used = external_data_files(other)
        candidates = [f for f in candidates if f not in used]
    return candidates


def new_data_name(out: str | os.PathLike) -> str:
    """A fresh external-data file name for a model written to ``out``: ``<name>.<12 hex>.data``."""
    return f"{Path(out).name}.{os.urandom(6).hex()}.data"


class OutputPlan:
    """Collect what a command reads and writes, then :meth:`check` before anything is written."""

    def __init__(self):
        self.reads: list[tuple[str, Path]] = []
        self.writes: list[tuple[str, Path]] = []
        self.removes: list[tuple[str, Path, str]] = []  # (label, path, label of the write that removes it)
        self.folders: list[tuple[str, Path]] = []
        self.exempt: set[Path] = set()  # real paths a write may share with a read (--in-place)
        self.suffixes: dict[Path, tuple[str, ...]] = {}
        self.model_writes: set[str] = set()  # labels of model writes (the --in-place hint applies to them)

    # reads
    def read(self, path, label: str) -> OutputPlan:
        if path is not None and str(path) != "digits" and os.path.lexists(path):
            self.reads.append((label, Path(path)))
        return self

    def read_model(self, path, label: str = "the input model") -> OutputPlan:
        if path is None or not os.path.lexists(path):
            return self
        self.read(path, label)
        for f in external_data_files(path):
            self.read(f, f"{label}'s external data")
        return self

    # writes
    def write(self, path, label: str, *, suffixes: tuple[str, ...] | None = None) -> OutputPlan:
        if path is not None:
            self.writes.append((label, Path(path)))
            if suffixes:
                self.suffixes[Path(path)] = suffixes
        return self

    def write_model(self, path, label: str = "output", *, in_place: bool = False) -> OutputPlan:
        if path is None:
            return self
        p = Path(path)
        self.write(p, label)
        self.model_writes.add(label)
        for f in model_companions(p):
            self.removes.append((f"the old external data of {label}", f, label))
        if in_place:
            self.exempt.add(_real(p))
            self.exempt.update(_real(f) for f in external_data_files(p))
        return self

    def write_folder(self, folder, files: Iterable[str], label: str, *, models: Iterable[str] = ()) -> OutputPlan:
        folder = Path(folder)
        self.folders.append((label, folder))
        models = set(models)
        for name in files:
            if name in models:
                self.write_model(folder / name, f"{label} file {name}")
            else:
                self.write(folder / name, f"{label} file {name}",
                           suffixes=FIGURE_SUFFIXES if name.endswith(FIGURE_SUFFIXES) else None)
        return self

    def check(self) -> OutputPlan:
        """Raise :class:`BnfoldError` (one line) on the first problem; touch nothing but a probe file."""
        for label, folder in self.folders:
            if os.path.lexists(folder):
                if not folder.is_dir():
                    raise BnfoldError(f"{label} {folder} exists and is not a folder: choose another path")
            else:
                ancestor = folder
                while not ancestor.exists() and ancestor != ancestor.parent:
                    ancestor = ancestor.parent
                if os.path.lexists(ancestor) and not ancestor.is_dir():
                    raise BnfoldError(f"{label} {folder}: {ancestor} is not a folder")
                check_folder_writable(ancestor, label, folder)
        probed: set[Path] = set()
        for label, p in self.writes:
            if not p.name or p.name in (".", ".."):
                raise BnfoldError(f"{label} {p}: give a file name")
            check_target(p, label)
            folder = _folder(p)
            if not any(folder == f for _, f in self.folders) or folder.exists():
                real_folder = _real(folder)
                if real_folder not in probed:
                    check_folder_writable(folder, label, p)
                    probed.add(real_folder)
        targets = [(label, p, _real(p), _identity(p)) for label, p in self.writes]
        for i, (la, pa, ra, ia) in enumerate(targets):
            for lb, pb, rb, ib in targets[:i]:
                if ra == rb or (ia is not None and ia == ib):
                    raise BnfoldError(f"{la} {pa} and {lb} {pb} are the same file: give them different paths")
        targets += [(label, p, _real(p), _identity(p)) for label, p, _ in self.removes]
        read_dirs = []
        for rl, rp in self.reads:
            rr, ri = _real(rp), _identity(rp)
            if rp.is_dir():
                read_dirs.append((rl, rp, rr))
            for wl, wp, wr, wi in targets:
                if (wr == rr or (wi is not None and wi == ri)) and not (wr in self.exempt and rr in self.exempt):
                    if wl.startswith("the old external data"):
                        raise BnfoldError(f"writing {next(o for _, f, o in self.removes if f == wp)} would remove "
                                          f"{wp}, which is {rl} {rp}: choose another output path")
                    hint = " or pass --in-place" if rl == "the input model" and wl in self.model_writes else ""
                    raise BnfoldError(f"{wl} {wp} is the input file {rp} ({rl}): choose another path{hint}")
        for wl, wp, wr, _ in targets:
            for rl, rp, rr in read_dirs:
                if rr in wr.parents:
                    raise BnfoldError(f"{wl} {wp} is inside {rl} {rp}: choose a path outside it")
        for label, p in self.writes:
            want = self.suffixes.get(p)
            if want and p.suffix.lower() not in want:
                raise BnfoldError(f"{label} {p}: unsupported file type '{p.suffix}'; use {', '.join(want)}")
        return self


# ------------------------------------------------------------------------------------------------ temporaries
def temp_name(out: str | os.PathLike) -> str:
    """``.<name>.<pid>.<8 hex>.bnfold-tmp``: recognisable, and tied to the process that owns it."""
    return f".{Path(out).name[:120]}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove bnfold temporaries in ``folder`` whose process no longer exists (left by a killed run)."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for e in entries:
        m = _TMP_RE.match(e)
        if m is None or _alive(int(m.group(1))):
            continue
        p = Path(folder) / e
        try:
            if stat.S_ISDIR(os.lstat(p).st_mode):
                shutil.rmtree(p)
            else:
                os.unlink(p)
            removed.append(e)
            log.info("removed %s, left by a run that was killed", printable(p))
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``folder`` while the caller renames files into it; a no-op
    where folders cannot be locked."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ signals
_pending: list[int] = []
_depth = [0]


@contextlib.contextmanager
def critical_section() -> Iterator[None]:
    """SIGINT/SIGTERM arriving inside are acted on when the section ends (with :func:`handle_signals`'
    handlers installed), so a commit of renames is never cut in half."""
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if _depth[0] == 0 and _pending:
            _raise_for(_pending.pop())


def _raise_for(signum: int):
    _pending.clear()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _handler(signum, frame):
    if _depth[0] > 0:
        _pending.append(signum)
        return
    _raise_for(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGINT into KeyboardInterrupt and SIGTERM into :class:`bnfold.errors.Terminated` (so ``finally``
    blocks remove temporaries), deferred inside :func:`critical_section`. Main thread only; restores the
    previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Render a matplotlib figure in the format its suffix names and write it atomically."""
    import io

    p = Path(path)
    if p.suffix.lower() not in FIGURE_SUFFIXES:
        raise BnfoldError(f"{p}: a plot is written as {', '.join(FIGURE_SUFFIXES)}; '{p.suffix}' is not one")
    buf = io.BytesIO()
    fig.savefig(buf, format=p.suffix.lower().lstrip("."), dpi=dpi)
    return write_bytes_atomic(p, buf.getvalue())


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename; ``path`` must be
    absent or a regular file (never a symlink, FIFO or device, which would be replaced)."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise BnfoldError(f"{out}: output folder {parent} does not exist")
    check_target(out)
    clean_stale_temps(parent)
    tmp = parent / temp_name(out)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise BnfoldError(f"{out}: cannot write in folder {parent} ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        with critical_section():
            check_target(out)
            os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
