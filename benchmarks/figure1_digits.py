"""Reproduce Figure 1 of the BatchNorm paper (Ioffe & Szegedy, 2015) on scikit-learn's 8x8 digits.

The paper trains, on MNIST, a network with 3 fully-connected hidden layers of 100 sigmoid units each, with and
without BatchNorm before every nonlinearity, using plain SGD on mini-batches of 60, and shows

(a) test accuracy against training steps: the BN network reaches a higher accuracy sooner;
(b, c) the {15, 50, 85}th percentiles of the input to one sigmoid of the last hidden layer, over training:
    without BN (b) the distribution drifts in mean and spread, with BN (c) it stays put.

This script runs the same experiment on the 1,797 handwritten 8x8 digits bundled with scikit-learn (inputs scaled
to [0, 1]) and also checks a third claim: BN keeps training at learning rates where the plain network does not.

Setup (all of it is recorded in the JSON):

* data: :func:`bnfold.data.load_digits`, split 80/20 with :func:`bnfold.train.split` and a fixed split seed
  (the same split for every run);
* network: :class:`bnfold.models.zoo.MnistMLP` (``in_features=64, hidden=100, classes=10``), with ``bn=True``
  (Linear, BatchNorm1d, Sigmoid) x 3 or ``bn=False`` (Linear, Identity, Sigmoid) x 3, then a Linear head; PyTorch's
  default initialisation. With the same seed both networks start from the same Linear weights and see the same
  mini-batches, so every (seed, lr) pair is a paired comparison;
* training: cross-entropy, ``torch.optim.SGD`` without momentum or weight decay, a constant learning rate, batches
  of 60 drawn by reshuffling the training set every epoch (the last batch of an epoch has the remainder);
* evaluation every ``--eval-every`` steps (and at step 0) on the held-out test set, in inference mode
  (``model.eval()``: BN normalises with its momentum running averages). At the same time the input to the sigmoid
  of unit ``--unit`` of the last hidden layer (the output of ``features[7]``: the BN, or the Identity of the plain
  net) is recorded over the test set as its 15th/50th/85th percentiles (linear interpolation). Drift statistics
  are also computed for all 100 units of that layer, so that the chosen unit can be checked to be typical;
* after training, the BN network's test accuracy is reported twice: with the momentum running averages, and with
  Algorithm 2's population statistics (:func:`bnfold.calibrate.population_statistics` over the training set in
  batches of 60);
* a run whose training loss becomes non-finite is stopped and recorded as diverged.

Figure: ``figure1.png`` with (a) test accuracy vs steps at ``--shared-lr`` (mean over seeds, band = min..max),
(b, c) the percentiles of the chosen sigmoid input without and with BN (first seed, shared lr), (d) final and
peak test accuracy against the learning rate for both networks.

Usage::

    python benchmarks/figure1_digits.py [--steps 6000] [--seeds 3] [--out docs]

The default learning-rate ladder is 0.1, 0.3, 1, 3, 10, 30, 100 with a shared rate of 1 for panels (a)-(c): on
digits the plain sigmoid network is still on its initial plateau for thousands of steps at 0.1, and 1 is close to
its best rate, so the comparison at the shared rate does not handicap it. About 3.5 minutes on one CPU thread.

Writes ``figure1.json`` (all numbers), ``figure1.png`` and ``figure1.md`` (setup, tables, verdicts) into ``--out``.
Deterministic for a given set of arguments on a given machine (one CPU thread by default).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bnfold.calibrate import population_statistics
from bnfold.data import load_digits
from bnfold.models.zoo import MnistMLP
from bnfold.train import batches as index_batches
from bnfold.train import split

PERCENTILES = (15, 50, 85)
#: |sigmoid input| above this counts as saturated: sigmoid < 0.01 or > 0.99 (log(99) = 4.595)
SATURATED = math.log(99.0)
NETS = ("plain", "bn")
LABEL = {"plain": "without BN", "bn": "with BN"}
COLOR = {"plain": "tab:red", "bn": "tab:blue"}


def log(msg: str) -> None:
    print(f"[figure1 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- one run
def _pre_sigmoid_and_logits(model: MnistMLP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs to the last hidden layer's sigmoids (output of ``features[7]``) and the logits, in one pass."""
    h = model.features[:8](x)
    return h, model.head(model.features[8](h))


def _evaluate(model: MnistMLP, x: torch.Tensor, y: torch.Tensor, unit: int, q: torch.Tensor):
    model.eval()
    with torch.no_grad():
        h, logits = _pre_sigmoid_and_logits(model, x)
    acc = (logits.argmax(1) == y).float().mean().item()
    pct_all = torch.quantile(h.double(), q, dim=0)  # (3, hidden)
    saturated = (h.abs() > SATURATED).float().mean().item()
    return acc, pct_all[:, unit].tolist(), pct_all.numpy(), saturated


def _drift(p: np.ndarray, steps: np.ndarray) -> dict:
    """Drift of the percentiles ``p`` (3, n_evals) of one unit: range of the median over the run and over its
    second half, the median's range relative to the mean 15-85 width, and the range of that width.

    Step 0 is left out: in inference mode a fresh BN still has its initial running statistics (mean 0, variance
    1), so at step 0 it is the identity and its output is not yet normalised; from the first evaluation on, the
    running averages have had ``eval_every`` updates."""
    trained = steps > 0
    half = steps >= steps[-1] / 2
    width = p[2] - p[0]
    out = {}
    for key, sel in (("all", trained), ("second_half", half)):
        med, w = p[1][sel], width[sel]
        out[key] = {"p50_min": float(med.min()), "p50_max": float(med.max()),
                    "p50_range": float(med.max() - med.min()),
                    "width_min": float(w.min()), "width_max": float(w.max()),
                    "width_mean": float(w.mean()), "width_ratio": float(w.max() / max(w.min(), 1e-12)),
                    "p50_range_over_width": float((med.max() - med.min()) / max(w.mean(), 1e-12))}
    return out


def train_run(net: str, lr: float, seed: int, xtr, ytr, xte, yte, *, steps: int, eval_every: int,
              batch_size: int, unit: int) -> dict:
    """Train one network at one learning rate from one seed; return its curves and final numbers."""
    torch.manual_seed(seed)
    model = MnistMLP(in_features=xtr.shape[1], hidden=100, classes=10, bn=(net == "bn"))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    q = torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64)

    eval_steps, accs, pcts, all_pcts, losses, sats = [], [], [], [], [], []
    acc, pct, allp, sat = _evaluate(model, xte, yte, unit, q)
    eval_steps.append(0), accs.append(acc), pcts.append(pct), all_pcts.append(allp), losses.append(None)
    sats.append(sat)
    step, diverged_at, loss_sum, loss_n = 0, None, 0.0, 0
    t0 = time.perf_counter()
    while step < steps and diverged_at is None:
        for b in index_batches(xtr, batch_size, shuffle=True, generator=gen):
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xtr[b]), ytr[b])
            lv = loss.item()
            if not math.isfinite(lv):
                diverged_at = step + 1
                break
            loss.backward()
            opt.step()
            step += 1
            loss_sum += lv
            loss_n += 1
            if step % eval_every == 0 or step == steps:
                acc, pct, allp, sat = _evaluate(model, xte, yte, unit, q)
                eval_steps.append(step), accs.append(acc), pcts.append(pct), all_pcts.append(allp)
                sats.append(sat)
                losses.append(loss_sum / loss_n)
                loss_sum, loss_n = 0.0, 0
            if step >= steps:
                break
    seconds = time.perf_counter() - t0

    steps_arr = np.asarray(eval_steps)
    p_unit = np.asarray(pcts).T  # (3, n_evals)
    p_all = np.stack(all_pcts, axis=-1)  # (3, hidden, n_evals)
    per_unit = [_drift(p_all[:, u], steps_arr) for u in range(p_all.shape[1])]
    all_units = {}
    for key in ("all", "second_half"):
        r = np.array([d[key]["p50_range"] for d in per_unit])
        rr = np.array([d[key]["p50_range_over_width"] for d in per_unit])
        all_units[key] = {"p50_range_median": float(np.median(r)), "p50_range_q25": float(np.quantile(r, 0.25)),
                          "p50_range_q75": float(np.quantile(r, 0.75)),
                          "p50_range_over_width_median": float(np.median(rr)),
                          "unit_rank_of_p50_range": int((r < r[unit]).sum())}

    run = {"net": net, "lr": lr, "seed": seed, "eval_steps": eval_steps, "test_accuracy": accs,
           "train_loss": losses, "saturated_fraction": sats, "percentiles": {f"p{p}": p_unit[i].tolist() for i, p in enumerate(PERCENTILES)},
           "drift_unit": _drift(p_unit, steps_arr), "drift_all_units": all_units,
           "steps_done": step, "diverged_at": diverged_at, "train_seconds": seconds,
           "peak_accuracy": float(max(accs)), "final_accuracy": accs[-1] if diverged_at is None else None}
    if net == "bn" and diverged_at is None:
        run["final_accuracy_momentum"] = accs[-1]
        population_statistics(model, (xtr[b] for b in index_batches(xtr, batch_size)))
        run["final_accuracy_algorithm2"] = _evaluate(model, xte, yte, unit, q)[0]
    return run


def steps_to(run: dict, target: float) -> int | None:
    for s, a in zip(run["eval_steps"], run["test_accuracy"]):
        if a >= target:
            return s
    return None


# ---------------------------------------------------------------------------------------------- summary
def _stats(values: list) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "min": None, "max": None, "std": None, "n": 0}
    a = np.asarray(v, dtype=float)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "std": float(a.std()),
            "n": len(v)}


def acc_at(run: dict, step: int) -> float | None:
    if step in run["eval_steps"]:
        return run["test_accuracy"][run["eval_steps"].index(step)]
    return None


def summarize(runs: list[dict], lrs: list[float], checkpoints: list[int], target: float) -> dict:
    out = {}
    for net in NETS:
        for lr in lrs:
            rs = [r for r in runs if r["net"] == net and r["lr"] == lr]
            s2t = [steps_to(r, target) for r in rs]
            d = {"net": net, "lr": lr, "seeds": [r["seed"] for r in rs],
                 "diverged": sum(r["diverged_at"] is not None for r in rs),
                 "accuracy_at": {str(c): _stats([acc_at(r, c) for r in rs]) for c in checkpoints},
                 "steps_to_target": s2t, "reached_target": sum(s is not None for s in s2t),
                 "steps_to_target_stats": _stats(s2t),
                 "final_accuracy": _stats([r["final_accuracy"] for r in rs]),
                 "peak_accuracy": _stats([r["peak_accuracy"] for r in rs]),
                 "final_train_loss": _stats([r["train_loss"][-1] for r in rs if r["diverged_at"] is None]),
                 "final_saturated_fraction": _stats([r["saturated_fraction"][-1] for r in rs]),
                 "unit_p50_range": _stats([r["drift_unit"]["all"]["p50_range"] for r in rs]),
                 "unit_p50_range_second_half": _stats([r["drift_unit"]["second_half"]["p50_range"] for r in rs]),
                 "unit_p50_range_over_width": _stats([r["drift_unit"]["all"]["p50_range_over_width"] for r in rs]),
                 "unit_width_min": _stats([r["drift_unit"]["all"]["width_min"] for r in rs]),
                 "unit_width_max": _stats([r["drift_unit"]["all"]["width_max"] for r in rs]),
                 "unit_width_ratio": _stats([r["drift_unit"]["all"]["width_ratio"] for r in rs]),
                 "all_units_p50_range_median": _stats(
                     [r["drift_all_units"]["all"]["p50_range_median"] for r in rs]),
                 "all_units_p50_range_over_width_median": _stats(
                     [r["drift_all_units"]["all"]["p50_range_over_width_median"] for r in rs]),
                 "train_seconds": float(sum(r["train_seconds"] for r in rs))}
            if net == "bn":
                d["final_accuracy_momentum"] = _stats([r.get("final_accuracy_momentum") for r in rs])
                d["final_accuracy_algorithm2"] = _stats([r.get("final_accuracy_algorithm2") for r in rs])
            out[f"{net}@{lr:g}"] = d
    return out


def judge(summary: dict, lrs: list[float], shared_lr: float, target: float, checkpoints: list[int]) -> dict:
    """Verdicts on the three claims, computed from the numbers (wording chosen by simple rules)."""
    p, b = summary[f"plain@{shared_lr:g}"], summary[f"bn@{shared_lr:g}"]
    early = checkpoints[:3]
    early_gap = {c: (b["accuracy_at"][str(c)]["mean"] or 0) - (p["accuracy_at"][str(c)]["mean"] or 0)
                 for c in early}
    bs, ps = b["steps_to_target_stats"]["mean"], p["steps_to_target_stats"]["mean"]
    n = len(b["seeds"])
    sooner = b["reached_target"] == n and (p["reached_target"] < n or (ps is not None and bs < ps))
    final_higher = (b["final_accuracy"]["mean"] or 0) > (p["final_accuracy"]["mean"] or 0)
    claim1 = {"holds": bool(sooner and all(g > 0 for g in early_gap.values())),
              "criterion": "BN reaches the target in fewer steps on every seed's mean and is ahead at the first "
                           "three checkpoints",
              "final_accuracy_also_higher": bool(final_higher),
              "early_accuracy_gap_bn_minus_plain": {str(k): v for k, v in early_gap.items()},
              "steps_to_target_bn": b["steps_to_target"], "steps_to_target_plain": p["steps_to_target"],
              "final_bn": b["final_accuracy"]["mean"], "final_plain": p["final_accuracy"]["mean"],
              "peak_bn": b["peak_accuracy"]["mean"], "peak_plain": p["peak_accuracy"]["mean"]}
    plain_best = max(lrs, key=lambda lr: summary[f"plain@{lr:g}"]["final_accuracy"]["mean"] or -1)
    claim1["plain_best_lr"] = plain_best
    claim1["steps_to_target_at_plain_best_lr"] = {net: summary[f"{net}@{plain_best:g}"]["steps_to_target"]
                                                  for net in NETS}
    rp, rb = p["unit_p50_range"]["mean"], b["unit_p50_range"]["mean"]
    rwp, rwb = p["unit_p50_range_over_width"]["mean"], b["unit_p50_range_over_width"]["mean"]
    ap, ab = p["all_units_p50_range_over_width_median"]["mean"], b["all_units_p50_range_over_width_median"]["mean"]
    wp, wb = p["unit_width_ratio"]["mean"], b["unit_width_ratio"]["mean"]
    claim2 = {"holds": bool(rb < rp and rwb < rwp and ab < ap and wb < wp),
              "criterion": "for the chosen unit a smaller range of the median (absolute and relative to the 15-85 "
                           "spread) and a smaller max/min ratio of the 15-85 spread; and a smaller median relative "
                           "range over all units of the layer",
              "unit_width_ratio_plain": wp, "unit_width_ratio_bn": wb,
              "unit_width_min_max_plain": [p["unit_width_min"]["mean"], p["unit_width_max"]["mean"]],
              "unit_width_min_max_bn": [b["unit_width_min"]["mean"], b["unit_width_max"]["mean"]],
              "unit_p50_range_second_half_plain": p["unit_p50_range_second_half"]["mean"],
              "unit_p50_range_second_half_bn": b["unit_p50_range_second_half"]["mean"],
              "unit_p50_range_plain": rp, "unit_p50_range_bn": rb,
              "unit_p50_range_over_width_plain": rwp, "unit_p50_range_over_width_bn": rwb,
              "all_units_median_p50_range_over_width_plain": ap, "all_units_median_p50_range_over_width_bn": ab}
    per_lr = {}
    for lr in lrs:
        sp, sb = summary[f"plain@{lr:g}"], summary[f"bn@{lr:g}"]
        per_lr[f"{lr:g}"] = {"plain_reached": sp["reached_target"], "bn_reached": sb["reached_target"],
                             "plain_final": sp["final_accuracy"]["mean"], "bn_final": sb["final_accuracy"]["mean"],
                             "plain_diverged": sp["diverged"], "bn_diverged": sb["diverged"]}
    higher_lrs = [lr for lr in lrs if lr > shared_lr]
    plain_fails = [lr for lr in higher_lrs if summary[f"plain@{lr:g}"]["reached_target"] < n]
    bn_trains_where_plain_fails = [lr for lr in plain_fails if summary[f"bn@{lr:g}"]["reached_target"] == n]
    ok = {net: [lr for lr in lrs if summary[f"{net}@{lr:g}"]["reached_target"] == n] for net in NETS}
    claim3 = {"holds": bool(bn_trains_where_plain_fails), "per_lr": per_lr,
              "lrs_where_every_seed_reaches_target": ok,
              "criterion": "at some lr above the shared one, the plain net misses the target on some seed while "
                           "the BN net reaches it on every seed",
              "higher_lrs_where_plain_misses_target": plain_fails,
              "of_those_where_bn_reaches_target_every_seed": bn_trains_where_plain_fails}
    return {"target": target, "claim1_bn_higher_accuracy_sooner": claim1,
            "claim2_bn_stable_sigmoid_input": claim2, "claim3_bn_trains_at_higher_lr": claim3}


# ---------------------------------------------------------------------------------------------- figure
def plot(runs: list[dict], summary: dict, lrs: list[float], shared_lr: float, seeds: list[int], setup: dict,
         path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    (ax_a, ax_d), (ax_b, ax_c) = axes
    # (a) accuracy vs steps at the shared lr
    for net in NETS:
        rs = [r for r in runs if r["net"] == net and r["lr"] == shared_lr and r["diverged_at"] is None]
        if not rs:
            continue
        x = np.asarray(rs[0]["eval_steps"])
        a = np.asarray([r["test_accuracy"] for r in rs])
        ax_a.plot(x, a.mean(0), color=COLOR[net], label=f"{LABEL[net]} (mean of {len(rs)} seeds)")
        if len(rs) > 1:
            ax_a.fill_between(x, a.min(0), a.max(0), color=COLOR[net], alpha=0.2, linewidth=0)
    ax_a.axhline(setup["target_accuracy"], color="grey", lw=0.8, ls=":")
    ax_a.set_ylim(0, 1.0)
    ax_a.set_xlabel("training steps (mini-batches of 60)")
    ax_a.set_ylabel("test accuracy")
    ax_a.set_title(f"(a) test accuracy, lr = {shared_lr:g} (band: min-max over seeds)")
    ax_a.grid(alpha=0.3)
    ax_a.legend(loc="lower right")

    # (b), (c) percentiles of one sigmoid input, first seed, shared lr
    sel = {net: next((r for r in runs if r["net"] == net and r["lr"] == shared_lr and r["seed"] == seeds[0]), None)
           for net in NETS}
    lo = min(min(r["percentiles"]["p15"]) for r in sel.values() if r)
    hi = max(max(r["percentiles"]["p85"]) for r in sel.values() if r)
    pad = 0.05 * (hi - lo)
    for ax, net, tag in ((ax_b, "plain", "(b)"), (ax_c, "bn", "(c)")):
        r = sel[net]
        if r is None:
            continue
        x = r["eval_steps"]
        for p, ls in zip(PERCENTILES, ("--", "-", ":")):
            ax.plot(x, r["percentiles"][f"p{p}"], color=COLOR[net], ls=ls, lw=1.8 if p == 50 else 1.2,
                    label=f"{p}th percentile")
        ax.fill_between(x, r["percentiles"]["p15"], r["percentiles"]["p85"], color=COLOR[net], alpha=0.12, lw=0)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("training steps")
        ax.set_ylabel(f"input to sigmoid (unit {setup['unit']}, last hidden layer)")
        d = r["drift_unit"]["all"]
        ax.set_title(f"{tag} {LABEL[net]}: sigmoid input percentiles over the test set\n"
                     f"lr = {shared_lr:g}, seed {seeds[0]}; 50th pct. range {d['p50_range']:.2f}, "
                     f"15-85 width {d['width_min']:.2f}..{d['width_max']:.2f}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)

    # (d) final and peak accuracy vs lr
    for net in NETS:
        fm = np.array([summary[f"{net}@{lr:g}"]["final_accuracy"]["mean"] or np.nan for lr in lrs], float)
        fl = np.array([summary[f"{net}@{lr:g}"]["final_accuracy"]["min"] or np.nan for lr in lrs], float)
        fh = np.array([summary[f"{net}@{lr:g}"]["final_accuracy"]["max"] or np.nan for lr in lrs], float)
        pk = np.array([summary[f"{net}@{lr:g}"]["peak_accuracy"]["mean"] or np.nan for lr in lrs], float)
        ax_d.errorbar(lrs, fm, yerr=[fm - fl, fh - fm], color=COLOR[net], marker="o", capsize=3,
                      label=f"{LABEL[net]}: final (mean, min-max)")
        ax_d.plot(lrs, pk, color=COLOR[net], marker="^", ls="--", alpha=0.7, label=f"{LABEL[net]}: peak (mean)")
        div = [lr for lr in lrs if summary[f"{net}@{lr:g}"]["diverged"]]
        if div:
            ax_d.plot(div, [0.1] * len(div), "x", color=COLOR[net], ms=10, mew=2, label=f"{LABEL[net]}: diverged")
    ax_d.axvline(shared_lr, color="grey", lw=0.8, ls=":")
    ax_d.axhline(setup["target_accuracy"], color="grey", lw=0.8, ls=":")
    ax_d.set_xscale("log")
    ax_d.set_ylim(0, 1.02)
    ax_d.set_xlabel("learning rate (log scale)")
    ax_d.set_ylabel(f"test accuracy after {setup['steps']} steps")
    ax_d.set_title("(d) test accuracy vs learning rate (plain SGD)")
    ax_d.grid(alpha=0.3, which="both")
    ax_d.legend(loc="lower left", fontsize=9)

    fig.suptitle("BatchNorm paper Figure 1 on scikit-learn 8x8 digits "
                 f"({setup['train_samples']} train / {setup['test_samples']} test): MLP 64-100-100-100-10, "
                 f"sigmoid, SGD, batch {setup['batch_size']}, {len(seeds)} seed(s)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- report
def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _acc_cell(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    if s["n"] > 1:
        return f"{100 * s['mean']:.1f} ({100 * s['min']:.1f}–{100 * s['max']:.1f})"
    return f"{100 * s['mean']:.1f}"


def _gap_images(a: float | None, b: float | None, setup: dict) -> str:
    if a is None or b is None:
        return "no gap: a run diverged"
    n = setup["test_samples"]
    return f"{100 * (a - b):+.1f} points, {round((a - b) * n):+d} of {n} test images on average"


def _steps_cell(d: dict) -> str:
    s = d["steps_to_target"]
    n = len(s)
    hit = [x for x in s if x is not None]
    if not hit:
        return "never"
    cell = f"{np.mean(hit):.0f} ({min(hit)}–{max(hit)})" if len(hit) > 1 else f"{hit[0]}"
    return cell if len(hit) == n else f"{cell}; {n - len(hit)}/{n} never"


def write_markdown(result: dict, path: Path) -> None:
    s, summary, claims = result["setup"], result["summary"], result["claims"]
    lrs, shared, target = s["lrs"], s["shared_lr"], s["target_accuracy"]
    cps = s["checkpoints"]
    L = []
    L.append("# BatchNorm paper, Figure 1, on scikit-learn's 8x8 digits\n")
    L.append(f"Generated by `benchmarks/figure1_digits.py` on {s['date']} with `{s['command']}` "
             f"(total {s['total_seconds']:.0f} s). All numbers are in `figure1.json`.\n")
    L.append("## Setup\n")
    L.append(f"- Data: scikit-learn's handwritten digits, 1,797 images of 8x8 pixels scaled to [0, 1] (64 inputs), "
             f"split 80/20 with `bnfold.train.split(n, 0.2, seed={s['split_seed']})`: {s['train_samples']} "
             f"training / {s['test_samples']} test samples (the same split for every run).")
    L.append("- Network: `bnfold.models.zoo.MnistMLP(64, 100, 10)`: 3 fully-connected hidden layers of 100 sigmoid "
             "units, with BatchNorm1d before each sigmoid (`bn=True`) or none (`bn=False`), then a linear "
             "10-way output; PyTorch default initialisation. With the same seed, both networks start from identical "
             "Linear weights and see identical mini-batches.")
    L.append(f"- Training: cross-entropy, plain SGD (no momentum, no weight decay), constant learning rate, "
             f"mini-batches of {s['batch_size']} (training set reshuffled every epoch), {s['steps']} steps "
             f"(≈{s['steps'] * s['batch_size'] / s['train_samples']:.0f} epochs).")
    plain_best = max(lrs, key=lambda lr: summary[f"plain@{lr:g}"]["final_accuracy"]["mean"] or -1)
    L.append(f"- Learning rates: {', '.join(f'{x:g}' for x in lrs)}; shared rate for panels (a)–(c): {shared:g} "
             f"(the plain network's final accuracy there is "
             f"{_pct(summary[f'plain@{shared:g}']['final_accuracy']['mean'])}%; its best rate in the ladder is "
             f"{plain_best:g} with {_pct(summary[f'plain@{plain_best:g}']['final_accuracy']['mean'])}%). "
             f"Seeds: {', '.join(map(str, s['seeds']))} (seed = weight initialisation and batch order).")
    L.append(f"- Evaluation every {s['eval_every']} steps on the test set in inference mode (`model.eval()`: BN uses "
             f"its momentum running averages, momentum 0.1). Sigmoid input: unit {s['unit']} of the last hidden "
             "layer (output of `features[7]`, i.e. after BN / Identity, before the sigmoid), 15/50/85th percentiles "
             "over the test set. The BN network's final accuracy is also given with Algorithm 2 population "
             "statistics (`bnfold.calibrate.population_statistics` over the training set, batches of 60).")
    L.append(f"- Machine: {s['machine']}; Python {s['python']}, torch {s['torch']}, {s['threads']} torch thread(s).")
    L.append("")
    L.append("![Figure 1](figure1.png)\n")
    L.append("## Test accuracy (%)\n")
    L.append(f"Mean over {len(s['seeds'])} seed(s), (min–max) in brackets. "
             f"'steps to {100 * target:.0f}%': first evaluation step at which test accuracy ≥ {100 * target:.0f}%. "
             f"'final train loss': mean mini-batch loss over the last {s['eval_every']} steps (chance: ln 10 = 2.303). "
             f"'saturated at end': % of the last hidden layer's sigmoid inputs (100 units x {s['test_samples']} test "
             f"images) with |input| > {SATURATED:.2f}, i.e. sigmoid < 0.01 or > 0.99, at the last evaluation.\n")
    hdr = ["net", "lr"] + [f"@{c}" for c in cps] + [f"steps to {100 * target:.0f}%", "final (momentum stats)",
                                                    "final (Algorithm 2)", "peak", "final train loss",
                                                    "saturated at end", "diverged"]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(hdr) - 2)) + "|")
    for lr in lrs:
        for net in NETS:
            d = summary[f"{net}@{lr:g}"]
            row = [LABEL[net], f"{lr:g}"] + [_acc_cell(d["accuracy_at"][str(c)]) for c in cps]
            row += [_steps_cell(d), _acc_cell(d["final_accuracy"]),
                    _acc_cell(d["final_accuracy_algorithm2"]) if net == "bn" else "n/a",
                    _acc_cell(d["peak_accuracy"]),
                    "–" if d["final_train_loss"]["mean"] is None else f"{d['final_train_loss']['mean']:.3f}",
                    _acc_cell(d["final_saturated_fraction"]), f"{d['diverged']}/{len(d['seeds'])}"]
            L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("## Drift of the sigmoid input\n")
    L.append(f"Unit {s['unit']} of the last hidden layer, over the test set at every evaluation. 'p50 range' is "
             "max − min of its 50th percentile over the run (from the first evaluation on: at step 0 a fresh BN "
             "in inference mode still has running mean 0 and variance 1, so it is the identity) and over the second "
             "half; "
             "'width' is the 85th − 15th percentile spread; 'range/width' divides the p50 range by the mean width "
             "(a scale-free drift). The last column is the same ratio's median over all 100 units of the layer "
             "(is the chosen unit typical?). Mean over seeds.\n")
    L.append("| net | lr | p50 range | p50 range, 2nd half | width min..max | range/width (unit) | "
             "range/width (median of 100 units) |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    for lr in lrs:
        for net in NETS:
            d = summary[f"{net}@{lr:g}"]
            if d["unit_p50_range"]["mean"] is None:
                continue
            L.append(f"| {LABEL[net]} | {lr:g} | {d['unit_p50_range']['mean']:.2f} | "
                     f"{d['unit_p50_range_second_half']['mean']:.2f} | "
                     f"{d['unit_width_min']['mean']:.2f}..{d['unit_width_max']['mean']:.2f} | "
                     f"{d['unit_p50_range_over_width']['mean']:.2f} | "
                     f"{d['all_units_p50_range_over_width_median']['mean']:.2f} |")
    L.append("")
    L.append("## Do the claims hold here?\n")
    c1, c2, c3 = (claims["claim1_bn_higher_accuracy_sooner"], claims["claim2_bn_stable_sigmoid_input"],
                  claims["claim3_bn_trains_at_higher_lr"])
    gaps = ", ".join(f"{100 * v:+.1f} points at step {k}" for k, v in c1["early_accuracy_gap_bn_minus_plain"].items())
    pb, bb = summary[f"plain@{shared:g}"], summary[f"bn@{shared:g}"]
    best = c1["plain_best_lr"]
    pbest, bbest = summary[f"plain@{best:g}"], summary[f"bn@{best:g}"]
    L.append(f"1. **BN reaches higher test accuracy sooner — {'holds' if c1['holds'] else 'does not hold'}** "
             f"(lr {shared:g}). Steps to {100 * target:.0f}%: with BN {_steps_cell(bb)}, without {_steps_cell(pb)}. "
             f"Accuracy gap BN − plain: {gaps}. Final: {_pct(c1['final_bn'])}% with BN vs "
             f"{_pct(c1['final_plain'])}% without ({_gap_images(c1['final_bn'], c1['final_plain'], s)}); "
             f"peak {_pct(c1['peak_bn'])}% vs {_pct(c1['peak_plain'])}%. At the plain network's best rate in the "
             f"ladder (lr {best:g}, by final accuracy), steps to {100 * target:.0f}%: with BN {_steps_cell(bbest)}, "
             f"without {_steps_cell(pbest)}.")
    L.append(f"2. **The sigmoid input is much more stable with BN — {'holds' if c2['holds'] else 'does not hold'}** "
             f"(lr {shared:g}). Range of unit {s['unit']}'s median over training: {c2['unit_p50_range_bn']:.2f} with "
             f"BN vs {c2['unit_p50_range_plain']:.2f} without (second half only: "
             f"{c2['unit_p50_range_second_half_bn']:.2f} vs {c2['unit_p50_range_second_half_plain']:.2f}); "
             f"relative to the 15–85 spread {c2['unit_p50_range_over_width_bn']:.2f} vs "
             f"{c2['unit_p50_range_over_width_plain']:.2f}; median of that ratio over all 100 units "
             f"{c2['all_units_median_p50_range_over_width_bn']:.2f} vs "
             f"{c2['all_units_median_p50_range_over_width_plain']:.2f}. The spread itself moves between "
             f"{c2['unit_width_min_max_bn'][0]:.2f} and {c2['unit_width_min_max_bn'][1]:.2f} with BN "
             f"(max/min {c2['unit_width_ratio_bn']:.1f}×) but between {c2['unit_width_min_max_plain'][0]:.2f} and "
             f"{c2['unit_width_min_max_plain'][1]:.2f} without (max/min {c2['unit_width_ratio_plain']:.0f}×).")
    per = "; ".join(f"lr {k}: plain {v['plain_reached']}/{len(s['seeds'])} "
                    f"(final {_pct(v['plain_final'])}%), BN {v['bn_reached']}/{len(s['seeds'])} "
                    f"(final {_pct(v['bn_final'])}%)" for k, v in c3["per_lr"].items())
    ok = c3["lrs_where_every_seed_reaches_target"]
    span = {net: ("none" if not ok[net] else ", ".join(f"{x:g}" for x in ok[net])) for net in NETS}
    extra = (f"The rates above {shared:g} where the plain network misses {100 * target:.0f}% but BN reaches it on "
             f"every seed: {', '.join(f'{x:g}' for x in c3['of_those_where_bn_reaches_target_every_seed']) or 'none'}."
             )
    L.append(f"3. **BN trains at higher learning rates where the plain network does not — "
             f"{'holds' if c3['holds'] else 'does not hold'}.** Rates at which every seed reaches "
             f"{100 * target:.0f}% test accuracy within {s['steps']} steps: plain {span['plain']}; BN {span['bn']}. "
             f"{extra} Per rate (seeds reaching {100 * target:.0f}%, mean final accuracy): {per}.")
    L.append("")
    L.append("### Caveats\n")
    n_test, n_seeds = s["test_samples"], len(s["seeds"])
    alg2 = [r for r in result["runs"] if r.get("final_accuracy_algorithm2") is not None]
    d_alg2 = max((abs(r["final_accuracy_algorithm2"] - r["final_accuracy_momentum"]) for r in alg2), default=0.0)
    failed = [r for r in result["runs"] if steps_to(r, target) is None]
    n_nan = sum(r["diverged_at"] is not None for r in failed)
    init_w = [r["percentiles"]["p85"][0] - r["percentiles"]["p15"][0] for r in result["runs"]]
    ranks = [r["drift_all_units"]["all"]["unit_rank_of_p50_range"] for r in result["runs"]
             if r["lr"] == shared]
    L.append(f"- The data set is tiny: {s['train_samples']} training and {n_test} test images of 8x8 pixels, one "
             f"fixed split. One test image is {100 / n_test:.2f} accuracy points, so final accuracies within about "
             f"one point of each other are not distinguishable here; {n_seeds} seed(s) per setting give only a rough "
             f"spread. The paper's MNIST run is 50,000 steps on 60,000 images of 28x28; this one is far smaller.")
    groups = []
    for lr in lrs:
        for net in NETS:
            d = summary[f"{net}@{lr:g}"]
            if d["reached_target"] == n_seeds:
                continue
            fa, sat, loss = d["final_accuracy"]["mean"], d["final_saturated_fraction"]["mean"], \
                d["final_train_loss"]["mean"]
            if d["diverged"]:
                kind = f"{d['diverged']} run(s) with a non-finite loss"
            elif sat is not None and sat >= 0.9:
                kind = "saturated"
            elif fa is not None and fa > 0.5:
                kind = "slow, still climbing" if (d["accuracy_at"][str(s['checkpoints'][-2])]["mean"] or 0) < fa \
                    else "slow"
            else:
                kind = "stalled"
            groups.append(f"{LABEL[net]} @ lr {lr:g} ({kind}: final {_pct(fa)}%, train loss "
                          f"{'–' if loss is None else f'{loss:.2f}'}, {_pct(sat)}% saturated)")
    L.append(f"- Runs that do not reach {100 * target:.0f}% on every seed ({len(failed)} run(s) in all, "
             f"{n_nan} with a non-finite loss): " + ("; ".join(groups) if groups else "none") + ". "
             + ("'Does not train' here is never a blow-up to NaN: the loss stays finite while the sigmoids "
                "saturate (the saturated share is given) or the network sits on a plateau."
                if failed and n_nan == 0 else ""))
    L.append(f"- At initialisation the 15–85 spread of unit {s['unit']}'s input over the test set is only "
             f"{min(init_w):.3f}–{max(init_w):.3f}: with the default initialisation the third sigmoid layer sees "
             "almost the same input for every image, which BN (normalising with mini-batch statistics in training) "
             "undoes from the first step and the plain network has to grow out of.")
    L.append(f"- Panels (b) and (c) show one unit (unit {s['unit']}) of one run; across all {n_seeds * 2} runs at lr "
             f"{shared:g}, its p50 range ranks {min(ranks)}–{max(ranks)} of 0–99 among the layer's units (0 = most "
             "stable), and the last column of the drift table gives the all-unit median. The BN output's scale is "
             "set by the learned γ, β, the plain net's by its weights, so the absolute ranges are also given "
             "relative to the 15–85 spread.")
    L.append(f"- The BN network is evaluated with its momentum running averages during training; after training, "
             f"Algorithm 2's population statistics change its test accuracy by at most {100 * d_alg2:.1f} points "
             "in any run.")
    L.append("- Initialisation is PyTorch's default (uniform, scaled by 1/sqrt(fan-in)), not the paper's; how long "
             "the plain sigmoid network stays on its initial plateau (previous point) depends on it.")
    path.write_text("\n".join(L) + "\n")


def _round(obj, digits: int = 6):
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, digits) for v in obj]
    return obj


def write_json(result: dict, path: Path) -> None:
    """Indented setup/summary/claims, then one run per line (floats to 6 significant digits)."""
    head = {k: v for k, v in result.items() if k != "runs"}
    text = json.dumps(_round(head), indent=1)[:-2]
    runs = ",\n  ".join(json.dumps(_round(r), separators=(",", ":")) for r in result["runs"])
    path.write_text(f"{text},\n \"runs\": [\n  {runs}\n ]\n}}\n")


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000, help="training steps (mini-batches) per run")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...) per network and lr")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
                    help="learning rates to run (panel d)")
    ap.add_argument("--shared-lr", type=float, default=1.0,
                    help="learning rate of panels (a)-(c); added to --lrs if missing")
    ap.add_argument("--batch-size", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--unit", type=int, default=0, help="unit of the last hidden layer for panels (b), (c)")
    ap.add_argument("--target", type=float, default=0.9, help="test accuracy for 'steps to target'")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)

    lrs = sorted(set(args.lrs))
    shared = args.shared_lr
    if shared not in lrs:
        lrs = sorted(set(lrs) | {shared})
    seeds = list(range(args.seeds))
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.perf_counter()

    data = load_digits()
    x = torch.from_numpy(data.inputs["x"])
    y = torch.from_numpy(data.labels)
    tr, te = split(len(x), 0.2, args.split_seed)
    xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    checkpoints = sorted({max(args.eval_every, int(round(args.steps * f / args.eval_every)) * args.eval_every)
                          for f in (0.05, 0.1, 0.2, 0.5)} | {args.steps})

    runs = []
    total = len(NETS) * len(lrs) * len(seeds)
    for lr in lrs:
        for seed in seeds:
            for net in NETS:
                r = train_run(net, lr, seed, xtr, ytr, xte, yte, steps=args.steps, eval_every=args.eval_every,
                              batch_size=args.batch_size, unit=args.unit)
                runs.append(r)
                extra = (f", Alg.2 {100 * r['final_accuracy_algorithm2']:.1f}%"
                         if "final_accuracy_algorithm2" in r else "")
                log(f"[{len(runs)}/{total}] {net:5s} lr={lr:<5g} seed={seed}: final "
                    f"{_pct(r['final_accuracy'])}%{extra}, peak {100 * r['peak_accuracy']:.1f}%, "
                    f"to {100 * args.target:.0f}%: {steps_to(r, args.target)}, "
                    f"diverged at {r['diverged_at']}, {r['train_seconds']:.1f} s")

    summary = summarize(runs, lrs, checkpoints, args.target)
    claims = judge(summary, lrs, shared, args.target, checkpoints)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    setup = {"dataset": "sklearn digits 8x8", "train_samples": len(tr), "test_samples": len(te),
             "split_seed": args.split_seed, "test_fraction": 0.2, "network": "MnistMLP(64, 100, 10), sigmoid",
             "optimizer": "SGD, momentum 0, weight decay 0", "batch_size": args.batch_size, "steps": args.steps,
             "eval_every": args.eval_every, "lrs": lrs, "shared_lr": shared, "seeds": seeds, "unit": args.unit,
             "unit_layer": "features[7] output (last hidden layer, before sigmoid)",
             "percentiles": list(PERCENTILES), "target_accuracy": args.target, "checkpoints": checkpoints,
             "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
             "numpy": np.__version__,
             "machine": f"{cpu}, {os.cpu_count()} CPU(s), {platform.platform()}",
             "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "command": "python benchmarks/figure1_digits.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, summary, lrs, shared, seeds, setup, args.out / "figure1.png")
    setup["total_seconds"] = time.perf_counter() - t_start
    result = {"setup": setup, "summary": summary, "claims": claims, "runs": runs}
    write_json(result, args.out / "figure1.json")
    write_markdown(result, args.out / "figure1.md")
    log(f"done in {setup['total_seconds']:.0f} s: {args.out / 'figure1.json'}, figure1.png, figure1.md")
    for k, v in claims.items():
        if isinstance(v, dict):
            log(f"{k}: {'holds' if v['holds'] else 'does not hold'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
