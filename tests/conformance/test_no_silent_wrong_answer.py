"""No silent wrong answer: B and C group counts, memory layouts (strides) and dtypes drawn
independently; every backend and entry point either equals the float64 reference or raises
the named error the reference raises. A new backend in the registry inherits the check."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignscan import bridges
from alignscan import cuda_kernels as K
from alignscan import reference as R

LAYOUTS = ("contiguous", "strided", "transposed", "broadcast")
DTYPES = (np.float32, np.float64)


def _laid_out(x, layout):
    """The same values in another memory layout: every other element of a bigger array,
    a transposed copy seen back through a transpose, or a broadcast view."""
    if layout == "strided":
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "transposed" and x.ndim >= 2:
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    if layout == "broadcast" and x.shape[0] >= 1:
        return np.broadcast_to(x[:1], x.shape) if x.ndim >= 3 else x
    return x


@st.composite
def _cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, dstate, length = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    dim = draw(st.sampled_from([2, 4, 6]))
    group_choices = [None] + [g for g in (1, 2, 3) if dim % g == 0] + [4]      # 4 does not divide 6
    groups_b, groups_c = draw(st.sampled_from(group_choices)), draw(st.sampled_from(group_choices))
    dtypes = {name: draw(st.sampled_from(DTYPES)) for name in ("u", "delta", "A", "B", "C")}
    layouts = {name: draw(st.sampled_from(LAYOUTS)) for name in ("u", "delta", "B", "C")}

    def bc(groups, name):
        shape = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
        return _laid_out(rng.standard_normal(shape).astype(dtypes[name]), layouts[name])

    seqlen = length + draw(st.integers(0, 4))
    positions = np.sort(rng.choice(seqlen, size=length, replace=False)).astype(np.int64)
    kw = dict(u=_laid_out(rng.standard_normal((batch, dim, length)).astype(dtypes["u"]), layouts["u"]),
              delta=_laid_out((0.5 * rng.standard_normal((batch, dim, length))).astype(dtypes["delta"]),
                              layouts["delta"]),
              A=-np.exp(rng.standard_normal((dim, dstate))).astype(dtypes["A"]),
              B=bc(groups_b, "B"), C=bc(groups_c, "C"), delta_softplus=True, positions=positions, seqlen=seqlen,
              alignment=draw(st.sampled_from(R.ALIGNMENTS)))
    return kw


def _torch(kw, backend):
    t = {k: (torch.tensor(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    return bridges.selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], None, None, None, True,
                                     positions=t["positions"], seqlen=t["seqlen"], alignment=t["alignment"],
                                     backend=backend).numpy()


def _callers():
    callers = {"numba-cpu": lambda kw: K.selective_scan_fwd(**kw, backend="numba-cpu"),
               "torch op (numba-cpu)": lambda kw: _torch(kw, "numba-cpu"),
               "torch twin": lambda kw: _torch(kw, "torch")}
    if K.available_backends()["cuda-emu"] is None:
        callers["cuda-emu"] = lambda kw: K.selective_scan_fwd(**kw, backend="cuda-emu")
    return callers


CALLERS = _callers()


@settings(max_examples=30, deadline=None)
@given(kw=_cases())
def test_every_backend_equals_the_reference_or_raises_the_same_named_error(kw):
    try:
        expected = R.selective_scan(**kw)
        reference_error = None
    except (ValueError, TypeError) as exc:
        expected, reference_error = None, exc
    compute = R.compute_dtype(kw["u"].dtype)
    for name, call in CALLERS.items():
        if reference_error is not None:
            with pytest.raises(type(reference_error)) as info:
                call(kw)
            assert str(info.value).split(" ")[0] == str(reference_error).split(" ")[0], (name, info.value)
            continue
        got = call(kw)
        assert np.all(np.isfinite(got)), name
        R.assert_within_tolerance(got, expected, compute, f"{name} out")
