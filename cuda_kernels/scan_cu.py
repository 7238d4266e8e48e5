"""The host side of ``scan.cu``, written once for both places it runs: a real GPU through
CuPy (``cupy_raw``) and the CPU through the CUDA execution-model emulation (``cuda_emu``).

Each caller supplies an array module ``xp`` (cupy or numpy) and a ``launch(name, dtype,
grid, block, params)`` that runs one template instance of a kernel; this module owns the
compile-time settings, the list of instances, the buffers and the order of launches.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from reference.arguments import compute_dtype
from reference.scan import SOFTPLUS_THRESHOLD

__all__ = ["SOURCE", "THREADS", "ITEMS", "SPECIALISATIONS", "KERNELS", "defines", "kernel_names", "chunk_tokens",
           "launch_geometry", "forward", "backward"]

SOURCE = Path(__file__).with_name("scan.cu")
THREADS = 128      # threads per block: one block per (batch, channel)
ITEMS = 4          # consecutive tokens per thread; a chunk is THREADS x ITEMS tokens
SPECIALISATIONS = {"float": np.dtype(np.float32), "double": np.dtype(np.float64)}
KERNELS = ("selective_scan_fwd", "selective_scan_bwd")


def defines(threads=THREADS, items=ITEMS):
    """The -D options scan.cu is compiled with (by nvcc/NVRTC and by the host compiler)."""
    if threads < 1 or threads & (threads - 1) or items < 1:
        raise ValueError(f"threads must be a power of two and items >= 1, got {threads} x {items}")
    return (f"-DSCAN_THREADS={threads}", f"-DSCAN_ITEMS={items}",
            f"-DSCAN_SOFTPLUS_THRESHOLD={SOFTPLUS_THRESHOLD!r}")


def kernel_names():
    """Every template instance compiled, e.g. "selective_scan_fwd<float>"."""
    return [f"{k}<{t}>" for t in SPECIALISATIONS for k in KERNELS]


def instance(name, dtype):
    ctype = next(k for k, v in SPECIALISATIONS.items() if v == np.dtype(dtype))
    return f"{name}<{ctype}>"


def chunk_tokens(threads=THREADS, items=ITEMS):
    return threads * items


def launch_geometry(batch, dim, threads=THREADS):
    """(grid, block) for both kernels: grid (dim, batch), ``threads`` threads per block."""
    return (dim, batch), (threads,)


def _flags(args, coefficients):
    """use_softplus, has_D, has_z, has_bias, has_map, has_hold."""
    return (np.int32(args.delta_softplus), np.int32(args.D is not None), np.int32(args.z is not None),
            np.int32(args.delta_bias is not None), np.int32(coefficients is not None),
            np.int32(coefficients is not None and args.alignment == "hold"))


def _inputs(args, coefficients, xp, dt):
    dev = lambda x: None if x is None else xp.ascontiguousarray(xp.asarray(x), dtype=dt)
    x = dict(u=dev(args.u), delta=dev(args.delta), A=dev(args.A), B=dev(args.B), C=dev(args.C),
             D=dev(args.D), z=dev(args.z), bias=dev(args.delta_bias))
    coefs = (None,) * 4 if coefficients is None else tuple(dev(a) for a in coefficients)
    return x, coefs


def _out(given, name, shape, xp, dt):
    if given is None:
        return xp.empty(shape, dtype=dt)
    arr = xp.asarray(given)
    if arr.shape != tuple(shape) or arr.dtype != dt or not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {dt} array of shape {tuple(shape)} on the backend's device")
    return arr


def _forward_launch(args, coefficients, x, coefs, dt, launch, threads, out, last, states, write_out, want_last):
    b, d, m = args.u.shape
    grid, block = launch_geometry(b, d, threads)
    coef_self, coef_prev, hold, trailing = coefs
    launch("selective_scan_fwd", dt, grid, block, (
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"], coef_self, coef_prev, hold, trailing,
        np.int32(d), np.int32(args.dstate), np.int32(args.groups), np.int32(m), *_flags(args, coefficients),
        np.int32(write_out), np.int32(want_last), out, last, states))


def forward(args, coefficients, xp, launch, threads=THREADS, items=ITEMS, out=None, last_state=None):
    """out (batch, dim, M) [, last_state (batch, dim, N)] as ``xp`` arrays of the compute dtype.
    ``coefficients``: the map's ``GapCoefficients`` (None: no map). Absent optional inputs
    reach the kernel as null pointers (None)."""
    dt = compute_dtype(args.u.dtype)
    x, coefs = _inputs(args, coefficients, xp, dt)
    b, d, m = args.u.shape
    out_d = _out(out, "out", (b, d, m), xp, dt)
    want_last = args.return_last_state
    last_d = _out(last_state, "last_state", (b, d, args.dstate), xp, dt) if want_last else None
    if b * d:
        _forward_launch(args, coefficients, x, coefs, dt, launch, threads, out_d, last_d, None, 1, int(want_last))
    return (out_d, last_d) if want_last else out_d


def backward(dout, args, coefficients, xp, launch, threads=THREADS, items=ITEMS, grads_out=None):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) as ``xp`` arrays; None where the input was
    None. The forward kernel first saves the state at every chunk start (write_out = 0), then
    the backward kernel recomputes each chunk from it; dA, dD and ddelta_bias are summed over
    the batch here, in order."""
    dt = compute_dtype(args.u.dtype)
    grads_out = grads_out or {}
    x, coefs = _inputs(args, coefficients, xp, dt)
    b, d, m = args.u.shape
    n, g = args.dstate, args.groups
    dout_d = xp.ascontiguousarray(xp.asarray(dout), dtype=dt)
    du = _out(grads_out.get("du"), "du", (b, d, m), xp, dt)
    ddelta = _out(grads_out.get("ddelta"), "ddelta", (b, d, m), xp, dt)
    dz = _out(grads_out.get("dz"), "dz", (b, d, m), xp, dt) if args.z is not None else None
    dB = xp.zeros((b, g, n, m), dt)
    dC = xp.zeros((b, g, n, m), dt)
    dA_part = xp.zeros((b, d, n), dt)
    dD_part = xp.zeros((b, d), dt)
    dbias_part = xp.zeros((b, d), dt)
    nchunks = -(-m // chunk_tokens(threads, items))
    states = xp.empty((b, d, max(nchunks, 1), n), dt)
    if b * d and m:
        _forward_launch(args, coefficients, x, coefs, dt, launch, threads, None, None, states, 0, 0)
        grid, block = launch_geometry(b, d, threads)
        coef_self, coef_prev, hold, _ = coefs
        launch("selective_scan_bwd", dt, grid, block, (
            dout_d, x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"], coef_self, coef_prev, hold,
            np.int32(d), np.int32(n), np.int32(g), np.int32(m), *_flags(args, coefficients), states,
            du, ddelta, dz, dB, dC, dA_part, dD_part, dbias_part))
    else:
        for arr in (du, ddelta, dz):
            if arr is not None:
                arr.fill(0)
    return (du, ddelta, dA_part.sum(axis=0), dB if args.B_grouped else dB[:, 0],
            dC if args.C_grouped else dC[:, 0],
            dD_part.sum(axis=0) if args.D is not None else None,
            dz,
            dbias_part.sum(axis=0) if args.delta_bias is not None else None)
