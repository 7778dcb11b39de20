"""BatchNorm subclasses that do more after normalising (timm's BatchNormAct2d and kin), folded at module level.

The BN's affine map folds into the neighbouring layer; what the module does after normalising (its ``drop`` and
``act`` children) stays, as an ``nn.Sequential`` of those same child modules under the BN's name. A subclass whose
forward does anything else (work before or inside the normalisation, work of its own after its children, children
out of order) is skipped with ``not_plain_batchnorm`` and left untouched.

Numbers: the folded fp32 module against a float64 run of the original, with tests/helpers.py's tolerance."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold import count_bn
from bnfold.fold import fold_torch
from bnfold.models import zoo
from bnfold.torch_fold import count_foldable_bn, fold_module, strip_batchnorm

from .helpers import assert_close, run_ort


# ------------------------------------------------------------------------------------------------ timm-like modules
class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d, reproduced (timm is not a dependency): BN, then ``drop``, then ``act``."""

    def __init__(self, n, act=nn.ReLU, drop=None, apply_act=True):
        super().__init__(n)
        self.drop = drop() if drop is not None else nn.Identity()
        self.act = act() if apply_act else nn.Identity()

    def forward(self, x):
        assert x.ndim == 4
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1,
                         self.eps)
        return self.act(self.drop(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm.layers.SyncBatchNormAct: SyncBatchNorm's forward, then ``drop``/``act`` set as attributes."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def _sync_bn_act(n, act=nn.SiLU):
    m = SyncBatchNormAct(n)
    m.drop, m.act = nn.Identity(), act()
    return m


class FrozenBatchNormAct2d(nn.Module):
    """timm.layers.FrozenBatchNormAct2d: not a torch BatchNorm at all, statistics as buffers, then drop/act."""

    def __init__(self, n, act=nn.ReLU, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n) * 0.3)
        self.register_buffer("running_mean", torch.randn(n) * 0.3)
        self.register_buffer("running_var", torch.rand(n) + 0.5)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return self.act(self.drop(x * scale + bias))


def seq(*layers):
    return nn.Sequential(*layers)


BN_LIKE = (nn.modules.batchnorm._BatchNorm, FrozenBatchNormAct2d)

# name: (factory, input shape, index of the BN-act module in the Sequential, its tail's child classes, direction)
FOLDS = {
    "relu": (lambda: seq(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)), (2, 3, 7, 7), 1, [nn.Identity, nn.ReLU],
             "backward"),
    "prelu_dropout": (lambda: seq(nn.Conv2d(3, 4, 3, bias=False), BatchNormAct2d(4, nn.PReLU, nn.Dropout)),
                      (2, 3, 7, 7), 1, [nn.Dropout, nn.PReLU], "backward"),
    "no_act": (lambda: seq(nn.Conv2d(3, 4, 3, groups=1), BatchNormAct2d(4, apply_act=False)), (2, 3, 7, 7), 1,
               None, "backward"),
    "depthwise_hardswish": (lambda: seq(nn.Conv2d(4, 4, 3, padding=1, groups=4), BatchNormAct2d(4, nn.Hardswish)),
                            (2, 4, 6, 6), 1, [nn.Identity, nn.Hardswish], "backward"),
    "conv_transpose": (lambda: seq(nn.ConvTranspose2d(3, 4, 2, 2), BatchNormAct2d(4, nn.GELU)), (2, 3, 5, 5), 1,
                       [nn.Identity, nn.GELU], "backward"),
    "sync_bn_act": (lambda: seq(nn.Conv2d(3, 4, 3), _sync_bn_act(4)), (2, 3, 7, 7), 1, [nn.Identity, nn.SiLU],
                    "backward"),
    "frozen_bn_act": (lambda: seq(nn.Conv2d(3, 4, 3), FrozenBatchNormAct2d(4)), (2, 3, 7, 7), 1,
                      [nn.Identity, nn.ReLU], "backward"),
    # a BN-act that activates nothing folds forward into an unpadded conv, like a plain BN
    "forward_no_act": (lambda: seq(nn.ReLU(), BatchNormAct2d(4, apply_act=False, drop=nn.Dropout),
                                   nn.Conv2d(4, 5, 3)), (2, 4, 7, 7), 1, [nn.Dropout, nn.Identity], "forward"),
}


@pytest.mark.parametrize("tracer", ["export", "fx"])
@pytest.mark.parametrize("case", list(FOLDS))
def test_bn_act_folds_and_keeps_its_tail(case, tracer):
    factory, shape, idx, tail, direction = FOLDS[case]
    torch.manual_seed(0)
    model = zoo.randomize_bn(factory()).eval()
    original_state = copy.deepcopy(model.state_dict())
    x = torch.randn(shape)
    res = fold_module(model, x, tracer=tracer)
    assert (res.report.folded, res.report.bn_total) == (1, 1), res.report.to_dict()
    entry = res.report.entries[0]
    assert entry.direction == direction and entry.bn == str(idx)
    # structure: no BN left; the BN's place holds its own drop/act modules (or Identity when both are Identity)
    assert count_foldable_bn(res.module) == 0
    assert not any(isinstance(m, BN_LIKE) for m in res.module.modules())
    replaced = res.module[idx]
    original = model[idx]
    if tail is None:
        assert type(replaced) is nn.Identity
    else:
        assert type(replaced) is nn.Sequential and [type(m) for m in replaced] == tail
        assert [n for n, _ in replaced.named_children()] == ["drop", "act"]
        assert type(replaced.act) is type(original.act)
    # the caller's model is untouched; the act's own parameters keep their names and values
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original_state.items())
    folded_state = res.module.state_dict()
    for k, v in original_state.items():
        if k.startswith(f"{idx}.act."):
            assert torch.equal(folded_state[k], v) and res.param_map[k] == [k]
    assert res.param_map[f"{idx}.running_var"] == [f"{idx + (1 if direction == 'forward' else -1)}.weight",
                                                   f"{idx + (1 if direction == 'forward' else -1)}.bias"]
    # numbers
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double()).numpy()
        assert_close(res.module(x).numpy(), ref)


def test_bn_act_export_has_no_batchnorm(tmp_path):
    """Through `fold_torch` (fold SPEC / export): the ONNX file has no BatchNormalization left, the activation is
    still there, the file is valid, and it computes what the original module computes."""
    model = zoo.randomize_bn(seq(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, nn.SiLU), nn.Conv2d(4, 6, 1),
                                 BatchNormAct2d(6, apply_act=False))).eval()
    x = torch.randn(2, 3, 8, 8)
    res, report = fold_torch(model, (x,), tmp_path / "f.onnx")
    assert res.report.folded == 2 and report.extra["onnx_pass"]["bn_total"] == 0
    out = onnx.load(tmp_path / "f.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert count_bn(out) == 0
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Conv") == 2 and ("Sigmoid" in ops or "Silu" in ops or "Swish" in ops), ops
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double()).numpy()
    assert_close(run_ort(out, {out.graph.input[0].name: x.numpy()})[0], ref)


# ------------------------------------------------------------------------------------------------ refusals
class _Base(nn.BatchNorm2d):
    def __init__(self, n):
        super().__init__(n)
        self.drop = nn.Identity()
        self.act = nn.SiLU()

    def bn(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ScalesFirst(_Base):
    """Works on the input before normalising."""

    def forward(self, x):
        return self.act(self.drop(self.bn(x * 2)))


class Residual(_Base):
    """Adds its un-normalised input after the activation."""

    def forward(self, x):
        return self.act(self.bn(x)) + x


class ScalesAfter(_Base):
    """Does work of its own after its children."""

    def forward(self, x):
        return self.act(self.bn(x)) * 3


class OutOfOrder(_Base):
    """Calls its children in the reverse of their registration order."""

    def __init__(self, n):
        super().__init__(n)
        self.drop = nn.Tanh()

    def forward(self, x):
        return self.drop(self.act(self.bn(x)))


class FunctionalAct(nn.BatchNorm2d):
    """The activation is a function, not a child module: nothing would keep it."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class PlusOneInside(_Base):
    """Normalises with a variance of its own (var + 1), not its running statistics: not its BN's affine map."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var + 1, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


REFUSED = {
    "work_before": ScalesFirst,
    "residual": Residual,
    "work_after": ScalesAfter,
    "children_out_of_order": OutOfOrder,
    "functional_act": FunctionalAct,
    "other_statistics": PlusOneInside,
}


@pytest.mark.parametrize("tracer", ["export", "fx"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_bn_subclass_doing_other_work_is_skipped_untouched(case, tracer):
    model = zoo.randomize_bn(seq(nn.Conv2d(3, 4, 3), REFUSED[case](4))).eval()
    x = torch.randn(2, 3, 7, 7)
    res = fold_module(model, x, tracer=tracer)
    assert [e.reason for e in res.report.entries] == ["not_plain_batchnorm"], res.report.to_dict()
    assert REFUSED[case].__qualname__ in res.report.entries[0].message
    state, new_state = model.state_dict(), res.module.state_dict()
    assert set(state) == set(new_state) and all(torch.equal(state[k], new_state[k]) for k in state)
    assert type(res.module[1]) is REFUSED[case]
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x))


def test_activation_between_bn_and_consumer_blocks_a_forward_fold():
    """ReLU -> BatchNormAct2d(ReLU) -> Conv: no producer to fold into, and the activation stands between the BN
    and the conv: skipped, untouched."""
    model = zoo.randomize_bn(seq(nn.ReLU(), BatchNormAct2d(4), nn.Conv2d(4, 5, 3))).eval()
    x = torch.randn(2, 4, 7, 7)
    res = fold_module(model, x)
    assert [e.reason for e in res.report.entries] == ["no_foldable_neighbour"]
    assert "act" in res.report.entries[0].message and type(res.module[1]) is BatchNormAct2d
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x))


def test_strip_batchnorm_keeps_the_activation():
    """The no-BN latency floor drops the normalisation, not the activation a BN-act module applies."""
    model = zoo.randomize_bn(seq(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, nn.Hardtanh))).eval()
    stripped = strip_batchnorm(model)
    assert [type(m) for m in stripped[1]] == [nn.Identity, nn.Hardtanh]
    x = torch.randn(2, 3, 7, 7) * 5
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), nn.functional.hardtanh(model[0](x)))


# ------------------------------------------------------------------------------------------------ channel concat
class MixedConv2d(nn.Module):
    """timm.layers.MixedConv2d, reproduced: the channels split into groups, each its own kernel size, outputs
    concatenated on the channel axis (mixnet). A BN after it folds into each conv's slice of the channels."""

    def __init__(self, cin, couts=(3, 2, 1), kernels=(3, 5, 1), dim=1):
        super().__init__()
        self.splits = [cin // len(couts)] * (len(couts) - 1)
        self.splits.append(cin - sum(self.splits))
        self.convs = nn.ModuleList(nn.Conv2d(s, c, k, padding=k // 2, bias=i == 1)
                                   for i, (s, c, k) in enumerate(zip(self.splits, couts, kernels)))
        self.dim = dim

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        outs = [c(parts[i]) for i, c in enumerate(self.convs)]
        return torch.cat(outs, self.dim)


class SharedMixed(MixedConv2d):
    """A conv's output is also read besides the concat (its mean added to the BN's output)."""

    def __init__(self, cin):
        super().__init__(cin)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        outs = [c(parts[i]) for i, c in enumerate(self.convs)]
        return self.bn(torch.cat(outs, 1)) + outs[0].mean()


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_bn_act_after_a_channel_concat_of_convs_folds_into_each(tracer):
    model = zoo.randomize_bn(seq(MixedConv2d(6), BatchNormAct2d(6, nn.ReLU6))).eval()
    x = torch.randn(2, 6, 7, 7)
    res = fold_module(model, x, tracer=tracer)
    assert (res.report.folded, res.report.bn_total) == (1, 1), res.report.to_dict()
    e = res.report.entries[0]
    assert e.into == "0.convs.0+0.convs.1+0.convs.2" and e.direction == "backward"
    assert e.into_layer == "0"  # the module that concatenates (the fold record's tensor is its output)
    assert res.param_map["1.running_mean"] == ["0.convs.0.bias", "0.convs.1.bias", "0.convs.2.bias"]
    assert count_foldable_bn(res.module) == 0 and all(c.bias is not None for c in res.module[0].convs)
    with torch.no_grad():
        assert_close(res.module(x).numpy(), copy.deepcopy(model).double()(x.double()).numpy())


@pytest.mark.parametrize("case,reason", [("other_axis", "no_foldable_neighbour"),
                                         ("conv_output_shared", "producer_output_shared")])
def test_concat_that_is_not_exactly_the_bn_input_is_skipped(case, reason):
    if case == "other_axis":  # concatenated along H: a conv's output is not a slice of the BN's channels
        model = seq(MixedConv2d(6, couts=(4, 4, 4), dim=2), nn.BatchNorm2d(4))
    else:
        model = SharedMixed(6)
    model = zoo.randomize_bn(model).eval()
    x = torch.randn(2, 6, 7, 7)
    res = fold_module(model, x)
    assert [e.reason for e in res.report.entries] == [reason], res.report.to_dict()
    state, new_state = model.state_dict(), res.module.state_dict()
    assert set(state) == set(new_state) and all(torch.equal(state[k], new_state[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x))
