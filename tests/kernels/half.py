"""Half-precision scans for the kernel tests: a drawn float32 problem with u, delta, B, C, z
(and dout) rounded to float16 or bfloat16, as a kernel takes them (bfloat16 as its bits,
uint16: NumPy has no bfloat16), and the check of a backend against the float64 reference on
the same rounded values, each result at the tolerance row of its own dtype."""
import dataclasses

import numpy as np
import torch

from alignscan import reference as R
from alignscan.cuda_kernels.params import STREAMED, ScanParams

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
HALVES = ("float16", "bfloat16")


def narrow(x, storage):
    """float values rounded to ``storage`` (nearest even): float16, or bfloat16's bits (uint16,
    by torch's cast: a conversion independent of the emulation's)."""
    if storage == "float16":
        return np.asarray(x).astype(np.float16)
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).view(torch.uint16).numpy()


def widen(x, storage):
    """Half values (float16, or bfloat16 bits) as float64, exactly."""
    x = np.asarray(x)
    if storage == "bfloat16":
        return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


def tolerance_key(storage):
    return "bfloat16" if storage == "bfloat16" else np.dtype(storage)


@dataclasses.dataclass
class HalfScan:
    """One scan with half inputs: ``params`` for a kernel module, ``reference`` the keyword
    arguments of the same scan in float64 (the rounded values), ``dout`` in both forms."""

    storage: str
    params: ScanParams
    reference: dict
    dout: np.ndarray
    dout64: np.ndarray


def half_scan(p, storage):
    """The problem ``p`` (float32) with its streamed inputs rounded to ``storage``."""
    kw = p.kwargs()
    halves = {n: narrow(kw[n], storage) for n in STREAMED if kw[n] is not None}
    reference = dict(kw, **{n: widen(x, storage) for n, x in halves.items()})
    args = R.validate_scan_args(**reference)            # checked once, on the values
    grouped = lambda x, like: x.reshape(like.shape)
    args = dataclasses.replace(args, u=halves["u"], delta=halves["delta"], B=grouped(halves["B"], args.B),
                               C=grouped(halves["C"], args.C), z=halves.get("z"))
    params = ScanParams.build(args, args.coefficients(np.float32), storage=storage)
    dout = narrow(p.dout().astype(np.float32), storage)
    return HalfScan(storage, params, reference, dout, widen(dout, storage))


def check_result(got, expected, storage, what):
    """One result: a half one (float16, or bfloat16 bits) at its row, a float32 one at float32's."""
    got = np.asarray(got)
    if got.dtype in (np.float16, np.uint16):
        R.assert_within_tolerance(widen(got, storage), expected, tolerance_key(storage), what)
    else:
        assert got.dtype == np.float32, f"{what}: float32 expected, got {got.dtype}"
        R.assert_within_tolerance(got, expected, np.float32, what)


def check_half_forward(h, forward):
    """forward(params) -> out [, last_state]: out in the half dtype, last_state float32."""
    result = forward(h.params)
    out, last = result if h.params.want_last else (result, None)
    assert np.asarray(out).dtype == h.params.storage_dtype, f"out must be {h.storage}, got {np.asarray(out).dtype}"
    expected_out, expected_last = R.selective_scan(**dict(h.reference, return_last_state=True))
    check_result(out, expected_out, h.storage, f"out ({h.storage}, {h.params.alignment})")
    if h.params.want_last:
        check_result(last, expected_last, h.storage, f"last_state ({h.storage}, {h.params.alignment})")


def check_half_backward(h, backward):
    """backward(dout, params): du, ddelta, dB, dC, dz in the half dtype, dA, dD, ddelta_bias float32."""
    got = backward(h.dout, h.params)
    expected = R.selective_scan_backward(h.dout64, **h.reference)
    for name, g, e in zip(GRAD_NAMES, got, expected):
        if e is None:
            assert g is None, f"d{name} must be None"
            continue
        want = h.params.storage_dtype if name in STREAMED else np.dtype(np.float32)
        assert np.asarray(g).dtype == want, f"d{name} must be {want}, got {np.asarray(g).dtype}"
        check_result(g, e, h.storage, f"d{name} ({h.storage}, {h.params.alignment})")
