"""What a model file is, from its first bytes (no torch, no protobuf parse): so that a PyTorch checkpoint given
where an ONNX model is expected is named as such, with the fix."""

from __future__ import annotations

import json
import struct
from pathlib import Path

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTOCOLS = range(2, 6)  # torch.save(_use_new_zipfile_serialization=False), pickle.dump


def sniff(path: str | Path) -> str | None:
    """``"torch"`` (a torch.save zip or a raw pickle), ``"safetensors"``, or None (anything else, e.g. ONNX)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head.startswith(ZIP_MAGIC):
        return "torch" if _zip_has_pickle(path) else None
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000:
            if n > 1_000_000:
                return "safetensors"  # a large header: its first byte is enough
            try:
                with open(path, "rb") as f:
                    f.seek(8)
                    json.loads(f.read(n).decode("utf-8"))
                return "safetensors"
            except (OSError, ValueError):
                return None
    return None


def _zip_has_pickle(path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def not_onnx_message(path: str | Path) -> str | None:
    """The one-line error for a PyTorch file given as an ONNX MODEL (None when it is not one)."""
    kind = sniff(path)
    if kind is None:
        return None
    what = "a PyTorch checkpoint (torch.save)" if kind == "torch" else "a safetensors state dict"
    return (f"{path}: this is {what}, not an ONNX model: give the PyTorch model as SPEC with --weights, e.g. "
            f"'torchvision.models:resnet18 --weights {path} --input-shape 1x3x224x224' (a full pickled model also "
            "needs --trust-pickle)")
