"""alignscan.cuda_kernels — fast kernels of the position-map selective scan, one front door.

    selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, positions=None, seqlen=None, alignment="prev",
                       backend="numba-cpu")
    selective_scan_bwd(dout, <the same arguments>)  ->  (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)

Both take the reference's signature (SPEC §1), validate the arguments once with the
reference's validator, and hand the clean contract to a backend:

    "numba-cpu"   cuda_kernels.cpu         NumPy arrays in, NumPy arrays out
    "numba-cuda"  cuda_kernels.numba_cuda  NumPy arrays (copied in and out) or device arrays
    "cupy"        cuda_kernels.cupy_raw    CuPy arrays (CUDA C++ RawKernel)

``available_backends()`` says which can run here and, for each that cannot, why. Kernels
compute float64 inputs in float64 and everything else (float16, float32) in float32;
outputs come back in the compute dtype. Nothing here imports torch.
"""
from __future__ import annotations

import importlib
import os

from reference import validate_scan_args

__all__ = ["BACKENDS", "available_backends", "selective_scan_fwd", "selective_scan_bwd", "BackendUnavailable"]

BACKENDS = ("numba-cpu", "numba-cuda", "cupy")
_MODULES = {"numba-cpu": "cuda_kernels.cpu", "numba-cuda": "cuda_kernels.numba_cuda", "cupy": "cuda_kernels.cupy_raw"}


class BackendUnavailable(RuntimeError):
    """The asked backend cannot run on this machine; the message says why."""


def _cuda_reason():
    """None when numba.cuda sees a GPU (or its simulator is on), else why not."""
    try:
        from numba import cuda
    except Exception as exc:  # pragma: no cover - numba is a dependency
        return f"numba.cuda cannot be imported ({exc}); install the 'cuda' extra (numba-cuda)"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return None
    try:
        if cuda.is_available():
            return None
    except Exception as exc:
        return f"no CUDA GPU: {exc}"
    return "no CUDA GPU or driver on this machine (set NUMBA_ENABLE_CUDASIM=1 for the slow simulator)"


def _backend_reason(name):
    if name == "numba-cpu":
        return None
    if name == "numba-cuda":
        return _cuda_reason()
    if name == "cupy":
        try:
            from . import cupy_raw
        except ImportError as exc:
            return f"the CuPy backend is not installed ({exc})"
        return cupy_raw.unavailable_reason()
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def available_backends():
    """{backend name: None if it can run here, else the reason it cannot}."""
    return {name: _backend_reason(name) for name in BACKENDS}


def _backend_module(name):
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    reason = _backend_reason(name)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {reason}")
    return importlib.import_module(_MODULES[name])


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, positions=None, seqlen=None, alignment="prev",
                       backend="numba-cpu", out=None, last_state_out=None, stream=None):
    """The position-map scan (SPEC §1) on a fast backend.

    ``out`` (batch, dim, M) and ``last_state_out`` (batch, dim, N), arrays of the compute
    dtype on the backend's device, are filled in place when given (zero-copy callers).
    ``stream``: a raw CUDA stream handle for the GPU backends (ignored on the CPU).
    Returns out, or (out, last_state) with return_last_state.
    """
    module = _backend_module(backend)
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    return module.forward(args, out=out, last_state=last_state_out, stream=stream)


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, positions=None, seqlen=None, alignment="prev",
                       backend="numba-cpu", grads_out=None, stream=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) of sum(dout · out); None where
    the input was None. last_state carries no gradient. ``grads_out`` may map "du", "ddelta",
    "dz" to arrays to fill in place."""
    module = _backend_module(backend)
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    if tuple(dout.shape) != tuple(args.u.shape):
        raise ValueError(f"dout must have shape (batch, dim, M) = {tuple(args.u.shape)}, got {tuple(dout.shape)}")
    return module.backward(dout, args, grads_out=grads_out, stream=stream)
