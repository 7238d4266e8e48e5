"""One check, shared by every backend's tests: a backend against the float64 reference."""
import numpy as np

from alignscan import reference as R
from tests.strategies import GRAD_NAMES


def host(x):
    return None if x is None else R.arguments.host_array(x)


def check_forward(p, forward):
    """forward(**kwargs) of a backend equals the reference (out and last_state)."""
    kw = p.kwargs()
    expected = R.selective_scan(**kw)
    got = forward(**kw)
    dtype = np.float64 if p.u.dtype == np.float64 else np.float32
    if p.return_last_state:
        R.assert_within_tolerance(host(got[0]), expected[0], dtype, f"out for {p}")
        R.assert_within_tolerance(host(got[1]), expected[1], dtype, f"last_state for {p}")
    else:
        R.assert_within_tolerance(host(got), expected, dtype, f"out for {p}")


def check_backward(p, backward):
    """backward(dout, **kwargs) of a backend equals the reference adjoint, input by input."""
    dout = p.dout()
    kw = p.kwargs()
    expected = R.selective_scan_backward(dout, **kw)
    got = backward(dout, **kw)
    assert len(got) == len(GRAD_NAMES), f"the backward returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), got {len(got)}"
    dtype = np.float64 if p.u.dtype == np.float64 else np.float32
    for name, g, e in zip(GRAD_NAMES, got, expected):
        if e is None:
            assert g is None, f"d{name} must be None when {name} is None"
            continue
        R.assert_within_tolerance(host(g), e, dtype, f"d{name} for {p}")
