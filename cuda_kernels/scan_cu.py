"""The host side of ``scan.cu``, written once for both places it runs: a real GPU through
CuPy (``cupy_raw``) and the CPU through the CUDA execution-model emulation (``cuda_emu``).

Each caller supplies an array module ``xp`` (cupy or numpy) and a ``launch(name, storage,
grid, block, params)`` that runs one template instance of a kernel; this module owns the
compile-time settings, the list of instances, the buffers and the order of launches.

Dtypes (SPEC §1, Precision): the kernels are instantiated on the storage dtype of the
streamed inputs (``ScanParams.storage``: float32, float64, float16 or bfloat16), which
they read in place and in which they write out, du, ddelta, dz, dB and dC; A, D,
delta_bias, the map's coefficients, last_state and dA, dD, ddelta_bias are in the compute
dtype. A bfloat16 array arrives as its bits (uint16, ``params.storage_numpy_dtype``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from alignscan.reference.scan import SOFTPLUS_THRESHOLD

from .params import STREAMED

__all__ = ["SOURCE", "THREADS", "ITEMS", "SPECIALISATIONS", "STORAGE_DTYPES", "KERNELS", "defines", "kernel_names",
           "instance", "chunk_tokens", "launch_geometry", "forward", "backward"]

SOURCE = Path(__file__).with_name("scan.cu")
THREADS = 128      # threads per block: one block per (batch, channel)
ITEMS = 4          # consecutive tokens per thread; a chunk is THREADS x ITEMS tokens
# The template instances: storage dtype name -> scan.cu's input type T.
SPECIALISATIONS = {"float32": "float", "float64": "double", "float16": "__half", "bfloat16": "__nv_bfloat16"}
# What the kernels read and write in place beyond the compute dtypes (``bridges.dlpack`` asks).
STORAGE_DTYPES = ("float16", "bfloat16")
KERNELS = ("selective_scan_fwd", "selective_scan_bwd", "reduce_channels")
REDUCE_THREADS = 256   # threads per block of reduce_channels (one output element each)
# scan.cu converts half types only through the intrinsics (__half2float, __float2half_rn, ...),
# which cuda_emu.h emulates bit for bit: no implicit conversion or operator may creep in on
# the GPU that the CPU build would not see. (It also spares NVRTC the fp16/bf16 headers'
# conversions between each other, which break when the two come from different toolkits.)
NO_HALF_IMPLICIT = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_HALF2_OPERATORS__", "-D__CUDA_NO_BFLOAT16_OPERATORS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_BFLOAT162_OPERATORS__")


def defines(threads=THREADS, items=ITEMS):
    """The -D options scan.cu is compiled with (by nvcc/NVRTC and by the host compiler)."""
    if threads < 1 or threads & (threads - 1) or items < 1:
        raise ValueError(f"threads must be a power of two and items >= 1, got {threads} x {items}")
    return (f"-DSCAN_THREADS={threads}", f"-DSCAN_ITEMS={items}",
            f"-DSCAN_SOFTPLUS_THRESHOLD={SOFTPLUS_THRESHOLD!r}", *NO_HALF_IMPLICIT)


def kernel_names():
    """Every template instance compiled, e.g. "selective_scan_fwd<float>"."""
    return [f"{k}<{t}>" for t in SPECIALISATIONS.values() for k in KERNELS]


def instance(name, storage):
    """The template instance of kernel ``name`` for storage dtype ``storage`` (a name)."""
    return f"{name}<{SPECIALISATIONS[storage]}>"


def chunk_tokens(threads=THREADS, items=ITEMS):
    return threads * items


def launch_geometry(batch, dim, threads=THREADS):
    """(grid, block) for both kernels: grid (dim, batch), ``threads`` threads per block."""
    return (dim, batch), (threads,)


def _streamed(x, name, params, xp):
    """A streamed input (u, delta, B, C, z, dout) as a C-contiguous ``xp`` array in the
    storage dtype: in place when it is one already, else converted (a mixed call, where
    the storage dtype is the compute dtype). bfloat16 arrives as bits and is never converted
    from anything else: a uint16 array is bits, a float array is not."""
    arr = xp.asarray(x)
    want = params.storage_dtype
    if params.storage == "bfloat16" and arr.dtype != want:
        raise TypeError(f"{name} must be the bits of a bfloat16 array ({want}) when the storage dtype is bfloat16, "
                        f"got {arr.dtype}")
    return xp.ascontiguousarray(arr, dtype=want)


def _inputs(params, xp):
    """The kernels' shared inputs (``SCAN_INPUTS`` in scan.cu, ``params.INPUTS`` order, then
    the shapes and the flags) as ``xp`` arrays: the streamed ones in the storage dtype, the
    parameters and coefficients in the compute dtype; absent ones are null."""
    dt = params.dtype

    def convert(x, name):
        if name in STREAMED:
            return _streamed(x, name, params, xp)
        return xp.ascontiguousarray(xp.asarray(x), dtype=dt)
    arrays = params.inputs(convert, lambda name: None)
    shapes = (np.int32(params.dim), np.int32(params.dstate), np.int32(params.groups), np.int32(params.length))
    return (*arrays, *shapes, *(np.int32(f) for f in params.flags()))


def _out(given, name, shape, xp, dt, storage=None):
    """An output: ``given`` (checked) or a new array. Nothing is zeroed: the kernels write
    every element of every buffer they are given."""
    if given is None:
        return xp.empty(shape, dtype=dt)
    arr = xp.asarray(given)
    if arr.shape != tuple(shape) or arr.dtype != dt or not arr.flags.c_contiguous:
        what = f"{dt} ({storage} bits)" if storage == "bfloat16" else str(dt)
        raise ValueError(f"{name} must be a C-contiguous {what} array of shape {tuple(shape)} on the backend's device")
    return arr


def forward(params, xp, launch, threads=THREADS, items=ITEMS, out=None, last_state=None):
    """out (batch, dim, M) in the storage dtype [, last_state (batch, dim, N) in the compute
    dtype] as ``xp`` arrays, for a scan's ``ScanParams``."""
    p, dt, st = params, params.dtype, params.storage_dtype
    out_d = _out(out, "out", (p.batch, p.dim, p.length), xp, st, p.storage)
    last_d = _out(last_state, "last_state", (p.batch, p.dim, p.dstate), xp, dt) if p.want_last else None
    if p.batch * p.dim:
        grid, block = launch_geometry(p.batch, p.dim, threads)
        launch("selective_scan_fwd", p.storage, grid, block,
               (*_inputs(p, xp), np.int32(1), np.int32(p.want_last), out_d, last_d, None))
    return (out_d, last_d) if p.want_last else out_d


def backward(dout, params, xp, launch, threads=THREADS, items=ITEMS, grads_out=None):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) as ``xp`` arrays, du, ddelta, dB, dC, dz in
    the storage dtype, dA, dD, ddelta_bias in the compute dtype; None where the input was
    None. The forward kernel first saves the state at every chunk start (write_out = 0), then
    the backward kernel recomputes each chunk from it; dA, dD and ddelta_bias are summed over
    the batch here, in order."""
    p, dt, st = params, params.dtype, params.storage_dtype
    grads_out = grads_out or {}
    b, d, m, n, g = p.batch, p.dim, p.length, p.dstate, p.groups
    dout_d = _streamed(dout, "dout", p, xp)
    du = _out(grads_out.get("du"), "du", (b, d, m), xp, st, p.storage)
    ddelta = _out(grads_out.get("ddelta"), "ddelta", (b, d, m), xp, st, p.storage)
    dz = _out(grads_out.get("dz"), "dz", (b, d, m), xp, st, p.storage) if p.has_z else None
    # Per-channel partials, each written once by its block, summed over a group's channels in
    # order by reduce_channels: deterministic dB and dC (no atomics). Every buffer here is
    # written whole by the kernels (scan.cu says which writes what), so none is zeroed: on a
    # GPU zeroing the partials costs as much memory traffic as writing them.
    dB_part = xp.empty((b, d, n, m), dt)
    dC_part = xp.empty((b, d, n, m), dt)
    dB = xp.empty((b, g, n, m), st)
    dC = xp.empty((b, g, n, m), st)
    dA_part = xp.empty((b, d, n), dt)
    dD_part = xp.empty((b, d), dt)
    dbias_part = xp.empty((b, d), dt)
    nchunks = -(-m // chunk_tokens(threads, items))
    states = xp.empty((b, d, max(nchunks, 1), n), dt)
    if b * d and m:
        inputs = _inputs(p, xp)
        grid, block = launch_geometry(b, d, threads)
        launch("selective_scan_fwd", p.storage, grid, block, (*inputs, np.int32(0), np.int32(0), None, None, states))
        launch("selective_scan_bwd", p.storage, grid, block, (
            *inputs, dout_d, states, du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dbias_part))
        total = b * g * n * m
        reduce_grid = ((total + REDUCE_THREADS - 1) // REDUCE_THREADS, 1)
        for part, out in ((dB_part, dB), (dC_part, dC)):
            launch("reduce_channels", p.storage, reduce_grid, (REDUCE_THREADS,),
                   (part, out, np.int32(b), np.int32(d), np.int32(g), np.int32(n), np.int32(m)))
    else:
        # No token or no channel: no kernel runs, and every gradient is zero (an empty
        # sequence still has dA, dD, ddelta_bias of their full shapes).
        for arr in (du, ddelta, dz, dA_part, dD_part, dbias_part):
            if arr is not None:
                arr.fill(0)
    dB, dC = p.grouped(dB, dC)
    return (du, ddelta, dA_part.sum(axis=0), dB, dC, dD_part.sum(axis=0) if p.has_D else None, dz,
            dbias_part.sum(axis=0) if p.has_bias else None)
