"""Every torch <-> kernel array conversion, in one place, without copies where possible.

- CPU tensors reach the numba kernels as NumPy views through DLPack (``np.from_dlpack`` of
  the detached tensor): no copy when the tensor is contiguous and already in the compute
  dtype, one contiguous copy otherwise.
- CUDA tensors reach CuPy through DLPack (``cupy.from_dlpack``) and numba.cuda through
  ``__cuda_array_interface__``; both see the very memory torch allocated.
- Outputs and gradients are allocated by torch (its caching allocator owns them) and handed
  to the kernels as views to fill in place.
- Kernels run on torch's current CUDA stream (``stream_handle``).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["compute_dtype", "kernel_input", "kernel_view", "stream_handle", "to_torch"]


def compute_dtype(dtype):
    """float64 stays float64; float16, bfloat16 and float32 compute in float32 (as mamba_ssm)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_input(t, dtype, backend):
    """A tensor (or None) as the array the backend's kernel reads; copies only when the
    tensor is non-contiguous or not in ``dtype``."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    return kernel_view(t, backend)


def kernel_view(t, backend):
    """A zero-copy view of a contiguous tensor for a backend (writable: outputs use it too)."""
    if backend == "numba-cpu":
        return np.from_dlpack(t)
    if backend == "cupy":
        import cupy
        return cupy.from_dlpack(t)
    if backend == "numba-cuda":
        from numba import cuda
        return cuda.as_cuda_array(t)
    raise ValueError(f"no array view for backend {backend!r}")


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
