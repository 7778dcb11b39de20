"""Where an output came from, recorded in every output (ONNX metadata, JSON and markdown reports, checkpoints):
the model spec or input file, the weights (file and sha256, or "random, seed N"), the source of the BatchNorm
statistics, and bnfold's version. Torch-free: ONNX inputs record theirs without importing torch."""

from __future__ import annotations

import json

from bnfold._version import __version__

METADATA_KEY = "bnfold.provenance"


def provenance(model: str, *, weights=None, statistics: str | None = None, **extra) -> dict:
    """The provenance record. ``weights``: a :class:`bnfold.torch_io.WeightsSource` (its file and sha256, or
    seed), a description (weights made in this process), or None for an ONNX input (the weights are the
    file's). ``statistics``: where the BN statistics came
    from when the caller changed them (recalibration), else the weights' own account."""
    rec: dict = {"model": str(model)}
    if weights is None:
        rec["weights"] = f"the ONNX model's own ({model})"
        rec["statistics"] = statistics or "the ONNX model's BatchNormalization inputs"
    elif isinstance(weights, str):  # e.g. trained in this process
        rec["weights"] = weights
        rec["statistics"] = statistics
    else:
        w = weights.to_dict()
        rec["weights"] = w["weights"]
        rec["weights_file"] = w.get("path")
        rec["weights_sha256"] = w.get("sha256")
        if w.get("seed") is not None:
            rec["weights_seed"] = w["seed"]
        rec["statistics"] = statistics or w["statistics"]
    rec["bnfold"] = __version__
    rec.update(extra)
    return {k: v for k, v in rec.items() if v is not None}


def record(model, prov: dict | None) -> None:
    """Write ``prov`` into an ``onnx.ModelProto``'s metadata (replacing an earlier record)."""
    if prov is None:
        return
    for p in [p for p in model.metadata_props if p.key == METADATA_KEY]:
        model.metadata_props.remove(p)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(prov, separators=(",", ":")))


def read(model) -> dict | None:
    """The provenance an ONNX model records, or None."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            try:
                return json.loads(p.value)
            except ValueError:
                return None
    return None


def one_line(prov: dict) -> str:
    """``weights ...; statistics ...; bnfold X`` for a report or a terminal."""
    return f"weights {prov.get('weights')}; BatchNorm statistics: {prov.get('statistics')}; bnfold {prov.get('bnfold')}"
