"""Reduced precision: how far from a float64 reference is each way of getting an fp16/bf16 model?

For every model (the bnfold zoo and torchvision classifiers) and two kinds of BatchNorm statistics --
``typical`` (``zoo.randomize_bn``: gamma in [0.5, 1.5], variance in [0.5, 1.5], so every BN scale is near 1) and
``wide`` (gamma log-uniform in [0.1, 10], variance log-uniform in [1e-3, 1e3]: BN scales from ~3e-3 to ~300) --
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

Usage (torchvision and onnxconverter-common live in the shared venv; bnfold from this checkout)::

    PYTHONPATH=. /work/venv-timm/bin/python benchmarks/precision.py [--models zoo,tv] [--samples 8]
        [--latency --ep cpu --iters 100] [--out benchmarks/results]

Writes ``precision.json`` and ``precision.md`` (``precision_latency.*`` with ``--latency``) into ``--out``.
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


def emulate(m16: onnx.ModelProto) -> onnx.ModelProto:
    """fp32 arithmetic with every tensor that is fp16/bf16 in ``m16`` rounded to its dtype after its producer."""
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
            if o in low and n.op_type != "Cast":
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
    net = (wide_bn if bn == "wide" else load_zoo().randomize_bn)(net, seed=seed).eval()
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
    models["modelopt_fp16"] = modelopt_convert(unfolded)
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
        if keep is not None and c in ("bnfold_fp32", "bnfold_fp16", "occ_fp16_unfolded", "occ_fp16_folded"):
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
    if row["bn"] == "wide":
        ok = ok and all(b[k] < o[k] for k in keys)
    return "met" if ok else "NOT met"


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


def latency(keep: dict, ep: str, iters: int, out: Path) -> None:
    from bnfold.bench import bench

    results = {}
    with tempfile.TemporaryDirectory() as d:
        for key, models in keep.items():
            paths, labels = [], []
            for label, m in models.items():
                p = Path(d) / f"{key}-{label}.onnx"
                onnx.save(m, p)
                paths.append(p)
                labels.append(label)
            r = bench(paths, eps=[ep], opt_levels=["all"], batches=[1], iters=iters, labels=labels)
            results[key] = r.to_dict()
            print(f"latency {key}: " + ", ".join(f"{Path(x['model']).stem.split('-')[-1]} {x['p50_ms']:.3f} ms"
                                                 for x in r.to_dict()["results"]), flush=True)
    (out / "precision_latency.json").write_text(json.dumps(results, indent=1) + "\n")


def write(args, rows: list[dict]) -> None:
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "onnxruntime": ort.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "samples": args.samples}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"precision{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / f"precision{args.tag}.md").write_text(markdown(rows, meta))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="zoo,tv", help="zoo, tv, or names (comma-separated)")
    ap.add_argument("--bn", default="typical,wide", help="typical, wide (comma-separated)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency", action="store_true", help="also time the models (quiet machine only)")
    ap.add_argument("--ep", default="cpu")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. _smoke)")
    args = ap.parse_args(argv)
    zoo = load_zoo()
    wanted: list[tuple[str, str]] = []
    for item in args.models.split(","):
        if item == "zoo":
            wanted += [("zoo", n) for n in zoo.names() if n != "resnet50"]
        elif item == "tv":
            wanted += [("tv", n) for n in TV_MODELS]
        else:
            wanted.append(("zoo" if item in zoo.names() else "tv", item))
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
        latency(keep, args.ep, args.iters, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
