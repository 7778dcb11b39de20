"""Issue 14's findings, each reproduced and kept: per-channel tolerance, exact integer outputs (and the arg-max
tie rule), NaN candidates, overridable initializers, explicit data layout, and the front-end edges (FrozenBN
without eps, Conv3d subclasses, BN1d -> Dropout -> Linear, state-dict metadata, never-called BNs in calibrate,
the last pass's skip reason, models ONNX Runtime cannot run)."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnfold import fold_model
from bnfold.cli.main import main
from bnfold.errors import BnfoldError
from bnfold.torch_fold import fold_module
from bnfold.verify import compare_output, verify

from .helpers import G, assert_close


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------ tolerance
def test_each_channel_is_held_to_its_own_magnitude():
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(0, 600, (16, 4)), rng.uniform(0, 1, (16, 3))], 1)  # boxes, probabilities
    bad = ref.copy()
    bad[:, 5] = bad[:, 5] * 1.02 + 0.02  # a wrong scale and shift of one probability channel
    assert compare_output(ref, bad, atol=None, rtol=None, channel_axes=()).passed  # one scale: let through
    st = compare_output(ref, bad, atol=None, rtol=None)  # per slice of axis 1 by default
    assert not st.passed and st.worst_channel["index"] == [5] and st.channel_axes == [1]
    assert st.worst_channel["atol"] == pytest.approx(1e-4)
    ok = compare_output(ref, ref * (1 + 1e-6), atol=None, rtol=None)
    assert ok.passed and ok.tol_ratio < 1


def test_integer_outputs_are_exact_with_a_disagreement_rate():
    ref = np.array([[0, 1000], [3, 7]], np.int64)
    cand = ref.copy()
    cand[1, 0] = 4  # off by one next to a large element
    st = compare_output(ref, cand, atol=None, rtol=None)
    assert not st.passed and st.kind == "int" and st.mismatch_rate == pytest.approx(0.25)
    assert compare_output(ref, ref.copy(), atol=None, rtol=None).passed
    b = compare_output(np.array([True, False]), np.array([True, True]), atol=None, rtol=None)
    assert not b.passed and b.kind == "bool" and b.mismatch_rate == 0.5


def _argmax_model(w: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["scores"], name="mm"),
             helper.make_node("ArgMax", ["scores"], ["idx"], axis=1, keepdims=0)]
    g = helper.make_graph(nodes, "g", [x], [idx], initializer=[numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_argmax_tie_flips_are_accepted_and_real_flips_fail():
    w = np.zeros((4, 3), np.float32)
    w[:, 0] = w[:, 1] = 1.0  # columns 0 and 1 tie exactly: ArgMax picks 0
    ref = _argmax_model(w)
    w_tie = w.copy()
    w_tie[:, 1] *= 1 + 1e-6  # a rounding-size change flips the arg-max to 1
    w_apart = w.copy()
    w_apart[:, 1] = 0.9  # no tie: ArgMax picks 0 ...
    w_bad = w_apart.copy()
    w_bad[:, 1] *= 1.2  # ... and a real change makes it pick 1
    data_x = np.abs(np.random.default_rng(0).standard_normal((16, 4))).astype(np.float32) + 0.1
    from bnfold.data import Dataset
    data = Dataset({"x": data_x}, None, "pos")
    tie = verify(ref, _argmax_model(w_tie), data=data)
    st = tie.outputs["idx"]
    assert tie.passed and st.tie_flips == 16 and st.mismatch_rate == 1.0, tie.verdict()
    bad = verify(_argmax_model(w_apart), _argmax_model(w_bad), data=data)
    assert not bad.passed and bad.outputs["idx"].tie_flips == 0


def test_nan_candidate_fails_with_nan_cosine(tmp_path):
    g = G(seed=1)
    x = g.input("x", ["N", 3, 6, 6])
    y = g.node("Relu", [g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1], name="c1"), 4)])
    model = g.model([y])
    folded, _ = fold_model(model)
    bad = onnx.ModelProto()
    bad.CopyFrom(folded)
    t = next(t for t in bad.graph.initializer if t.name == next(n for n in bad.graph.node if n.op_type == "Conv").input[1])
    a = numpy_helper.to_array(t).copy()
    a[2] = np.nan
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    result = verify(model, bad)
    st = next(iter(result.outputs.values()))
    assert not result.passed and np.isnan(st.cosine) and st.nonfinite_mismatches > 0
    assert json.loads(result.to_json())["outputs"][next(iter(result.outputs))]["cosine"] is None
    assert "cosine NaN" in result.verdict() and result.verdict().startswith("FAILED | ")
    onnx.save(model, tmp_path / "o.onnx")
    onnx.save(bad, tmp_path / "b.onnx")
    r = cli("verify", tmp_path / "o.onnx", tmp_path / "b.onnx", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["passed"] is False  # valid JSON (null, not NaN)


def test_channel_axis_follows_the_producer():
    from bnfold.verify import _Graph
    g = G()
    x = g.input("x", [2, 3, 4, 4])
    c = g.conv(x, 3, 6, k=1, name="c")
    r = g.node("Reshape", [c, g.const(np.array([2, 6, 16], np.int64))], name="r")
    t = g.node("Transpose", [r], name="t", perm=[0, 2, 1])
    s = g.node("Sigmoid", [t], name="s")
    m = g.node("MatMul", [s, g.const(g.rand(6, 5))], name="mm")
    sm = g.node("Softmax", [c], name="sm", axis=1)
    cat = g.node("Concat", [g.node("Mul", [s, g.const(np.float32(600))], name="boxes"), t], name="cat", axis=-1)
    model = g.model([s, m, sm, cat])
    gr = _Graph(model, {"x": (2, 3, 4, 4)})
    assert gr.channel_axes(c) == (1,) and gr.channel_axes(r) == (1,) and gr.channel_axes(s) == (2,)
    assert gr.channel_axes(m) == (-1,) and gr.channel_axes(sm) == (1,)
    assert gr.channel_axes(cat) == (2,)  # the inputs' channel axis (the last), not a fixed reading of Concat's


# ------------------------------------------------------------------------------------------------ overridable
def _overridable_model(ir: int = 8) -> onnx.ModelProto:
    g = G(seed=2, ir_version=ir)
    x = g.input("x", ["N", 5])
    y = g.node("Add", [g.node("Gemm", [x, g.const(g.rand(3, 5))], transB=1, name="fc"), "offset"], name="add")
    g.inits.append(numpy_helper.from_array(g.rand(3), "offset"))
    g.inputs.append(helper.make_tensor_value_info("offset", TensorProto.FLOAT, [3]))
    return g.model([y])


def test_overridable_initializers_are_fed_random_values():
    ref = _overridable_model()
    same = verify(ref, ref)
    assert same.passed and same.overridden["initializers"] == ["offset"]
    baked = onnx.ModelProto()
    baked.CopyFrom(ref)
    keep = [i for i in baked.graph.input if i.name != "offset"]
    del baked.graph.input[:]
    baked.graph.input.extend(keep)  # the default is now a constant: the candidate baked it in
    result = verify(ref, baked)
    assert not result.passed, result.verdict()
    assert all(s.passed for s in result.outputs.values())  # with the defaults they agree
    assert not all(s.passed for s in result.overridden["outputs"].values())
    assert any("offset" in n for n in result.notes)


# ------------------------------------------------------------------------------------------------ data layout
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("layout")
    g = G(seed=3)
    x = g.input("input", ["N", 3, 8, 8])
    y = g.node("Relu", [g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1], name="c1"), 4)])
    model = g.model([y])
    folded, _ = fold_model(model)
    onnx.save(model, d / "o.onnx")
    onnx.save(folded, d / "f.onnx")
    rng = np.random.default_rng(0)
    nchw = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(d / "nhwc.npz", x=np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)))
    np.savez(d / "nchw.npz", x=nchw)
    return d


def test_nhwc_data_is_refused_unless_declared(small):
    r = cli("verify", small / "o.onnx", small / "f.onnx", "--data", small / "nhwc.npz")
    assert r.exit_code == 2 and "--layout nhwc" in r.output and r.output.strip().startswith("error:"), r.output
    ok = cli("verify", small / "o.onnx", small / "f.onnx", "--data", small / "nhwc.npz", "--layout", "nhwc", "--json")
    ref = cli("verify", small / "o.onnx", small / "f.onnx", "--data", small / "nchw.npz", "--json")
    assert ok.exit_code == 0 and ref.exit_code == 0, ok.output
    a, b = json.loads(ok.stdout), json.loads(ref.stdout)
    assert a["outputs"] == b["outputs"] and a["samples"] == 6  # the same numbers as the channels-first data


def test_run_checks_data_before_writing(small, tmp_path):
    out = tmp_path / "out"
    r = cli("run", small / "o.onnx", "-o", out, "--data", small / "nhwc.npz", "--iters", "2")
    assert r.exit_code == 2 and "--layout nhwc" in r.output and not out.exists(), r.output
    g = G(seed=4)
    x = g.input("x", ["N", 32])
    onnx.save(g.model([g.bn(g.node("Gemm", [x, g.const(g.rand(6, 32))], transB=1), 6)]), tmp_path / "flat.onnx")
    r = cli("run", tmp_path / "flat.onnx", "-o", out, "--data", "digits", "--iters", "2")  # 64 features, not 32
    assert r.exit_code == 2 and "(64,)" in r.output and not out.exists(), r.output


def test_run_pipeline_checks_data_before_writing(small, tmp_path):
    from bnfold.data import Dataset
    from bnfold.pipeline import run_pipeline
    bad = Dataset({"x": np.zeros((4, 8, 8, 3), np.float32)}, None, "nhwc")
    with pytest.raises(BnfoldError, match="--layout nhwc"):
        run_pipeline(onnx.load(small / "o.onnx"), tmp_path / "out", name="m", data=bad)
    assert not (tmp_path / "out").exists()


def net_without_default_shape():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()


def test_calibrate_takes_the_input_shape_from_data(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((10, 3, 12, 12)).astype(np.float32))
    out = tmp_path / "c.pt"
    r = cli("calibrate", "tests.test_verify_edges:net_without_default_shape", "--random-weights", "--data", tmp_path / "d.npz",
            "-o", out, "--batch-size", "5", "--json")
    assert r.exit_code == 0, r.output
    cal = json.loads(r.stdout)
    assert cal["input_shape"] == [1, 3, 12, 12] and cal["samples"] == 10 and cal["batches"] == 2
    np.savez(tmp_path / "h.npz", x=rng.standard_normal((10, 12, 12, 3)).astype(np.float32))
    r = cli("calibrate", "tests.test_verify_edges:net_without_default_shape", "--random-weights", "--data", tmp_path / "h.npz",
            "-o", out, "--layout", "nhwc", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["input_shape"] == [1, 3, 12, 12], r.output


# ------------------------------------------------------------------------------------------------ calibrate
class WithAux(nn.Module):
    """GoogLeNet-style: an auxiliary head that only runs in training."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        y = self.body(x)
        if self.training:
            return y, self.aux(y)
        return y


def test_calibrate_skips_never_called_bn():
    from bnfold.calibrate import population_statistics
    model = WithAux().eval()
    before = model.aux[1].running_mean.clone()
    res = population_statistics(model, [torch.randn(4, 3, 8, 8) for _ in range(3)])
    assert res.skipped == {"aux.1": "not_called"} and set(res.stats) == {"body.1"}
    assert torch.equal(model.aux[1].running_mean, before)
    assert res.summary()["skipped"] == {"aux.1": "not_called"}


# ------------------------------------------------------------------------------------------------ torch edges
class FrozenBatchNorm2d(nn.Module):
    """maskrcnn-benchmark's frozen BN: buffers only, no eps attribute (and no eps in its forward)."""

    def __init__(self, n):
        super().__init__()
        g = torch.Generator().manual_seed(n)
        self.register_buffer("weight", torch.rand(n, generator=g) + 0.5)
        self.register_buffer("bias", torch.randn(n, generator=g))
        self.register_buffer("running_mean", torch.randn(n, generator=g))
        self.register_buffer("running_var", torch.rand(n, generator=g) * 1e-3 + 1e-4)  # eps would matter

    def forward(self, x):
        scale = self.weight * self.running_var.rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def test_frozen_bn_without_eps_folds_exactly():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU()).eval()
    res = fold_module(model, torch.randn(1, 3, 8, 8))
    assert res.report.folded == 1 and not any(isinstance(m, FrozenBatchNorm2d) for m in res.module.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        import copy
        assert_close(res.module(x).numpy(), copy.deepcopy(model).double()(x.double()).numpy())


class Conv3DSimple(nn.Conv3d):
    """torchvision's video-model conv: a subclass that only sets arguments."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, (3, 3, 3), padding=(1, 1, 1), bias=False)


class OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_conv_subclass_that_computes_as_its_base_is_recognised():
    model = nn.Sequential(Conv3DSimple(2, 4), nn.BatchNorm3d(4), nn.ReLU()).eval()
    res = fold_module(model, torch.randn(1, 2, 4, 6, 6))
    assert res.report.folded == 1 and res.report.entries[0].into == "0"
    x = torch.randn(2, 2, 4, 6, 6)
    with torch.no_grad():
        assert_close(res.module(x).numpy(), model(x).numpy())
    other = nn.Sequential(OwnForward(3, 4, 3), nn.BatchNorm2d(4)).eval()
    assert fold_module(other, torch.randn(1, 3, 6, 6)).report.folded == 0  # does more than a conv: left alone


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_bn1d_dropout_linear_folds_at_module_level(tracer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Linear(6, 3)).eval()
    from bnfold.models import zoo
    zoo.randomize_bn(model)
    res = fold_module(model, torch.randn(4, 8), tracer=tracer)
    e = res.report.entries[0]
    assert e.status == "folded" and e.direction == "forward" and e.into == "4"
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert_close(res.module(x).numpy(), model(x).numpy())
    model.train()
    model[2].eval()  # dropout active: not an identity, no forward fold through it
    assert fold_module(model, torch.randn(4, 8), tracer=tracer).report.folded == 0


class Versioned(nn.Module):
    """Like torchvision's MNASNet: its loader reads the module version from the state dict's metadata."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def versioned():
    return Versioned().eval()


def test_weights_keep_state_dict_metadata(tmp_path):
    torch.save(Versioned().state_dict(), tmp_path / "w.pt")
    r = cli("fold", "tests.test_verify_edges:versioned", "--weights", tmp_path / "w.pt", "--input-shape", "1x3x8x8",
            "-o", tmp_path / "m.onnx", "-q")
    assert r.exit_code == 0, r.output
    from safetensors.torch import save_file
    save_file(Versioned().state_dict(), str(tmp_path / "w.safetensors"))  # no metadata: the model's own versions
    r = cli("fold", "tests.test_verify_edges:versioned", "--weights", tmp_path / "w.safetensors", "--input-shape",
            "1x3x8x8", "-o", tmp_path / "m2.onnx", "-q")
    assert r.exit_code == 0, r.output
    ddp = OrderedDict((f"module.{k}", v) for k, v in Versioned().state_dict().items())
    ddp._metadata = OrderedDict((("module" + ("." + k if k else "")), v)
                                for k, v in Versioned().state_dict()._metadata.items())
    from bnfold.torch_io import apply_weights
    apply_weights(Versioned(), ddp, "ddp")  # DataParallel prefixes stripped from the metadata too
    bad = Versioned().state_dict()
    bad._metadata[""] = {"version": 7}
    with pytest.raises(BnfoldError, match="refuses the checkpoint"):
        apply_weights(Versioned(), bad, "bad")  # a module's own loader refusing it is bad input


def test_torchvision_mnasnet_weights(tmp_path):
    tv = pytest.importorskip("torchvision.models")
    for name in ("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"):
        m = getattr(tv, name)().eval()
        torch.save(m.state_dict(), tmp_path / "w.pt")
        r = cli("fold", f"torchvision.models:{name}", "--weights", tmp_path / "w.pt", "--input-shape",
                "1x3x64x64", "-o", tmp_path / f"{name}.onnx", "-q")
        assert r.exit_code == 0, r.output


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: a BN subclass with an activation inside."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class CatBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = BNAct(6)

    def forward(self, x):
        return self.bn(torch.cat([x, x * 2], 1))


def test_report_shows_the_last_pass_reason():
    from bnfold.fold import fold_torch
    from bnfold.models import zoo
    model = zoo.randomize_bn(CatBN()).eval()
    _, report = fold_torch(model, (torch.randn(1, 3, 4, 4),), None)
    e = report.entries[0]
    assert e.status == "skipped" and e.reason == "no_foldable_neighbour", e
    assert "module level: not_plain_batchnorm" in e.message


def test_verify_exit_2_when_runtime_cannot_load(tmp_path, small):
    m = onnx.load(small / "o.onnx")
    m.graph.node[0].op_type = "NoSuchOp"
    onnx.save(m, tmp_path / "broken.onnx")
    r = cli("verify", tmp_path / "broken.onnx", small / "f.onnx")
    assert r.exit_code == 2 and "reference" in r.output and r.output.strip().startswith("error:"), r.output
    r = cli("verify", small / "o.onnx", tmp_path / "broken.onnx")
    assert r.exit_code == 2 and "candidate" in r.output, r.output


class MixedLevels(nn.Module):
    """One BN folded at module level, one (a BN subclass) left to the ONNX pass: the two exports' BN output
    names shift, and the localizer must still compare each folded layer with its own BN."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), BNAct(6)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.conv3(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def mixed_levels():
    from bnfold.models import zoo
    torch.manual_seed(0)
    return zoo.randomize_bn(MixedLevels()).eval()


def test_localizer_with_folds_at_both_levels(tmp_path):
    spec = "tests.test_verify_edges:mixed_levels"
    assert cli("export", spec, "--random-weights", "--no-fold", "--input-shape", "2x3x8x8", "-o", tmp_path / "o.onnx",
               "-q").exit_code == 0
    r = cli("fold", spec, "--random-weights", "--input-shape", "2x3x8x8", "-o", tmp_path / "f.onnx", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["folded"] == 2, r.output
    from .test_verify_acceptance import corrupt
    assert cli("verify", tmp_path / "o.onnx", tmp_path / "f.onnx", "-q").exit_code == 0
    for layer in ("conv1", "conv2", "conv3"):
        corrupt(tmp_path / "f.onnx", tmp_path / "bad.onnx", layer, 1, "scale")
        r = cli("verify", tmp_path / "o.onnx", tmp_path / "bad.onnx")
        assert r.exit_code == 1 and f"(layer {layer})" in r.output.strip().splitlines()[-1], r.output


def test_every_torchvision_classifier_loads_its_saved_state_dict(tmp_path):
    """Every torchvision classification model reloads a `torch.save(model.state_dict())` through --weights
    (module versions kept). Skipped where torchvision is not installed (it is not a dependency)."""
    tv = pytest.importorskip("torchvision.models")
    import torchvision

    from bnfold.torch_io import apply_weights, load_state_dict
    names = torchvision.models.list_models(module=tv)
    assert names
    for name in names:
        m = tv.get_model(name).eval()
        if sum(p.numel() for p in m.parameters()) > 150_000_000:
            continue  # the giants (ViT-H, RegNet-128GF): the same code path, minutes of disk I/O
        torch.save(m.state_dict(), tmp_path / "w.pt")
        apply_weights(tv.get_model(name), load_state_dict(tmp_path / "w.pt"), name)
