"""``selective_scan_fn``: the position-map scan as a differentiable torch op.

Same positional signature and return convention as
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (so ``from bridges import
selective_scan_fn`` replaces it in an existing model), plus the keyword-only position map.
The arguments are checked once, here, by the reference's validator; forward and backward
then run the kernels of the chosen backend through two ``torch.library`` custom ops
(``alignscan::selective_scan_fwd`` / ``_bwd``) with fake implementations and a registered
autograd, so models that call it compile under ``torch.compile(fullgraph=True)``. The ops
take the position map as its coefficient tensors, already on the device: no host round trip
per call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from alignscan.cuda_kernels import backends
from alignscan.cuda_kernels.params import ScanParams
from alignscan.reference.arguments import ScanArgs, dtype_name, validate_scan_args
from alignscan.reference.positions import GapCoefficients

from .dlpack import compute_dtype, kernel_input, kernel_view, storage_dtype, stream_handle, to_torch
from .positions import as_position_map
from .reference import require_tensor, scan_twin

__all__ = ["scan_flops", "selective_scan_fn", "resolve_backend", "ENV_BACKEND"]

ENV_BACKEND = backends.ENV_BACKEND


@torch.compiler.assume_constant_result
def _resolve(device_type, requested):
    return backends.resolve(requested, device_type)


def resolve_backend(device_type, requested=None):
    """The backend for tensors on ``device_type`` (the one registry's choice): ``requested``,
    else $ALIGNSCAN_BACKEND, else by device (CPU -> numba-cpu; CUDA -> cupy, else
    numba-cuda, else torch).

    Raises ValueError for an unknown name (naming the argument or the variable) or a
    backend for the other device, and cuda_kernels.BackendUnavailable (with the reason)
    when it cannot run here.
    """
    return _resolve(device_type, requested)


def _empty(like):
    return like.new_empty((0,), dtype=compute_dtype(like.dtype))


def _backend_entry(backend, device_type):
    """The registry entry a call of the op runs on: ``backend`` ("" when the caller named
    none) resolved for the device of the op's tensors, here, at run time. So a traced or
    exported graph holds the caller's request, never a name only one device can run."""
    return backends.get(backends.resolve(backend or None, device_type))


class _MadeCoefficients:
    """A position map's gap coefficients, already made: inside the op the map itself is gone,
    and the twin only asks it for them."""

    def __init__(self, coefs):
        self._made = GapCoefficients(*coefs)

    def coefficients(self, alignment, dtype):
        return self._made


def _twin_args(u, delta, A, B, C, D, z, delta_bias, coefs, delta_softplus, return_last_state, alignment):
    made = None if coefs[0] is None else _MadeCoefficients(coefs)
    return ScanArgs.unchecked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, made, alignment)


def _twin_forward(u, delta, A, B, C, D, z, delta_bias, coefs, delta_softplus, return_last_state, alignment):
    """The op's forward by the twin: the "torch" backend chosen inside the op (a graph made
    where a kernel ran, run on a GPU without CuPy or numba-cuda)."""
    cdt = compute_dtype(u.dtype)
    with torch.no_grad():
        result = scan_twin(_twin_args(u, delta, A, B, C, D, z, delta_bias, coefs, delta_softplus, return_last_state,
                                      alignment))
    out, last = result if return_last_state else (result, _empty(u))
    return out.to(u.dtype).clone(), last.to(cdt).clone()


def _kernel_args(entry, u, delta, A, B, C, D, z, delta_bias, coefs, delta_softplus, return_last_state, alignment):
    """(kernel module, the scan's ScanParams over backend views of the tensors, the storage
    dtype): u, delta, B, C, z in the dtype the module reads them in (``dlpack.storage_dtype``:
    float16/bfloat16 in place where it can), A, D, delta_bias and the map in the compute dtype."""
    module = entry.kernels()
    cdt = compute_dtype(u.dtype)
    sdt = storage_dtype(module, u, delta, B, C, z)
    view = lambda t: kernel_input(t, cdt, entry)
    streamed = lambda t: kernel_input(t, sdt, entry)
    args = ScanArgs.unchecked(streamed(u), streamed(delta), view(A), streamed(B), streamed(C), view(D), streamed(z),
                              view(delta_bias), delta_softplus, return_last_state, None, alignment)
    coefficients = None if coefs[0] is None else GapCoefficients(*(view(c) for c in coefs))
    return module, ScanParams.build(args, coefficients, storage=dtype_name(sdt)), sdt


@torch.library.custom_op("alignscan::selective_scan_fwd", mutates_args=())
def _fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
            delta_bias: Optional[Tensor], coef_self: Optional[Tensor], coef_prev: Optional[Tensor],
            hold: Optional[Tensor], trailing: Optional[Tensor], delta_softplus: bool, return_last_state: bool,
            alignment: str, backend: str) -> tuple[Tensor, Tensor]:
    entry = _backend_entry(backend, u.device.type)
    if entry.name == "torch":
        return _twin_forward(u, delta, A, B, C, D, z, delta_bias, (coef_self, coef_prev, hold, trailing),
                             delta_softplus, return_last_state, alignment)
    module, params, sdt = _kernel_args(entry, u, delta, A, B, C, D, z, delta_bias,
                                       (coef_self, coef_prev, hold, trailing), delta_softplus, return_last_state,
                                       alignment)
    cdt = compute_dtype(u.dtype)
    batch, dim, length = u.shape
    out = torch.empty((batch, dim, length), dtype=sdt, device=u.device)
    last = torch.empty((batch, dim, A.shape[-1]), dtype=cdt, device=u.device) if return_last_state else _empty(u)
    module.forward(params, out=kernel_view(out, entry),
                   last_state=kernel_view(last, entry) if return_last_state else None, stream=stream_handle(u.device))
    # out in u's dtype (SPEC §1): the kernel wrote it so unless it cannot read u's dtype.
    return out.to(u.dtype), last


@_fwd_op.register_fake
def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, coef_self, coef_prev, hold, trailing, delta_softplus,
              return_last_state, alignment, backend):
    cdt = compute_dtype(u.dtype)
    last_shape = (u.shape[0], u.shape[1], A.shape[-1]) if return_last_state else (0,)
    return u.new_empty(u.shape), u.new_empty(last_shape, dtype=cdt)


@torch.library.custom_op("alignscan::selective_scan_bwd", mutates_args=())
def _bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            z: Optional[Tensor], delta_bias: Optional[Tensor], coef_self: Optional[Tensor],
            coef_prev: Optional[Tensor], hold: Optional[Tensor], trailing: Optional[Tensor], delta_softplus: bool,
            alignment: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    entry = _backend_entry(backend, u.device.type)
    if entry.name == "torch":
        # Autograd does not record inside a custom op, so the twin cannot be differentiated
        # here; an eager call on this device takes the twin outside the op and has a backward.
        raise NotImplementedError(
            f"the scan's backward on {u.device.type} tensors: this graph was traced or exported where a kernel "
            f"backend ran, and on {u.device.type} here only the 'torch' twin can run, whose backward does not run "
            f"inside the traced op; call the model eagerly, or trace it with backend='torch'")
    module, params, sdt = _kernel_args(entry, u, delta, A, B, C, D, z, delta_bias,
                                       (coef_self, coef_prev, hold, trailing), delta_softplus, False, alignment)
    grads_out = {"du": torch.empty(u.shape, dtype=sdt, device=u.device),
                 "ddelta": torch.empty(u.shape, dtype=sdt, device=u.device)}
    if z is not None:
        grads_out["dz"] = torch.empty(u.shape, dtype=sdt, device=u.device)
    grads = module.backward(kernel_input(dout, sdt, entry), params,
                            grads_out={k: kernel_view(v, entry) for k, v in grads_out.items()},
                            stream=stream_handle(u.device))
    du, ddelta, dA, dB, dC, dD, _, dbias = grads
    # Each gradient in its input's dtype (SPEC §1): du, ddelta, dz, dB, dC come in the storage
    # dtype (the inputs' own when the kernel read them in place), dA, dD, ddelta_bias in the
    # compute dtype (A, D, delta_bias are float32 parameters under mamba_ssm's convention).
    return (grads_out["du"].to(u.dtype), grads_out["ddelta"].to(delta.dtype), to_torch(dA, u).to(A.dtype),
            to_torch(dB, u, sdt).to(B.dtype), to_torch(dC, u, sdt).to(C.dtype),
            to_torch(dD, u).to(D.dtype) if D is not None else _empty(u),
            grads_out["dz"].to(z.dtype) if z is not None else _empty(u),
            to_torch(dbias, u).to(delta_bias.dtype) if delta_bias is not None else _empty(u))


@_bwd_op.register_fake
def _bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, coef_self, coef_prev, hold, trailing, delta_softplus,
              alignment, backend):
    cdt = compute_dtype(u.dtype)
    like = lambda t: u.new_empty(t.shape, dtype=t.dtype) if t is not None else u.new_empty((0,), dtype=cdt)
    return (like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias))


_N_INPUTS = 12   # u, delta, A, B, C, D, z, delta_bias and the four coefficient tensors


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_N_INPUTS])
    ctx.softplus, _, ctx.alignment, ctx.backend = inputs[_N_INPUTS:]
    ctx.mark_non_differentiable(output[1])    # last_state carries no gradient, as in mamba_ssm


def _backward(ctx, dout, _dlast):
    saved = ctx.saved_tensors
    grads = torch.ops.alignscan.selective_scan_bwd(dout, *saved, ctx.softplus, ctx.alignment, ctx.backend)
    inputs = saved[:8]
    result = [g.to(x.dtype) if (x is not None and need) else None
              for g, x, need in zip(grads, inputs, ctx.needs_input_grad[:8])]
    return (*result, *([None] * (_N_INPUTS - 8 + 4)))


torch.library.register_autograd("alignscan::selective_scan_fwd", _backward, setup_context=_setup_context)


def scan_flops(batch, dim, length, dstate, has_D, has_z, has_map, alignment):
    """FLOPs of one position-map scan, as mamba_ssm's authors count the selective scan
    (9·B·L·D·N: discretising A and B, the recurrence, the output; + B·L·D each for D and the
    z gate), plus the gap terms: E_i = coef_self·Δ_i + coef_prev·Δ_{i-1} (3·B·L·D) with a map,
    and under "hold" the held input of every token after a gap (an exp and the S_q sum,
    counted as 4·B·L·D·N as if every token followed a gap: an upper bound, shapes only)."""
    flops = 9 * batch * length * dim * dstate + (batch * dim * length if has_D else 0) \
        + (batch * dim * length if has_z else 0)
    if has_map:
        flops += 3 * batch * dim * length
        if alignment == "hold":
            flops += 4 * batch * dim * length * dstate
    return flops


@register_flop_formula(torch.ops.alignscan.selective_scan_fwd, get_raw=True)
def _scan_flop_formula(u, delta, A, B, C, D, z, delta_bias, coef_self, coef_prev, hold, trailing, delta_softplus,
                       return_last_state, alignment, backend, *args, **kwargs):
    """``torch.utils.flop_counter.FlopCounterMode`` counts every call of the op by ``scan_flops``."""
    batch, dim, length = u.shape
    return scan_flops(batch, dim, length, A.shape[-1], D is not None, z is not None, coef_self is not None, alignment)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, positions=None, seqlen=None, alignment="prev", backend=None):
    """The selective scan with a position map (SPEC §1), differentiable.

    Args:
        u, delta: (batch, dim, M); A: (dim, N); B, C: (batch, N, M) or (batch, G, N, M);
        D, delta_bias: (dim,) or None; z: (batch, dim, M) or None: as mamba_ssm.
        positions: a ``TorchPositionMap`` (made once per pruning stage: the fast path), or
            integers (batch, M) or (M,) with ``seqlen``, the original index of each token on
            the unpruned path, or None (no pruning). seqlen: that path's length or None.
        alignment: "prev" (the paper), "hold" (zero-order hold, ours), "self" (ablation) or
            "none" (relabel, EViT).
        backend: a name from the registry (``cuda_kernels.backends``): "numba-cpu",
            "cupy", "numba-cuda", "torch" (the autograd twin), ...; default
            $ALIGNSCAN_BACKEND, else the registry's choice for the device of ``u``, made
            per call inside the op (so an exported graph runs on any device).

    Returns:
        out (batch, dim, M) in u's dtype, and last_state (batch, dim, N) with
        return_last_state (no gradient), float32 for float16/bfloat16/float32 inputs and
        float64 for float64 (as mamba_ssm); each gradient in its input's dtype.
        float16/bfloat16 compute in float32; the GPU backends (and cuda-emu) read them in
        place (numba-cuda: float16 only), the others convert them to float32 first.
    """
    require_tensor(u)
    positions, seqlen = as_position_map(positions, seqlen, u)
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    # Checked here, eagerly, with a message naming the argument; the op itself receives the
    # request ("" for none) and resolves it from its tensors' device when it runs, so a
    # traced or exported graph carries no backend that only one device can run.
    if resolve_backend(u.device.type, backend) == "torch":
        return scan_twin(args)
    coefs = args.coefficients(compute_dtype(u.dtype))
    coefs = (None,) * 4 if coefs is None else tuple(coefs)
    out, last = torch.ops.alignscan.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, *coefs,
                                                       args.delta_softplus, args.return_last_state, args.alignment,
                                                       backend or "")
    return (out, last) if args.return_last_state else out
