"""Property tests: random Conv / ConvTranspose / Gemm configurations followed (or preceded) by a BN fold exactly.

Each example builds a model, folds it, and checks structure, onnx.checker and ORT numbers (tests/helpers.py).
The number of examples per property is set by the hypothesis profile (``HYPOTHESIS_PROFILE=long`` for the
long run recorded in docs/reliability.md).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import G, assert_folds

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@st.composite
def conv_configs(draw, transpose: bool):
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    k = tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    strides = draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))
    dil = draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))
    size = draw(st.integers(max(1 + max((kk - 1) * d for kk, d in zip(k, dil)), 3), 6))
    cfg = dict(nd=nd, group=groups, k=k, strides=strides, dilations=dil)
    if draw(st.booleans()):
        cfg["auto_pad"] = draw(st.sampled_from(["SAME_UPPER", "SAME_LOWER", "VALID"])) if not transpose else "NOTSET"
    if cfg.get("auto_pad") in ("SAME_UPPER", "SAME_LOWER"):
        cfg["dilations"] = [1] * nd  # ONNX Runtime rejects dilations with SAME padding
    if cfg.get("auto_pad", "NOTSET") == "NOTSET":
        cfg["pads"] = draw(st.lists(st.integers(0, 1), min_size=2 * nd, max_size=2 * nd))
        if transpose:
            cfg["pads"] = [min(p, kk - 1) for p, kk in zip(cfg["pads"], k + k)]
    if transpose:
        cfg["output_padding"] = [draw(st.integers(0, max(0, min(s, d) - 1))) for s, d in zip(strides, dil)]
    bias = draw(st.booleans())
    return cin, cout, size, cfg, bias


def _build_conv(cfg_tuple, transpose, seed, forward=False):
    cin, cout, size, cfg, bias = cfg_tuple
    cfg = dict(cfg)
    nd = cfg.pop("nd")
    g = G(seed=seed)
    x = g.input("x", [2, cin] + [size] * nd)
    if forward:
        y = g.bn(g.node("Relu", [x]), cin)
        return g.model([g.conv(y, cin, cout, nd=nd, bias=bias, **cfg)])
    return g.model([g.bn(g.conv(x, cin, cout, nd=nd, bias=bias, transpose=transpose, **cfg), cout)])


@given(cfg=conv_configs(transpose=False), seed=st.integers(0, 2**16))
def test_conv_bn_property(cfg, seed):
    assert_folds(_build_conv(cfg, False, seed), expect_folded=1)


@given(cfg=conv_configs(transpose=True), seed=st.integers(0, 2**16))
def test_convtranspose_bn_property(cfg, seed):
    assert_folds(_build_conv(cfg, True, seed), expect_folded=1)


@given(cfg=conv_configs(transpose=False), seed=st.integers(0, 2**16))
def test_bn_conv_forward_property(cfg, seed):
    """Forward folds happen exactly when the conv reads no padding; either way the numbers match."""
    model = _build_conv(cfg, False, seed, forward=True)
    c = cfg[3]
    padded = any(c.get("pads", [])) or (c.get("auto_pad") in ("SAME_UPPER", "SAME_LOWER")
                                        and not all(k == 1 for k in c["k"]))
    assert_folds(model, expect_bn=1 if padded else 0, expect_folded=0 if padded else 1)


@given(m=st.integers(1, 4), k=st.integers(1, 5), n=st.integers(1, 5), ta=st.booleans(), tb=st.booleans(),
       alpha=st.floats(-2, 2).filter(lambda a: abs(a) > 0.05), beta=st.floats(-2, 2),
       c_shape=st.sampled_from(["none", "n", "1n", "mn", "scalar", "m1"]), forward=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gemm_bn_property(m, k, n, ta, tb, alpha, beta, c_shape, forward, seed):
    g = G(seed=seed)
    if forward:
        ta = False
    x = g.input("x", [k, m] if ta else [m, k])
    a = g.bn(g.node("Relu", [x]), k) if forward else x
    ins = [a, g.const(g.rand(*((n, k) if tb else (k, n))))]
    shapes = {"none": None, "n": (n,), "1n": (1, n), "mn": (m, n), "scalar": (), "m1": (m, 1)}
    if shapes[c_shape] is not None:
        ins.append(g.const(g.rand(*shapes[c_shape])))
    y = g.node("Gemm", ins, alpha=alpha, beta=beta, transA=int(ta), transB=int(tb))
    model = g.model([y] if forward else [g.bn(y, n)])
    assert_folds(model, expect_folded=1)


@given(rows=st.integers(1, 4), k=st.integers(1, 6), n=st.integers(1, 6), with_add=st.booleans(),
       forward=st.booleans(), seed=st.integers(0, 2**16))
def test_matmul_bn_property(rows, k, n, with_add, forward, seed):
    g = G(seed=seed)
    x = g.input("x", [rows, k])
    a = g.bn(g.node("Relu", [x]), k) if forward else x
    y = g.node("MatMul", [a, g.const(g.rand(k, n))])
    if with_add:
        y = g.node("Add", [y, g.const(g.rand(n))])
    assert_folds(g.model([y] if forward else [g.bn(y, n)]), expect_folded=1)

