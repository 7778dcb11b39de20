"""The rounding budget (bnfold.verify.tolerance): perturbations of ½ ULP, their spread, the per-channel budget,
the compute dtype, and compare_output judging against it."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.verify import compare_output
from bnfold.verify.tolerance import (
    FLOOR_ULPS,
    SAFETY,
    TENSOR_ULPS,
    candidate_dtype,
    channel_budget,
    perturb,
    rounding_spread,
    unit_roundoff,
)


def test_unit_roundoff_per_dtype():
    assert unit_roundoff("float32") == 2.0 ** -24 and unit_roundoff("float16") == 2.0 ** -11
    assert unit_roundoff("bfloat16") == 2.0 ** -8 and unit_roundoff("float64") == 2.0 ** -53
    with pytest.raises(ValueError):
        unit_roundoff("int8")


def test_perturb_moves_every_element_by_half_an_ulp_of_the_target():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(1000)  # float64 parameters: the step is exactly u
    q = perturb({"w": a}, 2.0 ** -11, rng)["w"]
    rel = (q - a) / a
    assert q.dtype == a.dtype and np.allclose(np.abs(rel), 2.0 ** -11, rtol=1e-9)
    assert 0.3 < np.mean(rel > 0) < 0.7  # random signs
    f32 = a.astype(np.float32)  # fp32 parameters at fp32's roundoff: one ULP away, never left in place
    q32 = perturb({"w": f32}, 2.0 ** -24, rng)["w"]
    assert q32.dtype == np.float32 and np.all(q32 != f32)
    assert np.all(np.abs(q32.astype(np.float64) - f32) <= np.spacing(np.abs(f32)) * 1.0001)
    f16 = a.astype(np.float16)  # a coarser parameter than the roundoff asked: one of its own ULPs
    q16 = perturb({"w": f16}, 2.0 ** -24, rng)["w"]
    assert q16.dtype == np.float16 and np.all(q16 != f16)
    scalar = perturb({"s": np.float32(3.0)}, 2.0 ** -11, rng)["s"]
    assert isinstance(scalar, np.ndarray) and scalar.shape == ()


def test_rounding_spread_of_a_linear_model():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 8))
    w = rng.standard_normal((8, 3))
    u = 2.0 ** -11
    spread = rounding_spread(lambda p: [x @ p["w"]], {"w": w}, u, draws=5)[0]
    bound = u * (np.abs(x) @ np.abs(w))  # every term moved by at most u of itself
    assert spread.shape == (4, 3) and np.all(spread <= bound * (1 + 1e-9)) and np.all(spread > 0.05 * bound)
    again = rounding_spread(lambda p: [x @ p["w"]], {"w": w}, u, draws=5)[0]
    assert np.array_equal(spread, again)  # seeded
    flat = rounding_spread(lambda p: [np.ones(3) + 0 * p["w"].sum()], {"w": w}, u)[0]
    assert not flat.any()  # an output the parameters do not move has no spread


def test_channel_budget_is_per_channel():
    ref = np.zeros((2, 3, 4))
    ref[:, 0] = 1000.0
    ref[:, 1] = 1.0
    spread = np.zeros_like(ref)
    spread[1, 0, 2] = 1e-3
    u = 2.0 ** -24
    b = channel_budget(spread, ref, (1,), u)
    assert b.shape == (1, 3, 1)
    whole_term = TENSOR_ULPS * u * 1000  # accumulation at the scale of the whole output, in every channel
    assert b[0, 0, 0] == pytest.approx(SAFETY * 1e-3 + FLOOR_ULPS * u * 1000 + whole_term)
    assert b[0, 1, 0] == pytest.approx(FLOOR_ULPS * u + whole_term) and b[0, 2, 0] == pytest.approx(whole_term)
    whole = channel_budget(spread, ref, (), u)
    assert whole.shape == (1, 1, 1) and whole.item() == pytest.approx(b[0, 0, 0])


def test_candidate_dtype_is_the_coarsest_that_matters():
    assert candidate_dtype([]) == "float32"
    assert candidate_dtype([("float32", 1000)]) == "float32"
    assert candidate_dtype([("float32", 100), ("float16", 1000)]) == "float16"
    assert candidate_dtype([("float32", 1000), ("float16", 10)]) == "float32"  # a few fp16 constants
    assert candidate_dtype([("float16", 500), ("bfloat16", 500)]) == "bfloat16"


def test_compare_output_against_the_budget():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((4, 2, 5)).astype(np.float32)
    ref[:, 0] *= 1e4  # a loud channel next to a quiet one
    spread = np.abs(ref.astype(np.float64)) * 2.0 ** -24
    small = ref + (spread * 3).astype(np.float32) * np.sign(ref)  # a few roundings off
    st = compare_output(ref, small, atol=None, rtol=None, spread=spread, budget_dtype="float32")
    assert st.passed and st.budget == "float32 rounding" and 0 < st.tol_ratio < 1 and st.rtol == 0.0
    bad = ref.copy()
    # invisible next to the loud channel (the whole-tensor rule), not against the quiet channel's own budget,
    # which holds TENSOR_ULPS of the loud channel's scale (accumulation order: 2 * 2**-24 * 3e4 = 3.6e-3 here)
    bad[:, 1] += 1e-2
    st = compare_output(ref, bad, atol=None, rtol=None, spread=spread, budget_dtype="float32")
    assert not st.passed and st.worst_channel["index"] == [1] and st.tol_ratio > 1
    assert compare_output(ref, bad, atol=None, rtol=None, channel_axes=()).passed  # the old whole-tensor rule
    # an explicit tolerance overrides the budget
    st = compare_output(ref, bad, atol=1e-2, rtol=None, spread=spread, budget_dtype="float32")
    assert st.passed and st.budget is None
    # fp16's budget is 2**13 times fp32's for the same spread
    st16 = compare_output(ref, bad, atol=None, rtol=None, spread=spread * 2 ** 13, budget_dtype="float16")
    assert st16.passed and st16.budget == "float16 rounding"
    # zero error against a zero budget passes; any error against it fails
    z = np.zeros((2, 3), np.float32)
    assert compare_output(z, z, atol=None, rtol=None, spread=np.zeros((2, 3))).passed
    assert not compare_output(z, z + 1e-30, atol=None, rtol=None, spread=np.zeros((2, 3))).passed
