"""`bnfold fold` / `bnfold export` on PyTorch factory specs: weights, input shapes, and every bad input."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from bnfold import count_bn
from bnfold.cli.main import main
from bnfold.models import zoo

from .helpers import assert_close, run_ort

SPEC = "bnfold.models.zoo:small_resnet"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    model = zoo.randomize_bn(zoo.create("small_resnet"), seed=3).eval()
    torch.save(model.state_dict(), d / "w.pt")
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(d / "w.safetensors"))
    return model, d


@pytest.mark.parametrize("fmt", ["w.pt", "w.safetensors"])
def test_fold_spec_with_weights(trained, tmp_path, fmt):
    model, d = trained
    out = tmp_path / "f.onnx"
    r = run("fold", SPEC, "--weights", d / fmt, "--input-shape", "1x3x32x32", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["bn_total"], data["folded"]) == (9, 9) and data["tracer"] == "torch.export"
    folded = onnx.load(out)
    assert count_bn(folded) == 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model.double()(x.double()).numpy()
    assert_close(run_ort(folded, {folded.graph.input[0].name: x.numpy()})[0], ref)


def test_export_no_fold_and_named_input(trained, tmp_path):
    _, d = trained
    out = tmp_path / "o.onnx"
    r = run("export", "small_resnet", "--weights", d / "w.pt", "--input-shape", "image=1x3x32x32", "--no-fold",
            "-o", out)
    assert r.exit_code == 0, r.output
    m = onnx.load(out)
    assert count_bn(m) == 9 and m.graph.input[0].name == "image"


def test_untrusted_pickle_is_refused_unless_trusted(tmp_path):
    model = zoo.create("small_resnet")
    ckpt = tmp_path / "full.pt"
    torch.save({"model": model, "note": object.__new__(zoo.ZooEntry)}, ckpt)  # needs unpickling of classes
    r = run("fold", SPEC, "--weights", ckpt, "-o", tmp_path / "f.onnx")
    assert r.exit_code == 2 and "--trust-pickle" in r.output and not (tmp_path / "f.onnx").exists()
    r = run("fold", SPEC, "--weights", ckpt, "-o", tmp_path / "f.onnx", "--trust-pickle", "-q")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("case", ["keys", "import", "attr", "shape", "not_module", "train_spec"])
def test_bad_torch_inputs_exit_2(trained, tmp_path, case):
    _, d = trained
    out = tmp_path / "f.onnx"
    args = {
        "keys": ["fold", "bnfold.models.zoo:mobilenet", "--weights", d / "w.pt", "-o", out],
        "import": ["fold", "no_such_pkg.models:net", "--random-weights", "-o", out],
        "attr": ["fold", "bnfold.models.zoo:no_such_net", "--random-weights", "-o", out],
        "shape": ["fold", SPEC, "--input-shape", "1x3xAx32", "-o", out],
        "not_module": ["fold", "bnfold.models.zoo:names", "--random-weights", "-o", out],
        "train_spec": ["fold", "unknown_zoo_name", "-o", out],
    }[case]
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert not out.exists()
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    if case == "keys":
        assert "checkpoint keys do not match" in r.output


def test_factory_without_default_shape_needs_input_shape(tmp_path):
    r = run("fold", "torch.nn:Identity", "--random-weights", "-o", tmp_path / "f.onnx")
    assert r.exit_code == 2 and "--input-shape" in r.output
