"""The reference scan against the oracles of SPEC §2 (1-5), for every alignment."""
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
from hypothesis import given
from hypothesis import strategies as st

from alignscan import reference as R
from tests.strategies import make_problem, scan_problems

EXACT = {"rtol": 1e-12, "atol": 1e-13}


def _scan_kwargs(p, **overrides):
    """The problem's arguments without return_last_state (for functions that take none)."""
    kw = p.kwargs(**overrides)
    kw.pop("return_last_state")
    return kw


def _at_positions(dense, positions):
    b, d = dense.shape[:2]
    pos = np.broadcast_to(positions, (b, positions.shape[-1]))
    return np.take_along_axis(dense, np.repeat(pos[:, None, :], d, axis=1), axis=2)


@given(scan_problems(alignments=("prev", "self", "hold"), explicit_seqlen=True))
def test_expansion_oracle_matches_dense_scan_of_expanded_sequence(p):
    out, last = R.selective_scan(**p.kwargs(return_last_state=True))
    dense = R.expand_to_dense(**_scan_kwargs(p))
    dense_out, dense_last = R.selective_scan(**dense, return_last_state=True)
    positions = p.positions if p.positions is not None else np.arange(p.u.shape[2])
    np.testing.assert_allclose(out, _at_positions(dense_out, positions), **EXACT)
    np.testing.assert_allclose(last, dense_last, **EXACT)


@given(scan_problems(alignments=("none",)))
def test_relabel_equals_dense_scan_of_remaining_tokens(p):
    out, last = R.selective_scan(**p.kwargs(return_last_state=True))
    dense_out, dense_last = R.selective_scan(**p.kwargs(positions=None, seqlen=None, return_last_state=True))
    np.testing.assert_allclose(out, dense_out, **EXACT)
    np.testing.assert_allclose(last, dense_last, **EXACT)


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@given(p=scan_problems())
def test_no_pruning_equals_dense_scan_for_every_alignment(alignment, p):
    length = p.u.shape[2]
    out, last = R.selective_scan(**p.kwargs(positions=np.arange(length), seqlen=length,
                                            alignment=alignment, return_last_state=True))
    dense_out, dense_last = R.selective_scan(**p.kwargs(positions=None, seqlen=None, alignment="none",
                                                        return_last_state=True))
    np.testing.assert_allclose(out, dense_out, **EXACT)
    np.testing.assert_allclose(last, dense_last, **EXACT)


def _bidiagonal_terms(p, b, d, n):
    """a_i, b_i of h_i - a_i h_{i-1} = b_i, written out from SPEC §1 without the reference."""
    positions = np.broadcast_to(p.positions if p.positions is not None else np.arange(p.u.shape[2]),
                                p.u.shape[::2])[b]
    x = p.delta[b, d] + (p.delta_bias[d] if p.delta_bias is not None else 0.0)
    Delta = np.log1p(np.exp(x)) if p.delta_softplus else x
    gap = np.diff(positions, prepend=positions[0] - 1).astype(float)
    E = np.array([Delta[i] if i == 0 else
                  {"prev": Delta[i] + (gap[i] - 1) * Delta[i - 1], "self": gap[i] * Delta[i],
                   "none": Delta[i], "hold": Delta[i] + (gap[i] - 1) * Delta[i - 1]}[p.alignment]
                  for i in range(len(Delta))])
    Bmat = p.B if p.B.ndim == 4 else p.B[:, None]
    group = d // (p.u.shape[1] // Bmat.shape[1])
    own = Delta * Bmat[b, group, n] * p.u[b, d]
    rhs = own.copy()
    if p.alignment == "hold":   # each of the g - 1 pruned steps repeats the previous token's input
        for i in range(1, len(Delta)):
            held = sum(np.exp(k * Delta[i - 1] * p.A[d, n]) for k in range(int(gap[i]) - 1))
            rhs[i] += np.exp(Delta[i] * p.A[d, n]) * held * own[i - 1]
    return np.exp(E * p.A[d, n]), rhs


@given(scan_problems(), st.data())
def test_states_solve_the_bidiagonal_system(p, data):
    batch, dim, length = p.u.shape
    b, d, n = (data.draw(st.integers(0, s - 1)) for s in (batch, dim, p.A.shape[1]))
    a, rhs = _bidiagonal_terms(p, b, d, n)
    system = scipy.sparse.eye(length, format="csr") - scipy.sparse.diags(a[1:], -1, format="csr")
    solved = scipy.sparse.linalg.spsolve_triangular(system, rhs, lower=True)
    h = R.hidden_states(**_scan_kwargs(p))
    np.testing.assert_allclose(h[b, d, :, n], solved, **EXACT)


@given(scan_problems(alignments=("prev", "self", "none")))
def test_delta_rewrite_turns_a_dense_scan_into_the_position_map_scan(p):
    out = R.selective_scan(**p.kwargs(return_last_state=False))
    rewrite = R.delta_rewrite(**_scan_kwargs(p))
    dense = R.selective_scan(rewrite["u"], rewrite["delta"], p.A, p.B, p.C)
    if p.D is not None:
        dense = dense + p.D[None, :, None] * p.u
    if p.z is not None:
        dense = dense * p.z / (1 + np.exp(-p.z))
    np.testing.assert_allclose(out, dense, **EXACT)


def test_empty_sequence_gives_empty_output_and_zero_state():
    p = make_problem(np.random.default_rng(0), batch=2, dim=4, dstate=3, length=0,
                     positions=np.zeros((2, 0), np.int64), seqlen=7)
    for alignment in R.ALIGNMENTS:
        out, last = R.selective_scan(**p.kwargs(alignment=alignment))
        assert out.shape == (2, 4, 0) and last.shape == (2, 4, 3)
        assert not last.any()
        grads = R.selective_scan_backward(p.dout(), **p.kwargs(alignment=alignment))
        assert grads[0].shape == (2, 4, 0) and not grads[2].any()


def test_trailing_gap_decays_last_state_by_the_last_tokens_delta():
    """A hand case: one token at 0 on a path of length 4 -> three pruned steps after it."""
    A = np.array([[-0.5]])
    u, delta = np.array([[[2.0]]]), np.array([[[0.3]]])
    B, C = np.ones((1, 1, 1)), np.ones((1, 1, 1))
    _, last = R.selective_scan(u, delta, A, B, C, return_last_state=True, positions=[0], seqlen=4)
    h0 = 0.3 * 2.0
    np.testing.assert_allclose(last, [[[np.exp(3 * 0.3 * -0.5) * h0]]], rtol=1e-15)
    _, last_none = R.selective_scan(u, delta, A, B, C, return_last_state=True, positions=[0], seqlen=4,
                                    alignment="none")
    np.testing.assert_allclose(last_none, [[[h0]]], rtol=1e-15)


def test_prev_alignment_hand_case():
    """Tokens at 0 and 3: E_1 = Δ_1 + 2·Δ_0 (two pruned steps advance with Δ_0)."""
    A = np.array([[-1.0]])
    u = np.array([[[1.0, 1.0]]]); delta = np.array([[[0.2, 0.5]]])
    B = np.ones((1, 1, 2)); C = np.ones((1, 1, 2))
    out = R.selective_scan(u, delta, A, B, C, positions=[0, 3])
    h0 = 0.2
    h1 = np.exp(-(0.5 + 2 * 0.2)) * h0 + 0.5
    np.testing.assert_allclose(out[0, 0], [h0, h1], rtol=1e-15)
