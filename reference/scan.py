"""The selective scan with a position map, in float64 NumPy, written for reading (SPEC §1).

Each equation of SPEC §1 is one function below, named after its symbol. The scan itself
is a loop over the M remaining tokens, vectorised over (batch, dim, N). Shapes: b batch,
d dim, N state, G groups, M remaining tokens, L = seqlen (the unpruned path).
"""
from __future__ import annotations

import numpy as np

from .arguments import validate_scan_args
from .hold import hold_sum, hold_sum_grad

__all__ = [
    "softplus",
    "discretized_delta",
    "effective_delta",
    "channel_groups",
    "SOFTPLUS_THRESHOLD",
    "hidden_states",
    "selective_scan",
    "selective_scan_backward",
]

# softplus(x) = x above it, as the mamba kernel: the one place every backend takes it from.
SOFTPLUS_THRESHOLD = 20.0


def softplus(x):
    """log1p(exp(x)) for x <= 20, x above (SPEC §1)."""
    return np.where(x <= SOFTPLUS_THRESHOLD, np.log1p(np.exp(np.minimum(x, SOFTPLUS_THRESHOLD))), x)


def softplus_grad(x):
    """d softplus / dx: the logistic sigmoid below the threshold, 1 above."""
    return np.where(x <= SOFTPLUS_THRESHOLD, 1.0 / (1.0 + np.exp(-x)), 1.0)


def silu(x):
    return x / (1.0 + np.exp(-x))


def silu_grad(x):
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 + x * (1.0 - s))


def discretized_delta(delta, delta_bias, delta_softplus):
    """Δ_i = softplus(delta_i + delta_bias) or delta_i + delta_bias; (b, d, M)."""
    x = delta if delta_bias is None else delta + delta_bias[None, :, None]
    return softplus(x) if delta_softplus else x


def effective_delta(Delta, coefficients):
    """E_i, the timescale that covers token i and the q_i = g_i - 1 pruned steps before it:

        E_i = coef_self_i·Δ_i + coef_prev_i·Δ_{i-1}

    with the coefficients of the alignment (``PositionMap.coefficients``, SPEC §1): "prev"
    Δ_i + (g_i - 1)·Δ_{i-1} (Eq. 5/6); "self" g_i·Δ_i; "none" Δ_i; E_0 = Δ_0.
    Delta (b, d, M) -> (b, d, M).
    """
    E = coefficients.coef_self[:, None, :] * Delta
    E[..., 1:] += coefficients.coef_prev[:, None, 1:] * Delta[..., :-1]
    return E


def channel_groups(BC, dim):
    """(b, G, N, M) -> (b, d, N, M): channel d reads group d // (dim // G)."""
    groups = BC.shape[1]
    return np.repeat(BC, dim // groups, axis=1)


def _float64_inputs(args):
    f = lambda x: None if x is None else np.asarray(x, dtype=np.float64)
    return {name: f(getattr(args, name)) for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}


def hold_weights(Delta, A, hold):
    """w_i = exp(Δ_i·A)·S_{q_i}(Δ_{i-1}·A): the weight with which token i-1's input Δ·B·u
    reaches h_i through the q_i held steps of alignment "hold" (``reference.hold``); w_0 = 0
    and w_i = 0 where q_i = 0.  Delta (b, d, M), A (d, N), hold (b, M) -> (b, d, M, N)."""
    w = np.zeros(Delta.shape + (A.shape[1],))
    x_prev = Delta[:, :, :-1, None] * A[None, :, None, :]                          # Δ_{i-1}·A
    q = hold[:, None, 1:, None]
    w[:, :, 1:] = np.exp(Delta[:, :, 1:, None] * A[None, :, None, :]) * hold_sum(q, x_prev)
    return w


def _scan_terms(x, args):
    """The per-token terms of the recurrence h_i = deltaA_i·h_{i-1} + deltaB_u_i: Δ, E,
    deltaA = exp(E·A), the token's own input Δ·B·u, the hold weights w ("hold" only, else
    None) and deltaB_u = Δ_i·B_i·u_i (+ w_i·Δ_{i-1}·B_{i-1}·u_{i-1} under "hold")."""
    dim = x["u"].shape[1]
    coefficients = args.position_map.coefficients(args.alignment)
    Delta = discretized_delta(x["delta"], x["delta_bias"], args.delta_softplus)      # (b, d, M)
    E = effective_delta(Delta, coefficients)                                        # (b, d, M)
    deltaA = np.exp(E[:, :, :, None] * x["A"][None, :, None, :])                    # (b, d, M, N)
    Bd = channel_groups(x["B"], dim)                                                 # (b, d, N, M)
    own = (Delta * x["u"])[:, :, :, None] * Bd.transpose(0, 1, 3, 2)                # (b, d, M, N)
    w = hold_weights(Delta, x["A"], coefficients.hold) if args.alignment == "hold" else None
    deltaB_u = own.copy()
    if w is not None:
        deltaB_u[:, :, 1:] += w[:, :, 1:] * own[:, :, :-1]
    return Delta, E, deltaA, own, w, deltaB_u


def _recurrence(deltaA, deltaB_u):
    """h_{-1} = 0; h_i = deltaA_i·h_{i-1} + deltaB_u_i. Returns every h_i, (b, d, M, N)."""
    h = np.zeros_like(deltaB_u)
    state = np.zeros(deltaB_u.shape[:2] + deltaB_u.shape[3:])
    for i in range(deltaB_u.shape[2]):
        state = deltaA[:, :, i] * state + deltaB_u[:, :, i]
        h[:, :, i] = state
    return h


def hidden_states(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  *, positions=None, seqlen=None, alignment="prev"):
    """Every state h_i of the remaining tokens, float64 (b, d, M, N) (SPEC §1)."""
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    x = _float64_inputs(args)
    _, _, deltaA, _, _, deltaB_u = _scan_terms(x, args)
    return _recurrence(deltaA, deltaB_u)


def _readout(h, x, dim):
    """y_i = Σ_n C_i[n]·h_i[n] + D·u_i; (b, d, M)."""
    Cd = channel_groups(x["C"], dim)                                  # (b, d, N, M)
    y = np.einsum("bdmn,bdnm->bdm", h, Cd)
    if x["D"] is not None:
        y = y + x["D"][None, :, None] * x["u"]
    return y


def _last_state(h, Delta, own, x, args):
    """State at original position seqlen-1: the last h advanced over the t trailing steps
    with the last token's Δ (t = 0 under "none"); under "hold" they also repeat its input:
    + S_t(Δ_{M-1}·A)·Δ_{M-1}·B_{M-1}·u_{M-1}."""
    b, d, _, n = h.shape
    if h.shape[2] == 0:
        return np.zeros((b, d, n))
    steps = args.position_map.coefficients(args.alignment).trailing[:, None, None]     # (b, 1, 1)
    x_last = Delta[:, :, -1, None] * x["A"][None]                                     # Δ_{M-1}·A
    last = np.exp(steps * x_last) * h[:, :, -1]
    if args.alignment == "hold":
        last += hold_sum(steps, x_last) * own[:, :, -1]
    return last


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, positions=None, seqlen=None, alignment="prev"):
    """The position-map selective scan (SPEC §1), computed in float64.

    Args:
        u, delta: (batch, dim, M) the remaining tokens in scan order and their raw timescale.
        A: (dim, N).  B, C: (batch, N, M) or (batch, G, N, M).  D, delta_bias: (dim,) or None.
        z: (batch, dim, M) gate or None.  delta_softplus: apply softplus to delta + bias.
        positions: (batch, M) or (M,) original index of each remaining token, a validated
            ``PositionMap`` (then no seqlen), or None.
        seqlen: length of the unpruned path, or None (each row ends at its last token).
        alignment: "prev" (the paper, Eq. 5/6), "self" (ablation), "none" (relabel) or
            "hold" (ours: pruned steps repeat the previous token's input, ``reference.hold``).

    Returns:
        out (batch, dim, M) float64, and last_state (batch, dim, N) if return_last_state.
    """
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    x = _float64_inputs(args)
    Delta, _, deltaA, own, _, deltaB_u = _scan_terms(x, args)
    h = _recurrence(deltaA, deltaB_u)
    y = _readout(h, x, args.dim)
    out = y * silu(x["z"]) if x["z"] is not None else y
    if return_last_state:
        return out, _last_state(h, Delta, own, x, args)
    return out


def _sum_to_groups(dBC_channels, groups, grouped):
    """(b, d, N, M) per-channel gradient -> (b, G, N, M), or (b, N, M) when B/C came in 3-D."""
    b, d, n, m = dBC_channels.shape
    dBC = dBC_channels.reshape(b, groups, d // groups, n, m).sum(axis=2)
    return dBC if grouped else dBC[:, 0]


def selective_scan_backward(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                            delta_softplus=False, return_last_state=False, *, positions=None,
                            seqlen=None, alignment="prev"):
    """The adjoint of ``selective_scan``: a reverse scan, derived by hand (SPEC §2 oracle 6).

    Args:
        dout: (batch, dim, M) gradient of the output. last_state carries no gradient.
        the rest: as ``selective_scan``.

    Returns:
        (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), float64, each shaped like its input,
        None where the input was None.
    """
    args = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              positions=positions, seqlen=seqlen, alignment=alignment)
    x = _float64_inputs(args)
    dout = np.asarray(dout, dtype=np.float64)
    if dout.shape != x["u"].shape:
        raise ValueError(f"dout must have shape (batch, dim, M) = {x['u'].shape}, got {dout.shape}")
    b, d, m = x["u"].shape
    Delta, E, deltaA, own, w, deltaB_u = _scan_terms(x, args)
    h = _recurrence(deltaA, deltaB_u)
    Bd = channel_groups(x["B"], d).transpose(0, 1, 3, 2)    # (b, d, M, N)
    Cd = channel_groups(x["C"], d).transpose(0, 1, 3, 2)    # (b, d, M, N)

    # Gate: out = y·silu(z).
    dz = None
    if x["z"] is not None:
        y = _readout(h, x, d)
        dz = dout * y * silu_grad(x["z"])
        dy = dout * silu(x["z"])
    else:
        dy = dout

    # Readout: y_i = Σ_n C_i h_i + D u_i.
    du = dy * x["D"][None, :, None] if x["D"] is not None else np.zeros_like(dy)
    dD = (dy * x["u"]).sum(axis=(0, 2)) if x["D"] is not None else None
    dC_channels = (dy[..., None] * h)                                  # (b, d, M, N)

    # Reverse scan: dh_i = dy_i·C_i + deltaA_{i+1}·dh_{i+1}.
    dh = np.zeros((b, d, m, deltaA.shape[-1]))
    carry = np.zeros((b, d, deltaA.shape[-1]))
    for i in reversed(range(m)):
        carry = dy[:, :, i, None] * Cd[:, :, i] + carry
        dh[:, :, i] = carry
        carry = deltaA[:, :, i] * carry
    h_prev = np.concatenate([np.zeros_like(h[:, :, :1]), h[:, :, :-1]], axis=2)
    d_deltaA = dh * h_prev                                             # ∂/∂deltaA_i

    # deltaB_u_i = own_i (+ w_i·own_{i-1} under "hold"), own_i = Δ_i·B_i·u_i: a token's own
    # input reaches h_i directly and, held, h_{i+1}.
    d_own = dh.copy()
    if w is not None:
        d_own[:, :, :-1] += w[:, :, 1:] * dh[:, :, 1:]
    dDelta = (d_own * Bd).sum(axis=-1) * x["u"]
    du += (d_own * Bd).sum(axis=-1) * Delta
    dB_channels = d_own * (Delta * x["u"])[..., None]

    # deltaA_i = exp(E_i·A): dE_i = Σ_n ∂deltaA_i·deltaA_i·A, dA = Σ_{b,i} ∂deltaA_i·deltaA_i·E_i.
    grad_exponent = d_deltaA * deltaA                                  # (b, d, M, N)
    dE = (grad_exponent * x["A"][None, :, None, :]).sum(axis=-1)
    dA = (grad_exponent * E[..., None]).sum(axis=(0, 2))

    # "hold": w_i = exp(Δ_i·A)·S_q(x), x = Δ_{i-1}·A (reference.hold), and dS/dx = T_q(x).
    if w is not None:
        A_ = x["A"][None, :, None, :]
        dw = dh[:, :, 1:] * own[:, :, :-1]                             # ∂/∂w_i, i >= 1
        x_prev = Delta[:, :, :-1, None] * A_
        q = args.position_map.coefficients(args.alignment).hold[:, None, 1:, None]
        e_self = np.exp(Delta[:, :, 1:, None] * A_)
        dw_dx = e_self * hold_sum_grad(q, x_prev)                      # ∂w_i/∂x
        dDelta[:, :, 1:] += (dw * w[:, :, 1:] * A_).sum(axis=-1)        # through exp(Δ_i·A)
        dDelta[:, :, :-1] += (dw * dw_dx * A_).sum(axis=-1)             # through S_q(Δ_{i-1}·A)
        dA += (dw * (w[:, :, 1:] * Delta[:, :, 1:, None] + dw_dx * Delta[:, :, :-1, None])).sum(axis=(0, 2))

    # E_i = coef_self_i·Δ_i + coef_prev_i·Δ_{i-1} (SPEC §1): under "prev" the gap term
    # sends (g_i - 1)·dE_i to token i-1.
    coefficients = args.position_map.coefficients(args.alignment)
    dDelta += coefficients.coef_self[:, None, :] * dE
    dDelta[..., :-1] += coefficients.coef_prev[:, None, 1:] * dE[..., 1:]

    # Δ = softplus(delta + bias) or delta + bias.
    pre = x["delta"] if x["delta_bias"] is None else x["delta"] + x["delta_bias"][None, :, None]
    ddelta = dDelta * softplus_grad(pre) if args.delta_softplus else dDelta
    ddelta_bias = ddelta.sum(axis=(0, 2)) if x["delta_bias"] is not None else None

    groups = args.groups
    dB = _sum_to_groups(dB_channels.transpose(0, 1, 3, 2), groups, args.B_grouped)
    dC = _sum_to_groups(dC_channels.transpose(0, 1, 3, 2), groups, args.C_grouped)
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias
