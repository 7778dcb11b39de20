"""ONNX Runtime sessions with an honest account of what they run on.

``get_available_providers()`` lists CUDA wherever the onnxruntime-gpu wheel is installed, even when CUDA
cannot load; a session silently falls back to the CPU then. Every helper here reports the providers a session
really uses (``session.get_providers()``).
"""

from __future__ import annotations

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


def make_session(model: onnx.ModelProto | str | os.PathLike, *, ep: str = "cpu", opt_level: str = "off",
                 threads: int | None = None, provider_options: dict | None = None) -> ort.InferenceSession:
    """A session on ``ep`` at graph optimization level ``opt_level`` (off/basic/extended/all)."""
    check_ep(ep)
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[opt_level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    providers = EPS[ep]
    if provider_options:
        providers = [(p, provider_options.get(p, {})) for p in providers]
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        sess = ort.InferenceSession(src, so, providers=providers)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BnfoldError(f"ONNX Runtime cannot load the model on '{ep}': {msg[:300]}") from None
    used = sess.get_providers()
    if PRIMARY[ep] not in used:
        log.warning("asked for %s but the session runs on %s", PRIMARY[ep], ", ".join(used))
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
