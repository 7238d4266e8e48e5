"""Alignment "hold" (SPEC §1): S_q and its derivative against sums written out, the limits,
and a hand case. (The scan under "hold" is checked against the expansion oracle, the linear
solve and finite differences with every other alignment.)"""
import math

import numpy as np
import pytest

from alignscan import reference as R
from alignscan.reference.hold import hold_sum, hold_sum_grad, langevin


@pytest.mark.parametrize("q", [0, 1, 2, 3, 7, 40])
@pytest.mark.parametrize("x", [0.0, 1e-12, -1e-9, -1e-4, -0.03, -0.2, -0.7, -1.0, -3.0, -30.0, 0.01, 0.5])
def test_hold_sums_equal_the_sums_written_out(q, x):
    S = math.fsum(math.exp(k * x) for k in range(q))
    T = math.fsum(k * math.exp(k * x) for k in range(q))
    assert hold_sum(q, x) == pytest.approx(S, rel=1e-13, abs=1e-300)
    assert hold_sum_grad(q, x) == pytest.approx(T, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("q,x", [(10**6, -1.0), (10**9, -1e-3), (10**9, -1e-10), (10**9, -1e-12),
                                 (10**12, -5e-13), (10**4, -3e-5), (500, -0.002)])
def test_hold_sums_for_long_gaps(q, x):
    """Against the closed forms evaluated in 50-digit arithmetic (mpmath comes with torch)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    X = mpmath.mpf(x)
    a, aq = mpmath.exp(X), mpmath.exp(q * X)
    S = (aq - 1) / (a - 1)
    T = (q * aq * (a - 1) - (aq - 1) * a) / (a - 1) ** 2
    assert hold_sum(q, x) == pytest.approx(float(S), rel=1e-12)
    assert hold_sum_grad(q, x) == pytest.approx(float(T), rel=1e-11)


def test_langevin_is_continuous_where_the_series_hands_over():
    y = np.array([0.0999999999, 0.1, 0.1000000001, -0.1])
    exact = np.array([1 / math.tanh(v) - 1 / v for v in y])
    np.testing.assert_allclose(langevin(y), exact, rtol=1e-8)
    assert langevin(0.0) == 0.0


def test_hold_hand_case():
    """Tokens at 0 and 3: the two pruned steps repeat token 0's input Δ_0·B·u_0."""
    A = np.array([[-1.0]])
    u = np.array([[[1.0, 2.0]]]); delta = np.array([[[0.2, 0.5]]])
    B = np.ones((1, 1, 2)); C = np.ones((1, 1, 2))
    out, last = R.selective_scan(u, delta, A, B, C, positions=[0, 3], seqlen=6, alignment="hold",
                                 return_last_state=True)
    h0 = 0.2 * 1.0
    h = h0
    for _ in range(2):                          # the held steps
        h = math.exp(-0.2) * h + 0.2 * 1.0
    h1 = math.exp(-0.5) * h + 0.5 * 2.0
    hl = h1
    for _ in range(2):                          # the trailing steps after position 3 on a path of 6
        hl = math.exp(-0.5) * hl + 0.5 * 2.0
    np.testing.assert_allclose(out[0, 0], [h0, h1], rtol=1e-14)
    np.testing.assert_allclose(last[0, 0, 0], hl, rtol=1e-14)
