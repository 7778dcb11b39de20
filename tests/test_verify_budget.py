"""verify judged against the model's own rounding (issue 21): the issue's three verdicts, fp16 candidates against
an fp32 reference, --atol/--rtol as overrides; and verify stating its power (issue 22): an unproven pass on
identity statistics, --strict; mismatched inputs named for both models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from bnfold.cli.main import main
from bnfold.verify import verify

from . import verify_cases as vc
from .helpers import G


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _stats(result):
    return next(iter(result.outputs.values()))


def test_deep_correct_fold_at_1e8_passes():
    """The Inception-v3-sized correct fold (94 BN, randomized statistics, activations beyond 1e8): its error is
    fp32's own rounding; the fixed rule called it FAILED."""
    ref = vc.deep_inception_like()
    assert sum(n.op_type == "BatchNormalization" for n in ref.graph.node) == 94
    cand = vc.folded(ref)
    result = verify(ref, cand)
    st = _stats(result)
    assert result.passed, result.verdict()
    assert st.budget == "float32 rounding" and st.tol_ratio < 1 and st.max_abs > 1e3  # large errors, in scale
    assert "x its float32 rounding budget" in result.verdict() and result.unproven is None
    assert not verify(ref, cand, budget=False).passed  # the fixed rule's verdict on the same fold
    ch, budget = st.worst_channel["index"][0], st.worst_channel["atol"]
    bad = vc.shift_bias(cand, "fc", [ch], 0.3 * budget)  # a wrong bias well within the budget passes...
    assert verify(ref, bad, power=False).passed
    bad = vc.shift_bias(cand, "fc", [ch], 3 * budget)  # ... three budgets fails
    assert not verify(ref, bad, power=False, locate=False).passed


def test_cancelling_channels_pass():
    """Two channels of ~1e4 cancelling into ~1: the unfolded fp32 model is itself ~1e-1 off float64."""
    ref = vc.cancelling()
    result = verify(ref, vc.folded(ref))
    assert result.passed, result.verdict()
    assert _stats(result).max_abs > 1e-2  # what the fixed rule (tolerance ~2e-4) failed
    assert not verify(ref, vc.folded(ref), budget=False).passed


def test_yolo_head_with_probabilities_off_by_0025_fails():
    """Boxes in the hundreds and probabilities side by side on the last axis, concatenated over anchors: the
    probabilities' channel is the last axis (not the Concat's), and +0.025 on them fails."""
    ref = vc.yolo_head()
    ok = verify(ref, vc.folded(ref))
    assert ok.passed, ok.verdict()
    assert _stats(ok).channel_axes == [2]
    bad = verify(ref, vc.folded(vc.yolo_head(prob_shift=0.025)))
    st = _stats(bad)
    assert not bad.passed and st.channel_axes == [2] and st.worst_channel["index"][0] >= 4
    assert bad.verdict().startswith("FAILED | ")


def _randomized_resnet_pair():
    torch = pytest.importorskip("torch")
    from bnfold.export import export_onnx
    from bnfold.models import zoo
    torch.manual_seed(0)
    model = zoo.randomize_bn(zoo.create("small_resnet")).eval()
    ref = export_onnx(model, (torch.randn(2, 3, 32, 32),), keep_bn=True)
    return ref, vc.folded(ref)


def _scale_channel(model, op: str, factor: float):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.op_type == op)
    t = next(t for t in m.graph.initializer if t.name == node.input[1])
    a = numpy_helper.to_array(t).copy()
    a[1] = (a[1].astype(np.float32) * factor).astype(a.dtype)
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    return m


def test_fp16_candidate_is_judged_with_fp16_budget(tmp_path):
    ref, cand = _randomized_resnet_pair()
    c16 = vc.to_fp16(cand)
    ok = verify(ref, c16)
    assert ok.passed, ok.verdict()
    assert ok.tolerance["dtype"] == "float16" and "float16 rounding budget" in ok.verdict()
    assert not verify(ref, c16, budget=False, rtol=1e-5, atol=1e-6).passed  # fp32-sized tolerance would fail it
    bad = verify(ref, _scale_channel(c16, "Conv", 1.25))
    assert not bad.passed and "float16 rounding budget" in bad.verdict()
    onnx.save(ref, tmp_path / "ref.onnx")
    onnx.save(c16, tmp_path / "c16.onnx")
    onnx.save(_scale_channel(c16, "Conv", 1.25), tmp_path / "bad16.onnx")
    r = cli("verify", tmp_path / "ref.onnx", tmp_path / "c16.onnx")
    assert r.exit_code == 0 and "float16 rounding budget" in r.output.splitlines()[-1], r.output
    r = cli("verify", tmp_path / "ref.onnx", tmp_path / "bad16.onnx")
    assert r.exit_code == 1 and r.output.splitlines()[-1].startswith("FAILED | "), r.output


def test_explicit_tolerance_overrides_the_budget():
    ref = vc.cancelling()
    cand = vc.folded(ref)
    r = verify(ref, cand, atol=1.0, rtol=0.0)
    assert r.passed and r.tolerance["kind"] == "fixed" and _stats(r).budget is None and _stats(r).atol == 1.0
    assert "--atol/--rtol" in r.verdict()
    assert not verify(ref, cand, atol=1e-4, rtol=0.0).passed


# ------------------------------------------------------------------------------------------------ power
def test_readme_pair_is_unproven_and_strict_fails(tmp_path):
    """A freshly initialised network (`--random-weights`: identity statistics) and its fold: the pass proves
    nothing (the README's step by step now uses the zoo's randomized statistics, which are proven)."""
    ref, folded = tmp_path / "small_resnet.onnx", tmp_path / "small_resnet_folded.onnx"
    assert cli("export", "small_resnet", "--no-fold", "--random-weights", "-o", ref, "-q").exit_code == 0
    assert cli("fold", ref, "-o", folded, "-q").exit_code == 0
    r = cli("verify", ref, folded)
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code == 0 and last.startswith("PASSED (unproven: the BatchNorms are identities on this data"), last
    r = cli("verify", ref, folded, "--strict")
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("PASSED (unproven:"), r.output
    r = cli("verify", ref, folded, "--json")
    import json
    power = json.loads(r.stdout)["power"]
    assert power["bn_total"] == 9 and power["all_removed_detected"] is False


def test_randomized_statistics_are_proven(tmp_path):
    ref, cand = _randomized_resnet_pair()
    result = verify(ref, cand)
    assert result.passed and result.unproven is None, result.verdict()
    assert result.power["checked"] == result.power["bn_total"] == 9 and not result.power["undetected"]
    onnx.save(ref, tmp_path / "ref.onnx")
    onnx.save(cand, tmp_path / "cand.onnx")
    r = cli("verify", tmp_path / "ref.onnx", tmp_path / "cand.onnx", "--strict")
    assert r.exit_code == 0 and r.output.strip().splitlines()[-1].startswith("PASSED | "), r.output


def test_one_identity_bn_among_real_ones_is_named():
    g = G(seed=3)
    x = g.input("x", [2, 4, 6, 6])
    y = g.node("Relu", [g.bn(g.conv(x, 4, 4, pads=[1] * 4), 4, name="bn_real")])
    ident = [np.ones(4), np.zeros(4), np.zeros(4), np.ones(4)]
    y = g.bn(g.conv(y, 4, 4, pads=[1] * 4), 4, params=ident, name="bn_identity")
    ref = g.model([y])
    result = verify(ref, vc.folded(ref))
    assert result.passed and result.power["undetected"] == ["bn_identity"], result.power
    assert result.unproven.startswith("1 of 2 BatchNorms change no output") and "bn_identity" in result.unproven


# ------------------------------------------------------------------------------------------------ inputs
def test_mismatched_inputs_name_both_models(tmp_path):
    def model(side):
        g = G(seed=0)
        x = g.input("input", [1, 3, side, side])
        return g.model([g.bn(g.conv(x, 3, 4, pads=[1] * 4), 4)])
    onnx.save(model(32), tmp_path / "a.onnx")
    onnx.save(vc.folded(model(64)), tmp_path / "b.onnx")
    r = cli("verify", tmp_path / "a.onnx", tmp_path / "b.onnx")
    assert r.exit_code == 2, r.output
    msg = r.output.strip()
    assert "'input' float32[1x3x32x32]" in msg and "'input' float32[1x3x64x64]" in msg
    assert "cannot run the reference" not in msg and "Traceback" not in msg
    assert len(msg.splitlines()) == 1, msg
