"""alignscan.cuda_kernels — fast kernels of the position-map selective scan, one front door.

    selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, positions=None, seqlen=None, alignment="prev",
                       backend=None)
    selective_scan_bwd(dout, <the same arguments>)  ->  (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)

Both take the reference's signature (SPEC §1; ``positions`` raw or a ``reference.PositionMap``),
validate the arguments once with the reference's validator, and hand the clean contract to
a backend of the registry (``cuda_kernels.backends``):

    "numba-cpu"   cuda_kernels.cpu         NumPy arrays in, NumPy arrays out
    "cupy"        cuda_kernels.cupy_raw    CuPy arrays (scan.cu, a CUDA C++ RawKernel)
    "numba-cuda"  cuda_kernels.numba_cuda  NumPy arrays (copied in and out) or device arrays

``backend=None`` takes $ALIGNSCAN_BACKEND, else the default for the arrays' device.
``available_backends()`` says which can run here and, for each that cannot, why. Kernels
compute float64 inputs in float64 and everything else (float16, float32) in float32;
outputs come back in the compute dtype, except where a backend reads float16 in place
(cupy, cuda-emu, numba-cuda: SPEC §1), whose out and du, ddelta, dz, dB, dC come back in
float16. Nothing here imports torch.
"""
from __future__ import annotations

from alignscan.reference.arguments import compute_dtype, validate_scan_args

from . import backends
from ._numba_support import select_threading_layer
from .backends import BackendUnavailable, available_backends
from .params import ScanParams

THREADING_LAYER = select_threading_layer()   # thread- and fork-safe TBB (see _numba_support)

__all__ = ["BACKENDS", "available_backends", "selective_scan_fwd", "selective_scan_bwd", "BackendUnavailable",
           "backends", "THREADING_LAYER", "ScanParams"]

BACKENDS = backends.names(kernels_only=True)


def _device_type(x):
    return "cuda" if hasattr(x, "__cuda_array_interface__") or hasattr(x, "copy_to_host") else "cpu"


def _prepare(backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, positions, seqlen,
             alignment):
    """The backend's kernels and the scan's ``ScanParams``: arguments validated once, the
    map's coefficients on the backend's device."""
    entry = backends.get(backends.resolve(backend, _device_type(u), kernels_only=True, host_copies=True))
    module = entry.kernels()
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    coefficients = backends.device_coefficients(entry, args, compute_dtype(args.u.dtype))
    return module, ScanParams.build(args, coefficients)


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, positions=None, seqlen=None, alignment="prev",
                       backend=None, out=None, last_state_out=None, stream=None):
    """The position-map scan (SPEC §1) on a fast backend.

    ``out`` (batch, dim, M) and ``last_state_out`` (batch, dim, N), arrays of the compute
    dtype on the backend's device, are filled in place when given (zero-copy callers).
    ``stream``: a raw CUDA stream handle for the GPU backends (ignored on the CPU).
    Returns out, or (out, last_state) with return_last_state.
    """
    module, params = _prepare(backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              positions, seqlen, alignment)
    return module.forward(params, out=out, last_state=last_state_out, stream=stream)


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, positions=None, seqlen=None, alignment="prev",
                       backend=None, grads_out=None, stream=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) of sum(dout · out); None where
    the input was None. last_state carries no gradient. ``grads_out`` may map "du", "ddelta",
    "dz" to arrays to fill in place."""
    module, params = _prepare(backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              positions, seqlen, alignment)
    if tuple(dout.shape) != tuple(params.args.u.shape):
        raise ValueError(f"dout must have shape (batch, dim, M) = {tuple(params.args.u.shape)}, "
                         f"got {tuple(dout.shape)}")
    return module.backward(dout, params, grads_out=grads_out, stream=stream)
