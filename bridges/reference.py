"""``selective_scan_ref``: the position-map scan (SPEC §1) as plain torch operations.

Differentiable by autograd, on any device. It is the backend "torch" of
``bridges.selective_scan_fn`` and the twin its tests compare against. Like mamba_ssm's
``selective_scan_ref`` it computes in float32 (float64 for float64 inputs) and returns out
in the input dtype and last_state in the compute dtype (float32 for float16/bfloat16).
Arguments are checked by the reference's one validator; the gaps come from the position
map (``TorchPositionMap.coefficients``), never recomputed here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reference.arguments import validate_scan_args
from reference.scan import SOFTPLUS_THRESHOLD

from .dlpack import compute_dtype
from .positions import as_position_map

__all__ = ["selective_scan_ref", "effective_delta", "discretized_delta", "require_tensor", "scan_twin"]


def require_tensor(u):
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u must be a torch.Tensor, got {type(u).__name__}")


def discretized_delta(delta, delta_bias, delta_softplus):
    """Δ = softplus(delta + delta_bias) (threshold as the reference) or delta + delta_bias."""
    x = delta if delta_bias is None else delta + delta_bias.to(delta.dtype)[None, :, None]
    return F.softplus(x, threshold=SOFTPLUS_THRESHOLD) if delta_softplus else x


def effective_delta(Delta, coefficients):
    """E_i = coef_self_i·Δ_i + coef_prev_i·Δ_{i-1} (SPEC §1); E = Δ without a map."""
    if coefficients is None or Delta.shape[-1] == 0:
        return Delta
    shifted = torch.cat([torch.zeros_like(Delta[..., :1]), Delta[..., :-1]], dim=-1)
    return coefficients.coef_self[:, None, :] * Delta + coefficients.coef_prev[:, None, :] * shifted


def scan_twin(args):
    """The scan on validated torch ``ScanArgs``: out (b, d, M) [, last_state (b, d, N)]."""
    dtype_in = args.u.dtype
    cdt = compute_dtype(dtype_in)
    u, delta, A, B, C = (x.to(cdt) for x in (args.u, args.delta, args.A, args.B, args.C))
    batch, dim, length = u.shape
    dstate = A.shape[1]
    coefficients = args.coefficients(cdt)
    Delta = discretized_delta(delta, args.delta_bias, args.delta_softplus)        # (b, d, M)
    E = effective_delta(Delta, coefficients)
    B = B.repeat_interleave(dim // B.shape[1], dim=1)                              # (b, d, N, M)
    C = C.repeat_interleave(dim // C.shape[1], dim=1)
    deltaA = torch.exp(E[..., None] * A[None, :, None, :])                         # (b, d, M, N)
    deltaB_u = (Delta * u)[..., None] * B.transpose(2, 3)                          # (b, d, M, N)
    h = u.new_zeros(batch, dim, dstate)
    ys = []
    for i in range(length):
        h = deltaA[:, :, i] * h + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", h, C[:, :, :, i]))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(batch, dim, 0)
    if args.D is not None:
        y = y + args.D.to(cdt)[None, :, None] * u
    out = y * F.silu(args.z.to(cdt)) if args.z is not None else y
    out = out.to(dtype_in)
    if not args.return_last_state:
        return out
    last = h
    if coefficients is not None and length:
        steps = coefficients.trailing[:, None, None]
        last = torch.exp(steps * Delta[:, :, -1, None] * A[None]) * h
    return out, last.detach()


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, positions=None, seqlen=None, alignment="prev"):
    """out (batch, dim, M) [, last_state (batch, dim, N)]: SPEC §1 in torch, autograd-friendly.

    Shapes as ``reference.selective_scan``; positions an integer tensor (batch, M) or (M,)
    with seqlen, a ``TorchPositionMap``, or None.
    """
    require_tensor(u)
    positions, seqlen = as_position_map(positions, seqlen, u)
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    return scan_twin(args)
