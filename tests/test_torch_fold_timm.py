"""timm models at module level: every BatchNormAct2d that directly follows a conv folds, and the folded module
computes what the original computes. LeViT folds every BN on the SPEC path and on its exported file.

Skipped without timm (CI's venv has none). Run with a venv that has it, e.g.
``PYTHONPATH=. /work/venv-timm/bin/python -m pytest tests/test_torch_fold_timm.py -p no:cacheprovider``
(this file imports neither ``bnfold.models`` nor ``bnfold.cli``, which need the installed package).

"Directly follows a conv" is decided here without bnfold: in an eager run, a BN's input is the very tensor a
Conv2d (or timm's MixedConv2d, a channel concat of convs) returned. Numbers: the folded fp32 module against a
float64 run of the original, tests/helpers.py's tolerance."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from torch import nn

from bnfold import count_bn, fold_model
from bnfold.export import export_onnx
from bnfold.fold import fold_torch
from bnfold.torch_fold import fold_module

from .helpers import assert_close, run_ort

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, MixedConv2d  # noqa: E402


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, as after training (bnfold.models.zoo.randomize_bn)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def bn_act_after_conv(model: nn.Module, x: torch.Tensor) -> tuple[set[str], set[str]]:
    """(every BatchNormAct2d, those whose input is a conv's own output), from hooks on an eager run."""
    conv_outputs: dict[int, torch.Tensor] = {}  # kept alive, so that no other tensor takes an id
    after_conv: set[str] = set()
    handles = []
    names = {m: n for n, m in model.named_modules()}
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, MixedConv2d)):
            handles.append(m.register_forward_hook(lambda _m, _i, out: conv_outputs.setdefault(id(out), out)))
        if isinstance(m, BatchNormAct2d):
            handles.append(m.register_forward_pre_hook(
                lambda mod, inp: after_conv.add(names[mod]) if id(inp[0]) in conv_outputs else None))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)}, after_conv


@pytest.mark.parametrize("name", ["mobilenetv4_conv_small", "mixnet_s", "repvgg_a0"])
def test_every_bn_act_after_a_conv_folds(name):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name)).eval()
    x = torch.randn(1, 3, 160, 160)
    bn_act, after_conv = bn_act_after_conv(model, x)
    assert after_conv and after_conv <= bn_act
    res = fold_module(model, x)
    folded = {e.bn for e in res.report.entries if e.status == "folded"}
    assert after_conv <= folded, sorted(after_conv - folded)
    # what stays is what could not fold (repvgg's identity-branch BNs read the block input, not a conv)
    for e in res.report.entries:
        if e.status == "skipped":
            assert e.bn not in after_conv and e.reason == "no_foldable_neighbour", (e.bn, e.reason, e.message)
    left = {n for n, m in res.module.named_modules() if isinstance(m, BatchNormAct2d)}
    assert left == bn_act - folded
    # each folded BatchNormAct2d left its activation in place, as the same module class
    for n in folded & bn_act:
        original, now = model.get_submodule(n), res.module.get_submodule(n)
        if isinstance(now, nn.Sequential):
            assert type(now.act) is type(original.act) and type(now.drop) is type(original.drop)
        else:
            assert type(now) is nn.Identity and type(original.act) is nn.Identity
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double()).numpy()
        assert_close(res.module(x).numpy(), ref)


def test_levit_folds_every_batchnorm_on_both_paths(tmp_path):
    """`bnfold fold SPEC` and `bnfold fold` of `bnfold export --no-fold`'s file: every BN of levit_128s."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("levit_128s")).eval()
    x = torch.randn(1, 3, 224, 224)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    _, report = fold_torch(model, (x,), tmp_path / "f.onnx")
    assert report.folded == report.bn_total == n_bn, report.summary()
    exported = export_onnx(model, (x,), keep_bn=True)
    folded, report2 = fold_model(exported)
    assert report2.folded == report2.bn_total == count_bn(exported) == n_bn, report2.summary()
    out = onnx.load(tmp_path / "f.onnx")
    assert count_bn(out) == 0 and count_bn(folded) == 0
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double()).numpy()
    assert_close(run_ort(out, {out.graph.input[0].name: x.numpy()})[0], ref)
    assert_close(run_ort(folded, {folded.graph.input[0].name: x.numpy()})[0], ref)


@pytest.mark.parametrize("variant", ["frozen", "sync"])
def test_frozen_and_sync_bn_act_variants_fold(variant):
    """timm's freeze_batch_norm_2d (FrozenBatchNormAct2d: not a torch BatchNorm) and convert_sync_batchnorm
    (SyncBatchNormAct): every one folds, as the BatchNormAct2d they replace."""
    from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d

    torch.manual_seed(0)
    base = randomize_bn(timm.create_model("mobilenetv4_conv_small")).eval()
    n = sum(isinstance(m, BatchNormAct2d) for m in base.modules())
    model = (freeze_batch_norm_2d if variant == "frozen" else convert_sync_batchnorm)(copy.deepcopy(base)).eval()
    assert not any(isinstance(m, BatchNormAct2d) for m in model.modules())
    x = torch.randn(1, 3, 96, 96)
    res = fold_module(model, x)
    assert res.report.folded == res.report.bn_total == n, res.report.summary()
    with torch.no_grad():
        assert_close(res.module(x).numpy(), copy.deepcopy(model).double()(x.double()).numpy())
