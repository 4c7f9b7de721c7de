"""The CPU backend's float32 erf and GELU against float64 (scipy), exhaustively over bfloat16 and
densely over float32: the error stays at float32's own rounding, far inside the 1e-5 parity bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from smcli.backends.erf32 import erf32, gelu32

ULP_OF_ONE = 2.0**-24  # float32's spacing just below 1
ERF_BOUND = 3 * ULP_OF_ONE  # measured: 2.2 units at most (1e8 values over [-10, 10])


def gelu64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x * 0.5 * (1.0 + erf(x / math.sqrt(2.0)))


def every_bfloat16() -> np.ndarray:
    """All 65,536 bfloat16 bit patterns, as the float32 values they stand for (NaN and inf too)."""
    return (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)


def test_erf_on_every_bfloat16_value():
    values = every_bfloat16()
    got = erf32(values.copy())
    finite = np.isfinite(values)
    assert np.abs(got[finite] - erf(values[finite].astype(np.float64))).max() <= ERF_BOUND
    assert np.array_equal(np.isnan(got), np.isnan(values))
    assert got[values == np.inf].tolist() == [1.0] and got[values == -np.inf].tolist() == [-1.0]
    assert np.array_equal(got[np.abs(values) >= 4], np.sign(values[np.abs(values) >= 4]))  # rounds to +-1


def test_erf_on_1e8_float32_values_over_minus_10_to_10():
    total, chunk = 100_000_000, 10_000_000
    worst = 0.0
    for start in range(0, total, chunk):
        steps = np.arange(start, start + chunk, dtype=np.float64)
        values = (-10.0 + 20.0 * steps / (total - 1)).astype(np.float32)  # evenly spaced, endpoints in
        got = erf32(values.copy())
        worst = max(worst, float(np.abs(got - erf(values.astype(np.float64))).max()))
    assert worst <= ERF_BOUND


@pytest.mark.parametrize("shape", [(0,), (1,), (5, 3), (70_001,), (3, 40_000)])
def test_erf_and_gelu_keep_shape_and_work_across_chunks(shape):
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
    assert np.abs(erf32(values.copy()) - erf(values.astype(np.float64))).max(initial=0) <= ERF_BOUND
    got = gelu32(values.copy())
    assert got.shape == values.shape
    assert np.all(np.abs(got - gelu64(values)) <= 3e-7 * np.maximum(np.abs(values), 1.0))


def test_gelu_on_every_bfloat16_value_is_as_close_as_torchs_formula_in_float32():
    values = every_bfloat16()
    finite = values[np.isfinite(values) & (np.abs(values) < 1e30)]
    got = gelu32(finite.copy())
    assert np.all(np.abs(got - gelu64(finite)) <= 3e-7 * np.maximum(np.abs(finite), 1.0))
