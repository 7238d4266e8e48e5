"""Constructions behind the oracles of SPEC §2, shared by the tests of every layer.

- ``expand_to_dense``: oracle 1, the pruned sequence written back into a full-length one
  whose dense scan, read at ``positions``, equals the aligned scan.
- ``delta_rewrite``: oracle 5, the dense-scan arguments (Δ' = E, u' = u·Δ/E) that make any
  dense selective scan compute the position-map scan.
"""
from __future__ import annotations

import numpy as np

from .arguments import validate_scan_args
from .scan import _float64_inputs, discretized_delta, effective_delta

__all__ = ["expand_to_dense", "delta_rewrite"]


def _source_token(positions, seqlen, alignment):
    """For every path index of one row, the remaining token whose raw delta it carries.

    "prev": the last remaining token at or before it; "self": the first at or after it,
    and after the last remaining token, the last one (SPEC §1: last_state uses Δ_{M-1}).
    Leading pruned indices (before positions_0) get -1: their state stays zero.
    """
    idx = np.searchsorted(positions, np.arange(seqlen), side="right") - 1   # last token <= t
    if alignment == "self":
        nxt = np.searchsorted(positions, np.arange(seqlen), side="left")    # first token >= t
        idx = np.where(nxt < len(positions), nxt, len(positions) - 1)
        idx = np.where(np.arange(seqlen) < positions[0], -1, idx)
    return idx


def expand_to_dense(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    *, positions=None, seqlen=None, alignment="prev"):
    """Oracle 1: the full sequence whose dense scan contains the pruned one (SPEC §2).

    At positions_i the token's own u, delta, B, C, z; at a pruned index u = 0, B = C = z = 0
    and the raw delta of the previous remaining token ("prev") or the next one ("self");
    under "hold" a pruned index after a remaining token repeats that token's u, raw delta
    and B (leading pruned indices stay zero). Needs one path length for the whole batch:
    pass ``seqlen`` or positions ending alike.

    Returns:
        dict of float64 arrays u, delta (b, d, L), B, C (b, G, N, L), z (b, d, L) or None,
        plus A, D, delta_bias unchanged, ready for ``selective_scan(**dense)``.
    """
    if alignment not in ("prev", "self", "hold"):
        raise ValueError(f"alignment must be 'prev', 'self' or 'hold' to expand, got {alignment!r}")
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    if np.any(args.seqlen_rows != args.seqlen_rows[0]):
        raise ValueError("seqlen must be given when the rows of positions end at different indices")
    if args.length == 0:
        raise ValueError("expand_to_dense needs at least one remaining token")
    x = _float64_inputs(args)
    b, d, _ = x["u"].shape
    L = int(args.seqlen_rows[0])
    out = {
        "u": np.zeros((b, d, L)), "delta": np.zeros((b, d, L)),
        "B": np.zeros(x["B"].shape[:3] + (L,)), "C": np.zeros(x["C"].shape[:3] + (L,)),
        "z": None if x["z"] is None else np.zeros((b, d, L)),
    }
    for row in range(b):
        pos = args.positions[row]
        src = _source_token(pos, L, alignment)
        carried = src >= 0
        out["delta"][row][:, carried] = x["delta"][row][:, src[carried]]
        if alignment == "hold":   # the held input: u and B of the token before the gap
            out["u"][row][:, carried] = x["u"][row][:, src[carried]]
            out["B"][row][..., carried] = x["B"][row][..., src[carried]]
        out["u"][row][:, pos] = x["u"][row]
        out["delta"][row][:, pos] = x["delta"][row]
        out["B"][row][..., pos] = x["B"][row]
        out["C"][row][..., pos] = x["C"][row]
        if x["z"] is not None:
            out["z"][row][:, pos] = x["z"][row]
    out.update(A=x["A"], D=x["D"], delta_bias=x["delta_bias"], delta_softplus=args.delta_softplus)
    return out


def delta_rewrite(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  *, positions=None, seqlen=None, alignment="prev"):
    """Oracle 5: dense-scan arguments with Δ'_i = E_i and u'_i = u_i·Δ_i/E_i (SPEC §2).

    The dense scan of the M tokens with these (no D, no bias, no softplus, no gate) gives
    Σ_n C_i·h_i; add D·u and apply the gate outside. E_i > 0 wherever Δ_i > 0. Not for
    "hold": its held input carries B_{i-1}, which no dense scan over the M tokens has.

    Returns:
        dict with ``delta`` = E and ``u`` = u·Δ/E, float64 (b, d, M).
    """
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    if args.alignment == "hold":
        raise ValueError("alignment 'hold' has no delta rewrite: its held input B_{i-1}·u_{i-1} is not a dense "
                         "scan's input over the M tokens (use the expansion oracle)")
    x = _float64_inputs(args)
    Delta = discretized_delta(x["delta"], x["delta_bias"], args.delta_softplus)
    E = effective_delta(Delta, args.position_map.coefficients(args.alignment))
    return {"delta": E, "u": x["u"] * Delta / E}
