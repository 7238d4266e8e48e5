"""The one tolerance table: how close a fast path must come to the float64 reference.

Keyed by the dtype of the result being judged. float32 is at least as tight as mamba_ssm's
own test of its CUDA kernel (rtol 6e-4, atol 2e-3); float64 kernels must agree to 1e-10.
float16 and bfloat16 results (out, du, ddelta, dz, dB, dC of half inputs) are judged against
the reference on the same half-precision input values; last_state, dA, dD and ddelta_bias
of half inputs are float32 and take the float32 row.
"""
from __future__ import annotations

import numpy as np

__all__ = ["TOLERANCES", "FAST_EXP_MAX_ULP", "tolerance", "max_deviation", "within_tolerance", "assert_within_tolerance"]

TOLERANCES = {
    np.dtype(np.float64): {"rtol": 1e-10, "atol": 1e-12},
    np.dtype(np.float32): {"rtol": 6e-4, "atol": 2e-3},
    # A half result is computed in float32 from the half inputs' exact values (widening is
    # exact) and rounded once to its dtype, to nearest even: at most the unit roundoff,
    # 2^-11 (float16) or 2^-8 (bfloat16), of its magnitude. So it may differ from the
    # reference by the float32 row plus that roundoff, relative; the absolute part (a
    # float16 subnormal is off by at most 2^-25) stays the float32 row's.
    np.dtype(np.float16): {"rtol": 6e-4 + 2.0**-11, "atol": 2e-3},
    "bfloat16": {"rtol": 6e-4 + 2.0**-8, "atol": 2e-3},
}


# The CPU kernels' float32 exp (cuda_kernels._numba_support._expf32: range reduction and a
# degree-6 polynomial, vectorisable): its largest error, in float32 ulp of the correctly
# rounded exp, over a dense sweep of every 61st float32 in [-104, 89] plus every float32
# within 2^16 ulp of 0, of ln(FLT_MAX) and of ln(FLT_MIN) (tests/kernels/test_fast_exp.py).
FAST_EXP_MAX_ULP = 1.5      # measured: 1.25 ulp at most (mean 0.074) over 37.1 M values, in the kernels' fast-math


def tolerance(dtype):
    """{"rtol": ..., "atol": ...} for a NumPy dtype, or the string "bfloat16"."""
    key = dtype if isinstance(dtype, str) else np.dtype(dtype)
    if key not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {dtype!r}; known: {list(TOLERANCES)}")
    return TOLERANCES[key]


def max_deviation(actual, expected):
    """(max |actual - expected|, the same divided by max |expected|) as floats; 0.0 when empty.

    The relative figure is normwise (max-norm), so elements near zero do not dominate it.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.size == 0:
        return 0.0, 0.0
    diff = np.abs(actual - expected)
    scale = float(np.abs(expected).max())
    return float(diff.max()), float(diff.max() / scale) if scale > 0 else float(diff.max())


def _bounds(expected, dtype):
    tol = tolerance(dtype)
    # atol scales with the array's magnitude once it exceeds 1 (gradients summed over a batch).
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    return tol["atol"] * scale + tol["rtol"] * np.abs(expected)


def within_tolerance(actual, expected, dtype):
    """|actual - expected| <= atol·max(1, max|expected|) + rtol·|expected| everywhere."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return False
    return bool(np.all(np.abs(actual - expected) <= _bounds(expected, dtype)))


def assert_within_tolerance(actual, expected, dtype, what="value"):
    """AssertionError with the worst element when ``within_tolerance`` fails."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    if not within_tolerance(actual, expected, dtype):
        excess = np.abs(actual - expected) / _bounds(expected, dtype)
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        max_abs, max_rel = max_deviation(actual, expected)
        raise AssertionError(f"{what} ({np.dtype(dtype) if not isinstance(dtype, str) else dtype}): "
                             f"{excess.max():.2f}x over tolerance at {worst}: {actual[worst]!r} vs "
                             f"{expected[worst]!r} (max abs dev {max_abs:.3e}, max rel {max_rel:.3e})")
