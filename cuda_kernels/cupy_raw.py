"""The CuPy backend: ``scan.cu`` compiled with ``cupy.RawModule`` (see the top of scan.cu
for the design). ``forward`` / ``backward`` take validated ``ScanArgs`` whose arrays are
CuPy arrays or anything ``cupy.asarray`` takes without a copy (``__cuda_array_interface__``,
DLPack); NumPy inputs are copied to the device and the results stay there.

One list, ``SPECIALISATIONS``, names the input types compiled; ``kernel_names()`` gives the
template instances that ``cupy.RawModule`` (and the nvcc compile test) build.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .layout import compute_dtype, gap_coefficients

__all__ = ["SPECIALISATIONS", "COMPILE_OPTIONS", "THREADS", "ITEMS", "SOURCE", "kernel_names",
           "launch_geometry", "unavailable_reason", "forward", "backward"]

SOURCE = Path(__file__).with_name("scan.cu")
THREADS = 128      # threads per block: one block per (batch, channel)
ITEMS = 4          # consecutive tokens per thread; a chunk is THREADS x ITEMS tokens
SPECIALISATIONS = {"float": np.dtype(np.float32), "double": np.dtype(np.float64)}
COMPILE_OPTIONS = ("--std=c++14", f"-DSCAN_THREADS={THREADS}", f"-DSCAN_ITEMS={ITEMS}")
_KERNELS = ("selective_scan_fwd", "selective_scan_bwd")
_NULL = np.uint64(0)   # a null pointer kernel argument


def kernel_names():
    """Every template instance compiled, e.g. "selective_scan_fwd<float>"."""
    return [f"{k}<{t}>" for t in SPECIALISATIONS for k in _KERNELS]


def launch_geometry(batch, dim):
    """(grid, block) for both kernels: grid (dim, batch), THREADS threads per block."""
    return (dim, batch), (THREADS,)


def unavailable_reason():
    """None when CuPy can launch kernels here, else why not."""
    try:
        import cupy
    except Exception as exc:
        return f"CuPy is not installed or does not import ({type(exc).__name__}: {exc}); install the 'cuda' extra"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA GPU or driver for CuPy ({type(exc).__name__}: {str(exc)[:120]})"
    return None if count > 0 else "no CUDA GPU visible to CuPy"


@functools.lru_cache(maxsize=None)
def _module():
    import cupy
    return cupy.RawModule(code=SOURCE.read_text(), options=COMPILE_OPTIONS, name_expressions=kernel_names())


def _kernel(name, dtype):
    ctype = next(k for k, v in SPECIALISATIONS.items() if v == dtype)
    return _module().get_function(f"{name}<{ctype}>")


def _stream(stream):
    import contextlib

    import cupy
    if stream is None:
        return contextlib.nullcontext()
    if isinstance(stream, int):
        return cupy.cuda.ExternalStream(stream)
    return stream


def _inputs(args, dt):
    import cupy
    dev = lambda x, t=dt: None if x is None else cupy.ascontiguousarray(cupy.asarray(x), dtype=t)
    b, d, m = args.u.shape
    x = dict(u=dev(args.u), delta=dev(args.delta), A=dev(args.A), B=dev(args.B), C=dev(args.C),
             D=dev(args.D), z=dev(args.z), bias=dev(args.delta_bias))
    coef_self, coef_prev, trailing = (cupy.asarray(a) for a in
                                      gap_coefficients(args.positions, args.seqlen_rows, args.alignment, dt))
    dummy = cupy.zeros(1, dtype=dt)
    for k in ("D", "z", "bias"):
        if x[k] is None:
            x[k] = dummy
    return x, coef_self, coef_prev, trailing


def _flags(args):
    return (np.int32(args.delta_softplus), np.int32(args.D is not None), np.int32(args.z is not None),
            np.int32(args.delta_bias is not None))


def _out(given, name, shape, dt):
    import cupy
    if given is None:
        return cupy.empty(shape, dtype=dt)
    arr = cupy.asarray(given)
    if arr.shape != tuple(shape) or arr.dtype != dt or not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {dt} device array of shape {tuple(shape)}")
    return arr


def _forward_launch(args, x, coefs, dt, out, last, states, write_out, want_last):
    b, d, m = args.u.shape
    grid, block = launch_geometry(b, d)
    coef_self, coef_prev, trailing = coefs
    _kernel("selective_scan_fwd", dt)(grid, block, (
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"], coef_self, coef_prev, trailing,
        np.int32(d), np.int32(args.dstate), np.int32(args.groups), np.int32(m), *_flags(args),
        np.int32(write_out), np.int32(want_last), out, last, states))


def forward(args, out=None, last_state=None, stream=None):
    """out (batch, dim, M) [, last_state (batch, dim, N)] as CuPy arrays of the compute dtype."""
    import cupy
    dt = compute_dtype(args)
    with _stream(stream):
        x, *coefs = _inputs(args, dt)
        b, d, m = args.u.shape
        out_d = _out(out, "out", (b, d, m), dt)
        want_last = args.return_last_state
        last_d = _out(last_state, "last_state", (b, d, args.dstate), dt) if want_last else cupy.zeros(1, dt)
        if b * d:
            _forward_launch(args, x, coefs, dt, out_d, last_d, _NULL, 1, int(want_last))
        elif want_last:
            last_d.fill(0)
    return (out_d, last_d) if want_last else out_d


def backward(dout, args, grads_out=None, stream=None):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) as CuPy arrays; None where the input was None."""
    import cupy
    dt = compute_dtype(args)
    grads_out = grads_out or {}
    with _stream(stream):
        x, *coefs = _inputs(args, dt)
        b, d, m = args.u.shape
        n, g = args.dstate, args.groups
        dout_d = cupy.ascontiguousarray(cupy.asarray(dout), dtype=dt)
        du = _out(grads_out.get("du"), "du", (b, d, m), dt)
        ddelta = _out(grads_out.get("ddelta"), "ddelta", (b, d, m), dt)
        dz = _out(grads_out.get("dz"), "dz", (b, d, m), dt) if args.z is not None else cupy.zeros(1, dt)
        dB = cupy.zeros((b, g, n, m), dt)
        dC = cupy.zeros((b, g, n, m), dt)
        dA_part = cupy.zeros((b, d, n), dt)
        dD_part = cupy.zeros((b, d), dt)
        dbias_part = cupy.zeros((b, d), dt)
        nchunks = (m + THREADS * ITEMS - 1) // (THREADS * ITEMS)
        states = cupy.empty((b, d, max(nchunks, 1), n), dt)
        if b * d and m:
            _forward_launch(args, x, coefs, dt, cupy.zeros(1, dt), cupy.zeros(1, dt), states, 0, 0)
            grid, block = launch_geometry(b, d)
            coef_self, coef_prev, _ = coefs
            _kernel("selective_scan_bwd", dt)(grid, block, (
                dout_d, x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"], coef_self, coef_prev,
                np.int32(d), np.int32(n), np.int32(g), np.int32(m), *_flags(args), states,
                du, ddelta, dz, dB, dC, dA_part, dD_part, dbias_part))
        else:
            du.fill(0)
            ddelta.fill(0)
            dz.fill(0)
        dA = dA_part.sum(axis=0)
        grads = (du, ddelta, dA, dB if args.B_grouped else dB[:, 0], dC if args.C_grouped else dC[:, 0],
                 dD_part.sum(axis=0) if args.D is not None else None,
                 dz if args.z is not None else None,
                 dbias_part.sum(axis=0) if args.delta_bias is not None else None)
    return grads
