"""The CuPy backend: ``scan.cu`` compiled with ``cupy.RawModule`` (see the top of scan.cu
for the design; ``scan_cu`` for the host side it shares with the CPU emulation).
``forward`` / ``backward`` take validated ``ScanArgs`` whose arrays are CuPy arrays or
anything ``cupy.asarray`` takes without a copy (``__cuda_array_interface__``, DLPack);
NumPy inputs are copied to the device and the results stay there. float16 arrays and
bfloat16 bits (uint16) are read in place and outputs written in that storage dtype
(``scan_cu``: the kernels are instantiated on it).
"""
from __future__ import annotations

import contextlib
import functools
import re

import numpy as np

from . import scan_cu
from .scan_cu import SOURCE, STORAGE_DTYPES, kernel_names

__all__ = ["SOURCE", "COMPILE_OPTIONS", "STORAGE_DTYPES", "kernel_names", "unavailable_reason", "forward", "backward"]

COMPILE_OPTIONS = ("--std=c++14", *scan_cu.defines())
_NULL = np.uint64(0)   # a null pointer kernel argument


def unavailable_reason():
    """None when CuPy can compile and launch this backend's kernels here, else why not.

    A device count alone is not enough: a missing or mismatched NVRTC (a cupy-cuda12x wheel
    beside a CUDA 13 driver stack, say) passes it and fails at the first call. So the probe
    compiles scan.cu (kept: the backend uses that module) and launches a one-thread kernel,
    once per process (``Backend.reason`` caches the answer)."""
    try:
        import cupy
    except Exception as exc:
        return (f"CuPy is not installed or does not import ({type(exc).__name__}: {exc}); install the extra of "
                f"your torch's CUDA major: 'cuda12' or 'cuda13'")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        # Without a GPU the runtime reports "cudaErrorInsufficientDriver: CUDA driver version is
        # insufficient ...", which reads as "upgrade the driver": name the error code only.
        code = re.search(r"cudaError\w+", str(exc))
        return (f"no CUDA GPU found: CuPy finds no NVIDIA driver and device to run on "
                f"({code.group(0) if code else type(exc).__name__})")
    if count == 0:
        return "no CUDA GPU found (CuPy sees no device)"
    try:
        _module()
    except Exception as exc:
        return (f"CuPy cannot compile scan.cu here ({type(exc).__name__}: {str(exc)[:300]}); is the cupy-cuda "
                f"wheel's CUDA major the driver's and torch's?")
    try:
        flag = cupy.zeros(1, dtype=cupy.int32)
        cupy.RawKernel(_PROBE, "alignscan_probe")((1,), (1,), (flag,))
        if int(flag.get()[0]) != 1:
            return "CuPy launched a probe kernel that did not run (the flag it sets stayed 0)"
    except Exception as exc:
        return f"CuPy cannot launch a kernel here ({type(exc).__name__}: {str(exc)[:300]})"
    return None


_PROBE = 'extern "C" __global__ void alignscan_probe(int* flag) { *flag = 1; }'


@functools.lru_cache(maxsize=None)
def _module():
    import cupy
    return cupy.RawModule(code=SOURCE.read_text(), options=COMPILE_OPTIONS, name_expressions=kernel_names())


def _launch(name, storage, grid, block, params):
    kernel = _module().get_function(scan_cu.instance(name, storage))
    kernel(grid, block, tuple(_NULL if p is None else p for p in params))


def _stream(stream):
    import cupy
    if stream is None:
        return contextlib.nullcontext()
    if isinstance(stream, int):
        return cupy.cuda.ExternalStream(stream)
    return stream


def forward(params, out=None, last_state=None, stream=None):
    """out (batch, dim, M) in the storage dtype [, last_state (batch, dim, N) in the compute
    dtype] as CuPy arrays."""
    import cupy
    with _stream(stream):
        return scan_cu.forward(params, cupy, _launch, out=out, last_state=last_state)


def backward(dout, params, grads_out=None, stream=None):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) as CuPy arrays (du, ddelta, dB, dC, dz in the
    storage dtype); None where the input was None."""
    import cupy
    with _stream(stream):
        return scan_cu.backward(dout, params, cupy, _launch, grads_out=grads_out)
