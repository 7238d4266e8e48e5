"""Every torch <-> kernel array conversion, in one place, without copies where possible.

- A tensor reaches a backend as that backend's own array type through the registry entry's
  ``view`` (``cuda_kernels.backends``): NumPy views through DLPack for the CPU backends,
  ``cupy.from_dlpack`` for CuPy, ``__cuda_array_interface__`` for numba.cuda. No copy when
  the tensor is contiguous and already in the dtype the kernel reads, one contiguous copy
  otherwise.
- Dtypes (SPEC §1, Precision): u, delta, B, C, z (and dout) are read in their storage dtype
  (``storage_dtype``): float16 or bfloat16 as given when the backend's kernels read it in
  place (their module's ``STORAGE_DTYPES``), else the compute dtype. A, D, delta_bias and
  the map's coefficients are read in the compute dtype. NumPy and CuPy have no bfloat16:
  a bfloat16 tensor travels as a uint16 view of the same memory (its bits), and comes back
  through ``to_torch(..., dtype=torch.bfloat16)`` the same way.
- Outputs and gradients are allocated by torch (its caching allocator owns them) and handed
  to the kernels as views to fill in place.
- Kernels run on torch's current CUDA stream (``stream_handle``).
"""
from __future__ import annotations

import numpy as np
import torch

from alignscan.cuda_kernels.params import storage_dtype_name
from alignscan.reference.arguments import compute_dtype_name

__all__ = ["compute_dtype", "storage_dtype", "kernel_input", "kernel_view", "stream_handle", "to_torch"]

# NumPy and CuPy have no bfloat16: its bits go as this (params.storage_numpy_dtype).
_BFLOAT16_BITS = torch.uint16


def compute_dtype(dtype):
    """``reference.compute_dtype_name`` as a torch dtype: float64 stays float64; float16,
    bfloat16 and float32 compute in float32 (as mamba_ssm)."""
    return getattr(torch, compute_dtype_name(dtype))


def storage_dtype(module, u, delta, B, C, z=None):
    """The dtype the kernels of ``module`` read u, delta, B, C, z, dout in and write out, du,
    ddelta, dz, dB, dC in: ``params.storage_dtype_name`` of the tensors (u's half dtype when
    they all share it) if the module reads it in place, else the compute dtype."""
    name = storage_dtype_name(u, delta, B, C, z)
    if name in getattr(module, "STORAGE_DTYPES", ()):
        return getattr(torch, name)
    return compute_dtype(u.dtype)


def _bits(t):
    """A bfloat16 tensor as the uint16 view of its memory (no copy); others unchanged."""
    return t.view(_BFLOAT16_BITS) if t.dtype == torch.bfloat16 else t


def kernel_input(t, dtype, entry):
    """A tensor (or None) as the array the backend's kernel reads, in ``dtype``; copies only
    when the tensor is non-contiguous or not in ``dtype``."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    return entry.view(_bits(t))


def kernel_view(t, entry):
    """A zero-copy view of a contiguous tensor for a backend (writable: outputs use it too)."""
    return entry.view(_bits(t))


def stream_handle(device):
    """The raw handle of torch's current CUDA stream on ``device`` (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


def to_torch(x, like, dtype=None):
    """A backend's own result (a NumPy/CuPy/numba array) as a tensor on ``like``'s device,
    zero-copy through DLPack where the array supports it. ``dtype=torch.bfloat16``: ``x``
    holds bfloat16 bits (uint16), viewed back as bfloat16."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif hasattr(x, "__dlpack__"):
        t = torch.from_dlpack(x)
    else:
        t = torch.as_tensor(x, device=like.device)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
