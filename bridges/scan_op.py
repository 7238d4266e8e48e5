"""``selective_scan_fn``: the position-map scan as a differentiable torch op.

Same positional signature and return convention as
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (so ``from bridges import
selective_scan_fn`` replaces it in an existing model), plus the keyword-only position map.
Forward and backward run the kernels of the chosen backend through two ``torch.library``
custom ops (``alignscan::selective_scan_fwd`` / ``_bwd``) with fake implementations and a
registered autograd, so models that call it compile under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

import cuda_kernels as K

from .dlpack import compute_dtype, kernel_input, kernel_view, stream_handle, to_torch
from .reference import selective_scan_ref

__all__ = ["selective_scan_fn", "resolve_backend", "BACKENDS", "ENV_BACKEND"]

BACKENDS = ("numba-cpu", "numba-cuda", "cupy", "torch")
ENV_BACKEND = "ALIGNSCAN_BACKEND"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.compiler.assume_constant_result
def _status():
    return K.available_backends()


def resolve_backend(device_type, requested=None):
    """The backend for tensors on ``device_type``: ``requested``, else $ALIGNSCAN_BACKEND,
    else by device (CPU -> numba-cpu; CUDA -> cupy, else numba-cuda, else torch).

    Raises ValueError for an unknown name or a backend for the other device, and
    cuda_kernels.BackendUnavailable (with the reason) when it cannot run here.
    """
    name = requested if requested is not None else os.environ.get(ENV_BACKEND) or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name is None:
        if device_type != "cuda":
            return "numba-cpu"
        status = _status()
        return next((b for b in ("cupy", "numba-cuda") if status[b] is None), "torch")
    if name == "torch":
        return name
    if (name == "numba-cpu") != (device_type != "cuda"):
        raise ValueError(f"backend {name!r} cannot take {device_type} tensors "
                         f"({'numba-cpu runs on the CPU' if name == 'numba-cpu' else name + ' needs CUDA tensors'})")
    reason = _status()[name]
    if reason is not None:
        raise K.BackendUnavailable(f"backend {name!r} cannot run here: {reason}")
    return name


def _empty(like):
    return like.new_empty((0,), dtype=compute_dtype(like.dtype))


@torch.library.custom_op("alignscan::selective_scan_fwd", mutates_args=())
def _fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
            delta_bias: Optional[Tensor], positions: Optional[Tensor], seqlen: Optional[int], delta_softplus: bool,
            return_last_state: bool, alignment: str, backend: str) -> tuple[Tensor, Tensor]:
    cdt = compute_dtype(u.dtype)
    view = lambda t: kernel_input(t, cdt, backend)
    batch, dim, length = u.shape
    out = torch.empty((batch, dim, length), dtype=cdt, device=u.device)
    last = torch.empty((batch, dim, A.shape[-1]), dtype=cdt, device=u.device) if return_last_state else _empty(u)
    K.selective_scan_fwd(view(u), view(delta), view(A), view(B), view(C), view(D), view(z), view(delta_bias),
                         delta_softplus, return_last_state,
                         positions=None if positions is None else positions.detach().cpu().numpy(),
                         seqlen=seqlen, alignment=alignment, backend=backend, out=kernel_view(out, backend),
                         last_state_out=kernel_view(last, backend) if return_last_state else None,
                         stream=stream_handle(u.device))
    return out, last


@_fwd_op.register_fake
def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, positions, seqlen, delta_softplus, return_last_state,
              alignment, backend):
    cdt = compute_dtype(u.dtype)
    last_shape = (u.shape[0], u.shape[1], A.shape[-1]) if return_last_state else (0,)
    return u.new_empty(u.shape, dtype=cdt), u.new_empty(last_shape, dtype=cdt)


@torch.library.custom_op("alignscan::selective_scan_bwd", mutates_args=())
def _bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            z: Optional[Tensor], delta_bias: Optional[Tensor], positions: Optional[Tensor], seqlen: Optional[int],
            delta_softplus: bool, alignment: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                        Tensor, Tensor, Tensor]:
    cdt = compute_dtype(u.dtype)
    view = lambda t: kernel_input(t, cdt, backend)
    grads_out = {"du": torch.empty(u.shape, dtype=cdt, device=u.device),
                 "ddelta": torch.empty(u.shape, dtype=cdt, device=u.device)}
    if z is not None:
        grads_out["dz"] = torch.empty(u.shape, dtype=cdt, device=u.device)
    grads = K.selective_scan_bwd(view(dout), view(u), view(delta), view(A), view(B), view(C), view(D), view(z),
                                 view(delta_bias), delta_softplus, False,
                                 positions=None if positions is None else positions.detach().cpu().numpy(),
                                 seqlen=seqlen, alignment=alignment, backend=backend,
                                 grads_out={k: kernel_view(v, backend) for k, v in grads_out.items()},
                                 stream=stream_handle(u.device))
    du, ddelta, dA, dB, dC, dD, _, dbias = grads
    return (grads_out["du"], grads_out["ddelta"], to_torch(dA, u), to_torch(dB, u), to_torch(dC, u),
            to_torch(dD, u) if D is not None else _empty(u), grads_out.get("dz", _empty(u)),
            to_torch(dbias, u) if delta_bias is not None else _empty(u))


@_bwd_op.register_fake
def _bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, positions, seqlen, delta_softplus, alignment, backend):
    cdt = compute_dtype(u.dtype)
    like = lambda t: u.new_empty(t.shape, dtype=cdt) if t is not None else u.new_empty((0,), dtype=cdt)
    return (like(u), like(u), like(A), like(B), like(C), like(D), like(z), like(delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, positions, seqlen, softplus, _, alignment, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, positions)
    ctx.seqlen, ctx.softplus, ctx.alignment, ctx.backend = seqlen, softplus, alignment, backend
    ctx.mark_non_differentiable(output[1])    # last_state carries no gradient, as in mamba_ssm


def _backward(ctx, dout, _dlast):
    u, delta, A, B, C, D, z, delta_bias, positions = ctx.saved_tensors
    grads = torch.ops.alignscan.selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, positions, ctx.seqlen,
                                                   ctx.softplus, ctx.alignment, ctx.backend)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    result = [g.to(x.dtype) if (x is not None and need) else None
              for g, x, need in zip(grads, inputs, ctx.needs_input_grad[:8])]
    return (*result, None, None, None, None, None, None)


torch.library.register_autograd("alignscan::selective_scan_fwd", _backward, setup_context=_setup_context)


def _check_tensors(u, **others):
    """Device and dtype checks torch needs before the kernels' own validation."""
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u must be a torch.Tensor, got {type(u).__name__}")
    if u.dtype not in _FLOATS:
        raise TypeError(f"u must be a float16/bfloat16/float32/float64 tensor, got {u.dtype}")
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}: every tensor must be on one device")


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, positions=None, seqlen=None, alignment="prev", backend=None):
    """The selective scan with a position map (SPEC §1), differentiable.

    Args:
        u, delta: (batch, dim, M); A: (dim, N); B, C: (batch, N, M) or (batch, G, N, M);
        D, delta_bias: (dim,) or None; z: (batch, dim, M) or None: as mamba_ssm.
        positions: integer tensor/array (batch, M) or (M,), original index of each token on
            the unpruned path, or None (no pruning). seqlen: length of that path or None.
        alignment: "prev" (the paper), "self" (ablation) or "none" (relabel, EViT).
        backend: "numba-cpu", "numba-cuda", "cupy" or "torch" (the autograd twin); default
            $ALIGNSCAN_BACKEND, else by device.

    Returns:
        out (batch, dim, M) in u's dtype, and last_state (batch, dim, N) with
        return_last_state (no gradient). float16/bfloat16 compute in float32.
    """
    _check_tensors(u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    if positions is not None and not isinstance(positions, torch.Tensor):
        positions = torch.as_tensor(positions)
    backend = resolve_backend(u.device.type, backend)
    if backend == "torch":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  positions=positions, seqlen=seqlen, alignment=alignment)
    out, last = torch.ops.alignscan.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, positions, seqlen,
                                                       bool(delta_softplus), bool(return_last_state), alignment,
                                                       backend)
    out = out.to(u.dtype)
    return (out, last.to(u.dtype)) if return_last_state else out
