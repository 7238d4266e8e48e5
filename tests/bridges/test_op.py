"""bridges.selective_scan_fn against the float64 reference, through numba-cpu and "torch"."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import cuda_kernels as K
import reference as R
from bench.problems import make_problem
from bridges import dense_kernel_adapter, resolve_backend, selective_scan_fn, selective_scan_ref
from tests.bridges.helpers import GRAD_NAMES, run, tensors
from tests.strategies import scan_problems

BACKENDS = {"numba-cpu": lambda *a, **k: selective_scan_fn(*a, backend="numba-cpu", **k),
            "torch": lambda *a, **k: selective_scan_fn(*a, backend="torch", **k),
            "dense adapter": dense_kernel_adapter(selective_scan_ref)}


def _check_against_reference(p, fn, dtype):
    out, last, grads = run(fn, p, tensors(p))
    ref_out, ref_last = R.selective_scan(**p.kwargs(return_last_state=True))
    R.assert_within_tolerance(out, ref_out, dtype, f"out for {p}")
    R.assert_within_tolerance(last, ref_last, dtype, f"last_state for {p}")
    ref_grads = dict(zip(GRAD_NAMES, R.selective_scan_backward(p.dout(), **p.kwargs())))
    for name, g in grads.items():
        R.assert_within_tolerance(g.double().numpy(), ref_grads[name], dtype, f"d{name} for {p}")


@pytest.mark.parametrize("backend", list(BACKENDS))
@settings(max_examples=30)
@given(p=scan_problems(max_dim=6, max_dstate=4, max_length=9))
def test_op_matches_reference_float64(backend, p):
    _check_against_reference(p, BACKENDS[backend], np.float64)


@pytest.mark.parametrize("backend", ["numba-cpu", "torch"])
@settings(max_examples=15)
@given(p=scan_problems(dtype=np.float32, max_dim=6, max_dstate=4, max_length=9))
def test_op_matches_reference_float32(backend, p):
    _check_against_reference(p, BACKENDS[backend], np.float32)


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
def test_gradcheck_float64(alignment):
    rng = np.random.default_rng(0)
    p = make_problem(rng, batch=2, dim=4, dstate=3, length=5, groups=2, positions=np.array([[0, 2, 3, 7, 9],
                                                                                           [1, 2, 4, 5, 6]]),
                     seqlen=11, alignment=alignment)
    ts = tensors(p)
    fn = lambda *xs: selective_scan_fn(*xs, delta_softplus=True, positions=torch.tensor(p.positions), seqlen=11,
                                       alignment=alignment, backend="numba-cpu")
    assert torch.autograd.gradcheck(fn, tuple(ts[n] for n in GRAD_NAMES), eps=1e-6, atol=1e-7, rtol=1e-5)


# --- A port of the parametrization of mamba_ssm's tests/ops/test_selective_scan.py ----------
# Its grid (seqlen x groups x every flag) is pairwise-covered by the first six columns of an
# 8-row orthogonal array:
# every pair of flag values occurs, for every seqlen, alignment and position-map choice.
MAMBA_SEQLENS = (128, 256, 512, 1024, 2048, 4096)
FLAGS = ("varBC_groups", "return_last_state", "has_delta_bias", "delta_softplus", "has_z", "has_D")
# (B and C are always the input-dependent (batch, [G,] N, L) kind here: the position map only
# makes sense for them, so mamba's is_variable_B/C = False cases have no counterpart.)
OA8 = [(0, 0, 0, 0, 0, 0, 0), (0, 0, 0, 1, 1, 1, 1), (0, 1, 1, 0, 0, 1, 1), (0, 1, 1, 1, 1, 0, 0),
       (1, 0, 1, 0, 1, 0, 1), (1, 0, 1, 1, 0, 1, 0), (1, 1, 0, 0, 1, 1, 0), (1, 1, 0, 1, 0, 0, 1)]
# That test's float32 tolerances are the float32 row of the one table (rtol 6e-4, atol 2e-3).
MAMBA_RTOL, MAMBA_ATOL = R.tolerance(np.float32)["rtol"], R.tolerance(np.float32)["atol"]


@pytest.mark.parametrize("pruned", [False, True], ids=["no-map", "random-map"])
@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@pytest.mark.parametrize("row", range(len(OA8)))
@pytest.mark.parametrize("seqlen", MAMBA_SEQLENS)
def test_mamba_ssm_parametrization_against_selective_scan_ref(seqlen, row, alignment, pruned):
    flags = dict(zip(FLAGS, OA8[row]))
    rng = np.random.default_rng(seqlen * 97 + row)
    length = int(seqlen * 0.7) if pruned else seqlen
    positions = np.sort(rng.choice(seqlen, length, replace=False)) if pruned else None
    p = make_problem(rng, batch=2, dim=4, dstate=8, length=length, groups=2 if flags["varBC_groups"] else None,
                     dtype=np.float32, positions=positions, seqlen=seqlen if pruned else None, alignment=alignment,
                     D=flags["has_D"], z=flags["has_z"], delta_bias=flags["has_delta_bias"],
                     delta_softplus=flags["delta_softplus"], return_last_state=flags["return_last_state"])
    ts = tensors(p)
    ts_ref = tensors(p)
    out, last, grads = run(BACKENDS["numba-cpu"], p, ts)
    ref_out, ref_last, ref_grads = run(selective_scan_ref, p, ts_ref)
    np.testing.assert_allclose(out, ref_out, rtol=MAMBA_RTOL, atol=MAMBA_ATOL)
    np.testing.assert_allclose(last, ref_last, rtol=MAMBA_RTOL, atol=MAMBA_ATOL)
    for name, g in grads.items():
        # mamba_ssm loosens atol for gradients that sum over the sequence (dA, dB, dC, dD, ddelta_bias).
        scale = max(1.0, ref_grads[name].abs().max().item())
        np.testing.assert_allclose(g.numpy(), ref_grads[name].numpy(), rtol=MAMBA_RTOL, atol=MAMBA_ATOL * scale,
                                   err_msg=f"d{name}")


def test_backend_choice_by_device_env_and_argument(monkeypatch):
    assert resolve_backend("cpu") == "numba-cpu"
    monkeypatch.setenv("ALIGNSCAN_BACKEND", "torch")
    assert resolve_backend("cpu") == "torch"
    assert resolve_backend("cpu", "numba-cpu") == "numba-cpu"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cpu", "triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("cpu", "cupy")
    if K.available_backends()["cupy"] is not None:
        with pytest.raises(K.BackendUnavailable, match="cannot run here"):
            resolve_backend("cuda", "cupy")


def test_env_backend_is_used_by_the_op(monkeypatch):
    p = make_problem(np.random.default_rng(0), batch=1, dim=2, dstate=2, length=4)
    calls = []
    monkeypatch.setattr("bridges.scan_op.selective_scan_ref", lambda *a, **k: calls.append(1) or selective_scan_ref(*a, **k))
    monkeypatch.setenv("ALIGNSCAN_BACKEND", "torch")
    run(selective_scan_fn, p, tensors(p))
    assert calls, "ALIGNSCAN_BACKEND=torch must route through the torch twin"
