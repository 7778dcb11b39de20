"""Training zoo models, and checkpoints that carry their model name and configuration without pickle.

``train`` fits a zoo model on a dataset (the bundled digits by default), then replaces every BN's momentum
average with the population statistics of Algorithm 2 over the training set (:mod:`bnfold.calibrate`), so
that what gets folded is what the paper prescribes.

Checkpoints are ``.safetensors`` (the model name and a JSON config in the file's metadata) or ``.pt``/``.pth``
holding only tensors, strings and numbers (``{"state_dict": ..., "bnfold": {...}}``), loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.calibrate import CalibrationResult, population_statistics
from bnfold.data import Dataset, load_dataset
from bnfold.errors import BnfoldError
from bnfold.models import zoo
from bnfold.outputs import write_bytes_atomic
from bnfold.torch_io import read_checkpoint_config  # noqa: F401 (re-exported: checkpoints are read there)

log = logging.getLogger(__name__)


@dataclass
class EpochMetrics:
    epoch: int
    loss: float
    train_accuracy: float
    test_accuracy: float


@dataclass
class TrainResult:
    model: nn.Module
    name: str
    history: list[EpochMetrics]
    test_accuracy: float
    calibration: CalibrationResult
    config: dict = field(default_factory=dict)


def prepare(data: Dataset, input_shape: tuple, *, layout: str = "nchw") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs shaped for the model: flat digits become images (upsampled, channels repeated) when the model
    takes images; other data must already match the model's per-sample shape."""
    if data.labels is None:
        raise BnfoldError(f"data '{data.name}' has no labels: training needs 'y'/'labels' or class folders")
    x = torch.from_numpy(np.asarray(next(iter(data.inputs.values())), np.float32))
    y = torch.from_numpy(np.asarray(data.labels, np.int64))
    if y.numel() and int(y.min()) < 0:
        raise BnfoldError(f"data '{data.name}' has negative labels ({int(y.min())}); labels are class indices 0, 1, ...")
    sample = tuple(input_shape[1:])
    if tuple(x.shape[1:]) == sample and layout == "nchw":
        return x, y
    side = math.isqrt(int(np.prod(x.shape[1:])))
    if x.dim() == 2 and side * side == x.shape[1] and len(sample) == 3:
        img = x.reshape(len(x), 1, side, side)
        img = F.interpolate(img, size=sample[1:], mode="bilinear", align_corners=False)
        return img.repeat(1, sample[0], 1, 1).contiguous(), y
    from bnfold.data import fit_to_shape

    # flat samples and split trailing axes are reshaped; data that fits only after a transpose (channels-last
    # for a channels-first model) is refused, never silently reshaped
    return torch.from_numpy(np.ascontiguousarray(fit_to_shape(x.numpy(), sample, layout=layout))), y


def split(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held-out)`` indices: :func:`bnfold.data.holdout_split`, the same whatever ``seed`` (the
    training seed), so that ``--data digits`` elsewhere is the split `train` reported its test accuracy on."""
    from bnfold.data import holdout_split

    return holdout_split(n, test_fraction)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / max(1, len(x))


def batches(x: torch.Tensor, batch_size: int, *, shuffle: bool = False, generator=None, drop_singleton=True):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BnfoldError(f"batch size {batch_size!r}: give a positive integer (at least 2 for BatchNorm)")
    idx = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        b = idx[i:i + batch_size]
        if drop_singleton and len(b) < 2:
            continue  # BN cannot normalise a single sample with batch statistics
        yield b


def train(name: str, data: Dataset | str = "digits", *, epochs: int = 10, lr: float = 0.1, batch_size: int = 64,
          seed: int = 0, device: str | None = None, optimizer: str = "sgd", test_fraction: float = 0.2,
          calibrate: bool = True, on_epoch: Callable[[EpochMetrics], None] | None = None,
          on_step: Callable[[int, int], None] | None = None, layout: str = "nchw") -> TrainResult:
    """Train zoo model ``name`` and install Algorithm 2 population statistics over its training set
    (``layout="nhwc"``: array data is channels-last)."""
    entry = zoo.get(name)
    if not isinstance(epochs, int) or epochs < 1:
        raise BnfoldError(f"epochs {epochs!r}: train at least 1 epoch")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise BnfoldError(f"batch size {batch_size!r}: at least 2 (BatchNorm normalises over the batch)")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise BnfoldError(f"learning rate {lr!r}: give a positive number")
    device = _device(device)
    if isinstance(data, str):
        if data == "digits":
            data = "digits:all"  # split below: the held-out part is what `--data digits` means elsewhere
        data = load_dataset(data, image_size=tuple(entry.input_shape[2:4]) if len(entry.input_shape) == 4 else None)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = prepare(data, entry.input_shape, layout=layout)
    classes = int(y.max().item()) + 1
    model = entry.factory().to(device)
    out_features = _num_outputs(model, x[:2].to(device))
    if out_features < classes:
        raise BnfoldError(f"zoo model '{name}' predicts {out_features} classes but the data has {classes}")
    tr, te = split(len(x), test_fraction, seed)
    xtr, ytr, xte, yte = x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device)
    params = model.parameters()
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr))
    history = []
    steps_per_epoch = sum(1 for _ in batches(xtr, batch_size))
    for epoch in range(1, epochs + 1):
        model.train()
        total, n = 0.0, 0
        for k, b in enumerate(batches(xtr, batch_size, shuffle=True, generator=g)):
            opt.zero_grad()
            loss = F.cross_entropy(model(xtr[b]), ytr[b])
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
            n += len(b)
            if on_step:
                on_step((epoch - 1) * steps_per_epoch + k + 1, epochs * steps_per_epoch)
        if not math.isfinite(total):
            raise BnfoldError(f"training diverged at epoch {epoch} (loss is not finite): lower --lr")
        # epoch metrics with the momentum statistics; the final model gets Algorithm 2's
        m = EpochMetrics(epoch, total / max(1, n), accuracy(model, xtr, ytr), accuracy(model, xte, yte))
        history.append(m)
        if on_epoch:
            on_epoch(m)
    cal = None
    if calibrate:
        cal = population_statistics(model, (xtr[b] for b in batches(xtr, batch_size)))
    test_acc = accuracy(model, xte, yte)
    config = {"model": name, "input_shape": list(entry.input_shape), "data": "digits" if data.name.startswith("digits:all") else data.name, "epochs": epochs, "lr": lr,
              "batch_size": batch_size, "seed": seed, "optimizer": optimizer, "test_fraction": test_fraction,
              "train_samples": len(tr), "test_samples": len(te), "test_accuracy": test_acc,
              "history": [asdict(h) for h in history],
              "calibration": None if cal is None else cal.summary()}
    return TrainResult(model.eval().cpu(), name, history, test_acc, cal, config)


def _device(device: str | None) -> str:
    """``device`` checked: a torch device name that exists here (default: cuda when available)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BnfoldError(f"--device '{device}': not a device name; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BnfoldError(f"--device '{device}': no CUDA GPU is available here; use --device cpu")
    try:
        torch.empty(1, device=dev)
    except Exception as exc:
        raise BnfoldError(f"--device '{device}': cannot use it here ({str(exc).splitlines()[0][:200]}); "
                          "use --device cpu") from None
    return str(dev)


def _num_outputs(model: nn.Module, x: torch.Tensor) -> int:
    model.eval()
    with torch.no_grad():
        return int(model(x).shape[-1])


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(model: nn.Module, path: str | os.PathLike, config: dict) -> Path:
    """A weights-only checkpoint with the model name and config; written atomically."""
    p = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if p.suffix == ".safetensors":
        from safetensors.torch import save
        blob = save(state, metadata={"bnfold.model": str(config.get("model", "")),
                                     "bnfold.config": json.dumps(config)})
    elif p.suffix in (".pt", ".pth"):
        import io
        buf = io.BytesIO()
        torch.save({"state_dict": state, "bnfold": json.dumps(config)}, buf)
        blob = buf.getvalue()
    else:
        raise BnfoldError(f"{p}: checkpoints are .safetensors (recommended) or .pt/.pth")
    return write_bytes_atomic(p, blob)
