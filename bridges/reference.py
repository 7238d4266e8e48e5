"""``selective_scan_ref``: the position-map scan (SPEC §1) as plain torch operations.

Differentiable by autograd, on any device. It is the fallback backend "torch" of
``bridges.selective_scan_fn`` and the twin its tests compare against. Like mamba_ssm's
``selective_scan_ref`` it computes in float32 (float64 for float64 inputs) and returns the
input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "effective_delta", "gaps_of"]


def gaps_of(positions, batch, length, device):
    """g (batch, M) as float: g_0 = 1, g_i = p_i - p_{i-1}; all ones without a map."""
    if positions is None:
        return torch.ones(batch, length, device=device)
    positions = positions.to(device).expand(batch, length)
    g = torch.ones(batch, length, device=device)
    if length > 1:
        g[:, 1:] = (positions[:, 1:] - positions[:, :-1]).to(g.dtype)
    return g


def effective_delta(Delta, gap, alignment):
    """E (SPEC §1): "prev" Δ_i + (g_i - 1)·Δ_{i-1}, "self" g_i·Δ_i, "none" Δ_i; E_0 = Δ_0."""
    gap = gap.to(Delta.dtype)[:, None, :]
    if alignment == "none" or Delta.shape[-1] == 0:
        return Delta
    if alignment == "self":
        return gap * Delta
    shifted = torch.cat([torch.zeros_like(Delta[..., :1]), Delta[..., :-1]], dim=-1)
    return Delta + (gap - 1) * shifted


def _trailing(positions, seqlen, batch, length, device):
    if positions is None or seqlen is None or length == 0:
        if positions is None and seqlen is not None and length:
            return torch.full((batch,), float(seqlen - length), device=device)
        return torch.zeros(batch, device=device)
    return (seqlen - 1 - positions.to(device).expand(batch, length)[:, -1]).to(torch.float32)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, positions=None, seqlen=None, alignment="prev"):
    """out (batch, dim, M) [, last_state (batch, dim, N)]: SPEC §1 in torch, autograd-friendly.

    Shapes as ``reference.selective_scan``; positions is an integer tensor (batch, M) or
    (M,) on any device, or None.
    """
    if alignment not in ("prev", "self", "none"):
        raise ValueError(f"alignment must be one of ('prev', 'self', 'none'), got {alignment!r}")
    dtype_in = u.dtype
    cdt = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A, B, C = (x.to(cdt) for x in (u, delta, A, B, C))
    batch, dim, length = u.shape
    dstate = A.shape[1]
    x = delta if delta_bias is None else delta + delta_bias.to(cdt)[None, :, None]
    Delta = F.softplus(x) if delta_softplus else x                           # softplus threshold 20
    E = effective_delta(Delta, gaps_of(positions, batch, length, u.device), alignment)
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    B = B.repeat_interleave(dim // B.shape[1], dim=1)                         # (b, d, N, M)
    C = C.repeat_interleave(dim // C.shape[1], dim=1)
    deltaA = torch.exp(E[..., None] * A[None, :, None, :])                    # (b, d, M, N)
    deltaB_u = (Delta * u)[..., None] * B.transpose(2, 3)                     # (b, d, M, N)
    h = u.new_zeros(batch, dim, dstate)
    ys = []
    for i in range(length):
        h = deltaA[:, :, i] * h + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", h, C[:, :, :, i]))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(cdt)[None, :, None] * u
    out = y * F.silu(z.to(cdt)) if z is not None else y
    out = out.to(dtype_in)
    if not return_last_state:
        return out
    last = h
    if alignment != "none" and length:
        steps = _trailing(positions, seqlen, batch, length, u.device).to(cdt)[:, None, None]
        last = torch.exp(steps * Delta[:, :, -1, None] * A[None]) * h
    return out, last.detach().to(dtype_in)
