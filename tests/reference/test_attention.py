"""Hidden attention reproduces the scan: y_i = Σ_j α[i, j]·u_j + D·u_i (before the gate)."""
import numpy as np
from hypothesis import given

from alignscan import reference as R
from tests.strategies import scan_problems


@given(scan_problems())
def test_hidden_attention_reproduces_y(p):
    kw = p.kwargs(z=None, return_last_state=False)
    y = R.selective_scan(**kw)
    kw.pop("return_last_state")
    alpha = R.hidden_attention(**kw)
    m = p.u.shape[2]
    assert alpha.shape == p.u.shape[:2] + (m, m)
    assert not np.triu(alpha, k=1).any(), "α must be lower triangular (causal scan)"
    recon = np.einsum("bdij,bdj->bdi", alpha, p.u)
    if p.D is not None:
        recon += p.D[None, :, None] * p.u
    np.testing.assert_allclose(recon, y, rtol=1e-11, atol=1e-12)


def test_alignment_adds_decay_across_gaps():
    """With a gap of 3 and A < 0, aligned attention to the earlier token is smaller."""
    A = np.array([[-1.0]]); u = np.ones((1, 1, 2)); delta = np.full((1, 1, 2), 0.5)
    B = C = np.ones((1, 1, 2))
    aligned = R.hidden_attention(u, delta, A, B, C, positions=[0, 3])
    relabel = R.hidden_attention(u, delta, A, B, C, positions=[0, 3], alignment="none")
    np.testing.assert_allclose(aligned[0, 0, 1, 0], np.exp(-0.5 * 3) * 0.5, rtol=1e-14)
    np.testing.assert_allclose(relabel[0, 0, 1, 0], np.exp(-0.5) * 0.5, rtol=1e-14)
