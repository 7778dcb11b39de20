"""Acceptance for verify (issue 14): deliberately wrong folds -- one output channel scaled, one bias shifted, in an
early, a middle and a late layer; on the ONNX path (`bnfold fold original.onnx`) and the PyTorch path
(`bnfold export SPEC --no-fold` vs `bnfold fold SPEC`); a classifier, a detector-style head (box coordinates x600
next to probabilities in one tensor) and a segmentation-style output -- all FAIL with exit 1 and name the
corrupted layer. The correct folds PASS (exit 0)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from torch import nn

from bnfold.cli.main import main
from bnfold.models import zoo
from bnfold.verify import compare_output, source_layers, verify

from .helpers import run_ort


class DetHead(nn.Module):
    """A detector-style head: one tensor (N, anchors, 4 + classes) with box coordinates scaled to pixels (x600)
    next to class probabilities (0..1)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.b = nn.Sequential(zoo.conv_bn(3, 8), zoo.conv_bn(8, 16, 3, 2), zoo.conv_bn(16, 16))
        self.head = nn.Conv2d(16, 4 + classes, 1)

    def forward(self, x):
        h = self.head(self.b(x)).flatten(2).transpose(1, 2)
        return torch.cat([torch.sigmoid(h[..., :4]) * 600, torch.sigmoid(h[..., 4:])], -1)


def det_head():
    torch.manual_seed(0)
    return zoo.randomize_bn(DetHead()).eval()


def small_resnet():
    torch.manual_seed(0)
    return zoo.randomize_bn(zoo.create("small_resnet")).eval()


def unet():
    torch.manual_seed(0)
    return zoo.randomize_bn(zoo.create("unet")).eval()


MODELS = {  # spec, input shape, {position: (layer, output channel to corrupt)}
    "classifier": ("tests.test_verify_acceptance:small_resnet", "2x3x32x32",
                   {"early": ("stem.0", 1), "middle": ("layers.1.0.conv1", 1), "late": ("layers.2.0.conv2", 1)}),
    "detector": ("tests.test_verify_acceptance:det_head", "2x3x16x16",
                 {"early": ("b.0.0", 1), "middle": ("b.1.0", 1), "late": ("head", 5)}),
    "segmentation": ("tests.test_verify_acceptance:unet", "2x3x32x32",
                     {"early": ("enc1.0", 1), "middle": ("up_g", 1), "late": ("dec.0", 1)}),
}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per model: the reference export (BN kept), the ONNX-path fold and the PyTorch-path fold."""
    d = tmp_path_factory.mktemp("acceptance")
    out = {}
    for key, (spec, shape, _) in MODELS.items():
        ref, torch_folded = d / f"{key}_orig.onnx", d / f"{key}_torch.onnx"
        r = cli("export", spec, "--random-weights", "--no-fold", "--input-shape", shape, "-o", ref, "-q")
        assert r.exit_code == 0, r.output
        r = cli("fold", spec, "--random-weights", "--input-shape", shape, "-o", torch_folded, "-q")
        assert r.exit_code == 0, r.output
        onnx_folded = d / f"{key}_onnx.onnx"
        r = cli("fold", ref, "-o", onnx_folded, "-q")
        assert r.exit_code == 0, r.output
        out[key] = {"ref": ref, "onnx": onnx_folded, "torch": torch_folded}
    return out


def corrupt(path, out, layer: str, channel: int, how: str, factor: float = 1.25, shift: float | None = None):
    """Scale one output channel of ``layer``'s weight by ``factor``, or shift its bias by 0.5 (``both``: scale
    and shift by 0.3, the issue's example for the detector's probability channel); the layer is found through
    the exporter's layer names."""
    m = onnx.load(path)
    layers = source_layers(m)
    node = next(n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose") and layers.get(n.output[0]) == layer)
    inits = {t.name: t for t in m.graph.initializer}
    axis = 1 if node.op_type == "ConvTranspose" else 0
    if how in ("scale", "both"):
        t = inits[node.input[1]]
        w = numpy_helper.to_array(t).copy()
        np.moveaxis(w, axis, 0)[channel] *= factor
        t.CopyFrom(numpy_helper.from_array(w, t.name))
    if how in ("shift", "both"):
        assert len(node.input) > 2 and node.input[2] in inits, "the folded layer has a bias"
        t = inits[node.input[2]]
        b = numpy_helper.to_array(t).copy()
        b[channel] += shift if shift is not None else (0.3 if how == "both" else 0.5)
        t.CopyFrom(numpy_helper.from_array(b, t.name))
    onnx.save(m, out)
    return out


@pytest.mark.parametrize("path", ["onnx", "torch"])
@pytest.mark.parametrize("model", list(MODELS))
def test_correct_folds_pass(built, model, path):
    r = cli("verify", built[model]["ref"], built[model][path])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("PASSED | ")


CASES = [(m, p, pos, how) for m in MODELS for p in ("onnx", "torch") for pos in ("early", "middle", "late")
         for how in ("scale", "shift")]


@pytest.mark.parametrize("model,path,position,how", CASES, ids=["-".join(c) for c in CASES])
def test_wrong_fold_fails_and_names_the_layer(built, tmp_path, model, path, position, how):
    layer, channel = MODELS[model][2][position]
    if model == "detector" and position == "late":
        how = "both" if how == "shift" else how
    bad = corrupt(built[model][path], tmp_path / "bad.onnx", layer, channel, how)
    r = cli("verify", built[model]["ref"], bad, "--json")
    assert r.exit_code == 1, r.output
    verdict = r.stderr.strip().splitlines()[-1]
    assert verdict.startswith("FAILED | ") and f"(layer {layer})" in verdict, verdict
    fd = json.loads(r.stdout)["first_divergence"]
    assert fd["layer"] == layer


def test_issue_detector_example_fails_per_channel(built, tmp_path):
    """The issue's case: a probability channel scaled by 1.25 and shifted by 0.3 in a tensor whose box channels
    are x600 passed the whole-tensor tolerance; per channel it fails, and the JSON names the channel."""
    bad = corrupt(built["detector"]["torch"], tmp_path / "bad.onnx", "head", 5, "both", factor=1.05, shift=0.03)
    result = verify(onnx.load(built["detector"]["ref"]), onnx.load(bad), budget=False)  # the fixed rule
    st = result.outputs[next(iter(result.outputs))]
    assert not result.passed and st.channel_axes == [2] and st.worst_channel["index"] == [5]
    assert st.worst_channel["atol"] == pytest.approx(1e-4)  # the probability channel's own magnitude
    budgeted = verify(onnx.load(built["detector"]["ref"]), onnx.load(bad))  # and the rounding budget
    st = budgeted.outputs[next(iter(budgeted.outputs))]
    assert not budgeted.passed and st.worst_channel["index"] == [5] and st.worst_channel["atol"] < 1e-4
    # the old rule (the whole tensor one channel: atol 1e-4 x max|ref| ~ 0.06) lets this wrong fold through
    feeds = {"input": np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)}
    ref = run_ort(onnx.load(built["detector"]["ref"]), feeds)[0]
    cand = run_ort(onnx.load(bad), feeds)[0]
    assert np.abs(ref).max() > 100
    assert compare_output(ref, cand, atol=None, rtol=None, channel_axes=()).passed
    assert not compare_output(ref, cand, atol=None, rtol=None, channel_axes=(2,)).passed


@pytest.mark.parametrize("position", ["middle"])
def test_torch_module_reference_names_the_layer(built, tmp_path, position):
    """verify(module, candidate): the reference is run eagerly; on failure it is exported (BN kept) so the
    localizer can name the layer."""
    layer, channel = MODELS["classifier"][2][position]
    bad = corrupt(built["classifier"]["torch"], tmp_path / "bad.onnx", layer, channel, "scale")
    result = verify(small_resnet(), onnx.load(bad))
    assert not result.passed and result.first_divergence["layer"] == layer, result.verdict()
