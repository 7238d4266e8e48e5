"""Every torch <-> kernel array conversion, in one place, without copies where possible.

- A tensor reaches a backend as that backend's own array type through the registry entry's
  ``view`` (``cuda_kernels.backends``): NumPy views through DLPack for the CPU backends,
  ``cupy.from_dlpack`` for CuPy, ``__cuda_array_interface__`` for numba.cuda. No copy when
  the tensor is contiguous and already in the compute dtype, one contiguous copy otherwise.
- Outputs and gradients are allocated by torch (its caching allocator owns them) and handed
  to the kernels as views to fill in place.
- Kernels run on torch's current CUDA stream (``stream_handle``).
"""
from __future__ import annotations

import numpy as np
import torch

from alignscan.reference.arguments import compute_dtype_name

__all__ = ["compute_dtype", "kernel_input", "kernel_view", "stream_handle", "to_torch"]


def compute_dtype(dtype):
    """``reference.compute_dtype_name`` as a torch dtype: float64 stays float64; float16,
    bfloat16 and float32 compute in float32 (as mamba_ssm)."""
    return getattr(torch, compute_dtype_name(dtype))


def kernel_input(t, dtype, entry):
    """A tensor (or None) as the array the backend's kernel reads; copies only when the
    tensor is non-contiguous or not in ``dtype``."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    return entry.view(t)


def kernel_view(t, entry):
    """A zero-copy view of a contiguous tensor for a backend (writable: outputs use it too)."""
    return entry.view(t)


def stream_handle(device):
    """The raw handle of torch's current CUDA stream on ``device`` (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


def to_torch(x, like):
    """A backend's own result (a NumPy/CuPy/numba array) as a tensor on ``like``'s device,
    zero-copy through DLPack where the array supports it."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    return torch.as_tensor(x, device=like.device)
