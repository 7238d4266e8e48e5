"""The CPU kernels' float32 exp: accuracy in ulp over the float32 range (a dense sweep, stated
in the tolerance table), its edges, and that the compiled forward kernel really computes it
with vector instructions (a change that re-scalarises the state loop fails here)."""
import re

import numba
import numpy as np
import pytest

from alignscan import reference as R
from alignscan.cuda_kernels import cpu
from alignscan.cuda_kernels._numba_support import fast_exp


@numba.njit(fastmath={"contract", "reassoc", "nsz", "arcp"}, error_model="numpy")
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = fast_exp(x[i])


def _ulp_error(x):
    """|fast_exp(x) - exp(x)| in float32 ulp of the correctly rounded exp (float64 reference)."""
    got = np.empty_like(x)
    _exp_all(x, got)
    exact = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        rounded = exact.astype(np.float32)
    finite = np.isfinite(rounded) & (rounded >= np.float32(1.1754944e-38))
    ulp = np.spacing(np.abs(rounded[finite])).astype(np.float64)
    return np.abs(got[finite].astype(np.float64) - exact[finite]) / ulp, got


def _floats_between(lo, hi, stride=1):
    """Every ``stride``-th float32 in [lo, hi] (bit patterns walked in order)."""
    a, b = np.float32(lo), np.float32(hi)
    ints = []
    if a < 0:
        ints.append(np.arange(np.float32(-a).view(np.int32), -1, -stride, dtype=np.int64) | np.int64(1 << 31))
    if b >= 0:
        ints.append(np.arange(0, np.float32(b).view(np.int32) + 1, stride, dtype=np.int64))
    return np.concatenate(ints).astype(np.uint32).view(np.float32)


def _near(value, count=1 << 16):
    """The ``count`` float32 on either side of ``value``."""
    center = np.float32(value).view(np.int32).astype(np.int64)
    bits = np.arange(center - count, center + count + 1)
    return bits.astype(np.uint32).view(np.float32)


def test_the_float32_exp_is_within_the_stated_ulp_over_the_whole_range():
    sweep = np.concatenate([_floats_between(-104.0, 89.0, stride=61), _near(0.0), _near(88.72283),
                            _near(-87.33654)])
    errors, _ = _ulp_error(sweep)
    assert errors.size > 30_000_000
    assert errors.max() <= R.tolerances.FAST_EXP_MAX_ULP, f"max error {errors.max():.3f} ulp"


def test_the_float32_exp_at_its_edges():
    x = np.array([0.0, -0.0, 88.72283, 88.7229, 89.0, 1e30, np.inf, -87.33654, -87.4, -104.0, -1e30, -np.inf,
                  np.nan], np.float32)
    got = np.empty_like(x)
    _exp_all(x, got)
    assert got[0] == 1.0 and got[1] == 1.0                                  # exactly 1 at zero
    assert np.isfinite(got[2]) and got[2] > 3.4e38                           # the largest finite
    assert np.all(np.isposinf(got[3:7]))                                     # overflow to inf
    assert got[7] >= np.float32(1.1754944e-38)                               # the smallest normal
    assert np.all(got[8:12] == 0.0)                                          # underflow to 0, no denormal
    assert np.isnan(got[12])                                                 # NaN in, NaN out
    assert np.all(got[8:12].view(np.int32) == 0)                             # +0, not a denormal pattern


def _kernel_assembly():
    """The float32 forward kernel's machine code, compiled afresh (numba cannot show cached
    code) with the kernel's own options, its parallel loop run serially (the same inner loops)."""
    from alignscan.cuda_kernels.params import ScanParams
    from alignscan.testing import make_problem
    p = make_problem(np.random.default_rng(0), batch=1, dim=4, dstate=4, length=8, dtype=np.float32,
                     positions=np.arange(8) * 2, seqlen=16)
    args = R.validate_scan_args(**p.kwargs())
    params = ScanParams.build(args, args.coefficients(np.float32))
    out, last = np.empty((1, 4, 8), np.float32), np.empty((1, 4, 4), np.float32)
    fresh = numba.njit(**cpu._KERNEL)(cpu._forward_kernel.py_func)
    fresh(*cpu._prepared(params), *params.flags(), True, out, last)
    return fresh.inspect_asm(fresh.signatures[0]), fresh.inspect_llvm(fresh.signatures[0])


_SCALAR_EXP = re.compile(r"call\b[^\n]*@(llvm\.exp\.f32|expf|llvm\.exp\.f64|exp)\(")


def _packed_fmas(asm):
    return re.findall(r"\bvfmadd\w*ps\b[^\n]*%[yz]mm", asm)


def test_the_forward_kernel_computes_its_exps_with_vector_instructions():
    """The compiled float32 forward contains packed single-precision FMAs (the polynomial of
    the exp, over a whole register of channels) and calls no scalar exp from libm."""
    asm, llvm = _kernel_assembly()
    packed = _packed_fmas(asm)
    assert len(packed) >= 6, f"{len(packed)} packed float32 FMAs on ymm/zmm registers"
    assert not _SCALAR_EXP.search(llvm), "a scalar exp call is back in the forward kernel"


def test_the_check_sees_a_scalar_exp():
    """The control: the same loop over math.exp (what the kernels would call without a
    vectorisable exp) calls the scalar exp, and the check above would fail on it."""
    import math

    @numba.njit(fastmath={"contract", "reassoc", "nsz", "arcp"}, error_model="numpy")
    def scalar(x, out):
        for i in range(x.shape[0]):
            out[i] = math.exp(x[i])

    x = np.ones(64, np.float32)
    scalar(x, x.copy())
    assert _SCALAR_EXP.search(scalar.inspect_llvm(scalar.signatures[0]))


@pytest.mark.parametrize("alignment", R.ALIGNMENTS)
def test_the_forward_equals_the_reference_at_a_real_layer_shape(alignment):
    from alignscan import cuda_kernels as K
    from alignscan.testing import vim_layer_problem
    p = vim_layer_problem(batch=2, dim=96, keep_ratio=0.7, alignment=alignment, dtype=np.float32)
    out, last = K.selective_scan_fwd(**p.kwargs(return_last_state=True), backend="numba-cpu")
    ref_out, ref_last = R.selective_scan(**p.kwargs(return_last_state=True))
    R.assert_within_tolerance(out, ref_out, np.float32, "out")
    R.assert_within_tolerance(last, ref_last, np.float32, "last_state")
