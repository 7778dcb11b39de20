"""Population statistics for BatchNorm, exactly as the paper's Algorithm 2.

After training, each BN's inference statistics are computed over training mini-batches from the inputs that BN
sees *in the training network*: every BN normalises with its own mini-batch statistics (as during training),
while every other layer is in eval mode (dropout off). For batch ``b`` with ``m_b`` values per channel
(N*H*W for a conv, N for a linear layer), mini-batch mean ``mu_b`` and biased variance ``s2_b``:

    E[x]   = sum_b m_b mu_b / sum_b m_b
    Var[x] = sum_b m_b * (m_b / (m_b - 1)) * s2_b / sum_b m_b

With equal batches this is Algorithm 2 exactly (the mean of the mini-batch means, and m/(m-1) times the mean of
the mini-batch variances); a final smaller batch is weighted by its size instead of counting as much as a full
one. ``pooled=True`` gives instead the exact variance of all values pooled together, unbiased:
``(sum x^2 - M E[x]^2) / (M - 1)`` with ``M = sum_b m_b``.

Sums and counts are kept in float64. Under ``torch.distributed`` they are all-reduced (SUM), so N processes on a
partition of the batches give the result of one process on all of them (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnfold.errors import BnfoldError

log = logging.getLogger(__name__)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class _Acc:
    s1: torch.Tensor  # sum_b m_b mu_b
    sv: torch.Tensor  # sum_b m_b^2/(m_b-1) s2_b
    s2: torch.Tensor  # sum of x^2
    m: torch.Tensor  # sum_b m_b (scalar, float64)
    batches: int = 0


@dataclass
class CalibrationResult:
    """What calibration computed, and the statistics it replaced (``restore`` puts them back)."""

    stats: dict[str, tuple[torch.Tensor, torch.Tensor]]
    original: dict[str, dict[str, torch.Tensor | None]]
    batches: int
    samples: int
    method: str
    skipped_batches: int = 0
    world_size: int = 1
    per_bn_values: dict[str, int] = field(default_factory=dict)
    #: BatchNorms left as they were, with a reason code: ``not_called`` (never run in the forward pass in eval
    #: mode, e.g. the auxiliary heads of GoogLeNet/Inception, which fold skips for the same reason)
    skipped: dict[str, str] = field(default_factory=dict)

    def restore(self, model: nn.Module) -> None:
        """Put back the running statistics the model had before calibration."""
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, saved in self.original.items():
                m = modules[name]
                for k, v in saved.items():
                    if v is not None and getattr(m, k, None) is not None:
                        getattr(m, k).copy_(v)

    def summary(self) -> dict:
        return {"method": self.method, "batches": self.batches, "samples": self.samples,
                "skipped_batches": self.skipped_batches, "world_size": self.world_size, "bn": len(self.stats),
                "skipped": dict(self.skipped)}


def batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m) in _BN_TYPES or
            (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats)}


def population_statistics(model: nn.Module, batches: Iterable, *, max_batches: int | None = None,
                          pooled: bool = False, device: str | torch.device | None = None,
                          distributed: bool | None = None, apply: bool = True) -> CalibrationResult:
    """Compute (and with ``apply``, install) every BatchNorm's population statistics over ``batches``.

    ``batches`` yields input tensors, or tuples/lists whose first element is the input (labels are ignored).
    ``max_batches`` caps the number of batches. ``distributed`` (default: when torch.distributed is initialized)
    all-reduces the sums. The model's training flags are restored afterwards; the original statistics are kept in
    the result for :meth:`CalibrationResult.restore`.
    """
    bns = batchnorms(model)
    if not bns:
        raise BnfoldError("the model has no BatchNorm with running statistics to calibrate")
    for name, m in bns.items():
        if m.running_mean is None:
            raise BnfoldError(f"BatchNorm '{name}' keeps no running statistics (track_running_stats=False)")
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    original = {n: {"running_mean": m.running_mean.detach().clone(), "running_var": m.running_var.detach().clone(),
                    "num_batches_tracked": None if m.num_batches_tracked is None else m.num_batches_tracked.clone()}
                for n, m in bns.items()}
    modes = {n: m.training for n, m in model.named_modules()}
    accs: dict[str, _Acc] = {}
    called: set[str] = set()
    current: dict[str, list[tuple]] = {}

    def hook(name):
        def pre(module, args):
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            xd = x.double()
            mu = xd.mean(dim=dims)
            var = xd.var(dim=dims, unbiased=False)
            sq = (xd * xd).sum(dim=dims)
            count = x.numel() // x.shape[1]
            current.setdefault(name, []).append((mu, var, sq, count))  # a BN called twice sees two batches
            called.add(name)
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in bns.items()]
    model.eval()
    for m in bns.values():
        m.train()  # normalise with mini-batch statistics, as in the training network
    dev = torch.device(device) if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    n_batches = samples = skipped = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and n_batches >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = x.to(dev)
                current.clear()
                try:
                    model(x)
                except ValueError as exc:
                    if "Expected more than 1 value per channel" in str(exc):
                        skipped += 1  # a batch with one value per channel has no variance: skip it
                        log.info("skipping a batch of %d: %s", len(x), exc)
                        continue
                    raise
                for name, calls in current.items():
                    for mu, var, sq, count in calls:
                        if count < 2:
                            continue
                        acc = accs.get(name)
                        if acc is None:
                            z = torch.zeros_like(mu)
                            acc = accs[name] = _Acc(z.clone(), z.clone(), z.clone(),
                                                    torch.zeros((), dtype=torch.float64, device=mu.device))
                        acc.s1 += count * mu
                        acc.sv += count * (count / (count - 1)) * var
                        acc.s2 += sq
                        acc.m += count
                        acc.batches += 1
                n_batches += 1
                samples += len(x)
    finally:
        for h in handles:
            h.remove()
        for n, m in model.named_modules():
            m.training = modes[n]
        # train-mode forwards moved the running averages by momentum: put them back (apply then writes ours)
        with torch.no_grad():
            for name, saved in original.items():
                for k, v in saved.items():
                    if v is not None:
                        getattr(bns[name], k).copy_(v)
    world = 1
    if distributed:
        world = torch.distributed.get_world_size()
        nccl = torch.distributed.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        # every rank takes part in every collective, even one that saw no batch, so that none waits forever
        channels = {name: bns[name].num_features for name in sorted(bns)}
        for name in sorted(bns):
            acc = accs.get(name)
            c = channels[name]
            flag = torch.ones(1, dtype=torch.float64) if name in called else torch.zeros(1, dtype=torch.float64)
            packed = (torch.cat([acc.s1, acc.sv, acc.s2, acc.m.reshape(1), flag.to(acc.s1.device)]).to(device)
                      if acc is not None else torch.cat([torch.zeros(3 * c + 1, dtype=torch.float64), flag]).to(device))
            torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
            packed = packed.cpu() if acc is None else packed.to(acc.s1.device)
            if packed[3 * c + 1] > 0:
                called.add(name)  # called on some rank
            packed = packed[:3 * c + 1]
            if packed[3 * c] == 0:
                accs.pop(name, None)
                continue
            if acc is None:
                acc = accs[name] = _Acc(packed[:c], packed[c:2 * c], packed[2 * c:3 * c], packed[3 * c])
            acc.s1, acc.sv, acc.s2, acc.m = packed[:c], packed[c:2 * c], packed[2 * c:3 * c], packed[3 * c]
        totals = torch.tensor([n_batches, samples, skipped], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals)
        n_batches, samples, skipped = (int(v) for v in totals.tolist())
    skipped_bn = {n: "not_called" for n in bns if n not in accs and n not in called}
    for n in skipped_bn:
        log.info("BatchNorm '%s' is never called in the forward pass: left as it is (not_called)", n)
    if len(skipped_bn) == len(bns):
        raise BnfoldError("no BatchNorm is called in the model's forward pass (in eval mode): nothing to calibrate")
    missing = [n for n in bns if n not in accs and n not in skipped_bn]
    if missing:
        raise BnfoldError(f"BatchNorm '{missing[0]}' saw no usable batch during calibration (is it called in "
                          "forward? are the batches larger than 1?)")
    stats = {}
    for name, acc in accs.items():
        mean = acc.s1 / acc.m
        if pooled:
            var = (acc.s2 - acc.m * mean * mean) / (acc.m - 1)
        else:
            var = acc.sv / acc.m
        stats[name] = (mean, var.clamp_min(0))
    result = CalibrationResult(stats=stats, original=original, batches=n_batches, samples=samples,
                               method="pooled" if pooled else "algorithm2", skipped_batches=skipped,
                               world_size=world, per_bn_values={n: int(a.m.item()) for n, a in accs.items()},
                               skipped=skipped_bn)
    if apply:
        with torch.no_grad():
            for name, (mean, var) in stats.items():
                m = bns[name]
                m.running_mean.copy_(mean.to(m.running_mean.dtype))
                m.running_var.copy_(var.to(m.running_var.dtype))
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(n_batches)
    return result


def calibration_batches(data, input_shape: tuple, *, batch_size: int = 64, layout: str = "nchw"):
    """Mini-batches (torch tensors, batches of one dropped) of ``data`` (a spec such as ``digits``, here the
    training split, an .npz, an image folder, or a :class:`bnfold.data.Dataset`) shaped for a model taking
    ``input_shape``."""
    from bnfold.data import for_calibration, load_for_model

    ds = load_for_model(for_calibration(data), [(None, tuple(input_shape))], layout=layout)
    x = torch.from_numpy(np.ascontiguousarray(next(iter(ds.inputs.values())), dtype=np.float32))
    return ds, [x[i:i + batch_size] for i in range(0, len(x), batch_size) if len(x[i:i + batch_size]) > 1]


def input_shape_from(data, explicit: list | None, default_shape: tuple | None, *, layout: str = "nchw"):
    """The model's input shape for calibration: ``--input-shape`` when given; else the data's sample shape
    (batch 1), unless the data is flat and the model has a default shape (the digits for an image model)."""
    from bnfold.data import load_dataset, sample_shape_of

    if explicit:
        return tuple(explicit[0].shape)
    ds = data if not isinstance(data, (str, Path)) else None
    if ds is None:
        if default_shape is not None and len(default_shape) == 4 and Path(str(data)).is_dir():
            return tuple(default_shape)
        ds = load_dataset(data)
    sample = sample_shape_of(ds, layout="nchw" if ds is not data and Path(str(data)).is_dir() else layout)
    if default_shape is not None and (len(sample) == 1 or tuple(default_shape[1:]) == sample):
        return tuple(default_shape)
    return (1,) + tuple(sample)


def calibrate_spec(spec: str, data, *, weights=None, trust_pickle: bool = False, input_shapes: list[str] | None = None,
                   batch_size: int = 64, max_batches: int | None = None, pooled: bool = False,
                   layout: str = "nchw", random_weights: bool = False):
    """Build the PyTorch model ``spec`` (with ``weights``), recompute its BN population statistics over
    ``data`` and return ``(model, CalibrationResult, checkpoint config)``. The input shape comes from
    ``input_shapes`` (``[NAME=]1x3x224x224`` strings), else from the data (see :func:`input_shape_from`).
    ``weights``: a file or a :class:`bnfold.torch_io.WeightsSource` (the policy of
    :func:`bnfold.torch_io.choose_weights`); the config records the provenance."""
    from bnfold.data import for_calibration
    from bnfold.provenance import provenance
    from bnfold.torch_io import WeightsSource, build_weighted, choose_weights, parse_input_shape

    data = for_calibration(data)  # plain `digits`: the training split
    source = weights if isinstance(weights, WeightsSource) else choose_weights(spec, weights, random_weights)
    specs = [parse_input_shape(s) for s in (input_shapes or [])]
    model, default_shape = build_weighted(spec, source, trust_pickle=trust_pickle)
    if isinstance(data, (str, Path)) and not Path(str(data)).is_dir():
        from bnfold.data import load_dataset
        data = load_dataset(data)  # read once: for its shape and for its batches
    shape = input_shape_from(data, specs, default_shape, layout=layout)
    ds, batches = calibration_batches(data, shape, batch_size=batch_size, layout=layout)
    result = population_statistics(model, batches, max_batches=max_batches, pooled=pooled)
    from bnfold.torch_io import read_checkpoint_config
    config = (read_checkpoint_config(source.path) if source.kind == "file" else None) or {"model": spec}
    config["calibration"] = {**result.summary(), "data": ds.name, "batch_size": batch_size,
                             "input_shape": list(shape)}
    config["provenance"] = provenance(spec, weights=source, statistics=f"{result.method} over {ds.name} "
                                      f"({result.samples} samples, bnfold calibrate)")
    return model, result, config
