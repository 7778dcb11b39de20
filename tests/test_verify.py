"""verify: passes on correct folds, fails (exit 1) on a corrupted fold and names it, fp16-aware tolerances,
accuracy on labelled data, real-data loaders, and the command line's exit codes and JSON."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from bnfold import fold_model
from bnfold.cli.main import main
from bnfold.data import load_dataset, load_digits
from bnfold.export import export_onnx
from bnfold.models import zoo
from bnfold.verify import compare_output, verify

from .helpers import G


def exported(name: str, batch: int = 2):
    entry = zoo.get(name)
    torch.manual_seed(0)
    model = zoo.randomize_bn(entry.factory()).eval()
    return model, export_onnx(model, (torch.randn((batch,) + entry.input_shape[1:]),))


def corrupt(model: onnx.ModelProto, node_name: str, factor: float = 1.5) -> onnx.ModelProto:
    """Scale one output channel of a node's weight: the kind of error a wrong fold makes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.name == node_name)
    t = next(t for t in m.graph.initializer if t.name == node.input[1])
    a = numpy_helper.to_array(t).copy()
    a[1] *= factor
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    return m


@pytest.mark.parametrize("name", ["small_resnet", "mobilenet", "unet", "mlp_bn"])
def test_correct_folds_pass(name):
    _, original = exported(name)
    folded, _ = fold_model(original)
    result = verify(original, folded)
    assert result.passed, result.verdict()
    assert result.verdict().startswith("PASSED | ")
    assert result.providers == {"reference": ["CPUExecutionProvider"], "candidate": ["CPUExecutionProvider"]}
    for s in result.outputs.values():
        assert s.max_abs < s.atol and s.cosine > 0.999999


def test_corrupted_fold_fails_and_names_the_layer():
    _, original = exported("small_resnet")
    folded, report = fold_model(original)
    target = next(e for e in report.entries if e.layer == "layers.1.0.bn1")
    bad = corrupt(folded, target.into)
    result = verify(original, bad)
    assert not result.passed
    fd = result.first_divergence
    assert fd["node"] == target.into and fd["fold"] == "layers.1.0.bn1" and fd["fold_direction"] == "backward"
    assert "layers.1.0.bn1" in result.verdict() and result.verdict().startswith("FAILED | ")


def test_corrupted_forward_fold_is_named():
    g = G()
    x = g.input("x", [4, 6])
    y = g.node("Gemm", [g.bn(g.node("Relu", [x]), 6, name="bn_in"), g.const(g.rand(6, 5))], name="fc")
    model = g.model([y])
    folded, _ = fold_model(model)
    result = verify(model, corrupt(folded, "fc", 1.2))
    assert not result.passed and result.first_divergence["fold"] == "bn_in"
    assert result.first_divergence["fold_direction"] == "forward"


def test_fp16_passes_with_fp16_tolerance_and_catches_real_errors():
    g = G(dtype=np.float16, seed=4)
    x = g.input("x", [8, 8, 10, 10])
    y = g.node("Relu", [g.bn(g.conv(x, 8, 16, pads=[1, 1, 1, 1], name="c1"), 16)])
    y = g.bn(g.conv(y, 16, 16, pads=[1, 1, 1, 1], name="c2"), 16)
    model = g.model([y])
    folded, _ = fold_model(model)
    ok = verify(model, folded)
    assert ok.passed, ok.verdict()
    st = next(iter(ok.outputs.values()))
    assert st.dtype == "float16" and st.budget == "float16 rounding" and ok.tolerance["dtype"] == "float16"
    assert st.max_abs > 1e-3  # a healthy fp16 fold differs by more than fp32's default tolerance would allow
    bad = verify(model, corrupt(folded, "c2", 1.05))
    assert not bad.passed and bad.first_divergence["node"] == "c2"
    fixed = verify(model, folded, budget=False)  # the fixed rule follows the dtype too
    st = next(iter(fixed.outputs.values()))
    assert fixed.passed and st.budget is None and st.rtol == 1e-2


def test_tolerances_follow_dtype():
    ref = np.linspace(-4, 4, 100).astype(np.float32)
    assert compare_output(ref, ref + 1e-5, atol=None, rtol=None).passed
    assert not compare_output(ref, ref + 1e-2, atol=None, rtol=None).passed
    ref16 = ref.astype(np.float16)
    assert compare_output(ref16, (ref + 1e-2).astype(np.float16), atol=None, rtol=None).passed
    assert not compare_output(ref16, (ref * 1.1).astype(np.float16), atol=None, rtol=None).passed
    assert compare_output(ref, ref + 0.5, atol=1.0, rtol=0).passed  # explicit atol is absolute
    nan = ref.copy()
    nan[3] = np.nan
    assert not compare_output(ref, nan, atol=None, rtol=None).passed
    inf = ref.copy()
    inf[[0, 5]] = [-np.inf, np.inf]
    st = compare_output(inf, inf.copy(), atol=None, rtol=None)  # identical infinities agree
    assert st.passed and st.max_abs == 0 and st.cosine == pytest.approx(1.0)
    other = inf.copy()
    other[5] = -np.inf
    assert not compare_output(inf, other, atol=None, rtol=None).passed


def _trained_mnist_mlp(epochs: int = 10):
    """The paper's 3x100 sigmoid MLP with BN, trained briefly on the bundled digits."""
    data = load_digits()
    x = torch.from_numpy(data.inputs["x"])
    y = torch.from_numpy(data.labels)
    torch.manual_seed(0)
    model = zoo.create("mnist_mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def test_accuracy_before_and_after_folding(tmp_path):
    model = _trained_mnist_mlp()
    original = export_onnx(model, (torch.zeros(2, 64),))
    folded, report = fold_model(original)
    assert report.folded == 3
    result = verify(original, folded, data=load_digits())
    assert result.passed and result.samples == 1797
    assert result.accuracy["reference"] > 0.9
    assert result.accuracy["candidate"] == result.accuracy["reference"] and result.accuracy["delta"] == 0
    assert result.top1_agreement == 1.0
    # the torch module itself as the reference
    result = verify(model, folded, data=load_digits())
    assert result.passed and result.providers["reference"] == ["torch-cpu"]


def test_npz_and_image_folder_data(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", input=rng.standard_normal((5, 3, 8, 8)).astype(np.float32), labels=np.arange(5))
    ds = load_dataset(tmp_path / "d.npz")
    assert set(ds.inputs) == {"input"} and list(ds.labels) == [0, 1, 2, 3, 4]
    from PIL import Image
    for c in ("cat", "dog"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    ds = load_dataset(tmp_path / "img", image_size=(8, 8))
    assert ds.inputs["x"].shape == (4, 3, 8, 8) and list(ds.labels) == [0, 0, 1, 1] and ds.classes == ["cat", "dog"]
    assert 0 <= ds.inputs["x"].min() and ds.inputs["x"].max() <= 1


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    _, original = exported("small_resnet")
    folded, report = fold_model(original)
    onnx.save(original, d / "orig.onnx")
    onnx.save(folded, d / "folded.onnx")
    target = next(e for e in report.entries if e.layer == "layers.0.0.bn2")
    onnx.save(corrupt(folded, target.into), d / "bad.onnx")
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_pass_json(files):
    r = run("verify", files / "orig.onnx", files / "folded.onnx", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["passed"] is True and data["accuracy"] is None and data["top1_agreement"] == 1.0
    assert set(data["providers"]) == {"reference", "candidate"}
    for stats in data["outputs"].values():
        assert {"max_abs", "max_rel", "mean_abs", "p99_abs", "cosine"} <= set(stats)
    assert r.stderr.strip().splitlines()[-1].startswith("PASSED | ")


def test_cli_fail_exit_1_names_layer(files):
    r = run("verify", files / "orig.onnx", files / "bad.onnx")
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("FAILED | ") and "layers.0.0.bn2" in r.output


@pytest.mark.parametrize("case", ["missing", "bad_data", "ep"])
def test_cli_bad_input_exit_2(files, tmp_path, case):
    if case == "missing":
        args = ["verify", files / "orig.onnx", tmp_path / "nope.onnx"]
    elif case == "bad_data":
        np.savez(tmp_path / "d.npz", x=np.zeros((4, 5), np.float32))
        args = ["verify", files / "orig.onnx", files / "folded.onnx", "--data", tmp_path / "d.npz"]
    else:
        from bnfold.runtime import provider_works
        if provider_works("tensorrt"):
            pytest.skip("TensorRT really runs here")
        args = ["verify", files / "orig.onnx", files / "folded.onnx", "--ep", "tensorrt"]
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1


def test_fold_verify_writes_only_on_pass(files, tmp_path):
    out = tmp_path / "f.onnx"
    r = run("fold", files / "orig.onnx", "-o", out, "--verify", "-q")
    assert r.exit_code == 0 and out.exists() and "PASSED | " in r.output


def test_fold_verify_failure_writes_nothing(files, tmp_path, monkeypatch):
    import bnfold.onnx_fold as of
    real = of.fold_model

    def broken(model, *a, **k):  # simulate a fold bug: corrupt one folded conv
        folded, report = real(model, *a, **k)
        if folded is not None:
            folded = corrupt(folded, report.entries[0].into, 1.3)
        return folded, report
    monkeypatch.setattr("bnfold.fold.fold_model", broken)
    out = tmp_path / "f.onnx"
    r = run("fold", files / "orig.onnx", "-o", out, "--verify")
    assert r.exit_code == 1, r.output
    assert not out.exists() and "FAILED | " in r.output and "nothing written" in r.output
