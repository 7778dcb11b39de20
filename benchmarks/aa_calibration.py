"""A/A calibration of ``bnfold bench`` on this machine: does a 95% interval exclude 1 about 5% of the time when
the true ratio is 1, and is the median ratio 1 whatever the listing order?

One small model (the demo's ``small_resnet``, BatchNorm kept) is benchmarked against copies of itself; every
ratio's true value is 1. Sections:

1. **calibration**: ``--calls`` separate ``aa_check`` benchmarks of ``--copies`` copies at each of ``--levels``
   (bench's defaults otherwise: fresh sessions in balanced order, Student's t over the sessions' estimates;
   disjoint pairs of copies, so the comparisons are independent): how many 95% intervals exclude 1 (target
   <= 7% over >= 100 comparisons; two-sided binomial p against 5%), the median ratio overall and per listing
   position (target within +-0.5% of 1). The same raw samples are re-analysed the old way (every round of every
   session pooled into one sample, so only the rounds' noise counts) to show what the session level changes.
2. **threads and spinning**: A/A pairs (two copies) under three CPU settings, interleaved call by call in
   balanced order: ORT's default intra-op threads with spinning off (bench's default), the same with spinning on
   (ORT's default), and one intra-op thread. Per setting: exclusion rate, median ratio, median interval width,
   median latency and session-to-session spread.
3. **acceptance**: ``--accept-calls`` separate ``bnfold bench --aa M --aa-copies 4 --aa-repeats 1 --json``
   processes (the command's defaults): at most 10% of the intervals exclude 1, median ratio within 0.5% of 1.
4. **demo reruns**: ``bnfold demo`` run ``--demo-reruns`` times; the closing lines and whether any latency
   difference one run names is contradicted by another (its interval on the other side of 1).

The load average is recorded before and after every section (the results say whether the machine was
quiet). Usage::

    python benchmarks/aa_calibration.py [--calls 35] [--copies 4] [--levels off,all] [--iters 96]
        [--sessions 8] [--spin-calls 12] [--accept-calls 8] [--demo-reruns 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bnfold.bench import (
    aa_check,
    bench,
    binomial_two_sided,
    environment,
    ratio_ci,
    sign_test,
    williams_orders,
)

HERE = Path(__file__).parent


def log(msg: str) -> None:
    print(f"[aa {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def naive_ci(a_sessions, b_sessions) -> list[float]:
    """The method bench used before sessions: every round pooled into one sample, so the interval sees the
    rounds' noise only (the same closed-form statistics as bench, given a single session)."""
    a = np.concatenate([np.asarray(s) for s in a_sessions])
    b = np.concatenate([np.asarray(s) for s in b_sessions])
    return ratio_ci(a, b)["ci95"]


def pairs(results: list) -> list[tuple[int, dict, dict]]:
    """Disjoint pairs of one setting's copies, as ``aa_check`` compares them: (position, #2k, #2k-1)."""
    return [(pos + 1, results[pos], results[pos - 1]) for pos in range(1, len(results), 2)]


def excludes(ci) -> bool:
    return bool(ci[0] > 1 or ci[1] < 1)


def stats(comps: list[dict]) -> dict:
    n = len(comps)
    k = sum(c["excludes_1"] for c in comps)
    ratios = [c["ratio"] for c in comps]
    by_pos: dict[int, list[float]] = {}
    for c in comps:
        by_pos.setdefault(c["position"], []).append(c["ratio"])
    return {"comparisons": n, "excluded": k, "exclusion_rate": k / n if n else None,
            "binomial_p": binomial_two_sided(k, n, 0.05), "median_ratio": float(np.median(ratios)),
            "median_ratio_by_position": {str(p): float(np.median(v)) for p, v in sorted(by_pos.items())},
            "sign_test_p_by_position": {str(p): sign_test(v) for p, v in sorted(by_pos.items())},
            "median_width": float(np.median([c["ci95"][1] / c["ci95"][0] - 1 for c in comps]))}


def calibration(model: Path, args) -> dict:
    log(f"calibration: {args.calls} calls x {args.copies} copies x levels {args.levels}")
    t0, l0 = time.time(), load()
    res = aa_check(str(model), copies=args.copies, repeats=args.calls, opt_levels=tuple(args.levels.split(",")),
                   iters=args.iters, sessions=args.sessions, warmup=args.warmup,
                   progress=lambda k, n: log(f"  call {k + 1}/{n}") if k % 5 == 0 else None)
    naive = []
    for run in res.runs:
        by_setting: dict[str, list] = {}
        for r in run["results"]:
            by_setting.setdefault((r["ep"], r["opt_level"], r["batch"]), []).append(r)
        for rs in by_setting.values():
            for pos, r, base in pairs(rs):
                ci = naive_ci(r["samples_ms"], base["samples_ms"])
                ratio = float(np.median(np.concatenate(r["samples_ms"])) / np.median(np.concatenate(base["samples_ms"])))
                naive.append({"position": pos, "ratio": ratio, "ci95": ci, "excludes_1": excludes(ci)})
    spreads = [r["session_spread"] for run in res.runs for r in run["results"]]
    return {"summary": res.summary(), "stats": stats(res.comparisons), "naive_stats": stats(naive),
            "comparisons": res.comparisons, "session_spread_median": float(np.median(spreads)),
            "session_spread_max": float(np.max(spreads)), "seconds": round(time.time() - t0, 1),
            "load_start": l0, "load_end": load(), "runs": res.runs}


# "default threads": ONNX Runtime's own choice (threads=0; 2 intra-op threads on a 2-core machine)
def reanalyse(path: Path) -> dict:
    """The calibration section of an earlier run, its raw samples re-analysed with the current statistics
    (disjoint pairs of copies, as the self-check compares them now)."""
    old = json.loads(Path(path).read_text())
    comps = []
    for run in old["calibration"]["runs"]:
        by: dict = {}
        for r in run["results"]:
            by.setdefault((r["ep"], r["opt_level"], r["batch"]), []).append(r)
        for rs in by.values():
            for pos, r, base in pairs(rs):
                rc = ratio_ci(r["samples_ms"], base["samples_ms"], block=len(williams_orders(len(rs))))
                comps.append({"position": pos, "ratio": rc["ratio"], "ci95": rc["ci95"], "excludes_1": excludes(rc["ci95"])})
    cfg = old["calibration"]["runs"][0]["config"]
    return {"date": old["date"], "threads": cfg.get("threads"), "calls": len(old["calibration"]["runs"]),
            "stats": stats(comps), "load": [old["calibration"]["load_start"], old["calibration"]["load_end"]]}


SPIN_CONFIGS = {"default threads, spinning off": {"threads": 0, "spin": False},
                "default threads, spinning on": {"threads": 0, "spin": True},
                "1 thread": {"threads": 1, "spin": False}}


def spinning(model: Path, args) -> dict:
    log(f"threads/spinning: {args.spin_calls} A/A pairs per setting")
    t0, l0 = time.time(), load()
    names = list(SPIN_CONFIGS)
    rows = williams_orders(len(names))
    comps: dict[str, list] = {n: [] for n in names}
    p50: dict[str, list] = {n: [] for n in names}
    spread: dict[str, list] = {n: [] for n in names}
    for call in range(args.spin_calls):
        for j in rows[call % len(rows)]:
            name = names[j]
            run = bench([str(model)] * 2, opt_levels=("all",), iters=args.iters, sessions=args.sessions,
                        warmup=args.warmup, **SPIN_CONFIGS[name])
            r0, r1 = run.results
            comps[name].append({"position": 2, "ratio": r1.ratio, "ci95": r1.ratio_ci95,
                                "excludes_1": excludes(r1.ratio_ci95)})
            p50[name] += [r0.p50_ms, r1.p50_ms]
            spread[name] += [r0.session_spread, r1.session_spread]
    out = {}
    for n in names:
        out[n] = {**SPIN_CONFIGS[n], **stats(comps[n]), "median_p50_ms": float(np.median(p50[n])),
                  "median_session_spread": float(np.median(spread[n])), "comparisons_detail": comps[n]}
    return {"settings": out, "seconds": round(time.time() - t0, 1), "load_start": l0, "load_end": load()}


def acceptance(model: Path, args) -> dict:
    log(f"acceptance: {args.accept_calls} separate `bnfold bench --aa` calls, 4 copies each")
    t0, l0 = time.time(), load()
    exe = shutil.which("bnfold")
    comps, lines = [], []
    for call in range(args.accept_calls):
        p = subprocess.run([exe, "bench", "--aa", str(model), "--aa-copies", "4", "--aa-repeats", "1", "--json"],
                           capture_output=True, text=True, timeout=900)
        if p.returncode not in (0, 1):  # 1: this call's self-check failed, which the statistics below count
            raise RuntimeError(p.stderr)
        data = json.loads(p.stdout)
        lines.append(p.stderr.strip().splitlines()[-1])
        for c in data["comparisons"]:
            comps.append({"call": call, "position": c["position"], "ratio": c["ratio"], "ci95": c["ci95"],
                          "excludes_1": excludes(c["ci95"])})
    data = data["runs"][-1]
    st = stats(comps)
    st["passed"] = bool(st["exclusion_rate"] <= 0.10 and abs(st["median_ratio"] - 1) <= 0.005)
    return {"stats": st, "comparisons": comps, "done_lines": lines, "config": data["config"],
            "seconds": round(time.time() - t0, 1), "load_start": l0, "load_end": load()}


def demo_reruns(args) -> dict:
    log(f"demo: {args.demo_reruns} runs")
    t0, l0 = time.time(), load()
    exe = shutil.which("bnfold")
    runs = []
    with tempfile.TemporaryDirectory() as d:
        for k in range(args.demo_reruns):
            out = Path(d) / f"demo{k}"
            p = subprocess.run([exe, "demo", "-o", str(out)], capture_output=True, text=True, timeout=900)
            report = json.loads((out / "report.json").read_text())
            runs.append({"rc": p.returncode, "line": (p.stdout + p.stderr).strip().splitlines()[-1],
                         "comparisons": report["latency"]["comparisons"], "flags": report["latency"]["flags"],
                         "load": report["bench"]["config"].get("load_start")})
    contradictions = []
    for i, a in enumerate(runs):
        for c in a["comparisons"]:
            if c["verdict"] == "none":
                continue
            for j, b in enumerate(runs):
                other = next(x for x in b["comparisons"] if x["setting"] == c["setting"])
                wrong_side = other["ci95"][0] > 1 if c["verdict"] == "faster" else other["ci95"][1] < 1
                if i != j and wrong_side:
                    contradictions.append(f"run {i + 1} names {c['setting']} {c['text']}; run {j + 1}: {other['text']}")
    return {"runs": runs, "contradictions": contradictions, "seconds": round(time.time() - t0, 1),
            "load_start": l0, "load_end": load()}


def fmt_pos(d: dict) -> str:
    return ", ".join(f"#{k} {v:.4f}" for k, v in d.items())


def write_md(path: Path, data: dict) -> None:
    env, cfg = data["env"], data["config"]
    cal = data.get("calibration")
    lines = ["# A/A calibration of `bnfold bench` (CPU)", "",
             f"Generated by `benchmarks/aa_calibration.py` on {data['date']}; {data['seconds']:.0f} s in all."
             + (f" Sections kept from an earlier run: {', '.join(data['kept'])}." if data.get("kept") else ""), "",
             "## Setup", "",
             f"- {env['cpu']} ({env['cpu_count']} cores), {env['platform']}; ONNX Runtime {env['onnxruntime']}, "
             f"torch {env.get('torch')}",
             f"- Model: zoo `{cfg['model']}` exported with its BatchNorms kept, benchmarked against copies of itself "
             "(every ratio's true value is 1)",
             f"- Load average (1, 5, 15 min) at start / end: {data['load_start']} / {data['load_end']}: "
             + ("a loaded machine (load above the core count)." if max(data['load_start'][0], data['load_end'][0])
                > env['cpu_count'] else "a quiet machine (load at most the core count)."),
             ""]
    if cal:
        s, n = cal["stats"], cal["naive_stats"]
        lines += ["## 1. Calibration", "",
                  f"{cfg['calls']} separate benchmarks of {cfg['copies']} copies at opt levels {cfg['levels']}, "
                  f"{cfg['sessions']} fresh sessions x {cfg['iters'] // cfg['sessions']}+ rounds per setting "
                  f"(at least {cal['runs'][0]['config']['min_session_s']} s each, in whole cycles of the balanced "
                  f"order), warm-up {cfg['warmup']}, bench's defaults otherwise ({cal['runs'][0]['config']['threads']} "
                  f"intra-op thread(s), spinning off). Load {cal['load_start']} -> {cal['load_end']}; "
                  f"{cal['seconds']:.0f} s.", "",
                  "| method | comparisons | intervals excluding 1 | median ratio | median by listing position | "
                  "median interval width |", "|---|---:|---:|---:|---|---:|",
                  f"| two-stage, t over sessions (bench now) | {s['comparisons']} | {s['excluded']} ({100 * s['exclusion_rate']:.1f}%) | "
                  f"{s['median_ratio']:.4f} | {fmt_pos(s['median_ratio_by_position'])} | {100 * s['median_width']:.1f}% |",
                  f"| pooled rounds, one level (bench before) | {n['comparisons']} | {n['excluded']} "
                  f"({100 * n['exclusion_rate']:.1f}%) | {n['median_ratio']:.4f} | {fmt_pos(n['median_ratio_by_position'])} "
                  f"| {100 * n['median_width']:.1f}% |", "",
                  f"Targets: at most 7% of intervals exclude 1 -> **{'met' if s['exclusion_rate'] <= 0.07 else 'missed'}** "
                  f"({100 * s['exclusion_rate']:.1f}%, two-sided binomial p against a true 5%: {s['binomial_p']:.2g}); median "
                  f"ratio within +-0.5% of 1 at every listing position -> "
                  f"**{'met' if cal['summary']['median_within_0.5%'] else 'missed'}**. Sign test per position "
                  f"(p): {', '.join(f'#{k} {v:.2g}' for k, v in s['sign_test_p_by_position'].items())}. Session "
                  f"medians of one model differed by {100 * cal['session_spread_median']:.0f}% (median) and up to "
                  f"{100 * cal['session_spread_max']:.0f}%.", ""]
    ra = data.get("reanalysed")
    if ra:
        s = ra["stats"]
        lines += ["### 1b. An earlier calibration, re-analysed", "",
                  f"The raw samples of the run of {ra['date']} ({ra['calls']} benchmarks, ONNX Runtime's default "
                  f"threads (2 here), load {ra['load'][0]} -> {ra['load'][1]}), analysed with the current statistics: "
                  f"{s['excluded']} of {s['comparisons']} intervals exclude 1 ({100 * s['exclusion_rate']:.1f}%); median "
                  f"ratio {s['median_ratio']:.4f}, by listing position {fmt_pos(s['median_ratio_by_position'])}; "
                  f"median interval width {100 * s['median_width']:.1f}%.", ""]
    sp = data.get("spinning")
    if sp:
        lines += ["## 2. Threads and spinning", "",
                  f"A/A pairs (two copies, opt level all), {cfg['spin_calls']} benchmarks per setting, the settings "
                  f"interleaved call by call in balanced order. Load {sp['load_start']} -> {sp['load_end']}; "
                  f"{sp['seconds']:.0f} s.", "",
                  "| setting | A/A intervals excluding 1 | median ratio | median interval width | median p50 ms | "
                  "median session spread |", "|---|---:|---:|---:|---:|---:|"]
        for name, v in sp["settings"].items():
            lines.append(f"| {name} | {v['excluded']} of {v['comparisons']} | {v['median_ratio']:.4f} | "
                         f"{100 * v['median_width']:.1f}% | {v['median_p50_ms']:.3f} | "
                         f"{100 * v['median_session_spread']:.0f}% |")
        lines += ["", data.get("spin_note", ""), ""]
    acc = data.get("acceptance")
    if acc:
        s = acc["stats"]
        lines += ["## 3. Acceptance: four copies, separate `bnfold bench --aa` calls", "",
                  f"`bnfold bench --aa M --aa-copies 4 --aa-repeats 1 --json` with the command's defaults ({acc['config']['sessions']} sessions x "
                  f"{acc['config']['rounds_per_session']} rounds, opt level {acc['config']['opt_levels']}), "
                  f"{len(acc['done_lines'])} processes. Load {acc['load_start']} -> {acc['load_end']}; "
                  f"{acc['seconds']:.0f} s.", "",
                  f"- {s['excluded']} of {s['comparisons']} intervals exclude 1 ({100 * s['exclusion_rate']:.1f}%; "
                  f"allowed 10%); median ratio {s['median_ratio']:.4f} (allowed 1 +- 0.005); by position "
                  f"{fmt_pos(s['median_ratio_by_position'])} -> **{'PASSED' if s['passed'] else 'FAILED'}**", "",
                  "Ratios and intervals:", ""]
        lines += [f"- call {c['call'] + 1}, copy #{c['position']}: {c['ratio']:.4f} [{c['ci95'][0]:.4f}, "
                  f"{c['ci95'][1]:.4f}]{' (excludes 1)' if c['excludes_1'] else ''}" for c in acc["comparisons"]]
        lines.append("")
    dm = data.get("demo")
    if dm:
        lines += ["## 4. The demo's closing line, rerun", "",
                  f"`bnfold demo` run {len(dm['runs'])} times in a row. Load {dm['load_start']} -> {dm['load_end']}.",
                  ""]
        lines += [f"{k + 1}. `{r['line']}`" for k, r in enumerate(dm["runs"])]
        lines += ["", "Contradictions (a named difference that another run's interval puts on the other side of 1): "
                  + ("; ".join(dm["contradictions"]) if dm["contradictions"] else "none") + ".", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small_resnet")
    ap.add_argument("--calls", type=int, default=35)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--levels", default="off,all")
    ap.add_argument("--iters", type=int, default=96)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--spin-calls", type=int, default=12)
    ap.add_argument("--accept-calls", type=int, default=8)
    ap.add_argument("--demo-reruns", type=int, default=3)
    ap.add_argument("--sections", default="calibration,spinning,acceptance,demo")
    ap.add_argument("--keep-from", default=None, help="copy the sections not run now from this earlier JSON")
    ap.add_argument("--reanalyse-from", default=None, help="re-analyse an earlier JSON's calibration section")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    sections = args.sections.split(",")
    t0 = time.time()
    data = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "env": environment(),
            "config": vars(args), "load_start": load()}
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / f"{args.model}.onnx"
        p = subprocess.run([shutil.which("bnfold"), "export", args.model, "--no-fold", "-o", str(model)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stderr)
        if "calibration" in sections:
            data["calibration"] = calibration(model, args)
            s = data["calibration"]["stats"]
            log(f"  {s['excluded']}/{s['comparisons']} exclude 1; median {s['median_ratio']:.4f}; "
                f"naive {data['calibration']['naive_stats']['excluded']}")
        if "spinning" in sections:
            data["spinning"] = spinning(model, args)
            for n, v in data["spinning"]["settings"].items():
                log(f"  {n}: {v['excluded']}/{v['comparisons']}, width {100 * v['median_width']:.1f}%, "
                    f"p50 {v['median_p50_ms']:.3f}")
        if "acceptance" in sections:
            data["acceptance"] = acceptance(model, args)
            log(f"  {data['acceptance']['stats']}")
        if "demo" in sections:
            data["demo"] = demo_reruns(args)
            log(f"  contradictions: {data['demo']['contradictions']}")
    data["load_end"] = load()
    data["seconds"] = round(time.time() - t0, 1)
    if args.reanalyse_from:
        data["reanalysed"] = reanalyse(Path(args.reanalyse_from))
    if args.keep_from:
        kept = json.loads(Path(args.keep_from).read_text())
        for sec in ("calibration", "spinning", "acceptance", "demo"):  # not "reanalysed"
            if sec not in sections and sec in kept:
                data[sec] = kept[sec]
                data.setdefault("kept", []).append(f"{sec} (from the run of {kept['date']})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"latency_aa_{args.tag}.json").write_text(json.dumps(data, indent=1) + "\n")
    write_md(out / f"latency_aa_{args.tag}.md", data)
    log(f"wrote {out}/latency_aa_{args.tag}.{{json,md}}")


if __name__ == "__main__":
    main()
