"""The fold formula against direct float64 computations (torch's functional ops as the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnfold import InvalidStatisticsError, bn_affine, cast_checked, fold_backward, fold_forward
from bnfold.formula import CastOverflow


def rand_bn(c, rng):
    return rng.uniform(0.5, 1.5, c), rng.normal(0, 1, c), rng.normal(0, 1, c), rng.uniform(0.1, 2, c)


def bn_ref(y, gamma, beta, mean, var, eps):
    shape = (1, -1) + (1,) * (y.dim() - 2)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64).reshape(shape)  # noqa: E731
    return (y - t(mean)) / torch.sqrt(t(var) + eps) * t(gamma) + t(beta)


def test_bn_affine_matches_definition():
    rng = np.random.default_rng(0)
    g, b, m, v = rand_bn(5, rng)
    a = bn_affine(g, b, m, v, 1e-3)
    x = rng.normal(size=(7, 5))
    np.testing.assert_allclose(x * a.scale + a.shift, g * (x - m) / np.sqrt(v + 1e-3) + b, rtol=1e-14)


def test_bn_affine_without_affine_parameters():
    a = bn_affine(None, None, np.array([1.0, 2.0]), np.array([4.0, 1.0]), 0.0)
    np.testing.assert_allclose(a.scale, [0.5, 1.0])
    np.testing.assert_allclose(a.shift, [-0.5, -2.0])


@pytest.mark.parametrize("bad", ["nan_mean", "inf_gamma", "neg_var", "zero_var_zero_eps"])
def test_bn_affine_refuses_invalid_statistics(bad):
    g, b, m, v = [np.ones(3) for _ in range(4)]
    eps = 1e-5
    if bad == "nan_mean":
        m[1] = np.nan
    elif bad == "inf_gamma":
        g[2] = np.inf
    elif bad == "neg_var":
        v[0] = -1
    else:
        v[0], eps = 0.0, 0.0
    with pytest.raises(InvalidStatisticsError, match="'layer3.bn'"):
        bn_affine(g, b, m, v, eps, name="layer3.bn")


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_backward_conv(groups, bias):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 8 // groups, 3, 3))
    b = rng.normal(size=8) if bias else None
    params = rand_bn(8, rng)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    ref = bn_ref(F.conv2d(x, torch.tensor(w), None if b is None else torch.tensor(b), groups=groups), *params, 1e-5)
    w2, b2 = fold_backward(w, b, bn_affine(*params, 1e-5), layout="out_in")
    got = F.conv2d(x, torch.tensor(w2), torch.tensor(b2), groups=groups)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_backward_grouped_conv_transpose(groups):
    rng = np.random.default_rng(2)
    cin, cout = 6, 12
    w = rng.normal(size=(cin, cout // groups, 3, 3))
    params = rand_bn(cout, rng)
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64)
    ref = bn_ref(F.conv_transpose2d(x, torch.tensor(w), stride=2, groups=groups), *params, 1e-5)
    w2, b2 = fold_backward(w, None, bn_affine(*params, 1e-5), layout="in_out", groups=groups)
    got = F.conv_transpose2d(x, torch.tensor(w2), torch.tensor(b2), stride=2, groups=groups)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_forward_conv_without_padding(groups):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(12, 8 // groups, 3, 3))
    b = rng.normal(size=w.shape[0])
    params = rand_bn(8, rng)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    ref = F.conv2d(bn_ref(x, *params, 1e-5), torch.tensor(w), torch.tensor(b), stride=2, groups=groups)
    w2, b2 = fold_forward(w, b, bn_affine(*params, 1e-5), layout="out_in", groups=groups)
    got = F.conv2d(x, torch.tensor(w2), torch.tensor(b2), stride=2, groups=groups)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_linear_backward_and_forward(layout):
    rng = np.random.default_rng(4)
    w_oi = rng.normal(size=(5, 4))  # (out, in)
    w = w_oi if layout == "out_in" else w_oi.T
    b = rng.normal(size=5)
    x = torch.randn(3, 4, dtype=torch.float64)
    p_out, p_in = rand_bn(5, rng), rand_bn(4, rng)
    ref_b = bn_ref(F.linear(x, torch.tensor(w_oi), torch.tensor(b)), *p_out, 1e-5)
    w2, b2 = fold_backward(w, b, bn_affine(*p_out, 1e-5), layout=layout)
    w2 = w2 if layout == "out_in" else w2.T
    torch.testing.assert_close(F.linear(x, torch.tensor(w2), torch.tensor(b2)), ref_b, rtol=1e-12, atol=1e-12)
    ref_f = F.linear(bn_ref(x, *p_in, 1e-5), torch.tensor(w_oi), torch.tensor(b))
    w3, b3 = fold_forward(w, b, bn_affine(*p_in, 1e-5), layout=layout)
    w3 = w3 if layout == "out_in" else w3.T
    torch.testing.assert_close(F.linear(x, torch.tensor(w3), torch.tensor(b3)), ref_f, rtol=1e-12, atol=1e-12)


def test_cast_checked_detects_overflow():
    assert cast_checked(np.array([1.0, 2.0]), np.float16, what="w").dtype == np.float16
    with pytest.raises(CastOverflow, match="float16"):
        cast_checked(np.array([1.0, 7e4]), np.float16, what="w")
    # inf that was already inf is not an overflow of the fold
    assert np.isinf(cast_checked(np.array([np.inf]), np.float16, what="w")).all()
