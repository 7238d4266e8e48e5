"""``dense_kernel_adapter``: any dense selective scan with mamba_ssm's signature (for
example mamba_ssm's own CUDA kernel) turned into a position-map scan, by the delta rewrite
of SPEC §2 oracle 5: a dense scan over the M tokens with Δ'_i = E_i and u'_i = u_i·Δ_i/E_i
(bias and softplus folded in) equals the aligned scan up to D·u and the gate, which are
applied outside. Gradients flow through torch and the dense function's own backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import _trailing, effective_delta, gaps_of

__all__ = ["dense_kernel_adapter"]


def dense_kernel_adapter(dense_scan_fn):
    """Wrap ``dense_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
    delta_softplus=False, return_last_state=False)`` into the position-map signature of
    ``bridges.selective_scan_fn`` (keyword-only positions, seqlen, alignment)."""

    def position_map_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, *, positions=None, seqlen=None, alignment="prev"):
        if alignment not in ("prev", "self", "none"):
            raise ValueError(f"alignment must be one of ('prev', 'self', 'none'), got {alignment!r}")
        if positions is not None and not isinstance(positions, torch.Tensor):
            positions = torch.as_tensor(positions)
        batch, _, length = u.shape
        x = delta if delta_bias is None else delta + delta_bias[None, :, None].to(delta.dtype)
        Delta = F.softplus(x) if delta_softplus else x
        E = effective_delta(Delta, gaps_of(positions, batch, length, u.device), alignment)
        safe_E = torch.where(E != 0, E, torch.ones_like(E))
        u_rewritten = torch.where(E != 0, u * Delta / safe_E, torch.zeros_like(u))
        result = dense_scan_fn(u_rewritten, E, A, B, C, None, None, None, False, return_last_state)
        y, last = result if return_last_state else (result, None)
        if D is not None:
            y = y + D[None, :, None].to(y.dtype) * u
        if z is not None:
            y = y * F.silu(z)
        if not return_last_state:
            return y
        if alignment != "none" and length:
            steps = _trailing(positions, seqlen, batch, length, u.device).to(last.dtype)[:, None, None]
            last = torch.exp(steps * Delta[:, :, -1, None].to(last.dtype) * A[None].to(last.dtype)) * last
        return y, last.detach()

    position_map_scan.__name__ = f"position_map_{getattr(dense_scan_fn, '__name__', 'scan')}"
    position_map_scan.__doc__ = f"{getattr(dense_scan_fn, '__name__', 'dense scan')} with a position map (SPEC §2 oracle 5)."
    return position_map_scan
