"""Property tests of the PyTorch front end: random Conv/ConvTranspose/Linear + BatchNorm configurations fold
exactly (folded fp32 module vs a float64 run of the original, tolerance of tests/helpers.py)."""

from __future__ import annotations

import copy
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bnfold.models import zoo
from bnfold.torch_fold import fold_module

from .helpers import assert_close

settings.register_profile("torch_ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("torch_long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = "torch_long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "torch_ci"

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def layer_configs(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride, dil = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    transpose = draw(st.booleans())
    pad = draw(st.integers(0, (k - 1) * dil)) if transpose else draw(st.integers(0, 2))
    out_pad = draw(st.integers(0, max(0, min(stride, dil) - 1))) if transpose else 0
    return dict(nd=nd, groups=groups, cin=cin, cout=cout, k=k, stride=stride, dil=dil, pad=pad, out_pad=out_pad,
                transpose=transpose, bias=draw(st.booleans()), affine=draw(st.booleans()),
                size=draw(st.integers(max(3, (k - 1) * dil + 1), 6)), seed=draw(st.integers(0, 2**16)))


def _check(model, x):
    model = zoo.randomize_bn(model, seed=1).eval()
    res = fold_module(model, x)
    assert res.report.folded == res.report.bn_total == 1, res.report.to_dict()
    with torch.no_grad():
        assert_close(res.module(x).numpy(), copy.deepcopy(model).double()(x.double()).numpy())


@settings(settings.get_profile(PROFILE))
@given(cfg=layer_configs())
def test_conv_then_bn(cfg):
    torch.manual_seed(cfg["seed"])
    nd = cfg["nd"]
    if cfg["transpose"]:
        layer = CONVT[nd](cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], cfg["pad"], cfg["out_pad"],
                          groups=cfg["groups"], bias=cfg["bias"], dilation=cfg["dil"])
    else:
        layer = CONV[nd](cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], cfg["pad"], dilation=cfg["dil"],
                         groups=cfg["groups"], bias=cfg["bias"])
    model = nn.Sequential(layer, BN[nd](cfg["cout"], affine=cfg["affine"]))
    _check(model, torch.randn((2, cfg["cin"]) + (cfg["size"],) * nd))


@settings(settings.get_profile(PROFILE))
@given(cfg=layer_configs())
def test_bn_then_unpadded_conv(cfg):
    torch.manual_seed(cfg["seed"])
    nd = cfg["nd"]
    model = nn.Sequential(nn.ReLU(), BN[nd](cfg["cin"], affine=cfg["affine"]),
                          CONV[nd](cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], 0, dilation=cfg["dil"],
                                   groups=cfg["groups"], bias=cfg["bias"]))
    _check(model, torch.randn((2, cfg["cin"]) + (cfg["size"],) * nd))


@settings(settings.get_profile(PROFILE))
@given(n_in=st.integers(1, 8), n_out=st.integers(1, 8), bias=st.booleans(), affine=st.booleans(),
       forward=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_and_bn(n_in, n_out, bias, affine, forward, seed):
    torch.manual_seed(seed)
    if forward:
        model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(n_in, affine=affine), nn.Linear(n_in, n_out, bias=bias))
    else:
        model = nn.Sequential(nn.Linear(n_in, n_out, bias=bias), nn.BatchNorm1d(n_out, affine=affine))
    _check(model, torch.randn(3, n_in))
