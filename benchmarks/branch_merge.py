"""Branch merge on real networks: bnfold's ONNX fold of a branched export vs timm's own ``reparameterize_model``.

For each timm family trained with parallel branches (RepVGG, MobileOne, FastViT, RepViT, RepGhost) one model is
built with random weights and randomized BatchNorm statistics (every BN's weight, bias, running mean and variance
drawn from a seeded generator), in eval mode, with its training-time branches, and three ONNX files are made:

* ``branched``: the model exported as it is (dynamo exporter, ``optimize=False``, BN kept: ``bnfold.export``);
* ``bnfold``: ``branched`` folded by bnfold's ONNX pass (default options: branch merge on);
* ``timm``: a deep copy after timm's ``reparameterize_model`` (each block's own ``reparameterize()``), exported
  the same way.

Reported per family: Conv and BatchNormalization node counts of each file; max abs error (and max abs error over
max |ref|) of ``bnfold`` and ``timm`` against ``branched`` on the same random batch (ONNX Runtime CPU,
optimizations off); ``bnfold verify branched bnfold`` passed or not; and ONNX Runtime CPU latency (all
optimizations, one intra-op thread) of the three files timed side by side with ``bnfold.bench`` (fresh sessions
of balanced order, hierarchical-bootstrap 95% intervals of each median and of each ratio to ``branched``).
Acceptance (issue 19): for every family ``bnfold`` has no more Conv and no more BN nodes than ``timm`` and
matches ``branched`` (verify passes).

Needs timm (``/work/venv-timm``); run from the repository root::

    PYTHONPATH=. /work/venv-timm/bin/python benchmarks/branch_merge.py [--models repvgg_a0,...]
        [--sessions 6] [--iters 60] [--img 224] [--out benchmarks/results] [--no-latency]

Writes ``branch_merge_cpu.json`` (with every raw sample) and ``branch_merge_cpu.md`` to ``--out``.
``--smoke`` runs everything with tiny settings (64x64 input, 3 sessions, few rounds) into a temporary directory
unless ``--out`` is given: its timings are not results.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

FAMILIES = ("repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_050")


def randomize_bn(model, seed: int) -> int:
    """Give every BatchNorm (subclasses included) random affine parameters and running statistics."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.running_mean.shape[0]
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
            n += 1
    return n


def count(model: onnx.ModelProto, op: str) -> int:
    from bnfold.onnx_io import walk_graphs
    return sum(n.op_type == op for g in walk_graphs(model.graph) for n in g.node)


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def build(name: str, img: int, seed: int, workdir: Path) -> dict:
    import timm
    import torch
    from timm.utils.model import reparameterize_model

    from bnfold import fold_model
    from bnfold.export import export_onnx
    from bnfold.verify import verify

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    n_bn = randomize_bn(model, seed)
    example = (torch.randn(1, 3, img, img),)
    paths = {k: workdir / f"{name}_{k}.onnx" for k in ("branched", "bnfold", "timm")}
    branched = export_onnx(model, example, keep_bn=True)
    onnx.save(branched, paths["branched"])
    folded, report = fold_model(branched, name=name)
    onnx.save(folded, paths["bnfold"])
    rep = reparameterize_model(copy.deepcopy(model))
    onnx.save(export_onnx(rep, example, keep_bn=True), paths["timm"])
    x = np.random.default_rng(seed).standard_normal((2, 3, img, img)).astype(np.float32)
    ref = run_ort(paths["branched"], x)
    with torch.no_grad():
        eager = model(torch.from_numpy(x)).numpy()
    row = {"model": name, "img": img, "bn_modules": n_bn, "paths": {k: str(v) for k, v in paths.items()},
           "report": {"bn_total": report.bn_total, "folded": report.folded, "skipped": report.skipped,
                      "branches_merged": report.branches_merged, "merges_refused": report.merges_refused,
                      "skipped_reasons": sorted({e.reason for e in report.entries if e.status == "skipped"})},
           "export_vs_eager_max_abs": float(np.max(np.abs(ref.astype(np.float64) - eager))),
           "ref_max_abs": float(np.max(np.abs(ref)))}
    for k in ("branched", "bnfold", "timm"):
        m = onnx.load(paths[k])
        row[f"{k}_conv"], row[f"{k}_bn"] = count(m, "Conv"), count(m, "BatchNormalization")
        if k != "branched":
            err = float(np.max(np.abs(run_ort(paths[k], x).astype(np.float64) - ref)))
            row[f"{k}_max_abs_err"] = err
            row[f"{k}_max_rel_err"] = err / max(row["ref_max_abs"], 1e-30)
    v = verify(str(paths["branched"]), str(paths["bnfold"]), batch=2, seed=seed)
    row["bnfold_verify_passed"] = bool(v.passed)
    row["acceptance"] = bool(row["bnfold_conv"] <= row["timm_conv"] and row["bnfold_bn"] <= row["timm_bn"]
                             and v.passed)
    return row


def latency(row: dict, *, sessions: int, iters: int, min_session_s: float) -> dict:
    from bnfold.bench import bench, describe

    paths = [row["paths"][k] for k in ("branched", "bnfold", "timm")]
    run = bench(paths, opt_levels=("all",), threads=1, sessions=sessions, iters=iters, labels=["branched", "bnfold",
                                                                                                  "timm"],
                min_session_s=min_session_s)
    out = {"config": run.config, "env": run.env, "results": [r.to_dict(True) for r in run.results]}
    for r in run.results:
        row[f"{r.model}_p50_ms"], row[f"{r.model}_ci95_ms"] = r.p50_ms, r.ci95_ms
        if r.model != "branched":
            row[f"{r.model}_ratio"], row[f"{r.model}_ratio_ci95"] = r.ratio, r.ratio_ci95
            row[f"{r.model}_verdict"] = describe(r.ratio, r.ratio_ci95)
    return out


def markdown(rows: list[dict], config: dict) -> str:
    lines = [f"# Branch merge: bnfold vs timm reparameterize_model ({config['date']})", "",
             f"Input 1x3x{config['img']}x{config['img']} (counts/errors: batch 2), random weights, randomized BN "
             "statistics, seed " f"{config['seed']}. Errors: ONNX Runtime CPU, optimizations off, against the "
             "branched export.", "",
             "| model | Conv branched / bnfold / timm | BN branched / bnfold / timm | max err bnfold (rel) | "
             "max err timm (rel) | verify | accept |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['branched_conv']} / {r['bnfold_conv']} / {r['timm_conv']} | "
                     f"{r['branched_bn']} / {r['bnfold_bn']} / {r['timm_bn']} | "
                     f"{r['bnfold_max_abs_err']:.2e} ({r['bnfold_max_rel_err']:.1e}) | "
                     f"{r['timm_max_abs_err']:.2e} ({r['timm_max_rel_err']:.1e}) | "
                     f"{'PASS' if r['bnfold_verify_passed'] else 'FAIL'} | {'yes' if r['acceptance'] else 'NO'} |")
    if any("branched_p50_ms" in r for r in rows):
        lines += ["", "ONNX Runtime CPU, all optimizations, 1 thread; p50 ms [95% CI]; ratio to branched [95% CI]:", "",
                  "| model | branched | bnfold | timm | bnfold / branched | timm / branched |", "|---|---|---|---|---|---|"]
        for r in rows:
            if "branched_p50_ms" not in r:
                continue

            def ms(k, r=r):
                lo, hi = r[f"{k}_ci95_ms"]
                return f"{r[f'{k}_p50_ms']:.2f} [{lo:.2f}, {hi:.2f}]"

            def ratio(k, r=r):
                lo, hi = r[f"{k}_ratio_ci95"]
                return f"{r[f'{k}_ratio']:.3f} [{lo:.3f}, {hi:.3f}]"
            lines.append(f"| {r['model']} | {ms('branched')} | {ms('bnfold')} | {ms('timm')} | {ratio('bnfold')} | "
                         f"{ratio('timm')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(FAMILIES))
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--iters", type=int, default=60, help="rounds in all, over the sessions")
    ap.add_argument("--min-session-s", type=float, default=1.0)
    ap.add_argument("--no-latency", action="store_true", help="counts, errors and verify only")
    ap.add_argument("--smoke", action="store_true", help="tiny settings; results go to a temporary directory")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.img, args.sessions, args.iters, args.min_session_s = 64, 3, 18, 0.1
    out = args.out or (Path(tempfile.mkdtemp(prefix="branch_merge_smoke_")) if args.smoke else
                       Path("benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    config = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "img": args.img,
              "seed": args.seed, "sessions": args.sessions, "iters": args.iters, "smoke": args.smoke}
    rows, timings = [], {}
    with tempfile.TemporaryDirectory(prefix="branch_merge_") as tmp:
        for name in [m for m in args.models.split(",") if m]:
            print(f"{name}: building and exporting", file=sys.stderr, flush=True)
            row = build(name, args.img, args.seed, Path(tmp))
            if not args.no_latency:
                print(f"{name}: timing", file=sys.stderr, flush=True)
                timings[name] = latency(row, sessions=args.sessions, iters=args.iters,
                                        min_session_s=args.min_session_s)
            row.pop("paths")
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if "ci95" not in k}), file=sys.stderr, flush=True)
    (out / "branch_merge_cpu.json").write_text(json.dumps({"config": config, "rows": rows, "latency": timings},
                                                          indent=1) + "\n")
    (out / "branch_merge_cpu.md").write_text(markdown(rows, config))
    print(markdown(rows, config))
    print(f"written to {out}", file=sys.stderr)
    return 0 if all(r["acceptance"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
