"""bridges.selective_scan_fn: gradcheck, the mamba_ssm test's parametrization judged against
the float64 reference, and the backend choice. (Every backend against the reference, on
drawn problems, is the conformance suite: tests/conformance.)"""

import numpy as np
import pytest
import torch

from alignscan import cuda_kernels as K
from alignscan import reference as R
from alignscan.bridges import resolve_backend, selective_scan_fn
from alignscan.testing import make_problem
from tests.bridges.helpers import GRAD_NAMES, run, tensors


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
# That test's float32 tolerances (rtol 6e-4, atol 2e-3) are the float32 row of the one table.


@pytest.mark.parametrize("pruned", [False, True], ids=["no-map", "random-map"])
@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
@pytest.mark.parametrize("row", range(len(OA8)))
@pytest.mark.parametrize("seqlen", MAMBA_SEQLENS)
def test_mamba_ssm_parametrization_against_the_reference(seqlen, row, alignment, pruned):
    """mamba_ssm's grid through the torch op (numba-cpu), forward and every gradient, judged
    against the float64 NumPy reference at that test's float32 tolerances (the table's row)."""
    flags = {name: bool(v) for name, v in zip(FLAGS, OA8[row])}
    rng = np.random.default_rng(seqlen * 97 + row)
    length = int(seqlen * 0.7) if pruned else seqlen
    positions = np.sort(rng.choice(seqlen, length, replace=False)) if pruned else None
    p = make_problem(rng, batch=2, dim=4, dstate=8, length=length, groups=2 if flags["varBC_groups"] else None,
                     dtype=np.float32, positions=positions, seqlen=seqlen if pruned else None, alignment=alignment,
                     D=flags["has_D"], z=flags["has_z"], delta_bias=flags["has_delta_bias"],
                     delta_softplus=flags["delta_softplus"], return_last_state=flags["return_last_state"])
    out, last, grads = run(lambda *a, **k: selective_scan_fn(*a, backend="numba-cpu", **k), p, tensors(p))
    ref_out, ref_last = R.selective_scan(**p.kwargs(return_last_state=True))
    R.assert_within_tolerance(out, ref_out, np.float32, "out")
    R.assert_within_tolerance(last, ref_last, np.float32, "last_state")
    ref_grads = dict(zip(GRAD_NAMES, R.selective_scan_backward(p.dout(), **p.kwargs())))
    for name, g in grads.items():
        R.assert_within_tolerance(g.double().numpy(), ref_grads[name], np.float32, f"d{name}")


def test_backend_choice_by_device_env_and_argument(monkeypatch):
    assert resolve_backend("cpu") == "numba-cpu"
    monkeypatch.setenv("ALIGNSCAN_BACKEND", "torch")
    assert resolve_backend("cpu") == "torch"
    assert resolve_backend("cpu", "numba-cpu") == "numba-cpu"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cpu", "triton")
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("cpu", "cupy")
    if K.available_backends()["cupy"] is not None:
        with pytest.raises(K.BackendUnavailable, match="cannot run here"):
            resolve_backend("cuda", "cupy")


def test_env_backend_is_used_by_the_op(monkeypatch):
    p = make_problem(np.random.default_rng(0), batch=1, dim=2, dstate=2, length=4)
    calls = []
    import alignscan.bridges.scan_op as scan_op
    real = scan_op.scan_twin
    monkeypatch.setattr(scan_op, "scan_twin", lambda args: calls.append(1) or real(args))
    monkeypatch.setenv("ALIGNSCAN_BACKEND", "torch")
    run(selective_scan_fn, p, tensors(p))
    assert calls, "ALIGNSCAN_BACKEND=torch must route through the torch twin"


def test_a_bad_environment_variable_is_named(monkeypatch):
    p = make_problem(np.random.default_rng(0), batch=1, dim=2, dstate=2, length=4)
    monkeypatch.setenv("ALIGNSCAN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ALIGNSCAN_BACKEND"):
        run(selective_scan_fn, p, tensors(p))
    with pytest.raises(ValueError, match="ALIGNSCAN_BACKEND"):
        K.selective_scan_fwd(**p.kwargs())


def test_the_registry_knows_every_backend_once():
    from alignscan.cuda_kernels import backends
    names = backends.names()
    assert len(names) == len(set(names)) and "torch" in names and "numba-cpu" in names
    for name in names:
        entry = backends.get(name)
        assert entry.device in ("cpu", "cuda", "any") and entry.purpose
    assert set(K.available_backends()) == set(backends.names(kernels_only=True))
    calls = []
    probe_test = backends.Backend("probe-test", "cpu", "a test entry, not registered", None,
                                  lambda: calls.append(1) or "never runs", lambda x: x, default=False)
    assert probe_test.reason() == probe_test.reason() == "never runs" and calls == [1], "probed once, cached"
