"""The reference backward (hand-derived reverse scan) against central finite differences."""
import numpy as np
from hypothesis import given, settings

from alignscan import reference as R
from tests.strategies import GRAD_NAMES, scan_problems

FD_STEP = 1e-6
FD_RTOL, FD_ATOL = 1e-6, 1e-8


def _loss(p, dout, name, value):
    out = R.selective_scan(**p.kwargs(return_last_state=False, **{name: value}))
    return float((out * dout).sum())


def _finite_difference(p, dout, name):
    x = getattr(p, name)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += FD_STEP
        minus[idx] -= FD_STEP
        grad[idx] = (_loss(p, dout, name, plus) - _loss(p, dout, name, minus)) / (2 * FD_STEP)
    return grad


@settings(max_examples=25)
@given(scan_problems(max_batch=2, max_dim=4, max_dstate=3, max_length=6, max_run=6))
def test_backward_equals_central_finite_differences(p):
    dout = p.dout()
    grads = dict(zip(GRAD_NAMES, R.selective_scan_backward(dout, **p.kwargs())))
    for name in GRAD_NAMES:
        if getattr(p, name) is None:
            assert grads[name] is None, name
            continue
        assert grads[name].shape == getattr(p, name).shape, name
        scale = max(1.0, np.abs(grads[name]).max())
        np.testing.assert_allclose(grads[name], _finite_difference(p, dout, name),
                                   rtol=FD_RTOL, atol=FD_ATOL * scale, err_msg=f"d{name} for {p}")


def test_prev_gap_term_reaches_the_previous_token():
    """Under "prev" with a gap, delta_0 also gets the gap term from E_1 (SPEC §2 oracle 6)."""
    A = np.array([[-1.0]]); u = np.array([[[1.0, 1.0]]]); delta = np.array([[[0.2, 0.5]]])
    B = C = np.ones((1, 1, 2))
    dout = np.array([[[0.0, 1.0]]])
    ddelta = {al: R.selective_scan_backward(dout, u, delta, A, B, C, positions=[0, 3], alignment=al)[1]
              for al in ("prev", "none")}
    # y_1 = exp(-(Δ_1 + 2Δ_0))·Δ_0 + Δ_1  ->  ∂y_1/∂Δ_0 = exp(-(Δ_1+2Δ_0))·(1 - 2Δ_0)
    e = np.exp(-(0.5 + 2 * 0.2))
    np.testing.assert_allclose(ddelta["prev"][0, 0, 0], e * (1 - 2 * 0.2), rtol=1e-14)
    np.testing.assert_allclose(ddelta["none"][0, 0, 0], np.exp(-0.5), rtol=1e-14)  # y_1 = exp(-Δ_1)·Δ_0 + Δ_1
