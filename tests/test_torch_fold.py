"""The PyTorch front end: module-level folding over the zoo, every skip and refusal, and the export.

Numbers: the folded fp32 module must match a float64 run of the original (tests/helpers.py tolerance), and its
error must be of the same size as the unfolded fp32 module's own rounding error: at most 2x (RMS over a batch of
32 against float64; the measured ratios are 0.75-1.4, both errors ~1e-8 to 1e-7)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from bnfold import BnfoldError, count_bn
from bnfold.fold import fold_torch
from bnfold.models import zoo
from bnfold.torch_fold import count_foldable_bn, fold_module

from .helpers import assert_close, run_ort

ZOO = [n for n in zoo.names() if n not in ("resnet18", "resnet50")]


def rms_err(out, ref):
    return (out.double() - ref).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("tracer", ["export", "fx"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_folds_at_module_level(name, tracer):
    entry = zoo.get(name)
    torch.manual_seed(0)
    model = zoo.randomize_bn(entry.factory()).eval()
    original_state = copy.deepcopy(model.state_dict())
    x = torch.randn((32,) + entry.input_shape[1:])
    res = fold_module(model, x, tracer=tracer)
    assert res.tracer == f"torch.{tracer}"
    # the caller's model is untouched; the result keeps the user's classes and parameter names
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original_state.items())
    assert type(res.module) is type(model)
    folded_keys = set(res.module.state_dict())
    bn_names = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for k in original_state:
        owner = k.rpartition(".")[0]
        if owner not in bn_names or owner in {e.bn for e in res.report.entries if e.status == "skipped"}:
            assert k in folded_keys, k
    assert count_foldable_bn(res.module) == entry.unfoldable_bn
    assert res.report.folded == len(bn_names) - entry.unfoldable_bn and res.report.bn_total == len(bn_names)
    # every original name maps somewhere that exists (or nowhere, for num_batches_tracked)
    for k, dests in res.param_map.items():
        assert all(d in folded_keys for d in dests), (k, dests)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        out = res.module(x)
        base = model(x)
    assert_close(out.numpy(), ref.numpy())
    ratio = rms_err(out, ref) / max(rms_err(base, ref), 1e-30)
    assert ratio <= 2.0, f"folded error {ratio:.2f}x the unfolded fp32 error"


@pytest.mark.parametrize("name", ["small_resnet", "unet", "mlp_bn", "bn_head", "conv3d"])
def test_export_matches_folded_module(name, tmp_path):
    entry = zoo.get(name)
    model = zoo.randomize_bn(entry.factory()).eval()
    x = torch.randn((2,) + entry.input_shape[1:])
    res, report = fold_torch(model, (x,), tmp_path / "f.onnx")
    out = onnx.load(tmp_path / "f.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert count_bn(out) == entry.unfoldable_bn
    assert report.extra["onnx_pass"]["bn_total"] == entry.unfoldable_bn
    with torch.no_grad():
        ref = res.module(x).numpy()
    assert_close(run_ort(out, {out.graph.input[0].name: x.numpy()})[0], ref)
    x5 = torch.randn((5,) + entry.input_shape[1:])  # dynamic batch
    assert run_ort(out, {out.graph.input[0].name: x5.numpy()})[0].shape[0] == 5


def test_export_no_fold_keeps_bn(tmp_path):
    model = zoo.randomize_bn(zoo.create("small_resnet")).eval()
    _, report = fold_torch(model, (torch.randn(1, 3, 32, 32),), tmp_path / "o.onnx", fold=False)
    assert count_bn(onnx.load(tmp_path / "o.onnx")) == 9 == report.extra["onnx_bn_kept"]


# ------------------------------------------------------------------------------------------------ coverage
class Seq(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d, reproduced (torchvision is not a dependency)."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


COVERAGE = {
    "convT1d_groups": (lambda: Seq(nn.ConvTranspose1d(4, 6, 3, 2, groups=2), nn.BatchNorm1d(6)), (2, 4, 7)),
    "convT2d_depthwise": (lambda: Seq(nn.ConvTranspose2d(4, 4, 4, 2, 1, groups=4, bias=False), nn.BatchNorm2d(4)),
                          (2, 4, 5, 5)),
    "convT3d": (lambda: Seq(nn.ConvTranspose3d(2, 4, 2, 2, output_padding=1, dilation=2), nn.BatchNorm3d(4)),
                (1, 2, 3, 3, 3)),
    "conv1d_dil": (lambda: Seq(nn.Conv1d(3, 5, 3, dilation=2, padding=2), nn.BatchNorm1d(5)), (2, 3, 9)),
    "sync_bn": (lambda: Seq(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)), (2, 3, 6, 6)),
    "frozen_bn": (lambda: Seq(nn.Conv2d(3, 4, 3, bias=False), FrozenBatchNorm2d(4)), (2, 3, 6, 6)),
    "affine_false": (lambda: Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)), (2, 3, 6, 6)),
    "momentum_none": (lambda: Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)), (2, 3, 6, 6)),
    "linear_bn": (lambda: Seq(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)), (3, 6)),
    "bn_linear": (lambda: Seq(nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 5)), (3, 6)),
    "bn_conv_unpadded": (lambda: Seq(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, 2, groups=2)), (2, 4, 7, 7)),
    "bn_conv_valid": (lambda: Seq(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding="valid")), (2, 4, 7, 7)),
}


@pytest.mark.parametrize("case", list(COVERAGE))
def test_coverage(case):
    factory, shape = COVERAGE[case]
    model = zoo.randomize_bn(factory()).eval()
    x = torch.randn(shape)
    res = fold_module(model, x)
    assert res.report.folded == 1 == res.report.bn_total, res.report.to_dict()
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)) for m in res.module.modules())
    with torch.no_grad():
        assert_close(res.module(x).numpy(), copy.deepcopy(model).double()(x.double()).numpy())


# ------------------------------------------------------------------------------------------------ skips
class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BN with an activation inside."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class SeqLinear3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(5)  # normalises axis 1 (length 5), the Linear's features are axis 2

    def forward(self, x):
        return self.bn(self.fc(x))


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(x)


class FunctionalReuse(nn.Module):
    """TridentNet-style: the conv's weight is also used functionally with another dilation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.nn.functional.conv2d(x, self.conv.weight, padding=2, dilation=2)


def _hooked_conv():
    conv = nn.Conv2d(3, 4, 3)
    conv.register_forward_hook(lambda m, i, o: o * 2)
    return Seq(conv, nn.BatchNorm2d(4))


def _hooked_bn():
    bn = nn.BatchNorm2d(4)
    bn.register_forward_hook(lambda m, i, o: o + 1)
    return Seq(nn.Conv2d(3, 4, 3), bn)


def _weight_norm_conv():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))  # recomputes .weight in a forward pre-hook
    return Seq(conv, nn.BatchNorm2d(4))


SKIPS = {
    "parameters_used_elsewhere": (FunctionalReuse, (1, 3, 6, 6)),
    "module_has_hooks": (_hooked_conv, (1, 3, 6, 6)),
    "module_reused": (Reused, (1, 4, 5, 5)),
    "producer_output_shared": (SharedOutput, (1, 3, 5, 5)),
    "parameters_tied": (Tied, (1, 3, 5, 5)),
    "not_plain_batchnorm": (lambda: Seq(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)), (2, 3, 6, 6)),
    "channel_axis_mismatch": (SeqLinear3d, (2, 5, 8)),
    "consumer_padded": (lambda: Seq(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)), (2, 4, 7, 7)),
    "not_called": (Unused, (1, 3, 5, 5)),
}


@pytest.mark.parametrize("case", ["hooked_bn", "weight_norm"])
def test_hooks_are_never_folded_through(case):
    model = zoo.randomize_bn(_hooked_bn() if case == "hooked_bn" else _weight_norm_conv()).eval()
    x = torch.randn(1, 3, 6, 6)
    res = fold_module(model, x, inplace=(case == "weight_norm"))  # old weight_norm cannot be deep-copied
    assert [e.reason for e in res.report.entries] == ["module_has_hooks"]
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(res.module(x), ref)


@pytest.mark.parametrize("reason", list(SKIPS))
def test_skip_leaves_module_unchanged(reason):
    factory, shape = SKIPS[reason]
    model = zoo.randomize_bn(factory()).eval()
    x = torch.randn(shape)
    res = fold_module(model, x)
    assert [e.reason for e in res.report.entries] == [reason], res.report.to_dict()
    assert res.report.folded == 0
    state, new_state = model.state_dict(), res.module.state_dict()
    assert set(state) == set(new_state) and all(torch.equal(state[k], new_state[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x))


def test_training_mode_is_refused():
    model = Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(BnfoldError, match=r"'layers.1' is in training mode: call model.eval\(\)"):
        fold_module(model, torch.randn(1, 3, 5, 5))


def test_no_running_stats_is_refused():
    model = Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(BnfoldError, match="track_running_stats=False"):
        fold_module(model, torch.randn(1, 3, 5, 5))


def test_invalid_statistics_are_refused():
    model = Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model.layers[1].running_var[2] = float("nan")
    with pytest.raises(BnfoldError, match="'layers.1'.*not finite"):
        fold_module(model, torch.randn(1, 3, 5, 5))


def test_param_map_says_where_bn_went():
    model = zoo.randomize_bn(Seq(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).eval()
    res = fold_module(model, torch.randn(1, 3, 5, 5))
    assert res.param_map["layers.1.running_mean"] == ["layers.0.bias"]
    assert res.param_map["layers.1.weight"] == ["layers.0.weight", "layers.0.bias"]
    assert res.param_map["layers.1.num_batches_tracked"] == []
    assert res.param_map["layers.0.weight"] == ["layers.0.weight"]
    assert isinstance(res.module.layers[1], nn.Identity) and res.module.layers[0].bias is not None


def test_inplace_modifies_the_given_model():
    model = zoo.randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    res = fold_module(model, torch.randn(1, 3, 5, 5), inplace=True)
    assert res.module is model and isinstance(model.layers[1], nn.Identity)


def test_half_precision_module_folds_with_float64_math():
    model = zoo.randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    ref_model = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 6, 6)
    res = fold_module(model.to(torch.bfloat16), x.to(torch.bfloat16))
    assert res.module.layers[0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = res.module(x.to(torch.bfloat16)).double().numpy()
        ref = ref_model(x.double()).numpy()
    np.testing.assert_allclose(out, ref, rtol=5e-2, atol=5e-2 * np.abs(ref).max())


def test_torchvision_models_fold():
    tv = pytest.importorskip("torchvision")
    for name in ("resnet18", "mobilenet_v3_small", "efficientnet_b0"):
        model = zoo.randomize_bn(getattr(tv.models, name)()).eval()
        x = torch.randn(1, 3, 64, 64)
        res = fold_module(model, x)
        assert res.report.skipped == 0 and res.report.folded == res.report.bn_total > 0
        with torch.no_grad():
            assert_close(res.module(x).numpy(), copy.deepcopy(model).double()(x.double()).numpy())
