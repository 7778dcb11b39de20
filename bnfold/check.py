"""Validity checks on a folded model: ``onnx.checker`` (full check, which includes strict shape inference).

The check runs on the written file (inside the atomic save, before the rename), so the model is not serialized
a second time just to be checked; an in-memory model is checked through a temporary file when over 2 GB. A
skeleton (:mod:`bnfold.protofile`) is checked without its large tensors' data: the checker only checks that
data's size, which the index checked exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import onnx

from bnfold import protofile
from bnfold.errors import InternalError
from bnfold.onnx_io import tensor_bytes

log = logging.getLogger(__name__)
_2GB = 2**31 - 1


def checker_error(model: onnx.ModelProto | str | os.PathLike) -> str | None:
    """The first line of onnx.checker's complaint (full check) about a model or model file, or None."""
    try:
        if isinstance(model, onnx.ModelProto) and protofile.has_references(model):
            with protofile.checkable(model) as p:  # a skeleton: checked without its large tensors' data
                onnx.checker.check_model(p, full_check=True)
        elif isinstance(model, onnx.ModelProto) and tensor_bytes(model) > _2GB // 2:
            with tempfile.TemporaryDirectory() as d:
                p = os.path.join(d, "m.onnx")
                onnx.save_model(model, p, save_as_external_data=True, location="m.data")
                # saving converted the caller's tensors to external references in place: read them back
                onnx.load_external_data_for_model(model, d)
                onnx.checker.check_model(p, full_check=True)
        else:
            onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def _fork_is_safe() -> bool:
    """A fork copies only the calling thread: safe when no other thread (Python's, or the native pools that
    onnxruntime and torch start) may hold a lock the child needs."""
    import sys
    import threading

    return (hasattr(os, "fork") and sys.platform.startswith("linux") and threading.active_count() == 1
            and "onnxruntime" not in sys.modules and "torch" not in sys.modules and _BACKGROUND_CHECK)


_BACKGROUND_CHECK = True  #: tests that count the checker's calls in this process switch it off


class BackgroundCheck:
    """:func:`checker_error` of a model as it was when this was made, computed in a forked child while this
    process goes on (the checker holds the GIL: a thread would not overlap it). :meth:`wait` gives the verdict;
    :meth:`cancel` stops the child (on an interrupt: nothing is checked then). Without a safe fork (see
    :func:`_fork_is_safe`), or when the child fails, the check runs in this process."""

    def __init__(self, model: onnx.ModelProto | str | os.PathLike, *, fork: bool = True):
        self.model, self.pid, self._fd, self._done = model, None, None, []
        if not fork or not _fork_is_safe():
            return
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            return
        if pid == 0:  # the child: check, write the verdict, leave without running the parent's exit handlers
            code = 1
            try:
                import json
                import signal

                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (and kills it on an interrupt)
                os.close(r)
                data = json.dumps({"error": checker_error(model)}).encode()
                while data:
                    data = data[os.write(w, data):]
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self._fd = pid, r

    def wait(self) -> str | None:
        if not self._done:
            self._done.append(self._verdict())
        return self._done[0]

    __call__ = wait

    def cancel(self) -> None:
        if self.pid is not None and not self._done:
            with contextlib.suppress(OSError):
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            os.close(self._fd)
            self._done.append(None)

    def _verdict(self) -> str | None:
        if self.pid is None:
            return checker_error(self.model)
        import json

        chunks = []
        status = -1
        try:
            while chunk := os.read(self._fd, 1 << 16):
                chunks.append(chunk)
            _, status = os.waitpid(self.pid, 0)
        except BaseException:  # interrupted while waiting: the child goes too
            with contextlib.suppress(OSError):
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            raise
        finally:
            os.close(self._fd)
        if status != 0 or not chunks:  # the child died (killed, out of memory): check here instead
            log.debug("background check failed (status %s): checking in this process", status)
            return checker_error(self.model)
        return json.loads(b"".join(chunks))["error"]


#: a graph with fewer nodes is checked in the process: its check (~20 us a node) costs less than a fork (~7 ms)
BACKGROUND_MIN_NODES = 1000


def checker_error_in_background(model: onnx.ModelProto | str | os.PathLike, *,
                                nodes: int | None = None) -> BackgroundCheck:
    """A :class:`BackgroundCheck` of ``model`` (call it, or its ``wait``, for the verdict); ``nodes``, the
    model's node count when known: under :data:`BACKGROUND_MIN_NODES` the check runs in this process."""
    return BackgroundCheck(model, fork=nodes is None or nodes >= BACKGROUND_MIN_NODES)


def folded_checker(original: onnx.ModelProto | str | os.PathLike, label: str, warnings: list[str]):
    """A validate hook for :func:`bnfold.onnx_io.save_model`: check the written file; a failure the original
    shares becomes a warning, a failure only the folded model has is a bug in bnfold and aborts the save."""

    def validate(path: Path) -> None:
        err = checker_error(path)
        if err is None:
            return
        orig_err = checker_error(original)
        if orig_err is not None:
            msg = f"{label}: the input already fails onnx.checker ({orig_err}); the folded model fails it too"
            log.warning(msg)
            warnings.append(msg)
            return
        raise InternalError(f"the folded {label} fails onnx.checker ({err}) although the input passes; "
                            "nothing was written. Please report this with the model")

    return validate
