"""Alignment "hold": a zero-order hold across gaps (SPEC §1, an extension of ours).

Eq. 6 advances the state across a gap with no input. Under "hold" each of the q = g_i - 1
pruned steps between tokens i-1 and i receives token i-1's input again. With
x = Δ_{i-1}·A and b = Δ_{i-1}·B_{i-1}·u_{i-1}, the q held steps compose to

    h <- exp(q·x)·h_{i-1} + b·S_q(x),     S_q(x) = Σ_{k<q} exp(k·x) = expm1(q·x) / expm1(x)

and token i's own step follows: h_i = exp(Δ_i·A)·h + Δ_i·B_i·u_i. The decay is then
exp((Δ_i + q·Δ_{i-1})·A), exactly "prev"'s; the new part is the input token i-1 leaves
behind, which reaches h_i with the weight

    w_i = exp(Δ_i·A)·S_{q_i}(Δ_{i-1}·A)        (0 where q_i = 0).

S_q is evaluated with expm1 (never (1 - a^q)/(1 - a), which cancels as a -> 1), and its
derivative T_q = dS_q/dx = Σ_{k<q} k·exp(k·x) in a form without cancellation either.
"""
from __future__ import annotations

import numpy as np

__all__ = ["hold_sum", "hold_sum_grad", "langevin"]

# Below it the Langevin function is summed as a series, above it as coth(y) - 1/y; at 0.1
# the series' first omitted term is ~1e-17 and coth loses ~2.5 digits: both far under 1e-12.
_LANGEVIN_SERIES_BELOW = 0.1


def langevin(y):
    """L(y) = coth(y) - 1/y (odd, L(y) ~ y/3 near 0), without cancellation near 0."""
    y = np.asarray(y, dtype=np.float64)
    small = np.abs(y) < _LANGEVIN_SERIES_BELOW
    ys = np.where(small, y, 0.0)
    y2 = ys * ys
    series = ys * (1 / 3 + y2 * (-1 / 45 + y2 * (2 / 945 + y2 * (-1 / 4725 + y2 * (2 / 93555)))))
    yl = np.where(small, 1.0, y)
    return np.where(small, series, 1.0 / np.tanh(yl) - 1.0 / yl)


def hold_sum(q, x):
    """S_q(x) = Σ_{k<q} exp(k·x) = expm1(q·x) / expm1(x), and q where x = 0; S_0 = 0."""
    q, x = np.broadcast_arrays(np.asarray(q, dtype=np.float64), np.asarray(x, dtype=np.float64))
    nonzero = x != 0
    safe_x = np.where(nonzero, x, 1.0)
    with np.errstate(over="ignore", invalid="ignore"):   # overflow only where S itself overflows (x > 0)
        return np.where(nonzero, np.expm1(q * safe_x) / np.expm1(safe_x), q)


def hold_sum_grad(q, x):
    """T_q(x) = dS_q/dx = Σ_{k<q} k·exp(k·x); q(q-1)/2 at x = 0.

    |q·x| < 1: from S = exp((q-1)x/2)·sinh(qx/2)/sinh(x/2),
        T = S·((q-1)/2 + (q·L(q·x/2) - L(x/2))/2),  L the Langevin function;
    otherwise the difference form, whose second term is then small:
        T = (q·exp(q·x)·expm1(x) - exp(x)·expm1(q·x)) / expm1(x)².
    """
    q, x = np.broadcast_arrays(np.asarray(q, dtype=np.float64), np.asarray(x, dtype=np.float64))
    near = np.abs(q * x) < 1.0
    nonzero = x != 0
    xs = np.where(nonzero, x, 1.0)
    series = hold_sum(q, x) * ((q - 1) / 2 + (q * langevin(q * x / 2) - langevin(x / 2)) / 2)
    with np.errstate(over="ignore", invalid="ignore"):   # each form is only used where it is finite
        em1 = np.expm1(xs)
        difference = (q * np.exp(q * xs) * em1 - np.exp(xs) * np.expm1(q * xs)) / (em1 * em1)
    return np.where(~nonzero, q * (q - 1) / 2, np.where(near, series, difference))
