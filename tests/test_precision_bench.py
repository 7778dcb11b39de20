"""benchmarks/precision.py's statistics and emulation against their own claims: the acceptance verdict over
seeds simulated under its null (equal accuracy: "NOT within 5%" at most at the interval's one-sided level) and
under a real 1.5x difference (named), and the emulation rounding what an fp16 model rounds (an explicit Cast to
fp16 included)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bnfold_precision_bench", ROOT / "benchmarks" / "precision.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("n", [4, 8])
def test_verdict_under_its_null_and_under_a_real_difference(bench, n):
    rng = np.random.default_rng(0)
    trials = 2000
    # null: bnfold and occ equally accurate; per-seed log-ratios spread as the A/A runs measured (sd ~0.35)
    null = [bench.verdict(bench.ratio_stats(np.exp(rng.normal(0, 0.35, n))), wide=False) for _ in range(trials)]
    false_alarm = sum(v == "NOT within 5%" for v in null) / trials
    assert false_alarm <= 0.03  # the 95% interval's upper tail: 2.5%, plus simulation noise
    assert sum(v == "within 5%" for v in null) / trials > 0.4  # a fair coin around 1.05, not a rubber stamp
    worse = [bench.verdict(bench.ratio_stats(np.exp(rng.normal(np.log(1.5), 0.35, n))), wide=False)
             for _ in range(trials)]
    # power to name a real 1.5x: ~30% with 4 seeds, ~70% with 8 (the results say so)
    assert sum(v == "NOT within 5%" for v in worse) / trials > (0.2 if n == 4 else 0.6)
    wide_better = [bench.verdict(bench.ratio_stats(np.exp(rng.normal(np.log(0.6), 0.35, n))), wide=True)
                   for _ in range(trials)]
    assert sum(v.startswith("below") for v in wide_better) / trials > 0.95


def test_ratio_stats_interval_contains_the_geometric_mean(bench):
    st = bench.ratio_stats([0.5, 1.0, 2.0])
    assert st["gm"] == pytest.approx(1.0)
    assert st["lo"] < 1.0 < st["hi"] and st["min"] == pytest.approx(0.5) and st["max"] == pytest.approx(2.0)


def test_emulate_rounds_an_explicit_cast_to_fp16(bench):
    """x -> Cast(fp16) -> Cast(fp32): emulated, x is rounded to fp16 by the Cast (it was not before)."""
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["x16"], ["y"], to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = (np.random.default_rng(1).standard_normal((1, 64)) * 3).astype(np.float32)
    want = x.astype(np.float16).astype(np.float64)
    assert not np.array_equal(want, x)  # the rounding is visible
    np.testing.assert_array_equal(bench.run(bench.emulate(m), x), want)
    np.testing.assert_array_equal(bench.run(bench.emulate(m, round_activations=False), x), x)


def _result(rows: dict, date: str = "d") -> dict:
    """A --seeds result: ``rows`` {(model, bn): [(seed, bnfold error, occ error), ...]} (max = mean = emulated)."""
    def seed(s, b, o):
        e = {k: b for k in ("max", "mean", "emu_max", "emu_mean")}
        f = {k: o for k in ("max", "mean", "emu_max", "emu_mean")}
        return {"seed": s, "kept": 0, "subnormal": 0, "ref_max_abs": 1.0, "bnfold_fp16": e, "occ_fp16_unfolded": f,
                "occ_fp16_folded": dict(f), "occ_fp16_twin": dict(f)}
    return {"meta": {"date": date, "onnxruntime": "1", "torch": "2", "seeds": 2}, "rows": [
        {"model": m, "bn": bn, "samples": 16, "seeds": [seed(*x) for x in seeds]}
        for (m, bn), seeds in rows.items()]}


def test_merge_results_replaces_rows_adds_seeds_and_records_both(bench, tmp_path):
    old = _result({("a", "wide"): [(0, 2.0, 1.0), (1, 2.0, 1.0)], ("b", "wide"): [(0, 1.0, 1.0), (1, 1.0, 1.0)]})
    old["meta"]["extra_seeds"] = ["a wide: 2 more seeds (100-101) from old.json", "b wide: 1 more seed"]
    rerun = _result({("a", "wide"): [(0, 0.5, 1.0), (1, 0.5, 1.0)]}, date="today")
    more = _result({("a", "wide"): [(100, 0.5, 1.0), (101, 0.25, 1.0), (102, 0.5, 1.0)]})
    out = bench.merge_results(old, [("rerun.json", rerun)], [("more.json", more)])
    a = next(r for r in out["rows"] if r["model"] == "a")
    assert [s["seed"] for s in a["seeds"]] == [0, 1, 100, 101, 102]
    assert a["summary"]["n"] == 5 and a["summary"]["ratio_max"]["gm"] == pytest.approx(0.5 * 0.5 ** 0.2)
    assert out["meta"]["extra_seeds"] == ["b wide: 1 more seed", "a wide: 3 more seeds (100-102) from more.json"]
    assert out["meta"]["notes"] == ["a wide re-run today (rerun.json)"]
    assert next(r for r in out["rows"] if r["model"] == "b")["summary"]["n"] == 2
    assert [s["seed"] for s in old["rows"][0]["seeds"]] == [0, 1]  # the input is not modified
    with pytest.raises(ValueError, match="already in the row"):
        bench.merge_results(old, [], [("again.json", _result({("a", "wide"): [(1, 1.0, 1.0)]}))])
    with pytest.raises(ValueError, match="no row"):
        bench.merge_results(old, [], [("c.json", _result({("c", "wide"): [(5, 1.0, 1.0)]}))])
    other = _result({("a", "wide"): [(7, 1.0, 1.0)]})
    other["rows"][0]["samples"] = 4
    with pytest.raises(ValueError, match="other --samples"):
        bench.merge_results(old, [], [("o.json", other)])
    # the command: --render with --replace / --merge rewrites the .json and its .md
    target, src = tmp_path / "precision.json", tmp_path / "more.json"
    target.write_text(json.dumps(old))
    src.write_text(json.dumps(more))
    assert bench.main(["--render", str(target), "--merge", str(src)]) == 0
    assert len(json.loads(target.read_text())["rows"][0]["seeds"]) == 5
    assert "a wide: 3 more seeds (100-102) from more.json" in (tmp_path / "precision.md").read_text()


def _chain(depth: int, width: int = 32) -> torch.nn.Module:
    """``depth`` x (Linear, BatchNorm1d, ReLU) with He-initialised weights (a layer gain of ~1 before the BN)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        lin = torch.nn.Linear(width, width)
        torch.nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        torch.nn.init.zeros_(lin.bias)
        layers += [lin, torch.nn.BatchNorm1d(width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def _scales(model) -> list:
    return [(m.weight.double() / torch.sqrt(m.running_var.double() + m.eps)).detach().numpy()
            for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]


def test_wide_calib_bn_normalises_its_own_input_with_wides_gamma_and_beta(bench):
    import copy

    net = _chain(6, width=256)
    wide, calib = bench.wide_bn(copy.deepcopy(net), seed=3), bench.wide_calib_bn(copy.deepcopy(net), seed=3,
                                                                                shape=(1, 256))
    outs = []  # each BN's output on the calibration batch, in float64
    x = torch.from_numpy(bench.calibration_input((1, 256), seed=3))
    net64 = copy.deepcopy(calib).double().eval()
    for m in net64.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.register_forward_hook(lambda m, i, o: outs.append(o.detach().numpy()))
    with torch.no_grad():
        net64(x)
    bns = [(a, b) for a, b in zip(wide.modules(), calib.modules()) if isinstance(a, torch.nn.BatchNorm1d)]
    assert len(outs) == len(bns) == 6
    for (a, b), y in zip(bns, outs):  # wide's gamma and beta; the statistics are the input's own
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        assert not torch.equal(a.running_var, b.running_var)
        np.testing.assert_allclose(y.mean(0), b.bias.detach().double().numpy(), atol=1e-4)
        np.testing.assert_allclose(y.std(0), b.weight.detach().double().numpy(), rtol=1e-3)
    for s in _scales(calib):  # far from 1 per channel, both ways
        assert s.max() / s.min() > 100 and (s > 2).mean() > 0.1 and (s < 0.5).mean() > 0.1
    with pytest.raises(ValueError, match="input shape"):
        bench.wide_calib_bn(copy.deepcopy(net), seed=3)


def test_wide_calib_keeps_a_deep_float64_reference_inside_fp32(bench):
    """60 BNs deep: wide's float64 output passes fp32's largest value, wide_calib's stays near the typical one."""
    net = _chain(60)
    x = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    fp32_max = float(np.finfo(np.float32).max)
    wide = np.abs(bench.reference(bench.wide_bn(net, seed=1).eval(), x)).max()
    calib = np.abs(bench.reference(bench.wide_calib_bn(net, seed=1, shape=(1, 32)).eval(), x)).max()
    typical = np.abs(bench.reference(bench.BN_KINDS["typical"](net, seed=1).eval(), x)).max()
    assert wide > fp32_max
    assert 0 < calib < 1e3 and 1e-3 < calib / typical < 1e3


def test_wide_calib_rows_are_judged_as_wide_and_an_unknown_bn_is_refused(bench, tmp_path):
    res = _result({("a", "wide_calib"): [(0, 0.5, 1.0), (1, 0.6, 1.0), (2, 0.55, 1.0)],
                   ("a", "typical"): [(0, 0.5, 1.0), (1, 0.6, 1.0), (2, 0.55, 1.0)]})
    out = bench.merge_results(res, [], [])
    v = {r["bn"]: r["summary"]["verdict_cpu_"] for r in out["rows"]}
    assert v == {"wide_calib": "below / below", "typical": "within 5% / within 5%"}
    assert bench.judge({"bn": "wide_calib", "candidates": {"bnfold_fp16": {"max_rel": 1.0, "mean_rel": 1.0},
                                                          "occ_fp16_unfolded": {"max_rel": 1.0, "mean_rel": 1.0}}},
                       "") == "NOT met"  # equal is not below
    # a new BN kind's rows are added after the same model's rows
    more = bench.merge_results(_result({("a", "typical"): [(0, 1.0, 1.0)], ("a", "wide"): [(0, 1.0, 1.0)],
                                        ("b", "typical"): [(0, 1.0, 1.0)]}),
                               [("c.json", _result({("a", "wide_calib"): [(0, 0.5, 1.0)],
                                                    ("c", "wide_calib"): [(0, 0.5, 1.0)]}))], [])
    assert [(r["model"], r["bn"]) for r in more["rows"]] == [("a", "typical"), ("a", "wide"), ("a", "wide_calib"),
                                                             ("b", "typical"), ("c", "wide_calib")]
    assert more["meta"]["notes"] == ["a wide_calib, c wide_calib added d (c.json)"]
    with pytest.raises(SystemExit) as e:
        bench.main(["--bn", "wide_clib", "--models", "mlp_bn", "--out", str(tmp_path)])
    assert e.value.code == 2 and not list(tmp_path.iterdir())
