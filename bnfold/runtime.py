"""ONNX Runtime sessions with an honest account of what they run on.

``get_available_providers()`` lists CUDA wherever the onnxruntime-gpu wheel is installed, even when CUDA
cannot load; a session silently falls back to the CPU then. Every helper here reports the providers a session
really uses (``session.get_providers()``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os

import numpy as np
import onnx
import onnxruntime as ort

from bnfold.errors import BnfoldError

log = logging.getLogger(__name__)

EPS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
PRIMARY = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
OPT_LEVELS = {
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def check_ep(ep: str) -> None:
    if ep not in EPS:
        raise BnfoldError(f"unknown execution provider '{ep}': choose one of {', '.join(EPS)}")
    if PRIMARY[ep] not in ort.get_available_providers():
        raise BnfoldError(f"execution provider '{ep}' ({PRIMARY[ep]}) is not in this onnxruntime build "
                          f"(available: {', '.join(ort.get_available_providers())})")


class ProviderFallback(BnfoldError):
    """The requested provider is listed but the session fell back to another one."""


def make_session(model: onnx.ModelProto | str | os.PathLike, *, ep: str = "cpu", opt_level: str = "off",
                 threads: int | None = None, provider_options: dict | None = None,
                 strict: bool = True, config: dict | None = None) -> ort.InferenceSession:
    """A session on ``ep`` at graph optimization level ``opt_level`` (off/basic/extended/all). With ``strict``
    a silent fallback to another provider raises :class:`ProviderFallback`. ``config`` holds session config
    entries (e.g. ``{"session.intra_op.allow_spinning": "0"}``)."""
    check_ep(ep)
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[opt_level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, str(value))
    providers = EPS[ep]
    if provider_options:
        providers = [(p, provider_options.get(p, {})) for p in providers]
    if ep != "cpu" and not provider_works(ep):
        msg = (f"asked for {ep} ({PRIMARY[ep]}) but it cannot run here: the provider is listed by onnxruntime "
               "but its libraries (CUDA/cuDNN/TensorRT) did not load")
        if strict:
            raise ProviderFallback(msg)
        log.warning(msg)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    chatter = io.StringIO()
    try:
        # onnxruntime print()s provider failures ("EP Error ... Falling back") to stdout: keep stdout clean
        with contextlib.redirect_stdout(chatter):
            sess = ort.InferenceSession(src, so, providers=providers)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BnfoldError(f"ONNX Runtime cannot load the model on '{ep}': {msg[:300]}") from None
    if chatter.getvalue().strip():
        log.debug("onnxruntime: %s", chatter.getvalue().strip())
    used = sess.get_providers()
    if used[0] != PRIMARY[ep]:
        msg = (f"asked for {ep} ({PRIMARY[ep]}) but the session runs on {', '.join(used)}: the provider is listed "
               "by onnxruntime but its libraries did not load")
        if strict:
            raise ProviderFallback(msg)
        log.warning(msg)
    return sess


def ort_dtype(type_str: str) -> np.dtype:
    """numpy dtype of an ORT input type such as 'tensor(float16)'."""
    name = type_str[len("tensor("):-1] if type_str.startswith("tensor(") else type_str
    table = {"float": np.float32, "double": np.float64, "float16": np.float16, "int64": np.int64,
             "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    if name not in table:
        raise BnfoldError(f"input type {type_str} is not supported")
    return np.dtype(table[name])


def resolve_input_shapes(inputs, shapes: list, batch: int) -> list[tuple]:
    """Concrete shape of each session input (``session.get_inputs()``): from ``shapes`` (InputSpec, by name or
    position), else the graph's static dims, with a symbolic first (batch) dimension set to ``batch``. Any other
    dynamic dimension needs an explicit shape."""
    named = {s.name: s.shape for s in shapes if s.name}
    positional = [s.shape for s in shapes if not s.name]
    out = []
    for i, inp in enumerate(inputs):
        if inp.name in named:
            out.append(tuple(named[inp.name]))
            continue
        if i < len(positional):
            out.append(tuple(positional[i]))
            continue
        dims = list(inp.shape)
        for k, d in enumerate(dims):
            if not isinstance(d, int) or d <= 0:
                if k == 0:
                    dims[k] = batch
                else:
                    hint = "x".join(str(x) if isinstance(x, int) and x > 0 else "N" for x in inp.shape)
                    raise BnfoldError(f"input '{inp.name}' has dynamic dimension {k} ({d!r}): pass "
                                      f"--input-shape {inp.name}={hint} with N filled in")
        out.append(tuple(dims))
    return out


AUTO = "auto"
AUTO_ORDER = ("cuda", "cpu")  # --ep auto: the first that runs (one provider), or all that run (a list)


class ProviderChoice:
    """The providers a command will use, and those ``--ep auto`` left out with why (``{ep: reason}``)."""

    def __init__(self, eps: list[str], skipped: dict[str, str] | None = None):
        self.eps = eps
        self.skipped = skipped or {}

    def note(self) -> str:
        """``""``, or ``"skipped cuda (reason)"`` for the verdict line."""
        return "; ".join(f"skipped {ep} ({why})" for ep, why in self.skipped.items())


def unavailable_reason(ep: str, runtime: str = "ort") -> str | None:
    """Why ``ep`` cannot run here (None when it can). ``runtime="torch"``: ``ep`` is a torch device."""
    if runtime == "torch":
        if ep != "cuda":
            return None  # cpu runs; anything else the torch runtime refuses itself
        import torch
        return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"
    if ep not in EPS:
        return f"unknown execution provider; choose one of {', '.join(EPS)}"
    if PRIMARY[ep] not in ort.get_available_providers():
        return f"{PRIMARY[ep]} is not in this onnxruntime build"
    if ep != "cpu" and not provider_works(ep):
        return f"{PRIMARY[ep]} is listed, but its libraries (CUDA/cuDNN/TensorRT) did not load"
    return None


def resolve_providers(requested, *, runtime: str = "ort", single: bool = False) -> ProviderChoice:
    """What every command does with ``--ep``: each provider asked for by name must run here, else
    :class:`BnfoldError` naming it (exit 2); ``auto`` takes what runs (with ``single``, the first of
    cuda, cpu; else all of them) and records what it skipped, for the verdict line."""
    req = [requested] if isinstance(requested, str) else list(requested)
    if AUTO in req:
        if req != [AUTO]:
            raise BnfoldError(f"--ep {','.join(req)}: 'auto' stands alone (it takes whatever runs)")
        eps, skipped = [], {}
        for ep in AUTO_ORDER:
            why = unavailable_reason(ep, runtime)
            if why is None and not (single and eps):
                eps.append(ep)
            elif why is not None:
                skipped[ep] = why
        return ProviderChoice(eps if single else sorted(eps, key=["cpu", "cuda"].index), skipped)
    for ep in req:
        why = unavailable_reason(ep, runtime)
        if why is not None:
            raise BnfoldError(f"--ep {ep}: cannot run here ({why}); choose another provider, or --ep auto to "
                              "use what runs (the verdict then names what was skipped)")
    return ProviderChoice(req)


_WORKS: dict[str, bool] = {}


def provider_works(ep: str) -> bool:
    """Whether ``ep`` really runs a session here (not just listed by ``get_available_providers()``)."""
    if ep not in _WORKS:
        if PRIMARY.get(ep) not in ort.get_available_providers():
            _WORKS[ep] = False
        else:
            g = onnx.helper.make_graph(
                [onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
                [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
            m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
            m.ir_version = 8
            ort.set_default_logger_severity(4)  # a failing provider library logs errors natively: it is a probe
            try:
                so = ort.SessionOptions()
                so.log_severity_level = 4
                with contextlib.redirect_stdout(io.StringIO()):
                    sess = ort.InferenceSession(m.SerializeToString(), so, providers=EPS[ep])
                _WORKS[ep] = sess.get_providers()[0] == PRIMARY[ep]
            except Exception:
                _WORKS[ep] = False
            finally:
                ort.set_default_logger_severity(3)
    return _WORKS[ep]
