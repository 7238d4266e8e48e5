"""The host side of ``scan.cu``, written once for both places it runs: a real GPU through
CuPy (``cupy_raw``) and the CPU through the CUDA execution-model emulation (``cuda_emu``).

Each caller supplies an array module ``xp`` (cupy or numpy) and a ``launch(name, dtype,
grid, block, params)`` that runs one template instance of a kernel; this module owns the
compile-time settings, the list of instances, the buffers and the order of launches.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from alignscan.reference.scan import SOFTPLUS_THRESHOLD

__all__ = ["SOURCE", "THREADS", "ITEMS", "SPECIALISATIONS", "KERNELS", "defines", "kernel_names", "chunk_tokens",
           "launch_geometry", "forward", "backward"]

SOURCE = Path(__file__).with_name("scan.cu")
THREADS = 128      # threads per block: one block per (batch, channel)
ITEMS = 4          # consecutive tokens per thread; a chunk is THREADS x ITEMS tokens
SPECIALISATIONS = {"float": np.dtype(np.float32), "double": np.dtype(np.float64)}
KERNELS = ("selective_scan_fwd", "selective_scan_bwd", "reduce_channels")
REDUCE_THREADS = 256   # threads per block of reduce_channels (one output element each)


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


def _inputs(params, xp):
    """The kernels' shared inputs (``SCAN_INPUTS`` in scan.cu, ``params.INPUTS`` order, then
    the shapes and the flags) as ``xp`` arrays of the compute dtype; absent ones are null."""
    dt = params.dtype
    arrays = params.inputs(lambda x, name: xp.ascontiguousarray(xp.asarray(x), dtype=dt), lambda name: None)
    shapes = (np.int32(params.dim), np.int32(params.dstate), np.int32(params.groups), np.int32(params.length))
    return (*arrays, *shapes, *(np.int32(f) for f in params.flags()))


def _out(given, name, shape, xp, dt):
    if given is None:
        return xp.empty(shape, dtype=dt)
    arr = xp.asarray(given)
    if arr.shape != tuple(shape) or arr.dtype != dt or not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {dt} array of shape {tuple(shape)} on the backend's device")
    return arr


def forward(params, xp, launch, threads=THREADS, items=ITEMS, out=None, last_state=None):
    """out (batch, dim, M) [, last_state (batch, dim, N)] as ``xp`` arrays of the compute dtype,
    for a scan's ``ScanParams``."""
    p, dt = params, params.dtype
    out_d = _out(out, "out", (p.batch, p.dim, p.length), xp, dt)
    last_d = _out(last_state, "last_state", (p.batch, p.dim, p.dstate), xp, dt) if p.want_last else None
    if p.batch * p.dim:
        grid, block = launch_geometry(p.batch, p.dim, threads)
        launch("selective_scan_fwd", dt, grid, block,
               (*_inputs(p, xp), np.int32(1), np.int32(p.want_last), out_d, last_d, None))
    return (out_d, last_d) if p.want_last else out_d


def backward(dout, params, xp, launch, threads=THREADS, items=ITEMS, grads_out=None):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) as ``xp`` arrays; None where the input was
    None. The forward kernel first saves the state at every chunk start (write_out = 0), then
    the backward kernel recomputes each chunk from it; dA, dD and ddelta_bias are summed over
    the batch here, in order."""
    p, dt = params, params.dtype
    grads_out = grads_out or {}
    b, d, m, n, g = p.batch, p.dim, p.length, p.dstate, p.groups
    dout_d = xp.ascontiguousarray(xp.asarray(dout), dtype=dt)
    du = _out(grads_out.get("du"), "du", (b, d, m), xp, dt)
    ddelta = _out(grads_out.get("ddelta"), "ddelta", (b, d, m), xp, dt)
    dz = _out(grads_out.get("dz"), "dz", (b, d, m), xp, dt) if p.has_z else None
    # Per-channel partials, each written once by its block, summed over a group's channels in
    # order by reduce_channels: deterministic dB and dC (no atomics).
    dB_part = xp.zeros((b, d, n, m), dt)
    dC_part = xp.zeros((b, d, n, m), dt)
    dB = xp.zeros((b, g, n, m), dt)
    dC = xp.zeros((b, g, n, m), dt)
    dA_part = xp.zeros((b, d, n), dt)
    dD_part = xp.zeros((b, d), dt)
    dbias_part = xp.zeros((b, d), dt)
    nchunks = -(-m // chunk_tokens(threads, items))
    states = xp.empty((b, d, max(nchunks, 1), n), dt)
    if b * d and m:
        inputs = _inputs(p, xp)
        grid, block = launch_geometry(b, d, threads)
        launch("selective_scan_fwd", dt, grid, block, (*inputs, np.int32(0), np.int32(0), None, None, states))
        launch("selective_scan_bwd", dt, grid, block, (
            *inputs, dout_d, states, du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dbias_part))
        total = b * g * n * m
        reduce_grid = ((total + REDUCE_THREADS - 1) // REDUCE_THREADS, 1)
        for part, out in ((dB_part, dB), (dC_part, dC)):
            launch("reduce_channels", dt, reduce_grid, (REDUCE_THREADS,),
                   (part, out, np.int32(b), np.int32(d), np.int32(g), np.int32(n), np.int32(m)))
    else:
        for arr in (du, ddelta, dz):
            if arr is not None:
                arr.fill(0)
    dB, dC = p.grouped(dB, dC)
    return (du, ddelta, dA_part.sum(axis=0), dB, dC, dD_part.sum(axis=0) if p.has_D else None, dz,
            dbias_part.sum(axis=0) if p.has_bias else None)
