"""Reduced precision: how far from a float64 reference is each way of getting an fp16/bf16 model?

For every model (the bnfold zoo and torchvision classifiers) and two kinds of BatchNorm statistics --
``typical`` (``zoo.randomize_bn``: gamma in [0.5, 1.5], variance in [0.5, 1.5], so every BN scale is near 1) and
``wide`` (gamma log-uniform in [0.1, 10], variance log-uniform in [1e-3, 1e3]: BN scales from ~3e-3 to ~300) and
``wide_calib`` (``wide``'s gamma and beta, BN mean and variance measured on data as training leaves them: every
BN normalises, so deep networks stay inside fp32's range, see :func:`wide_calib_bn`) --
the unfolded model is exported to ONNX (fp32, BatchNorms kept) and turned into:

=========================  ==========================================================================================
``fp32_unfolded``          the export itself (the fp32 floor)
``bnfold_fp32``            ``bnfold.fold_model`` (fp32 fold)
``bnfold_fp16``            ``bnfold.precision.fold_to_dtype(dtype="fp16")``: float64 fold rounded once to fp16
``bnfold_bf16``            the same into bf16 (bf16 weights, fp32 compute: see README)
``occ_fp16_unfolded``      onnxconverter-common ``convert_float_to_float16(keep_io_types=True)`` of the export
``occ_fp16_folded``        the same converter applied to bnfold's fp32 fold (two roundings of every folded weight)
``modelopt_fp16``          NVIDIA ModelOpt ONNX AutoCast (``convert_to_mixed_precision``), where it is installed
=========================  ==========================================================================================

Each runs in ONNX Runtime (CPU provider, graph optimizations off) on the same random normal inputs; the
reference is the PyTorch module itself in float64. Error of an output element: ``|out - ref| / max|ref|`` (the
output's scale, so near-zero elements do not blow up); the table gives its maximum and mean over all outputs and
samples, ``inf`` when the candidate produced an inf or NaN. Counts per candidate: ``clamped`` (parameter values
the converter moved beyond rounding: onnxconverter-common clamps |v| > 1e4 and 0 < |v| < 1e-7 by default;
bnfold never clamps), ``subnormal`` (non-zero reduced-precision parameters below the normal range, plus those
that became zero), ``fp32_kept`` (nodes left in fp32: bnfold's kept list; onnxconverter-common's op block list).

On the CPU provider a float16 node without a float16 kernel runs in fp32 between Casts that ONNX Runtime
inserts (and removes back to back), so the ``cpu`` columns measure parameter rounding only. The ``emulated``
columns round every tensor that is fp16 in the candidate to fp16 after its producer (an explicit Cast pair),
with fp32 arithmetic inside each op -- what an fp16 GPU run with fp32 accumulation stores between ops. GPU
arithmetic itself needs a run on a GPU.

With ``--latency`` the fp16 models and the fp32 fold are also timed (``bnfold.bench``: sessions, balanced
order, intervals) on ``--ep``; run that only on a quiet machine. Without it no timing is taken.

Acceptance over independent realizations (``--seeds N``, see "realizations" below): N draws per model of weights,
BN statistics and inputs; per model the ratio bnfold / onnxconverter-common of the max and mean error, geometric
mean over seeds with a 95% interval, next to an A/A calibration; ``--attribute`` adds fp32 runs that round only
some parameters; ``--modelopt-python`` runs ModelOpt AutoCast from its own venv.

Usage (torchvision and onnxconverter-common live in the shared venv; bnfold from this checkout)::

    PYTHONPATH=. /work/venv-timm/bin/python benchmarks/precision.py --models zoo --seeds 10 --samples 16 \
        --attribute [--modelopt-python /tmp/modelopt-venv/bin/python]          # precision.md / .json
    PYTHONPATH=. /work/venv-timm/bin/python benchmarks/precision.py --models tv --seeds 3 --samples 2 --tag _tv
    PYTHONPATH=. /work/venv-timm/bin/python benchmarks/precision.py --bn wide_calib --seeds 3 --samples 2 \
        --models resnet50,densenet121,regnet_y_400mf,efficientnet_b0,inception_v3 --tag _tv_wide_calib
        # then --render precision_tv.json --replace precision_tv_wide_calib.json (rows added)
    PYTHONPATH=. /work/venv-timm/bin/python benchmarks/precision.py --models zoo --samples 4   # one realization,
        # with bf16 and the clamped / subnormal / kept counts: precision_single.md
    PYTHONPATH=. /work/venv-timm/bin/python benchmarks/precision.py --models zoo --bn typical --samples 4 \
        --latency --ep cpu --iters 200 --tag _quiet                             # precision_latency_quiet.md
    PYTHONPATH=. /work/venv-timm/bin/python benchmarks/precision.py --render benchmarks/results/precision.json
    PYTHONPATH=. /work/venv-timm/bin/python benchmarks/precision.py --render benchmarks/results/precision.json \
        --replace new_rows.json --merge more_seeds.json   # rows re-run, seeds added (recorded in the meta)
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.util
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bnfold.export import export_onnx  # noqa: E402
from bnfold.onnx_fold import fold_model  # noqa: E402
from bnfold.onnx_io import walk_graphs  # noqa: E402
from bnfold.precision import PrecisionOptions, fold_to_dtype  # noqa: E402

TV_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
             "regnet_y_400mf", "shufflenet_v2_x1_0", "inception_v3"]
CANDIDATES = ["fp32_unfolded", "bnfold_fp32", "bnfold_fp16", "bnfold_bf16", "occ_fp16_unfolded", "occ_fp16_folded",
              "modelopt_fp16"]
FP16_MIN_NORMAL = 6.103515625e-05


def load_zoo():
    """The zoo module (``models/zoo.py``; ``bnfold.models`` is a package only once bnfold is installed)."""
    try:
        from bnfold.models import zoo
        return zoo
    except ImportError:
        if "bnfold_zoo" in sys.modules:
            return sys.modules["bnfold_zoo"]
        spec = importlib.util.spec_from_file_location("bnfold_zoo", ROOT / "models" / "zoo.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bnfold_zoo"] = mod
        spec.loader.exec_module(mod)
        return mod


def wide_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BN statistics whose scales are far from 1: gamma log-uniform [0.1, 10], variance log-uniform [1e-3, 1e3]."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                if m.affine:
                    m.weight.copy_(10 ** (torch.rand(c, generator=g) * 2 - 1))
                    m.bias.copy_(torch.randn(c, generator=g) * 0.3)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                    m.running_var.copy_(10 ** (torch.rand(c, generator=g) * 6 - 3))
    return model


def calibration_input(shape: tuple, seed: int = 0) -> np.ndarray:
    """The random normal batch on which :func:`wide_calib_bn` measures BN statistics (not the evaluation inputs):
    2 samples, or as many as give each channel at least 256 values (batch x space) when the input is small."""
    space = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    samples = max(2, -(-256 // space))
    return np.random.default_rng(20_000 + seed).standard_normal((samples,) + tuple(shape[1:]))


def wide_calib_bn(model: torch.nn.Module, seed: int = 0, shape: tuple | None = None) -> torch.nn.Module:
    """BN scales far from 1 per channel whose float64 model stays inside fp32's range on deep networks.

    ``wide_bn`` draws gamma and the running variance independently of what reaches the BN, so nothing normalises:
    its scales ``gamma / sqrt(var + eps)`` have a root mean square of ~10-50 per layer, what the next layer sees
    grows by that much at every BN, and over the 50-120 BNs of a torchvision network the float64 reference
    reaches 1e36-1e123 (no fp16 or fp32 model can be finite). Here gamma and beta are ``wide``'s draws (same seed:
    gamma log-uniform [0.1, 10], half the channels above 1 and half below, 100x between the extremes) and the
    running mean and variance are what training leaves there: the statistics of the BN's own input, per channel
    (over batch and space), measured in float64 in network order on :func:`calibration_input` (random normal
    samples of ``shape``, 2 or enough for 256 values per channel; not the evaluation inputs), each BN normalising before the next is measured. Each BN's
    output then has per-channel mean beta and standard deviation gamma on that data whatever came in, so nothing
    compounds, and its scale ``gamma / std(input)`` is as far from 1 as gamma and the input's spread between
    channels make it (zoo and torchvision: >= 100x between channels within a layer, many channels far above and
    below 1). BNs without affine parameters or running statistics keep ``wide_bn``'s treatment."""
    if shape is None:
        raise ValueError("wide_calib needs the input shape (its BN statistics are measured on data)")
    wide_bn(model, seed=seed)
    net64 = copy.deepcopy(model).double().eval()
    pairs = [(a, b) for a, b in zip(model.modules(), net64.modules())
             if isinstance(a, torch.nn.modules.batchnorm._BatchNorm) and a.track_running_stats]

    def measure(m, inputs):
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        m.running_mean.copy_(x.mean(dims))
        m.running_var.copy_(x.var(dims, unbiased=False))

    hooks = [b.register_forward_pre_hook(measure) for _, b in pairs]
    try:
        with torch.no_grad():
            net64(torch.from_numpy(calibration_input(shape, seed)))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for a, b in pairs:
            a.running_mean.copy_(b.running_mean)
            a.running_var.copy_(b.running_var)
    return model


#: BN statistics by ``--bn`` name; every kind but ``typical`` has scales far from 1 (the "below" acceptance).
BN_KINDS = {"typical": lambda model, seed=0, shape=None: load_zoo().randomize_bn(model, seed=seed),
            "wide": lambda model, seed=0, shape=None: wide_bn(model, seed=seed), "wide_calib": wide_calib_bn}


def is_wide(bn: str) -> bool:
    return bn != "typical"


def build(kind: str, name: str):
    """``(module, input_shape)``; torchvision models get random weights (no download), batch 1 shapes."""
    torch.manual_seed(0)
    if kind == "zoo":
        zoo = load_zoo()
        return zoo.create(name), tuple(zoo.get(name).input_shape)
    import torchvision
    kwargs = {"aux_logits": False, "init_weights": True} if name == "inception_v3" else {}
    net = getattr(torchvision.models, name)(weights=None, **kwargs)
    return net, (1, 3, 299, 299) if name == "inception_v3" else (1, 3, 224, 224)


# ------------------------------------------------------------------------------------------------ candidates
def occ_convert(model: onnx.ModelProto) -> onnx.ModelProto | str:
    try:
        from onnxconverter_common import float16
    except ImportError:
        return "onnxconverter-common not installed (pip install 'bnfold[compare]')"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(copy.deepcopy(model), keep_io_types=True)


#: ModelOpt pins onnx and onnxruntime-gpu versions of its own: it lives in a separate venv whose python is given
#: by ``--modelopt-python`` (``python -m venv /tmp/modelopt-venv && /tmp/modelopt-venv/bin/pip install
#: "nvidia-modelopt[onnx]"``); the models travel as files.
MODELOPT_PYTHON: str | None = None

_MODELOPT_SCRIPT = """
import sys, onnx
from modelopt.onnx.autocast import convert_to_mixed_precision
for src in sys.argv[1:]:
    try:
        m = convert_to_mixed_precision(onnx_path=src, low_precision_type="fp16", keep_io_types=True)
        onnx.save(m, src + ".fp16.onnx")
    except Exception as exc:
        open(src + ".err", "w").write(type(exc).__name__ + ": " + str(exc)[:200])
"""


def modelopt_convert_many(models: list[onnx.ModelProto]) -> list[onnx.ModelProto | str]:
    """NVIDIA ModelOpt ONNX AutoCast (``convert_to_mixed_precision``, fp16, keep_io_types, its default
    thresholds) of each model: in-process where it imports, else in ``MODELOPT_PYTHON``'s environment."""
    if MODELOPT_PYTHON is None:
        return [modelopt_convert(m) for m in models]
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        paths = [str(Path(d) / f"m{i}.onnx") for i in range(len(models))]
        for m, p in zip(models, paths):
            onnx.save(m, p)
        r = subprocess.run([MODELOPT_PYTHON, "-c", _MODELOPT_SCRIPT, *paths], capture_output=True, text=True)
        out: list[onnx.ModelProto | str] = []
        for p in paths:
            if Path(p + ".fp16.onnx").exists():
                out.append(onnx.load(p + ".fp16.onnx"))
            elif Path(p + ".err").exists():
                out.append(f"ModelOpt AutoCast failed ({Path(p + '.err').read_text()})")
            else:
                out.append(f"ModelOpt AutoCast did not run (rc {r.returncode}: {r.stderr.strip()[-120:]})")
        return out


def modelopt_convert(model: onnx.ModelProto) -> onnx.ModelProto | str:
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except Exception as exc:  # not installed, or its CUDA-only imports fail
        return f"ModelOpt AutoCast not available ({type(exc).__name__}: {str(exc)[:80]})"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        onnx.save(model, p)
        try:
            return convert_to_mixed_precision(onnx_path=str(p), low_precision_type="fp16", keep_io_types=True)
        except Exception as exc:
            return f"ModelOpt AutoCast failed ({type(exc).__name__}: {str(exc)[:80]})"


def modelopt_kept(m: onnx.ModelProto) -> int:
    """Compute nodes AutoCast left in fp32 (a float32 output, not a Cast)."""
    from bnfold.graph import Binding, ModelGraph

    mg = ModelGraph(m)
    return sum(1 for n in m.graph.node if n.op_type not in ("Cast", "Constant", "Shape") and n.output
               and mg.elem_type(Binding(0, n.output[0])) == onnx.TensorProto.FLOAT)


def occ_counts(src: onnx.ModelProto, conv: onnx.ModelProto) -> dict:
    from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST

    clamped = 0
    for g in walk_graphs(src.graph):
        for t in g.initializer:
            if t.data_type == onnx.TensorProto.FLOAT:
                a = np.abs(numpy_helper.to_array(t))
                clamped += int(((a > 1e4) & np.isfinite(a)).sum() + ((a > 0) & (a < 1e-7)).sum())
    sub = 0
    for g in walk_graphs(conv.graph):
        for t in g.initializer:
            if t.data_type == onnx.TensorProto.FLOAT16:
                a = np.abs(numpy_helper.to_array(t).astype(np.float64))
                sub += int(((a > 0) & (a < FP16_MIN_NORMAL)).sum())
    kept = sum(n.op_type in DEFAULT_OP_BLOCK_LIST for g in walk_graphs(conv.graph) for n in g.node)
    return {"clamped": clamped, "subnormal": sub, "fp32_kept": kept}


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name, kind = sess.get_inputs()[0].name, sess.get_inputs()[0].type
    feed = x.astype(np.float16) if kind == "tensor(float16)" else x
    return np.asarray(sess.run(None, {name: feed})[0], np.float64)


def emulate(m16: onnx.ModelProto, round_activations: bool = True) -> onnx.ModelProto:
    """fp32 arithmetic with every tensor that is fp16/bf16 in ``m16`` rounded to its dtype after its producer
    (without ``round_activations``: the model's parameters as they are, no activation rounded at all)."""
    from onnx import helper

    from bnfold.graph import Binding, ModelGraph

    mg = ModelGraph(m16)
    low = {o: mg.elem_type(Binding(0, o)) for n in m16.graph.node for o in n.output
           if o and mg.elem_type(Binding(0, o)) in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)}
    m = copy.deepcopy(m16)
    for t in m.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
                a.i = onnx.TensorProto.FLOAT
            elif a.name == "value" and a.t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32)))
        rounds = []
        for k, o in enumerate(n.output):
            if o in low and round_activations:  # a Cast to fp16 rounds too
                n.output[k] = f"{o}__pre"
                rounds.append((o, low[o]))
        nodes.append(n)
        for o, et in rounds:
            nodes.append(helper.make_node("Cast", [f"{o}__pre"], [f"{o}__low"], to=et))
            nodes.append(helper.make_node("Cast", [f"{o}__low"], [o], to=onnx.TensorProto.FLOAT))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        if vi.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return m


def errors(out: np.ndarray, ref: np.ndarray) -> dict:
    if not np.isfinite(out).all():
        return {"max_rel": math.inf, "mean_rel": math.inf}
    scale = float(np.abs(ref).max()) or 1.0
    e = np.abs(out - ref) / scale
    return {"max_rel": float(e.max()), "mean_rel": float(e.mean())}


def evaluate(kind: str, name: str, bn: str, samples: int, seed: int, keep: dict | None) -> dict:
    net, shape = build(kind, name)
    net = BN_KINDS[bn](net, seed=seed, shape=shape).eval()
    x = np.random.default_rng(seed + 1).standard_normal((samples,) + shape[1:]).astype(np.float32)
    with torch.no_grad():
        ref = copy.deepcopy(net).double()(torch.from_numpy(x.astype(np.float64)))
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
    t0 = time.perf_counter()
    unfolded = export_onnx(net, (torch.from_numpy(x[:1]),), keep_bn=True)
    row = {"model": name, "source": kind, "bn": bn, "samples": samples, "input": list(shape[1:]),
           "ref_max_abs": float(np.abs(ref).max()), "candidates": {}}
    models: dict[str, onnx.ModelProto | str] = {"fp32_unfolded": unfolded}
    folded32, rep32 = fold_model(unfolded)
    models["bnfold_fp32"] = folded32
    row["bn_total"], row["bn_folded"] = rep32.bn_total, rep32.folded
    counts: dict[str, dict] = {"bnfold_fp32": {"clamped": 0, "subnormal": 0, "fp32_kept": 0}}
    for dt in ("fp16", "bf16"):
        m, rep = fold_to_dtype(unfolded, precision=PrecisionOptions(dtype=dt, samples=min(samples, 8), seed=seed))
        p = rep.extra["precision"]
        models[f"bnfold_{dt}"] = m
        counts[f"bnfold_{dt}"] = {"clamped": p["clamped"], "subnormal": p["subnormal"] + p["zero"],
                                  "fp32_kept": len(p["kept_fp32"]),
                                  "kept_reasons": sorted({k["reason"] for k in p["kept_fp32"]})}
    models["occ_fp16_unfolded"] = occ_convert(unfolded)
    models["occ_fp16_folded"] = occ_convert(folded32)
    for k, src in (("occ_fp16_unfolded", unfolded), ("occ_fp16_folded", folded32)):
        if isinstance(models[k], onnx.ModelProto):
            counts[k] = occ_counts(src, models[k])
    models["modelopt_fp16"] = modelopt_convert_many([unfolded])[0]
    for c in CANDIDATES:
        m = models.get(c)
        if isinstance(m, str) or m is None:
            row["candidates"][c] = {"skipped": m or "not run"}
            continue
        try:
            out = run(m, x)
        except Exception as exc:
            row["candidates"][c] = {"skipped": f"does not run in ONNX Runtime CPU: {str(exc)[:120]}"}
            continue
        row["candidates"][c] = {**errors(out, ref), **counts.get(c, {})}
        if c in ("bnfold_fp16", "bnfold_bf16", "occ_fp16_unfolded", "occ_fp16_folded", "modelopt_fp16"):
            e = errors(run(emulate(m), x), ref)
            row["candidates"][c].update(emu_max_rel=e["max_rel"], emu_mean_rel=e["mean_rel"])
        if keep is not None and c in ("fp32_unfolded", "bnfold_fp32", "bnfold_fp16", "occ_fp16_unfolded",
                                      "occ_fp16_folded", "modelopt_fp16"):
            keep.setdefault(f"{name}-{bn}", {})[c] = m
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["verdict"] = f"cpu {judge(row, '')}, emulated {judge(row, 'emu_')}"
    return row


def judge(row: dict, prefix: str) -> str:
    """The issue's acceptance: bnfold fp16 max and mean error within 5% of onnxconverter-common's fp16 of the
    unfolded model, and below it when the BN scales are far from 1."""
    b, o = row["candidates"].get("bnfold_fp16", {}), row["candidates"].get("occ_fp16_unfolded", {})
    keys = (f"{prefix}max_rel", f"{prefix}mean_rel")
    if not all(k in b and k in o for k in keys):
        return "n/a"
    ok = all(b[k] <= 1.05 * o[k] for k in keys)
    if is_wide(row["bn"]):
        ok = ok and all(b[k] < o[k] for k in keys)
    return "met" if ok else "NOT met"


# ------------------------------------------------------------------------------------------------ realizations
# One row of the table above is ONE realization of rounding errors: two equally good roundings of the same model
# differ by tens of % by chance, so a 5% criterion judged on one row is a coin flip. ``--seeds N`` draws N
# independent realizations per model (fresh weights and BN statistics per seed, ``--samples`` inputs each) and
# reports, per model, the ratio bnfold / onnxconverter-common of the max and mean error with its spread over the
# seeds, next to an A/A calibration: onnxconverter-common on a *twin* of the same model (every parameter moved by
# a random 2^-10 relative, i.e. about one fp16 ulp: a second, equally valid rounding realization) against the
# first. ``--attribute`` adds fp32 runs that round only some parameters (see ``VARIANTS``).

#: fp32 runs that isolate one source of error (parameters rounded to fp16 and stored back as fp32, fp32 arithmetic,
#: no activation rounding at all): what the "cpu" columns measure, taken apart.
VARIANTS = {
    "unf_all": "unfolded model, every parameter rounded (weights and BN gamma, beta, mean, var)",
    "unf_w": "unfolded model, only conv/linear weights and biases rounded",
    "unf_bn": "unfolded model, only the BatchNorm parameters rounded",
    "fold_all": "bnfold's fp16 parameters, fp32 graph (no Casts: bnfold fp16 without any activation rounding)",
    "fold_w": "bnfold's fp16 weights, biases exact (from the float64 fold, in fp32)",
    "fold_b": "bnfold's fp16 biases, weights exact",
    "fold_nosub": "bnfold's fp16 parameters, but weights that round to a subnormal or zero kept exact",
}


def build_seeded(kind: str, name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(1000 + seed)
    if kind == "zoo":
        return load_zoo().create(name)
    import torchvision
    kwargs = {"aux_logits": False, "init_weights": True} if name == "inception_v3" else {}
    return getattr(torchvision.models, name)(weights=None, **kwargs)


def _float_state(net: torch.nn.Module) -> dict:
    return {k: v for k, v in net.state_dict().items() if v.is_floating_point()}


def tagged_export(net: torch.nn.Module, shape: tuple) -> tuple[onnx.ModelProto, dict]:
    """Export ``net`` once with every float parameter and buffer set to distinct random values, and map each
    float initializer of the export to the state-dict entry it holds (by its bytes). Later realizations write
    their state into a copy of the export through this map (no re-export). Raises when an initializer holds
    something derived from the parameters (then it cannot be written this way)."""
    g = torch.Generator().manual_seed(12345)
    tagged = copy.deepcopy(net)
    with torch.no_grad():
        for v in _float_state(tagged).values():
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)  # positive: a valid variance too
    x = torch.zeros((1,) + tuple(shape[1:]))
    proto = export_onnx(tagged.eval(), (x,), keep_bn=True)
    by_bytes = {v.detach().numpy().astype(np.float32).tobytes(): k for k, v in _float_state(tagged).items()}
    mapping = {}
    for t in proto.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT:
            continue
        a = numpy_helper.to_array(t)
        k = by_bytes.get(a.tobytes())
        if k is not None:
            mapping[t.name] = k
        elif a.size > 1:
            raise ValueError(f"initializer '{t.name}' {a.shape} is not a parameter of the module")
    return proto, mapping


def write_state(proto: onnx.ModelProto, mapping: dict, net: torch.nn.Module) -> onnx.ModelProto:
    m = copy.deepcopy(proto)
    st = net.state_dict()
    for t in m.graph.initializer:
        if t.name in mapping:
            t.CopyFrom(numpy_helper.from_array(st[mapping[t.name]].detach().numpy().astype(np.float32), t.name))
    return m


def twin(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same model with every float parameter and buffer multiplied by 1 + 2^-10 * U(-1, 1): its fp16
    rounding errors are a fresh realization, its behaviour is the same to 1e-3."""
    g = torch.Generator().manual_seed(777 + seed)
    b = copy.deepcopy(net)
    with torch.no_grad():
        for v in _float_state(b).values():
            v.mul_(1 + (torch.rand(v.shape, generator=g, dtype=torch.float64) * 2 - 1) * 2 ** -10)
    return b


def reference(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        r = copy.deepcopy(net).double()(torch.from_numpy(x.astype(np.float64)))
    return (r[0] if isinstance(r, (tuple, list)) else r).numpy()


def _bn_param_names(m: onnx.ModelProto) -> set:
    return {i for n in m.graph.node if n.op_type == "BatchNormalization" for i in n.input[1:5]}


def round_params(m: onnx.ModelProto, names) -> onnx.ModelProto:
    """``m`` (fp32) with the float initializers ``names`` rounded to fp16 and stored back in fp32."""
    out = copy.deepcopy(m)
    for t in out.graph.initializer:
        if t.name in names and t.data_type == onnx.TensorProto.FLOAT:
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), t.name))
    return out


def params_only(m16: onnx.ModelProto, exact: onnx.ModelProto | None = None, keep=None) -> onnx.ModelProto:
    """bnfold's fp16 model as an fp32 graph: its fp16 initializers upcast exactly, every Cast to fp32 (no
    activation is rounded). With ``exact`` (bnfold's fp32 fold), the initializers for which ``keep(name,
    fp16_values, exact_values)`` is true take the exact value instead."""
    out = emulate(m16, round_activations=False)
    ex = {t.name: numpy_helper.to_array(t) for t in exact.graph.initializer} if exact is not None else {}
    for t in out.graph.initializer:
        if keep is not None and t.name in ex and t.data_type == onnx.TensorProto.FLOAT:
            a = numpy_helper.to_array(t)
            e = ex[t.name]
            if e.shape == a.shape:
                sel = keep(t.name, a, e)
                if sel is not None and np.any(sel):
                    t.CopyFrom(numpy_helper.from_array(np.where(sel, e, a).astype(np.float32), t.name))
    return out


def _conv_slots(m: onnx.ModelProto) -> tuple[set, set]:
    w, b = set(), set()
    for n in m.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            w.update(n.input[1:2])
            b.update(n.input[2:3])
        elif n.op_type == "Add":
            b.update(n.input[1:2])
    return w, b


def realize(kind: str, name: str, shape: tuple, bn: str, seed: int, samples: int, base: onnx.ModelProto | None,
            mapping: dict | None, attribute: bool) -> dict:
    """One realization: fresh weights and BN statistics (``seed``), ``samples`` fresh inputs; the errors of
    bnfold fp16, onnxconverter-common on the unfolded model, on bnfold's fp32 fold and on the twin (A/A)."""
    net = build_seeded(kind, name, seed)
    net = BN_KINDS[bn](net, seed=seed, shape=shape).eval()
    x = np.random.default_rng(10_000 + seed).standard_normal((samples,) + tuple(shape[1:])).astype(np.float32)
    ref = reference(net, x)
    net_b = twin(net, seed)
    ref_b = reference(net_b, x)
    if base is not None:
        unfolded, unfolded_b = write_state(base, mapping, net), write_state(base, mapping, net_b)
    else:
        unfolded = export_onnx(net, (torch.from_numpy(x[:1]),), keep_bn=True)
        unfolded_b = export_onnx(net_b, (torch.from_numpy(x[:1]),), keep_bn=True)
    folded32, _ = fold_model(unfolded)
    m16, rep = fold_to_dtype(unfolded, precision=PrecisionOptions(dtype="fp16", samples=8, seed=seed))
    p = rep.extra["precision"]
    cands = {"bnfold_fp16": m16, "occ_fp16_unfolded": occ_convert(unfolded), "occ_fp16_folded": occ_convert(folded32),
             "occ_fp16_twin": occ_convert(unfolded_b)}
    out = {"seed": seed, "kept": len(p["kept_fp32"]), "subnormal": p["subnormal"] + p["zero"],
           "ref_max_abs": float(np.abs(ref).max()),
           "_pending": (unfolded, x, ref)}  # for ModelOpt, converted in one batch per row
    for c, m in cands.items():
        if isinstance(m, str):
            return {"seed": seed, "error": m}
        r = ref_b if c == "occ_fp16_twin" else ref
        e, em = errors(run(m, x), r), errors(run(emulate(m), x), r)
        out[c] = {"max": e["max_rel"], "mean": e["mean_rel"], "emu_max": em["max_rel"], "emu_mean": em["mean_rel"]}
    if attribute:
        w, b = _conv_slots(unfolded)
        bnp = _bn_param_names(unfolded)
        allp = {t.name for t in unfolded.graph.initializer}
        fw, fb = _conv_slots(folded32)
        variants = {
            "unf_all": round_params(unfolded, allp), "unf_w": round_params(unfolded, w | b),
            "unf_bn": round_params(unfolded, bnp), "fold_all": params_only(m16),
            "fold_w": params_only(m16, folded32, lambda n, a, e: np.full(a.shape, n in fb)),
            "fold_b": params_only(m16, folded32, lambda n, a, e: np.full(a.shape, n in fw)),
            "fold_nosub": params_only(m16, folded32, lambda n, a, e: (n in fw) & (np.abs(a) < FP16_MIN_NORMAL)
                                      & (e != 0)),
        }
        for k, m in variants.items():
            e = errors(run(m, x), ref)
            out[k] = {"max": e["max_rel"], "mean": e["mean_rel"]}
    return out


def _gm(v: list[float]) -> float:
    return float(np.exp(np.mean(np.log(v))))


def ratio_stats(ratios: list[float]) -> dict:
    """Geometric mean of the per-seed ratios, their min and max, and a 95% t-interval of the geometric mean."""
    lr = np.log(np.asarray(ratios, np.float64))
    n = len(lr)
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(n, 2.0)
    half = t * lr.std(ddof=1) / math.sqrt(n) if n > 1 else math.inf
    return {"gm": float(np.exp(lr.mean())), "min": float(np.exp(lr.min())), "max": float(np.exp(lr.max())),
            "lo": float(np.exp(lr.mean() - half)), "hi": float(np.exp(lr.mean() + half)),
            "log_sd": float(lr.std(ddof=1)) if n > 1 else math.nan, "n": n}


def verdict(stats: dict, wide: bool) -> str:
    """The acceptance on a geometric-mean ratio with its interval: within 5% when the geometric mean is <= 1.05;
    shown worse only when the whole interval lies above 1.05; for wide statistics "below" needs the geometric mean
    under 1 (and says whether the interval is below 1 too)."""
    gm, lo, hi = stats["gm"], stats["lo"], stats["hi"]
    if wide:
        if hi < 1:
            return "below"
        if gm < 1:
            return "below (gm)"
        return "NOT below" if lo > 1.05 else "not shown below"
    if gm <= 1.05:
        return "within 5%"
    return "NOT within 5%" if lo > 1.05 else "within noise"


def summarize(row: dict) -> dict:
    """Per row: the ratios over seeds (:func:`ratio_stats`), the A/A ratios, the seeds where a converter's output
    held an inf (then bnfold's error is below by definition; the ratio is taken over the other seeds), and the
    verdicts (:func:`verdict`)."""
    done = [r for r in row["seeds"] if "error" not in r]
    fp32_max = float(np.finfo(np.float32).max)
    s = {"n": len(done), "fp32_overflows": sum(1 for r in done if r.get("ref_max_abs", 0) > fp32_max)}
    for pre in ("", "emu_"):
        s[f"{pre}inf_occ"] = sum(1 for r in done if not math.isfinite(r["occ_fp16_unfolded"][f"{pre}max"]))
        s[f"{pre}inf_bnfold"] = sum(1 for r in done if not math.isfinite(r["bnfold_fp16"][f"{pre}max"]))
        for k in ("max", "mean"):
            key = f"{pre}{k}"

            def fine(r, c, key=key):
                return c in r and "skipped" not in r[c] and math.isfinite(r[c][key]) and r[c][key] > 0

            ok = [r for r in done if fine(r, "bnfold_fp16") and fine(r, "occ_fp16_unfolded")]
            if len(ok) >= 2:
                s[f"ratio_{key}"] = ratio_stats([r["bnfold_fp16"][key] / r["occ_fp16_unfolded"][key] for r in ok])
            aa = [r for r in ok if fine(r, "occ_fp16_twin")]
            if len(aa) >= 2:
                s[f"aa_{key}"] = ratio_stats([r["occ_fp16_twin"][key] / r["occ_fp16_unfolded"][key] for r in aa])
            mo = [r for r in done if fine(r, "bnfold_fp16") and fine(r, "modelopt_fp16")]
            if len(mo) >= 2:
                s[f"modelopt_{key}"] = ratio_stats([r["bnfold_fp16"][key] / r["modelopt_fp16"][key] for r in mo])
            fo = [r for r in ok if fine(r, "occ_fp16_folded")]
            if len(fo) >= 2:
                s[f"folded_{key}"] = ratio_stats([r["occ_fp16_folded"][key] / r["occ_fp16_unfolded"][key]
                                                  for r in fo])
    if "attribute" in row:
        good = [r for r in done if all(math.isfinite(r[c]["max"]) for c in ("bnfold_fp16", "occ_fp16_unfolded"))]
        for v in VARIANTS:
            for k in ("max", "mean"):
                vals = [r[v][k] for r in good if v in r and math.isfinite(r[v][k]) and r[v][k] > 0]
                if vals:
                    s[f"{v}_{k}"] = _gm(vals)
        for k in ("max", "mean"):
            if good:
                s[f"bnfold_{k}"] = _gm([r["bnfold_fp16"][k] for r in good])
                s[f"occ_{k}"] = _gm([r["occ_fp16_unfolded"][k] for r in good])
    wide = is_wide(row["bn"])
    for pre in ("", "emu_"):
        parts = []
        for k in ("max", "mean"):
            st = s.get(f"ratio_{pre}{k}")
            parts.append(verdict(st, wide) if st else ("below (occ inf)" if s[f"{pre}inf_occ"] else "n/a"))
        v = " / ".join(parts)
        if s[f"{pre}inf_occ"]:
            v += f"; occ inf in {s[f'{pre}inf_occ']}/{s['n']}"
        if s[f"{pre}inf_bnfold"]:
            v += f"; bnfold inf in {s[f'{pre}inf_bnfold']}/{s['n']}"
        if s["fp32_overflows"]:  # the float64 reference itself passes fp32's range: no reduced-precision row
            v = f"n/a: the float64 reference passes fp32's range in {s['fp32_overflows']}/{s['n']} seeds"
        s[f"verdict_{pre or 'cpu_'}"] = v
    return s


def evaluate_seeds(kind: str, name: str, bns: list[str], seeds: int, samples: int, attribute: bool,
                   first_seed: int = 0) -> list[dict]:
    t0 = time.perf_counter()
    net0, shape = build(kind, name)
    try:
        base, mapping = tagged_export(net0, shape)
    except ValueError:
        base, mapping = None, None  # an export that derives initializers from parameters: export every seed
    rows = []
    for bn in bns:
        row = {"model": name, "source": kind, "bn": bn, "samples": samples, "input": list(shape[1:]), "seeds": []}
        if attribute:
            row["attribute"] = True
        for s in range(first_seed, first_seed + seeds):
            row["seeds"].append(realize(kind, name, shape, bn, s, samples, base, mapping, attribute))
        pending = [r.pop("_pending") for r in row["seeds"] if "_pending" in r]
        converted = modelopt_convert_many([u for u, _, _ in pending])
        for r, (_, x, ref), m in zip([r for r in row["seeds"] if "error" not in r], pending, converted):
            if isinstance(m, str):
                r["modelopt_fp16"] = {"skipped": m}
                continue
            try:
                e, em = errors(run(m, x), ref), errors(run(emulate(m), x), ref)
            except Exception as exc:
                r["modelopt_fp16"] = {"skipped": f"does not run in ONNX Runtime CPU: {str(exc)[:120]}"}
                continue
            r["modelopt_fp16"] = {"max": e["max_rel"], "mean": e["mean_rel"], "emu_max": em["max_rel"],
                                  "emu_mean": em["mean_rel"], "fp32_kept": modelopt_kept(m)}
        row["summary"] = summarize(row)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    return rows


def merge_results(into: dict, replace: list[tuple[str, dict]], merge: list[tuple[str, dict]]) -> dict:
    """``into`` (a ``--seeds`` result: meta and rows) with the rows of each ``replace`` result put in place of its
    rows of the same model and BN statistics (a re-run), then the seeds of each ``merge`` result appended to them
    (more seeds; a seed already there is an error); each is recorded in the meta (``notes``, ``extra_seeds``).
    The summaries are recomputed. ``replace`` and ``merge``: ``(file name, result)`` pairs."""
    out = copy.deepcopy(into)
    meta = out["meta"]
    index = {(r["model"], r["bn"]): i for i, r in enumerate(out["rows"])}
    for name, res in replace:
        done, added = [], []
        for r in res["rows"]:
            key = (r["model"], r["bn"])
            if key in index:
                out["rows"][index[key]] = copy.deepcopy(r)
                done.append(f"{r['model']} {r['bn']}")
            else:  # a new row goes after the rows of the same model (or at the end)
                same = [i for i, x in enumerate(out["rows"]) if x["model"] == r["model"]]
                out["rows"].insert(same[-1] + 1 if same else len(out["rows"]), copy.deepcopy(r))
                index = {(x["model"], x["bn"]): i for i, x in enumerate(out["rows"])}
                added.append(f"{r['model']} {r['bn']}")
            stale = f"{r['model']} {r['bn']}: "  # seeds merged into the old row went with it
            meta["extra_seeds"] = [e for e in meta.get("extra_seeds", []) if not e.startswith(stale)]
        for what, rows in (("re-run", done), ("added", added)):
            if rows:
                meta.setdefault("notes", []).append(f"{', '.join(rows)} {what} {res['meta'].get('date', '?')} "
                                                    f"({name})")
    for name, res in merge:
        for r in res["rows"]:
            key = (r["model"], r["bn"])
            if key not in index:
                raise ValueError(f"{name}: no row {key[0]} {key[1]} to add seeds to")
            row = out["rows"][index[key]]
            have = {s["seed"] for s in row["seeds"]}
            new = list(r["seeds"])
            dup = sorted(have & {s["seed"] for s in new})
            if dup:
                raise ValueError(f"{name}: {key[0]} {key[1]} seeds {dup[:5]} are already in the row")
            if r["samples"] != row["samples"] or bool(r.get("attribute")) != bool(row.get("attribute")):
                raise ValueError(f"{name}: {key[0]} {key[1]} was run with other --samples or --attribute")
            row["seeds"] += copy.deepcopy(new)
            seeds = sorted(s["seed"] for s in new)
            span = f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else "several"
            meta.setdefault("extra_seeds", []).append(
                f"{key[0]} {key[1]}: {len(new)} more seeds ({span}) from {name}")
    for r in out["rows"]:
        r["summary"] = summarize(r)
    return out


def _r(st: dict | None) -> str:
    if not st:
        return "n/a"
    return f"{st['gm']:.2f} [{st['lo']:.2f}, {st['hi']:.2f}]"


def _avg(row: dict, key: str) -> str:
    v = [r[key] for r in row["seeds"] if key in r]
    return f"{np.mean(v):.3g}" if v else "n/a"


def markdown_seeds(rows: list[dict], meta: dict) -> str:
    n = max((r["summary"]["n"] for r in rows), default=0)
    lines = [f"# Reduced precision over independent realizations ({meta['date']})", "",
             f"ONNX Runtime {meta['onnxruntime']} (CPU provider, optimizations off), torch {meta['torch']}; "
             f"{meta['seeds']} realizations per model (fresh weights, BN statistics and "
             f"{rows[0]['samples'] if rows else 0} random normal inputs per seed). Ratio = bnfold fp16 error / "
             "onnxconverter-common fp16 error of the same unfolded model (max and mean of |out - ref| / max|ref| "
             "against float64), per seed; cells: geometric mean over seeds [95% t-interval of it]. *A/A*: the same "
             "ratio for onnxconverter-common on a twin of the model (every parameter moved by 2^-10 relative: a "
             "second, equally valid rounding) against onnxconverter-common on the model: what chance alone gives. "
             "*cpu*: as ONNX Runtime's CPU provider runs the fp16 models (parameters rounded, activations not); "
             "*emulated*: every fp16 tensor rounded after its producer. Acceptance: typical statistics, geometric "
             "mean <= 1.05 (NOT when the whole interval is above 1.05, *within noise* otherwise); wide and "
             "wide_calib, geometric mean < 1 (*below* when the whole interval is). BN statistics: *typical* gamma "
             "and variance in [0.5, 1.5]; *wide* gamma log-uniform [0.1, 10], variance log-uniform [1e-3, 1e3] "
             "(per-channel scales 3e-3..300, compounding to beyond fp32's range on deep networks); *wide_calib* "
             "wide's gamma and beta with each BN's mean and variance measured on its own input (2 random samples, "
             "in float64, as training leaves them): every BN normalises, so nothing compounds, while its scales "
             "stay far from 1 per channel.", "",
             "| model | BN | n | ratio max (cpu) | ratio mean (cpu) | A/A max (cpu) | A/A mean (cpu) | ratio max "
             "(emulated) | ratio mean (emulated) | A/A max (emu) | A/A mean (emu) | occ unfolded inf (emu) | "
             "verdict cpu | verdict emulated | bnfold / ModelOpt max, mean (cpu) | bnfold / ModelOpt max, mean "
             "(emu) | bnfold kept fp32 / sub+zero (mean) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    if meta.get("extra_seeds"):  # rows merged with more seeds of the same model (column n)
        lines[2] += " More seeds: " + "; ".join(meta["extra_seeds"]) + "."
    if meta.get("notes"):
        lines[2] += " Notes: " + "; ".join(meta["notes"]) + "."
    for r in rows:
        s = r["summary"]
        lines.append(f"| {r['model']} | {r['bn']} | {s['n']} | " + " | ".join(
            _r(s.get(k)) for k in ("ratio_max", "ratio_mean", "aa_max", "aa_mean", "ratio_emu_max",
                                   "ratio_emu_mean", "aa_emu_max", "aa_emu_mean"))
            + f" | {s['emu_inf_occ']} | {s.get('verdict_cpu_', 'n/a')} | {s.get('verdict_emu_', 'n/a')} | "
            + " | ".join(f"{_r(s.get(f'modelopt_{p}max'))}, {_r(s.get(f'modelopt_{p}mean'))}" for p in ("", "emu_"))
            + f" | {_avg(r, 'kept')} / {_avg(r, 'subnormal')} |")
    mo = {r2.get("modelopt_fp16", {}).get("skipped") for r in rows for r2 in r["seeds"]} - {None}
    if mo:
        lines += ["", "ModelOpt: " + "; ".join(sorted(mo))]
    for bn in sorted({r["bn"] for r in rows}, reverse=True):
        aa = [r["summary"][k]["log_sd"] for r in rows if r["bn"] == bn for k in ("aa_max", "aa_mean")
              if k in r["summary"] and math.isfinite(r["summary"][k]["log_sd"])]
        rr = [r["summary"][k]["log_sd"] for r in rows if r["bn"] == bn for k in ("ratio_max", "ratio_mean")
              if k in r["summary"] and math.isfinite(r["summary"][k]["log_sd"])]
        if aa and rr:
            sd = float(np.median(aa))
            n = int(np.median([r["summary"]["n"] for r in rows if r["bn"] == bn]))
            lines += ["", f"Calibration, {bn} statistics (cpu): seed-to-seed spread (sd of log ratio), median over "
                          f"rows: A/A {sd:.2f} (two equally valid roundings differ by a factor of {math.exp(sd):.2f}"
                          f" typically), bnfold/occ {float(np.median(rr)):.2f}. With {n} seeds (the median row) a "
                          f"geometric mean is known to about x{math.exp(2 * sd / math.sqrt(max(n, 1))):.2f} "
                          "(2 standard errors); "
                          "one realization (the old single-seed table) cannot judge a 5% criterion."]
    att = [r for r in rows if "attribute" in r]
    if att:
        lines += ["", "Attribution (cpu setting: fp32 arithmetic, parameters rounded to fp16 as listed; geometric "
                      "mean over seeds of max / mean error):", ""]
        lines += [f"- `{k}`: {v}" for k, v in VARIANTS.items()]
        cols = ["occ", "unf_all", "unf_w", "unf_bn", "bnfold", "fold_all", "fold_w", "fold_b", "fold_nosub"]
        lines += ["", "| model | BN | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
        for r in att:
            s = r["summary"]
            lines.append(f"| {r['model']} | {r['bn']} | " + " | ".join(
                f"{s[c + '_max']:.2e} / {s[c + '_mean']:.2e}" if c + "_max" in s else "n/a" for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ output
def fmt(c: dict, prefix: str = "") -> str:
    if "skipped" in c or f"{prefix}max_rel" not in c:
        return "n/a"
    mx, mean = c[f"{prefix}max_rel"], c[f"{prefix}mean_rel"]
    return "inf" if math.isinf(mx) else f"{mx:.2e} / {mean:.2e}"


def markdown(rows: list[dict], meta: dict) -> str:
    cols = ["bnfold_fp16", "bnfold_bf16", "occ_fp16_unfolded", "occ_fp16_folded", "bnfold_fp32", "fp32_unfolded"]
    lines = [f"# Reduced precision: error against float64 ({meta['date']})", "",
             f"ONNX Runtime {meta['onnxruntime']} (CPU provider, optimizations off), torch {meta['torch']}; "
             f"{rows[0]['samples'] if rows else 0} random normal samples per model. Cells: max / mean of "
             "|out - ref| / max|ref|. Counts (clamped, subnormal+zero, fp32-kept nodes) per converter below.", "",
             "| model | BN | " + " | ".join(cols) + " | acceptance |",
             "|---|---|" + "---:|" * len(cols) + "---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bn']} | " + " | ".join(fmt(r["candidates"][c]) for c in cols)
                     + f" | {r['verdict']} |")
    emu = ["bnfold_fp16", "bnfold_bf16", "occ_fp16_unfolded", "occ_fp16_folded"]
    lines += ["", "Emulated fp16 storage of activations (every fp16 tensor rounded after its producer, fp32 inside "
              "ops):", "", "| model | BN | " + " | ".join(emu) + " |", "|---|---|" + "---:|" * len(emu)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bn']} | " + " | ".join(fmt(r["candidates"][c], "emu_") for c in emu) + " |")
    lines += ["", "| model | BN | bnfold fp16 clamped/sub/kept | bnfold bf16 clamped/sub/kept | occ unfolded "
              "clamped/sub/kept | occ folded clamped/sub/kept |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for c in ("bnfold_fp16", "bnfold_bf16", "occ_fp16_unfolded", "occ_fp16_folded"):
            x = r["candidates"][c]
            cells.append("n/a" if "skipped" in x else f"{x['clamped']} / {x['subnormal']} / {x['fp32_kept']}")
        lines.append(f"| {r['model']} | {r['bn']} | " + " | ".join(cells) + " |")
    skipped = {c: v["skipped"] for r in rows for c, v in r["candidates"].items() if "skipped" in v}
    for c, why in skipped.items():
        lines.append(f"\n{c}: {why}")
    return "\n".join(lines) + "\n"


def latency(keep: dict, ep: str, iters: int, out: Path, tag: str = "") -> None:
    """Time every kept model of a row in one :func:`bnfold.bench.bench` call (sessions, balanced order,
    intervals; ratios against the first, bnfold's fp32 fold). Quiet machine only."""
    from bnfold.bench import bench

    results = {}
    lines = [f"# fp16 latency, ONNX Runtime {ort.__version__} ({ep}, optimizations all, batch 1, {iters} iterations)",
             "", "On the CPU provider an fp16 node without an fp16 kernel runs in fp32 between Casts the runtime "
             "inserts: these times say what that costs, not what fp16 arithmetic gains (a GPU run says that).", "",
             "| model | BN | candidate | p50 ms | 95% CI ms | ratio to bnfold_fp32 [95% CI] |",
             "|---|---|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as d:
        for key, models in keep.items():
            order = ["bnfold_fp32"] + [k for k in models if k != "bnfold_fp32"]
            paths = []
            for label in order:
                p = Path(d) / f"{key}-{label}.onnx"
                onnx.save(models[label], p)
                paths.append(p)
            r = bench(paths, eps=[ep], opt_levels=["all"], batches=[1], iters=iters, labels=order).to_dict()
            results[key] = r
            model, bn = key.rsplit("-", 1)
            for x in r["results"]:
                lo, hi = x.get("ci95_ms") or (math.nan, math.nan)
                rl, rh = x.get("ratio_ci95") or (math.nan, math.nan)
                lines.append(f"| {model} | {bn} | {x['model']} | {x['p50_ms']:.4f} | {lo:.4f} - {hi:.4f} | "
                             f"{x.get('ratio', math.nan):.3f} [{rl:.3f}, {rh:.3f}] |")
            print(f"latency {key}: " + ", ".join(f"{x['model']} {x['p50_ms']:.3f} ms" for x in r["results"]),
                  flush=True)
    (out / f"precision_latency{tag}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"precision_latency{tag}.md").write_text("\n".join(lines) + "\n")


def write(args, rows: list[dict]) -> None:
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "onnxruntime": ort.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "samples": args.samples}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"precision_single{args.tag}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / f"precision_single{args.tag}.md").write_text(markdown(rows, meta))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="zoo,tv", help="zoo, tv, or names (comma-separated)")
    ap.add_argument("--bn", default="typical,wide", help=f"{', '.join(BN_KINDS)} (comma-separated)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency", action="store_true", help="also time the models (quiet machine only)")
    ap.add_argument("--ep", default="cpu")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. _smoke)")
    ap.add_argument("--seeds", type=int, default=0,
                    help="independent realizations per model (the acceptance table, precision_seeds*.md)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--attribute", action="store_true", help="with --seeds: fp32 runs that take the error apart")
    ap.add_argument("--render", type=Path, help="rewrite the .md of a --seeds result .json (nothing is run)")
    ap.add_argument("--replace", type=Path, nargs="+", default=[],
                    help="with --render: --seeds results whose rows replace the rows of the same model and BN")
    ap.add_argument("--merge", type=Path, nargs="+", default=[],
                    help="with --render: --seeds results whose seeds are added to the rows of the same model and BN")
    ap.add_argument("--modelopt-python", help="python of a venv with nvidia-modelopt[onnx] (run there, as files)")
    args = ap.parse_args(argv)
    if (args.replace or args.merge) and not args.render:
        ap.error("--replace and --merge need --render (the result they change)")
    bad = [b for b in args.bn.split(",") if b not in BN_KINDS]
    if bad:
        ap.error(f"--bn {bad[0]}: not one of {', '.join(BN_KINDS)}")
    if args.render:
        d = json.loads(args.render.read_text())
        if args.replace or args.merge:
            d = merge_results(d, [(p.name, json.loads(p.read_text())) for p in args.replace],
                              [(p.name, json.loads(p.read_text())) for p in args.merge])
            args.render.write_text(json.dumps(d, indent=1) + "\n")
        for r in d["rows"]:
            r["summary"] = summarize(r)
        args.render.with_suffix(".md").write_text(markdown_seeds(d["rows"], d["meta"]))
        for r in d["rows"]:  # the README's compact rows
            s = r["summary"]

            def cell(pre, s=s):
                a, b = s.get(f"ratio_{pre}max"), s.get(f"ratio_{pre}mean")
                if s["fp32_overflows"]:
                    return "n/a"
                return f"{a['gm']:.2f} / {b['gm']:.2f}" if a and b else "occ inf"
            v = s["verdict_cpu_"] if s["verdict_cpu_"] == s["verdict_emu_"] else \
                f"{s['verdict_cpu_']}; emulated: {s['verdict_emu_']}"
            print(f"| {r['model']} | {r['bn']} | {s['n']} | {cell('')} | {cell('emu_')} | {v} |")
        return 0
    zoo = load_zoo()
    wanted: list[tuple[str, str]] = []
    for item in args.models.split(","):
        if item == "zoo":
            wanted += [("zoo", n) for n in zoo.names() if n != "resnet50"]
        elif item == "tv":
            wanted += [("tv", n) for n in TV_MODELS]
        else:
            wanted.append(("zoo" if item in zoo.names() else "tv", item))
    global MODELOPT_PYTHON
    MODELOPT_PYTHON = args.modelopt_python
    if args.seeds:
        return main_seeds(args, wanted)
    rows, keep = [], ({} if args.latency else None)
    for kind, name in wanted:
        for bn in args.bn.split(","):
            try:
                row = evaluate(kind, name, bn, args.samples, args.seed, keep)
            except Exception as exc:  # a model the exporter or a converter cannot take: recorded, not fatal
                row = {"model": name, "source": kind, "bn": bn, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                print(f"{name} ({bn}): {row['error']}", flush=True)
                continue
            rows.append(row)
            c = row["candidates"]
            print(f"{name} ({bn}): bnfold fp16 {fmt(c['bnfold_fp16'])}, occ fp16 {fmt(c['occ_fp16_unfolded'])}, "
                  f"{row['verdict']} [{row['seconds']} s]", flush=True)
            write(args, rows)  # after every model: an interrupted run keeps what it measured
    write(args, rows)
    if keep is not None:
        latency(keep, args.ep, args.iters, args.out, args.tag)
    return 0


def main_seeds(args, wanted) -> int:
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "onnxruntime": ort.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "samples": args.samples,
            "seeds": args.seeds, "first_seed": args.first_seed}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, name in wanted:
        try:
            got = evaluate_seeds(kind, name, args.bn.split(","), args.seeds, args.samples, args.attribute,
                                 args.first_seed)
        except Exception as exc:  # recorded, not fatal
            print(f"{name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        for row in got:
            rows.append(row)
            s = row["summary"]
            print(f"{name} ({row['bn']}): ratio max {_r(s.get('ratio_max'))} mean {_r(s.get('ratio_mean'))}, "
                  f"A/A max {_r(s.get('aa_max'))} mean {_r(s.get('aa_mean'))}; emulated {_r(s.get('ratio_emu_max'))}"
                  f" / {_r(s.get('ratio_emu_mean'))}; {s.get('verdict_cpu_')}, {s.get('verdict_emu_')} "
                  f"[{row['seconds']} s]", flush=True)
        (args.out / f"precision{args.tag}.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        (args.out / f"precision{args.tag}.md").write_text(markdown_seeds(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
