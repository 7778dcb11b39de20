"""Modules that carry their own deploy switch (RepVGG/MobileOne `reparameterize()`, `switch_to_deploy()`, RepViT's
`fuse()` returning the fused module, torchvision's `fuse_model()`): listed by `inspect` on a SPEC, called first by
`--reparameterize` on fold/export/run, and reported (which modules, how many).

Numbers: the reparameterized, folded ONNX model against a float64 run of the model as given (tests/helpers.py)."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from bnfold import BnfoldError, count_bn
from bnfold.cli.main import main
from bnfold.fold import fold_torch, inspect_torch
from bnfold.models import zoo
from bnfold.onnx_fold import FoldOptions
from bnfold.torch_fold import find_deploy_switches, reparameterize

from .helpers import assert_close, run_ort


class ConvBN(nn.Sequential):
    """RepViT's Conv2d_BN: `fuse()` returns the fused conv, which replaces the module."""

    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))

    @torch.no_grad()
    def fuse(self):
        return fuse_conv_bn_eval(self[0], self[1])


class RepBlock(nn.Module):
    """RepVGG: 3x3 conv+BN and 1x1 conv+BN, summed; `reparameterize()` merges them into one 3x3 conv in place."""

    def __init__(self, c):
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.reparam = None

    def forward(self, x):
        if self.reparam is not None:
            return self.act(self.reparam(x))
        return self.act(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)))

    @torch.no_grad()
    def reparameterize(self):
        if self.reparam is not None:
            return
        bn3, bn1 = self.bn3, self.bn1
        w3, b3 = fuse_conv_bn_weights(self.conv3.weight, None, bn3.running_mean, bn3.running_var, bn3.eps,
                                      bn3.weight, bn3.bias)
        w1, b1 = fuse_conv_bn_weights(self.conv1.weight, None, bn1.running_mean, bn1.running_var, bn1.eps,
                                      bn1.weight, bn1.bias)
        conv = nn.Conv2d(w3.shape[1], w3.shape[0], 3, padding=1)
        conv.weight.copy_(w3 + F.pad(w1, [1, 1, 1, 1]))
        conv.bias.copy_(b3 + b1)
        self.reparam = conv
        del self.conv3, self.bn3, self.conv1, self.bn1


class Head(nn.Module):
    """`switch_to_deploy()` in place; a `fuse(other)` that needs an argument is not a deploy switch."""

    def __init__(self, c, n):
        super().__init__()
        self.fc = nn.Linear(c, n)
        self.deployed = False

    def forward(self, x):
        return self.fc(x.mean((2, 3)))

    def switch_to_deploy(self):
        self.deployed = True

    def fuse(self, other):  # not callable without arguments: not a switch
        raise AssertionError("must not be called")


class Decoy(nn.Module):
    """A `reparameterize` attribute that is a flag, not a method."""

    def __init__(self):
        super().__init__()
        self.reparameterize = True

    def forward(self, x):
        return x


def build() -> nn.Module:
    """The SPEC the command-line tests load: `tests.test_deploy_switches:build`."""
    torch.manual_seed(0)
    return zoo.randomize_bn(nn.Sequential(ConvBN(3, 8), RepBlock(8), Decoy(), RepBlock(8), Head(8, 5))).eval()


SHAPE = (2, 3, 12, 12)
SWITCHES = [("0", "ConvBN", "fuse"), ("1", "RepBlock", "reparameterize"), ("3", "RepBlock", "reparameterize"),
            ("4", "Head", "switch_to_deploy")]


def test_switches_are_found_by_what_is_callable():
    found = [(s.module, s.cls, s.method) for s in find_deploy_switches(build())]
    assert found == SWITCHES


def test_reparameterize_calls_each_switch_on_a_copy():
    model = build()
    state = copy.deepcopy(model.state_dict())
    new, called = reparameterize(model)
    assert [(s.module, s.cls, s.method) for s in called] == SWITCHES
    # the caller's model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and model[1].reparam is None
    assert type(new[0]) is nn.Conv2d and new[1].reparam is not None and new[4].deployed
    assert not any(isinstance(m, nn.BatchNorm2d) for m in new.modules())
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert_close(new(x).numpy(), copy.deepcopy(model).double()(x.double()).numpy())


def test_reparameterize_refuses_training_mode_and_says_which_switch_failed():
    with pytest.raises(BnfoldError, match="training mode"):
        reparameterize(build().train())

    class Broken(nn.Module):
        def forward(self, x):
            return x

        def switch_to_deploy(self):
            raise RuntimeError("boom")

    with pytest.raises(BnfoldError, match=r"Broken.switch_to_deploy\(\) of module '1' failed \(RuntimeError: boom"):
        reparameterize(nn.Sequential(nn.Identity(), Broken()).eval())


def test_fold_with_reparameterize_merges_the_branches(tmp_path):
    model = build()
    x = torch.randn(SHAPE)
    _, plain = fold_torch(model, (x,), tmp_path / "plain.onnx", FoldOptions(merge_branches=False))
    _, merged = fold_torch(model, (x,), tmp_path / "merged.onnx")  # the ONNX pass merges the branches itself
    res, report = fold_torch(model, (x,), tmp_path / "rep.onnx", reparameterize=True)
    assert report.extra["reparameterized"]["count"] == 4
    assert [m["module"] for m in report.extra["reparameterized"]["modules"]] == [s[0] for s in SWITCHES]
    assert "reparameterized" not in plain.extra and plain.folded == plain.bn_total == 5
    convs = {}
    for name in ("plain", "merged", "rep"):
        out = onnx.load(tmp_path / f"{name}.onnx")
        onnx.checker.check_model(out, full_check=True)
        assert count_bn(out) == 0
        convs[name] = sum(n.op_type == "Conv" for n in out.graph.node)
        with torch.no_grad():
            ref = copy.deepcopy(model).double()(x.double()).numpy()
        assert_close(run_ort(out, {out.graph.input[0].name: x.numpy()})[0], ref)
    assert (convs["plain"], convs["merged"], convs["rep"]) == (5, 3, 3)


def test_inspect_lists_the_switches():
    report = inspect_torch(build(), (torch.randn(SHAPE),))
    assert [(s["module"], s["class"], s["method"]) for s in report.extra["deploy_switches"]] == SWITCHES
    assert report.dry_run and report.bn_total == 5


# ------------------------------------------------------------------------------------------------ command line
SPEC = "tests.test_deploy_switches:build"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.pt"
    torch.save(build().state_dict(), path)
    return path


def test_cli_inspect_spec_lists_switches(weights):
    r = run("inspect", SPEC, "--weights", weights, "--input-shape", "2x3x12x12")
    assert r.exit_code == 0, r.output
    assert "deploy switches: 4 module(s): 2 RepBlock.reparameterize(), 1 ConvBN.fuse(), 1 Head.switch_to_deploy()" \
        in r.output
    assert "  3: RepBlock.reparameterize()" in r.output and r.output.strip().splitlines()[-1].startswith("PLAN |")
    r = run("inspect", SPEC, "--weights", weights, "--input-shape", "2x3x12x12", "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert [s["module"] for s in data["deploy_switches"]] == [s[0] for s in SWITCHES]


def test_cli_fold_and_export_reparameterize(weights, tmp_path):
    out = tmp_path / "f.onnx"
    r = run("fold", SPEC, "--weights", weights, "--input-shape", "2x3x12x12", "--reparameterize", "-o", out)
    assert r.exit_code == 0, r.output
    assert "reparameterized 4 module(s): 2 RepBlock.reparameterize()" in r.output
    assert sum(n.op_type == "Conv" for n in onnx.load(out).graph.node) == 3
    ref_out = tmp_path / "ref.onnx"
    r = run("export", SPEC, "--weights", weights, "--input-shape", "2x3x12x12", "--reparameterize", "--no-fold",
            "-o", ref_out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["reparameterized"]["count"] == 4
    assert count_bn(onnx.load(ref_out)) == 0  # the switches merged every BN themselves


def test_cli_reparameterize_on_onnx_is_bad_input(tmp_path):
    model = build()
    src = tmp_path / "m.onnx"
    fold_torch(model, (torch.randn(SHAPE),), src, fold=False)
    before = src.read_bytes()
    out = tmp_path / "o.onnx"
    for args in (["fold", src, "--reparameterize", "-o", out], ["inspect", src, "--reparameterize"]):
        r = run(*args)
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and "--reparameterize" in lines[0], r.output
    assert not out.exists() and src.read_bytes() == before
