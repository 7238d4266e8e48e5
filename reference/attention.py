"""The hidden attention of the (pruned) selective scan (Ali et al., "The Hidden Attention
of Mamba Models"), generalised to the position map.

Unrolling h_i = deltaA_i·h_{i-1} + Δ_i·B_i·u_i gives y_i = Σ_{j<=i} α[i, j]·u_j + D·u_i with

    α[i, j] = Σ_n C_i[n] · (Π_{k=j+1..i} deltaA_k[n]) · Δ_j · B_j[n],   deltaA_k = exp(E_k·A),

so under "prev" the gaps between remaining tokens show up as extra decay in α. Under "hold"
token j's input also reaches h_{j+1} through the held steps, with weight w_{j+1}
(``scan.hold_weights``): α[i, j] gains Σ_n C_i[n]·(Π_{k=j+2..i} deltaA_k[n])·w_{j+1}[n]·Δ_j·B_j[n].
"""
from __future__ import annotations

import numpy as np

from .arguments import validate_scan_args
from .scan import _float64_inputs, _scan_terms, channel_groups

__all__ = ["hidden_attention"]


def hidden_attention(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     *, positions=None, seqlen=None, alignment="prev"):
    """α (batch, dim, M, M), lower triangular, with y_i = Σ_j α[i, j]·u_j + D·u_i before gating.

    Takes the scan's arguments (SPEC §1); u is used only for Δ·B·u's shape checks, z is
    ignored (α is read before the gate). Memory is O(batch·dim·M·N) beyond the output.
    """
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    x = _float64_inputs(args)
    b, d, m = x["u"].shape
    Delta, _, deltaA, _, w, _ = _scan_terms(x, args)                 # deltaA (b, d, M, N)
    Bd = channel_groups(x["B"], d).transpose(0, 1, 3, 2)             # (b, d, M, N)
    Cd = channel_groups(x["C"], d).transpose(0, 1, 3, 2)
    source = Delta[..., None] * Bd                                   # Δ_j·B_j (b, d, M, N)
    alpha = np.zeros((b, d, m, m))
    decay = np.zeros((b, d, m, deltaA.shape[-1]))                    # Π_{k=j+1..i} deltaA_k, per j
    for i in range(m):
        decay[:, :, :i] *= deltaA[:, :, i, None, :]
        if w is not None and i > 0:
            decay[:, :, i - 1] += w[:, :, i]                         # token i-1's held input
        decay[:, :, i] = 1.0
        alpha[:, :, i, : i + 1] = np.einsum("bdn,bdjn->bdj", Cd[:, :, i], decay[:, :, : i + 1] * source[:, :, : i + 1])
    return alpha
