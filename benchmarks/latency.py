"""Latency of folded vs original vs no-BN models, on ONNX Runtime (every optimization level) and PyTorch eager.

For each architecture three models are built from the same weights:

* ``original``: the network with its BatchNorms, exported with ``optimize=False`` (BN kept);
* ``folded``: the original folded by bnfold (ONNX pass);
* ``nobn``: the same architecture with every BN replaced by Identity (and the convs left without bias): the
  floor no fold can beat;
* ``nobn_bias``: ``nobn`` with a bias on every conv/linear, i.e. exactly the folded model's structure: if
  folded/nobn_bias is 1 and folded/nobn is not, the whole gap to the floor is the cost of the bias that folding
  must add (``b' = beta - mean * s``).

All (model, optimization level) runners of one architecture are timed side by side in one loop, in
``--sessions`` fresh sessions (every session creates every runner anew, warms it up and runs whole cycles of a
balanced order for at least ``--rounds`` rounds and ``--session-time`` seconds; see ``bnfold.bench``). Reported
per runner: p50/p90/p99/mean and a 95% interval of the median (Student's t over the session medians); per pair:
the ratio (paired by round within each session, one estimate per session) with its 95% interval (t over the
sessions' estimates), which includes the session-to-session variation, and the half-width the session spread
alone leaves (``spread_halfwidth``: when it exceeds a target's margin, only more ``--sessions`` can decide it).
The raw per-session samples are in the JSON. The targets (issue: benchmark) are judged on the
intervals: **met** when the whole interval satisfies the target, **missed** when none of it does,
**undecided** otherwise:

1. folded is never slower than original at the same level (ratio <= 1.01);
2. folded with optimizations off matches original at ORT's basic level, where ORT folds BN itself (within 2%);
3. folded is within 3% of the no-BN floor at the same level (ratio <= 1.03).

On a GPU provider (``--ep cuda``) the runtime's own levers are tried too, at the ``all`` level: NHWC layout
(``prefer_nhwc``), exhaustive cuDNN algorithm search, TF32 off, and CUDA graphs, each reported as folded /
no-BN and folded / original, so the results say which lever closes a gap.

Usage::

    python benchmarks/latency.py [--archs resnet18,resnet50,...] [--sessions 10] [--rounds 12]
                                 [--session-time 1] [--threads 1] [--batch 1] [--ep cpu|cuda]
                                 [--previous OLD.json] [--out benchmarks/results] [--tag cpu]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from bnfold import fold_model
from bnfold.bench import (
    OrtRunner,
    Setting,
    TorchRunner,
    environment,
    measure,
    ratio_ci,
    summarize,
    williams_orders,
)
from bnfold.export import export_onnx
from bnfold.models import zoo
from bnfold.torch_fold import fold_module, strip_batchnorm

SHAPES = {"resnet18": (1, 3, 224, 224), "resnet50": (1, 3, 224, 224), "mobilenet": (1, 3, 224, 224),
          "efficientnet": (1, 3, 224, 224), "unet": (1, 3, 128, 128)}
LEVELS = ("off", "basic", "all")


def log(msg: str) -> None:
    print(f"[latency {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(arch: str, shape: tuple, tmp: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model = zoo.randomize_bn(zoo.create(arch)).eval()
    x = torch.randn(shape)
    original = export_onnx(model, (x,), dynamic_batch=False)
    folded, report = fold_model(original)
    assert report.skipped == 0 or arch in ("densenet", "preact_resnet"), report.summary()
    stripped = strip_batchnorm(model)
    nobn = export_onnx(stripped, (x,), dynamic_batch=False)
    with_bias = _add_biases(stripped)
    nobn_bias = export_onnx(with_bias, (x,), dynamic_batch=False)
    paths = {}
    for name, m in (("original", original), ("folded", folded), ("nobn", nobn), ("nobn_bias", nobn_bias)):
        paths[name] = tmp / f"{arch}_{name}.onnx"
        onnx.save(m, paths[name])
    return {"paths": paths, "module": model, "shape": shape, "folded_report": report.summary()}


def _add_biases(model: torch.nn.Module) -> torch.nn.Module:
    import copy
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)) and m.bias is None:
            n = m.out_channels if isinstance(m, torch.nn.modules.conv._ConvNd) else m.out_features
            m.bias = torch.nn.Parameter(torch.randn(n, generator=g) * 0.1)
    return model


def _timed(factories: list, labels: list, args) -> tuple[dict, dict]:
    """Time the runners of ``factories`` in fresh sessions; per-label summaries and per-label samples."""
    got = measure(factories, sessions=args.sessions, rounds=args.rounds, warmup=args.warmup,
                  min_session_s=args.session_time)
    runners = {}
    for lab, t, sm, prov in zip(labels, got.samples, got.session_ms, got.providers):
        runners[lab] = {**summarize(t), "providers": prov, "session_ms": float(np.median(sm)),
                        "samples_ms": [list(x) for x in t]}
    return runners, {lab: t for lab, t in zip(labels, got.samples)}


def run_ort(arch: str, built: dict, args) -> dict:
    factories, labels = [], []
    for level in LEVELS:
        for name in ("original", "folded", "nobn", "nobn_bias"):
            s = Setting(args.ep, level, args.batch, args.threads)
            factories.append(lambda path=str(built["paths"][name]), s=s: OrtRunner(path, s))
            labels.append(f"{name}@{level}")
    runners, by = _timed(factories, labels, args)
    return {"runners": runners, "ratios": ort_ratios(by)}


def ort_ratios(by: dict) -> dict:
    """The ORT ratios from per-runner per-session samples (runner order as timed: level-major)."""
    block = len(williams_orders(len(by)))
    out = {"ratios": {}}

    def ratio(a, b):
        return ratio_ci(by[a], by[b], block=block)
    for level in LEVELS:
        for x, y in (("folded", "original"), ("folded", "nobn"), ("original", "nobn"), ("folded", "nobn_bias"),
                     ("nobn_bias", "nobn")):
            out["ratios"][f"{x}/{y}@{level}"] = ratio(f"{x}@{level}", f"{y}@{level}")
    out["ratios"]["folded@off/original@basic"] = ratio("folded@off", "original@basic")
    out["ratios"]["original@basic/original@off"] = ratio("original@basic", "original@off")
    out["ratios"]["original@all/original@off"] = ratio("original@all", "original@off")
    return out["ratios"]


LEVERS = {  # CUDA provider options tried at the 'all' level (name -> (provider options, CUDA graph))
    "nhwc": ({"prefer_nhwc": "1"}, False),
    "cudnn_exhaustive": ({"cudnn_conv_algo_search": "EXHAUSTIVE"}, False),
    "tf32_off": ({"use_tf32": "0"}, False),
    "cuda_graph": ({}, True),
}


def run_levers(built: dict, args) -> dict:
    """The CUDA provider's levers, each timed on original/folded/no-BN side by side at the 'all' level."""
    out = {}
    names = ("original", "folded", "nobn")
    for lever, (opts, graph) in LEVERS.items():
        factories = [lambda path=str(built["paths"][name]), opts=opts, graph=graph:
                     OrtRunner(path, Setting("cuda", "all", args.batch, args.threads, True, graph, dict(opts)))
                     for name in names]
        runners, by = _timed(factories, list(names), args)
        block = len(williams_orders(len(names)))
        out[lever] = {"options": opts, "cuda_graph": graph, "p50_ms": {n: runners[n]["p50_ms"] for n in names},
                      "folded/original": ratio_ci(by["folded"], by["original"], block=block),
                      "folded/nobn": ratio_ci(by["folded"], by["nobn"], block=block)}
    return out


def run_torch(arch: str, built: dict, args) -> dict:
    import copy

    model = built["module"]
    x = torch.randn(built["shape"])
    variants = {"original": model, "folded": fold_module(model, x).module, "nobn": strip_batchnorm(model)}
    s = Setting("cpu" if args.ep == "cpu" else "cuda", "eager", args.batch, args.threads)
    factories = [lambda m=m, name=name: TorchRunner(copy.deepcopy(m), name, s, built["shape"])
                 for name, m in variants.items()]
    runners, by = _timed(factories, list(variants), args)
    return {"runners": runners, "ratios": torch_ratios(by)}


def torch_ratios(by: dict) -> dict:
    block = len(williams_orders(len(by)))
    return {"folded/original": ratio_ci(by["folded"], by["original"], block=block),
            "folded/nobn": ratio_ci(by["folded"], by["nobn"], block=block),
            "original/nobn": ratio_ci(by["original"], by["nobn"], block=block)}


def reanalyse(path: Path, old: dict | None, out_dir: Path, args) -> None:
    """Recompute every summary, ratio and target of an earlier run from its raw samples."""
    data = json.loads(Path(path).read_text())
    for res in data["archs"].values():
        for part, ratios in (("ort", ort_ratios), ("torch", torch_ratios)):
            by = {lab: st["samples_ms"] for lab, st in res[part]["runners"].items()}
            for st in res[part]["runners"].values():
                st.update(summarize(st["samples_ms"]))
            res[part]["ratios"] = ratios(by)
        res["targets"] = verdicts(res["ort"])
    data["reanalysed"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if old:
        data["previous"] = compare_previous(old, data)
    data["summary"] = summarize_findings(data)
    (out_dir / f"latency_{args.tag}.json").write_text(json.dumps(data, indent=1))
    write_md(out_dir / f"latency_{args.tag}.md", data)


def judge_target(ci, lo: float | None, hi: float | None) -> str:
    """'met' when the whole interval lies in [lo, hi], 'missed' when none of it does, else 'undecided'."""
    lo = -np.inf if lo is None else lo
    hi = np.inf if hi is None else hi
    if lo <= ci[0] and ci[1] <= hi:
        return "met"
    if ci[1] < lo or ci[0] > hi:
        return "missed"
    return "undecided"


TARGETS = ([(f"folded <= 1.01 x original @{lv}", f"folded/original@{lv}", None, 1.01) for lv in LEVELS]
           + [("folded@off within 2% of original@basic", "folded@off/original@basic", 0.98, 1.02)]
           + [(f"folded within 3% of no-BN @{lv}", f"folded/nobn@{lv}", None, 1.03) for lv in LEVELS])


def verdicts(ort_res: dict) -> list[list]:
    """[name, verdict, ratio, [lo, hi]] per target."""
    r = ort_res["ratios"]
    return [[name, judge_target(r[key]["ci95"], lo, hi), r[key]["ratio"], r[key]["ci95"]]
            for name, key, lo, hi in TARGETS]


def fmt_ci(d: dict) -> str:
    return f"{d['ratio']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"


def fmt_spread(d: dict) -> str:
    h = d.get("spread_halfwidth")
    return "" if h is None else f"{100 * h:.1f}%"


def write_md(path: Path, data: dict) -> None:
    env, cfg = data["env"], data["config"]
    lines = [f"# Latency: original vs folded vs no-BN ({data['tag']})", "",
             f"Generated by `benchmarks/latency.py` on {data['date']} ({data['seconds']:.0f} s)"
             + (f"; statistics recomputed from the raw samples on {data['reanalysed']} (`--reanalyse`)"
                if data.get("reanalysed") else "") + ".", "", "## Setup", "",
             f"- Device: {env.get('gpu') or env['cpu']} ({env['cpu_count']} CPU cores); {env['platform']}",
             f"- ONNX Runtime {env['onnxruntime']} ({cfg['ep']} provider; providers really used are listed per "
             f"runner in the JSON), PyTorch {env.get('torch')} eager on {cfg['ep']}",
             f"- Threads: {cfg['threads']} (intra-op; ORT spinning off), batch {cfg['batch']}",
             f"- Sessions: {cfg['sessions']} fresh sessions per architecture and runtime; each creates every runner "
             f"anew, warms each up {cfg['warmup']} times, then runs whole cycles of a balanced order (Williams "
             f"design: every runner equally often in every position) for at least {cfg['rounds']} rounds and "
             f"{cfg['session_time']} s",
             "- ORT levels: off = ORT_DISABLE_ALL, basic = ORT_ENABLE_BASIC (ORT folds Conv+BN itself here), "
             "all = ORT_ENABLE_ALL",
             f"- Load average (1, 5, 15 min) at start / end: {data['load_start']} / {data['load_end']}; per "
             f"architecture in the JSON: "
             + ("a loaded machine (load above the core count)." if max(data['load_start'][0], data['load_end'][0])
                > env['cpu_count'] else "a quiet machine (load at most the core count)."), "",
             "Intervals are 95% Student's t intervals over the sessions' own estimates (session medians; for a "
             "ratio, the median per-round log ratio of each order of the balanced design, averaged), so they "
             "include the session-to-session variation; ratios are paired by round within each session. Targets "
             "are judged on the intervals: met (the whole interval satisfies the target), missed (none of it "
             "does), undecided. `session-only +-` is the half-width the session spread alone leaves: where it "
             "exceeds a target's margin, more rounds cannot decide it, only more sessions.", ""]
    for arch, res in data["archs"].items():
        lines += [f"## {arch} {tuple(res['shape'])}", "", f"Fold: {res['folded_report']}. Load {res['load']}.", "",
                  "| ORT runner | p50 ms [95% CI] | p90 ms | p99 ms | session spread |", "|---|---:|---:|---:|---:|"]
        for name, st in res["ort"]["runners"].items():
            lines.append(f"| {name} | {st['p50_ms']:.2f} [{st['ci95_ms'][0]:.2f}, {st['ci95_ms'][1]:.2f}] | "
                         f"{st['p90_ms']:.2f} | {st['p99_ms']:.2f} | {100 * st['session_spread']:.0f}% |")
        lines += ["", "| ratio (ORT) | value [95% CI] | session-only +- |", "|---|---:|---:|"]
        lines += [f"| {k} | {fmt_ci(v)} | {fmt_spread(v)} |" for k, v in res["ort"]["ratios"].items()]
        lines += ["", "| PyTorch eager | p50 ms [95% CI] | session spread |", "|---|---:|---:|"]
        for name, st in res["torch"]["runners"].items():
            lines.append(f"| {name} | {st['p50_ms']:.2f} [{st['ci95_ms'][0]:.2f}, {st['ci95_ms'][1]:.2f}] | "
                         f"{100 * st['session_spread']:.0f}% |")
        lines += ["", "| ratio (PyTorch eager) | value [95% CI] |", "|---|---:|"]
        lines += [f"| {k} | {fmt_ci(v)} |" for k, v in res["torch"]["ratios"].items()]
        if res.get("levers"):
            lines += ["", "| CUDA lever (ORT all) | folded/original [95% CI] | folded/no-BN [95% CI] |", "|---|---:|---:|"]
            lines += [f"| {k} | {fmt_ci(v['folded/original'])} | {fmt_ci(v['folded/nobn'])} |"
                      for k, v in res["levers"].items()]
        lines += ["", "| target | verdict | ratio [95% CI] |", "|---|---|---:|"]
        lines += [f"| {name} | {'**' + v + '**' if v != 'met' else v} | {r:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] |"
                  for name, v, r, ci in res["targets"]]
        lines.append("")
    if data.get("previous"):
        pv = data["previous"]
        lines += ["## Earlier claims, re-judged", "",
                  f"The previous run ({pv['date']}: {pv['rounds']} rounds in one session, targets judged on point "
                  "estimates) against this one's intervals. *survived*: the earlier verdict stands on the interval; "
                  "*undecided*: the interval cannot tell; *overturned*: the interval says the opposite.", "",
                  "| architecture | target | earlier ratio (verdict) | now [95% CI] | now | earlier claim |",
                  "|---|---|---:|---:|---|---|"]
        for row in pv["rows"]:
            lines.append(f"| {row['arch']} | {row['target']} | {row['old_ratio']:.3f} ({'met' if row['old_met'] else 'missed'}) | "
                         f"{row['ratio']:.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] | {row['now']} | {row['fate']} |")
        lines.append("")
    lines += ["## What the numbers say", "", data.get("summary", ""), ""]
    path.write_text("\n".join(lines))


def compare_previous(old: dict, data: dict) -> dict:
    """Each earlier target verdict (point estimate) against this run's interval verdict."""
    rows = []
    for arch, res in data["archs"].items():
        if arch not in old.get("archs", {}):
            continue
        before = {t[0]: t for t in old["archs"][arch]["targets"]}
        for name, now, ratio, ci in res["targets"]:
            if name not in before:
                continue
            old_met = bool(before[name][1])
            fate = ("survived" if (now == "met") == old_met and now != "undecided" else
                    "undecided" if now == "undecided" else "overturned")
            rows.append({"arch": arch, "target": name, "old_ratio": float(before[name][2]), "old_met": old_met,
                         "now": now, "ratio": ratio, "ci95": ci, "fate": fate})
    return {"date": old.get("date"), "rounds": old.get("config", {}).get("rounds"), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="resnet18,resnet50,mobilenet,efficientnet,unet")
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=12, help="at least this many rounds per session")
    ap.add_argument("--session-time", type=float, default=1.0, help="at least this many seconds per session")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ep", default="cpu")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--previous", default=None, help="an earlier latency_TAG.json to re-judge")
    ap.add_argument("--reanalyse", default=None, help="recompute the statistics of this run's JSON (no timing)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import os
    t0 = time.time()
    old = json.loads(Path(args.previous).read_text()) if args.previous else None
    if args.reanalyse:
        reanalyse(Path(args.reanalyse), old, out_dir, args)
        log(f"re-analysed {args.reanalyse} -> {out_dir}/latency_{args.tag}.{{json,md}}")
        return
    data = {"tag": args.tag, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "env": environment(), "config": {k: v for k, v in vars(args).items() if k != "out"}, "archs": {},
            "load_start": [round(v, 2) for v in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as d:
        for arch in args.archs.split(","):
            shape = (args.batch,) + SHAPES.get(arch, zoo.get(arch).input_shape)[1:]
            log(f"{arch}: building {shape}")
            built = build(arch, shape, Path(d))
            load0 = [round(v, 2) for v in os.getloadavg()]
            log(f"{arch}: ORT, {len(LEVELS) * 4} runners x {args.sessions} sessions")
            ort_res = run_ort(arch, built, args)
            log(f"{arch}: PyTorch eager")
            torch_res = run_torch(arch, built, args)
            data["archs"][arch] = {"shape": list(shape), "folded_report": built["folded_report"], "ort": ort_res,
                                   "torch": torch_res, "targets": verdicts(ort_res),
                                   "load": [load0, [round(v, 2) for v in os.getloadavg()]]}
            if args.ep == "cuda":
                log(f"{arch}: CUDA levers ({', '.join(LEVERS)})")
                data["archs"][arch]["levers"] = run_levers(built, args)
            for name, v, r, ci in data["archs"][arch]["targets"]:
                log(f"  {name}: {v} ({r:.3f} [{ci[0]:.3f}, {ci[1]:.3f}])")
            write_all(data, old, out_dir, args, t0)  # after every architecture: a cut-short run keeps its part
    write_all(data, old, out_dir, args, t0)
    log(f"wrote {out_dir}/latency_{args.tag}.{{json,md}}")


def write_all(data: dict, old: dict | None, out_dir: Path, args, t0: float) -> None:
    import os
    data["load_end"] = [round(v, 2) for v in os.getloadavg()]
    data["seconds"] = round(time.time() - t0, 1)
    if old:
        data["previous"] = compare_previous(old, data)
    data["summary"] = summarize_findings(data)
    (out_dir / f"latency_{args.tag}.json").write_text(json.dumps(data, indent=1))
    write_md(out_dir / f"latency_{args.tag}.md", data)


def summarize_findings(data: dict) -> str:
    parts = []
    targets = [(a, t) for a, r in data["archs"].items() for t in r["targets"]]
    count = {v: sum(t[1] == v for _, t in targets) for v in ("met", "missed", "undecided")}
    parts.append(f"Of {len(targets)} target checks, judged on the 95% intervals: {count['met']} met, "
                 f"{count['missed']} missed, {count['undecided']} undecided (the interval straddles the target).")
    for arch, r in data["archs"].items():
        o = r["ort"]["ratios"]
        t = r["torch"]["ratios"]
        parts.append(
            f"{arch}: folded/original with ORT optimizations off {fmt_ci(o['folded/original@off'])}, at basic "
            f"{fmt_ci(o['folded/original@basic'])}, at all {fmt_ci(o['folded/original@all'])}; folded@off / "
            f"original@basic {fmt_ci(o['folded@off/original@basic'])}; folded/no-BN at all "
            f"{fmt_ci(o['folded/nobn@all'])}; PyTorch eager folded/original {fmt_ci(t['folded/original'])}.")
    missed = [(a, t) for a, t in targets if t[1] == "missed"]
    if missed:
        parts.append("Missed: " + "; ".join(f"{a} {t[0]} ({t[2]:.3f} [{t[3][0]:.3f}, {t[3][1]:.3f}])"
                                            for a, t in missed) + ".")
    gap = []
    for arch, r in data["archs"].items():
        o = r["ort"]["ratios"]
        for level in LEVELS:
            if o[f"folded/nobn@{level}"]["ci95"][0] > 1.03:
                gap.append(f"{arch}@{level}: folded/no-BN {fmt_ci(o[f'folded/nobn@{level}'])}, folded/no-BN-with-bias "
                           f"{fmt_ci(o[f'folded/nobn_bias@{level}'])}")
    if gap:
        parts.append("Where folded is surely more than 3% behind the no-BN floor, compare it with the same floor plus "
                     "a bias on every conv (the structure folding must produce, since b' = beta - mean*s is not "
                     "zero): " + "; ".join(gap) + ". When folded matches the with-bias floor, the gap is the bias "
                     "add itself, not something a better fold could remove.")
    if data.get("previous"):
        rows = data["previous"]["rows"]
        fates = {f: sum(r["fate"] == f for r in rows) for f in ("survived", "undecided", "overturned")}
        parts.append(f"Earlier target verdicts (point estimates, one session): {fates['survived']} survived, "
                     f"{fates['undecided']} undecided, {fates['overturned']} overturned on this run's intervals.")
    return "\n\n".join(parts)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
