"""numba-cuda under the CUDA simulator. Run by test_numba_cuda.py in a subprocess with
NUMBA_ENABLE_CUDASIM=1 (it must be set before numba.cuda is imported); not collected by the
main run (the name does not start with test_). The simulator interprets every thread in
Python: shapes are tiny and examples few."""
import os

import numpy as np
import pytest
from hypothesis import given, settings

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run me through tests/kernels/test_numba_cuda.py"

from numba import cuda  # noqa: E402

from alignscan import cuda_kernels as K  # noqa: E402
from alignscan import reference as R  # noqa: E402
from alignscan.cuda_kernels import numba_cuda  # noqa: E402
from alignscan.cuda_kernels.params import ScanParams  # noqa: E402
from alignscan.testing import make_problem  # noqa: E402
from tests.kernels.equivalence import check_backward, check_forward  # noqa: E402
from tests.kernels.half import check_half_backward, check_half_forward, half_scan  # noqa: E402
from tests.strategies import scan_problems  # noqa: E402

SMALL = dict(max_batch=2, max_dim=4, max_dstate=3, max_length=7, max_run=6)


def fwd(**kw):
    return K.selective_scan_fwd(**kw, backend="numba-cuda")


def bwd(dout, **kw):
    return K.selective_scan_bwd(dout, **kw, backend="numba-cuda")


@settings(max_examples=10)
@given(p=scan_problems(**SMALL))
def test_forward_matches_reference_float64(p):
    check_forward(p, fwd)


@settings(max_examples=10)
@given(p=scan_problems(**SMALL))
def test_backward_matches_reference_float64(p):
    check_backward(p, bwd)


@settings(max_examples=5)
@given(p=scan_problems(dtype=np.float32, **SMALL))
def test_forward_and_backward_match_reference_float32(p):
    check_forward(p, fwd)
    check_backward(p, bwd)


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
def test_several_tiles_and_channel_blocks(alignment):
    """Tiles of 4 tokens over M = 11 and two channel blocks per group: every tile boundary,
    checkpoint and cross-block reduction is exercised."""
    rng = np.random.default_rng(5)
    positions = np.stack([np.sort(rng.choice(20, 11, replace=False)) for _ in range(2)])
    p = make_problem(rng, batch=2, dim=12, dstate=3, length=11, groups=2, positions=positions, seqlen=21,
                     alignment=alignment)
    args = R.validate_scan_args(**p.kwargs())
    params = ScanParams.build(args, args.coefficients(np.float64))
    out, last = numba_cuda.forward(params, tile=4)
    ref_out, ref_last = R.selective_scan(**p.kwargs())
    R.assert_within_tolerance(out, ref_out, np.float64, "out")
    R.assert_within_tolerance(last, ref_last, np.float64, "last_state")
    dout = p.dout()
    for name, g, e in zip("u delta A B C D z delta_bias".split(), numba_cuda.backward(dout, params, tile=4),
                          R.selective_scan_backward(dout, **p.kwargs())):
        R.assert_within_tolerance(g, e, np.float64, f"d{name}")


def test_device_arrays_stay_on_the_device_and_fill_given_outputs():
    p = make_problem(np.random.default_rng(1), batch=1, dim=2, dstate=2, length=5, dtype=np.float32,
                     return_last_state=False)
    dev = {k: (cuda.to_device(v) if isinstance(v, np.ndarray) else v) for k, v in p.kwargs().items()
           if k != "positions"}
    out = cuda.device_array(p.u.shape, dtype=np.float32)
    result = K.selective_scan_fwd(**dev, positions=p.positions, out=out, backend="numba-cuda")
    assert result is out
    R.assert_within_tolerance(out.copy_to_host(), R.selective_scan(**p.kwargs()), np.float32, "out")


def test_device_array_of_wrong_dtype_is_rejected():
    p = make_problem(np.random.default_rng(1), batch=1, dim=2, dstate=2, length=3, dtype=np.float32)
    with pytest.raises(TypeError, match="delta: device arrays must be"):
        fwd(**p.kwargs(delta=cuda.to_device(p.delta.astype(np.float64))))


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
def test_float16_inputs_are_read_as_float16(alignment):
    """u, delta, B, C, z, dout in float16 reach the kernels as float16 (staged, not converted)
    and out, du, ddelta, dz, dB, dC come back in float16, last_state, dA, dD, ddelta_bias in
    float32: against the reference on the same float16 values, at the table's rows. Tiles of
    4 tokens over M = 6, so a tile boundary and a gap across it are crossed."""
    rng = np.random.default_rng(2)
    p = make_problem(rng, batch=1, dim=2, dstate=2, length=6, positions=np.array([[1, 2, 4, 5, 8, 9]]), seqlen=12,
                     alignment=alignment, dtype=np.float32)
    h = half_scan(p, "float16")
    assert numba_cuda._storage(h.params) == np.float16
    check_half_forward(h, lambda params: numba_cuda.forward(params, tile=4))
    check_half_backward(h, lambda dout, params: numba_cuda.backward(dout, params, tile=4))


def test_bfloat16_bits_are_refused_with_the_reason():
    p = make_problem(np.random.default_rng(1), batch=1, dim=2, dstate=2, length=3, dtype=np.float32)
    h = half_scan(p, "bfloat16")
    with pytest.raises(TypeError, match="numba-cuda cannot read bfloat16"):
        numba_cuda.forward(h.params)
