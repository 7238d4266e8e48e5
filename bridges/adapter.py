"""``dense_kernel_adapter``: any dense selective scan with mamba_ssm's signature (for
example mamba_ssm's own CUDA kernel) turned into a position-map scan, by the delta rewrite
of SPEC §2 oracle 5: a dense scan over the M tokens with Δ'_i = E_i and u'_i = u_i·Δ_i/E_i
(bias and softplus folded in) equals the aligned scan up to D·u and the gate, which are
applied outside. Gradients flow through torch and the dense function's own backward.
Arguments are checked by the reference's one validator; E comes from the position map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from alignscan.reference.arguments import validate_scan_args

from .positions import as_position_map
from .reference import discretized_delta, effective_delta, require_tensor

__all__ = ["dense_kernel_adapter"]


def dense_kernel_adapter(dense_scan_fn):
    """Wrap ``dense_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
    delta_softplus=False, return_last_state=False)`` into the position-map signature of
    ``bridges.selective_scan_fn`` (keyword-only positions, seqlen, alignment)."""

    def position_map_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, *, positions=None, seqlen=None, alignment="prev"):
        require_tensor(u)
        positions, seqlen = as_position_map(positions, seqlen, u)
        args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  positions=positions, seqlen=seqlen, alignment=alignment)
        if args.alignment == "hold":
            raise ValueError("dense_kernel_adapter cannot run alignment 'hold': its held input B_{i-1}·u_{i-1} is "
                             "not a dense scan's input (SPEC §2 oracle 5); use bridges.selective_scan_fn")
        coefficients = args.coefficients(delta.dtype)
        Delta = discretized_delta(delta, delta_bias, args.delta_softplus)
        E = effective_delta(Delta, coefficients)
        safe_E = torch.where(E != 0, E, torch.ones_like(E))
        u_rewritten = torch.where(E != 0, u * Delta / safe_E, torch.zeros_like(u))
        result = dense_scan_fn(u_rewritten, E, A, B, C, None, None, None, False, args.return_last_state)
        y, last = result if args.return_last_state else (result, None)
        if D is not None:
            y = y + D[None, :, None].to(y.dtype) * u
        if z is not None:
            y = y * F.silu(z)
        if not args.return_last_state:
            return y
        if coefficients is not None and u.shape[-1]:
            steps = coefficients.trailing.to(last.dtype)[:, None, None]
            last = torch.exp(steps * Delta[:, :, -1, None].to(last.dtype) * A[None].to(last.dtype)) * last
        return y, last.detach()

    position_map_scan.__name__ = f"position_map_{getattr(dense_scan_fn, '__name__', 'scan')}"
    position_map_scan.__doc__ = f"{getattr(dense_scan_fn, '__name__', 'dense scan')} with a position map (SPEC §2 oracle 5)."
    return position_map_scan
