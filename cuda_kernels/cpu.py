"""numba ``@njit`` kernels of the position-map selective scan for the CPU (SPEC §1).

Same arguments and semantics as ``reference.selective_scan`` / ``selective_scan_backward``.
float32 inputs compute and accumulate in float32, float64 in float64 (float16 inputs are
computed in float32 by the front door).

How the work is laid out:
- A task is one block of W = 32 channels of one (batch, group): ``prange`` runs the tasks,
  so every core has work at batch 1 too. Inside a task the W channels are processed side by
  side, the innermost loops run over them (the SIMD dimension: fast_exp is branch-free), and
  B_i[n], C_i[n] are read once per token for the whole block. Per-token values (Δ, E, Δ·u,
  ...) are staged token-major in small buffers, a tile or chunk at a time.
- The gap is fused: token i advances the state by exp(E_i·A) with E_i from the position
  map's coefficients (SPEC §1), so the cost is one exp per (token, channel, state) whatever
  the gaps, the same for every alignment; under "hold" a token after a gap also adds the
  input its predecessor leaves behind (w_i·Δ_{i-1}·B_{i-1}·u_{i-1}, ``reference.hold``).
- Backward, checkpointed as scan.cu does on the GPU: a first sweep keeps the state only at
  the start of every chunk of C = 256 tokens (none when the sequence is one chunk); the
  reverse sweep recomputes one chunk at a time from its checkpoint and runs the adjoint.
  Extra memory: O(batch·dim·N·M/C) for checkpoints, one chunk per running task, and
  per-block partial dB/dC (batch·G·blocks·M·N).
- Deterministic whatever the thread count: each task is the only writer of its outputs and
  of its block's partial dB/dC; the partials are summed over the blocks of a group, and dA,
  dD, ddelta_bias over the batch, afterwards, in a fixed order.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._numba_support import (
    HOLD_DIRECT_STEPS,
    cached_njit,
    cast_like,
    compile_notice,
    fast_exp,
    hold_sum,
    hold_sums,
    sigmoid,
    softplus,
    softplus_grad,
)

__all__ = ["forward", "backward", "CHANNEL_BLOCK", "CHUNK"]

CHANNEL_BLOCK = 32   # channels a task processes side by side (the SIMD dimension)
CHUNK = 256          # tokens per tile (forward) and chunk (backward: states are kept only at chunk starts)
_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
# Kernels use NumPy's float error model: Python's adds a zero check to every division, which
# keeps softplus and sigmoid (and so the loops around them) from vectorising (~10x slower).
_KERNEL = dict(fastmath=_FASTMATH, error_model="numpy")


@cached_njit(inline="never")
def _ordered_sum(values, zero):
    """Σ values in index order, from ``zero`` (which sets the type). Compiled without
    fast-math reassociation (and not inlined into the kernels' fast-math code), so a sum
    over tokens does not depend on how the loop around it was vectorised, which was seen
    to vary with where the buffers were allocated."""
    total = zero
    for i in range(values.shape[0]):
        total += values[i]
    return total


@cached_njit(inline="always")
def _discretize_row(delta_row, bias, use_softplus, Delta):
    """Δ_i = softplus(delta_i + bias) or delta_i + bias for one (batch, channel) row.
    Two plain loops (not one with a branch inside) so each compiles to SIMD code."""
    if use_softplus:
        for i in range(delta_row.shape[0]):
            Delta[i] = softplus(cast_like(delta_row[i] + bias, Delta[0]))
    else:
        for i in range(delta_row.shape[0]):
            Delta[i] = cast_like(delta_row[i] + bias, Delta[0])


@cached_njit(inline="always")
def _effective_delta_row(Delta, coef_self, coef_prev, has_map, E):
    """E_i = coef_self_i·Δ_i + coef_prev_i·Δ_{i-1} (SPEC §1, ``PositionMap.coefficients``);
    E = Δ without a map."""
    if not has_map:
        for i in range(E.shape[0]):
            E[i] = Delta[i]
        return
    if E.shape[0]:
        E[0] = coef_self[0] * Delta[0]
    for i in range(1, E.shape[0]):
        E[i] = coef_self[i] * Delta[i] + coef_prev[i] * Delta[i - 1]


@cached_njit(inline="always")
def _gather(b, d0, wc, t0, tn, u, delta, bias, use_softplus, coef_self, coef_prev, has_map, row, row_E,
            Dl, E, U, DU, Dprev, DUprev):
    """Tokens t0..t0+tn of the block, token-major (channel is the SIMD dimension): Δ, E (SPEC
    §1, from the map's coefficients), u, Δ·u; and Δ, Δ·u of the token before t0 (zero at t0 =
    0). Δ and E are computed on contiguous per-channel rows, so softplus vectorises.

    Here and in the backward, arrays are read through views of the chunk indexed by ``range``
    variables only: an index like t0 + t may be negative for all numba knows, so it adds a
    wraparound check that keeps the loop from vectorising (measured: ~20 % of the backward)."""
    zero = cast_like(0.0, Dl[0, 0])
    first = 1 if t0 > 0 else 0          # the row also holds the token before the chunk
    for w in range(wc):
        d = d0 + w
        _discretize_row(delta[b, d, t0 - first:t0 + tn], bias[w], use_softplus, row[:tn + first])
        _effective_delta_row(row[:tn + first], coef_self[b if has_map else 0, t0 - first:t0 + tn],
                             coef_prev[b if has_map else 0, t0 - first:t0 + tn], has_map, row_E[:tn + first])
        Dprev[w] = row[0] if first else zero
        DUprev[w] = row[0] * u[b, d, t0 - 1] if first else zero
        ur, dl, e = u[b, d, t0:t0 + tn], row[first:first + tn], row_E[first:first + tn]
        for t in range(tn):
            Dl[t, w] = dl[t]
            E[t, w] = e[t]
            U[t, w] = ur[t]
            DU[t, w] = dl[t] * ur[t]


@cached_njit(inline="always")
def _held_step(b, g, i, t, wc, q, AT, Dl, DU, Dprev, DUprev, Bt, Hout, weights, scratch):
    """"hold" (reference.hold): Hout += w_i·Δ_{i-1}·u_{i-1}·B_{i-1} for token i (chunk
    position t), w_i = exp(Δ_i·A)·S_q(Δ_{i-1}·A), kept in ``weights`` for the adjoint."""
    for n in range(AT.shape[0]):
        bp = Bt[b, g, i - 1, n]
        for w in range(wc):
            scratch[0, w] = (Dl[t - 1, w] if t > 0 else Dprev[w]) * AT[n, w]
        hold_sums(q, scratch[0, :wc], scratch[1], scratch[2], scratch[3], scratch[4], False)
        for w in range(wc):
            du_prev = DU[t - 1, w] if t > 0 else DUprev[w]
            weight = fast_exp(Dl[t, w] * AT[n, w]) * scratch[3, w]
            weights[n, w] = weight
            Hout[n, w] += weight * du_prev * bp


@cached_njit(inline="always")
def _block_of(task, groups, nblk, per_group):
    """(batch b, group g, block k of the group, first channel d0, channels wc) of a task: a
    block of CHANNEL_BLOCK channels of one (batch, group), the last block of a group partial."""
    b = task // (groups * nblk)
    g = (task // nblk) % groups
    k = task % nblk
    d0 = g * per_group + k * CHANNEL_BLOCK
    return b, g, k, d0, min(CHANNEL_BLOCK, (g + 1) * per_group - d0)


@cached_njit(inline="always")
def _held_token(q, wc, AT, dl, dl_prev, du, du_prev, b_row, b_prev, c_row, H, y):
    """"hold" (reference.hold), a token after a gap of q <= HOLD_DIRECT_STEPS steps, in one
    pass over the states: with a = exp(Δ_i·A) and r = exp(Δ_{i-1}·A),
    h_i = a·(r^q·h_{i-1} + S_q·Δ_{i-1}·u_{i-1}·B_{i-1}) + Δ_i·u_i·B_i,  S_q = Σ_{k<q} r^k,
    the powers of r by multiplication in a fixed number of masked steps, so that the channel
    loop vectorises (two exps per element, where the unfused form takes three); y += C_i·h_i.
    (Keeping exp(Δ_{i-1}·A) from the previous token instead, one exp, measured slower: the
    store it adds to every token costs more than the exp it saves.)"""
    one = cast_like(1.0, H[0, 0])
    zero = cast_like(0.0, H[0, 0])
    if q == 1:        # one pruned step, the commonest gap: r^q = r, S_q = 1
        for n in range(AT.shape[0]):
            bn, bp, cn = b_row[n], b_prev[n], c_row[n]
            for w in range(wc):
                a = fast_exp(dl[w] * AT[n, w])
                r = fast_exp(dl_prev[w] * AT[n, w])
                hn = a * (r * H[n, w] + du_prev[w] * bp) + du[w] * bn
                H[n, w] = hn
                y[w] += cn * hn
        return
    for n in range(AT.shape[0]):
        bn, bp, cn = b_row[n], b_prev[n], c_row[n]
        for w in range(wc):
            a = fast_exp(dl[w] * AT[n, w])
            r = fast_exp(dl_prev[w] * AT[n, w])
            power = one
            total = one
            for k in range(1, HOLD_DIRECT_STEPS):
                take = k < q
                power = power * r if take else power
                total += power if take else zero
            hn = a * (power * r * H[n, w] + total * du_prev[w] * bp) + du[w] * bn
            H[n, w] = hn
            y[w] += cn * hn


@cached_njit(parallel=True, **_KERNEL)
def _forward_kernel(u, delta, A, Bt, Ct, D, z, delta_bias, coef_self, coef_prev, hold, trailing,
                    use_softplus, has_D, has_z, has_bias, has_map, has_hold, want_last, out, last_state):
    """Tasks of one block of W channels of one (batch, group), as the backward: the tokens in
    order, a tile of K at a time, each token's N states advanced for all W channels side by
    side (the SIMD dimension), y accumulated per channel (no reduction across lanes)."""
    batch, dim, M = u.shape
    N = A.shape[1]
    groups = Bt.shape[1]
    per_group = dim // groups
    W = CHANNEL_BLOCK
    K = max(1, min(CHUNK, M))
    nblk = (per_group + W - 1) // W
    for task in prange(batch * groups * nblk):
        b, g, k, d0, wc = _block_of(task, groups, nblk, per_group)
        H = np.empty((N, W), dtype=u.dtype)             # the state h of the last token done
        AT = np.empty((N, W), dtype=u.dtype)
        Dl = np.empty((K, W), dtype=u.dtype)
        E = np.empty((K, W), dtype=u.dtype)
        U = np.empty((K, W), dtype=u.dtype)
        DU = np.empty((K, W), dtype=u.dtype)
        Y = np.empty((K, W), dtype=u.dtype)
        Wh = np.empty((N if has_hold else 1, W), dtype=u.dtype)   # "hold": weights of a long gap's held input
        XS = np.empty((5 if has_hold else 1, W), dtype=u.dtype)
        row = np.empty(K + 1, dtype=u.dtype)
        row_E = np.empty(K + 1, dtype=u.dtype)
        Dprev = np.zeros(W, dtype=u.dtype)
        DUprev = np.zeros(W, dtype=u.dtype)
        bias = np.zeros(W, dtype=u.dtype)
        zero = cast_like(0.0, AT[0, 0])
        for w in range(wc):
            bias[w] = delta_bias[d0 + w] if has_bias else zero
            for n in range(N):
                AT[n, w] = A[d0 + w, n]
                H[n, w] = zero
        tn = 0
        for t0 in range(0, M, K):
            tn = min(K, M - t0)
            Bc, Cc = Bt[b, g, t0:t0 + tn], Ct[b, g, t0:t0 + tn]
            hr = hold[b, t0:t0 + tn] if has_hold else hold[0, :1]
            _gather(b, d0, wc, t0, tn, u, delta, bias, use_softplus, coef_self, coef_prev, has_map, row, row_E,
                    Dl, E, U, DU, Dprev, DUprev)
            for t in range(tn):
                for w in range(wc):
                    Y[t, w] = D[d0 + w] * U[t, w] if has_D else zero
                q = hr[t] if has_hold else zero
                if q > 0 and q <= HOLD_DIRECT_STEPS:    # "hold" after a short gap: one fused pass
                    first = t == 0
                    _held_token(q, wc, AT, Dl[t], Dprev if first else Dl[t - 1], DU[t], DUprev if first else DU[t - 1],
                                Bc[t], Bt[b, g, t0 + t - 1], Cc[t], H, Y[t])
                    continue
                if q > 0:     # "hold" after a long gap: S_q in the float64 closed form (reference.hold)
                    for n in range(N):
                        bn = Bc[t, n]
                        for w in range(wc):
                            H[n, w] = fast_exp(E[t, w] * AT[n, w]) * H[n, w] + DU[t, w] * bn
                    _held_step(b, g, t0 + t, t, wc, q, AT, Dl, DU, Dprev, DUprev, Bt, H, Wh, XS)
                    for n in range(N):
                        cn = Cc[t, n]
                        for w in range(wc):
                            Y[t, w] += cn * H[n, w]
                    continue
                for n in range(N):
                    bn = Bc[t, n]
                    cn = Cc[t, n]
                    for w in range(wc):
                        hn = fast_exp(E[t, w] * AT[n, w]) * H[n, w] + DU[t, w] * bn
                        H[n, w] = hn
                        Y[t, w] += cn * hn
            for w in range(wc):   # out = y, or y·silu(z): per channel, so the gate vectorises
                d = d0 + w
                outr = out[b, d, t0:t0 + tn]
                if has_z:
                    zr = z[b, d, t0:t0 + tn]
                    for t in range(tn):
                        outr[t] = Y[t, w] * zr[t] * sigmoid(zr[t])
                else:
                    for t in range(tn):
                        outr[t] = Y[t, w]
        if want_last:   # the trailing steps after the last token (SPEC §1); held input under "hold"
            steps = trailing[b] if has_map else zero
            for w in range(wc):
                d = d0 + w
                for n in range(N):
                    if M == 0:
                        last_state[b, d, n] = zero
                        continue
                    x = Dl[tn - 1, w] * AT[n, w]
                    value = fast_exp(steps * x) * H[n, w]
                    if has_hold and steps > 0:
                        value += cast_like(hold_sum(steps, x), zero) * DU[tn - 1, w] * Bt[b, g, M - 1, n]
                    last_state[b, d, n] = value


@cached_njit(parallel=True, **_KERNEL)
def _backward_kernel(dout, u, delta, A, Bt, Ct, D, z, delta_bias, coef_self, coef_prev, hold, trailing,
                     use_softplus, has_D, has_z, has_bias, has_map, has_hold, ckpt, du, ddelta, dz, dB_part, dC_part,
                     dA_part, dD_part, dbias_part):
    batch, dim, M = u.shape
    N = A.shape[1]
    groups = Bt.shape[1]
    per_group = dim // groups
    W = CHANNEL_BLOCK
    K = max(1, min(CHUNK, M))        # a chunk's buffers, no larger than the sequence (they must stay in cache)
    nblk = (per_group + W - 1) // W
    nchunks = (M + K - 1) // K
    for task in prange(batch * groups * nblk):
        b, g, k, d0, wc = _block_of(task, groups, nblk, per_group)
        # Task-local buffers, token-major: the innermost loops run over the block's channels.
        H = np.empty((K + 1, N, W), dtype=u.dtype)      # H[t + 1] = h of token t0 + t; H[0] the chunk's start
        Adec = np.empty((K, N, W), dtype=u.dtype)       # deltaA_i = exp(E_i·A)
        Wh = np.empty((K if has_hold else 1, N, W), dtype=u.dtype)   # "hold" weights w_i
        AT = np.empty((N, W), dtype=u.dtype)
        Gc = np.zeros((N, W), dtype=u.dtype)            # carry deltaA_{i+1}·dh_{i+1}
        held = np.zeros((N, W), dtype=u.dtype)          # carry w_{i+1}·dh_{i+1} ("hold")
        DH = np.empty((N, W), dtype=u.dtype)
        dAT = np.zeros((N, W), dtype=u.dtype)
        Dl = np.empty((K, W), dtype=u.dtype)            # Δ
        E = np.empty((K, W), dtype=u.dtype)
        U = np.empty((K, W), dtype=u.dtype)
        DU = np.empty((K, W), dtype=u.dtype)            # Δ·u
        DY = np.empty((K, W), dtype=u.dtype)            # dy = dL/dy before the gate
        Y = np.empty((K, W), dtype=u.dtype)
        S = np.empty((K, W), dtype=u.dtype)             # Σ_n d(own input)_i·B_i: the gradient of Δ·u
        dE = np.empty((K, W), dtype=u.dtype)            # gradient of E_i
        DS = np.zeros((K if has_hold else 1, W), dtype=u.dtype)   # "hold": gradient of Δ_i through w_i
        HO = np.zeros((K if has_hold else 1, W), dtype=u.dtype)   # "hold": what w_i sends to Δ_{i-1}
        XS = np.empty((5 if has_hold else 1, W), dtype=u.dtype)   # "hold": Δ_{i-1}·A, scratch, S_q, T_q
        row = np.empty(K + 1, dtype=u.dtype)
        row_E = np.empty(K + 1, dtype=u.dtype)
        Dprev = np.zeros(W, dtype=u.dtype)
        DUprev = np.zeros(W, dtype=u.dtype)
        carry = np.zeros(W, dtype=u.dtype)              # what the next chunk's first token sends to dΔ
        bias = np.zeros(W, dtype=u.dtype)
        zero = cast_like(0.0, AT[0, 0])
        one = cast_like(1.0, AT[0, 0])
        for w in range(wc):
            bias[w] = delta_bias[d0 + w] if has_bias else zero
            for n in range(N):
                AT[n, w] = A[d0 + w, n]
        # Sweep 1: the state at every chunk start (nothing to do for a single chunk).
        for n in range(N):
            for w in range(wc):
                H[0, n, w] = zero
        for c in range(nchunks):
            for n in range(N):
                for w in range(wc):
                    ckpt[task, c, n, w] = H[0, n, w]
            if c == nchunks - 1:
                break
            t0 = c * K
            _gather(b, d0, wc, t0, K, u, delta, bias, use_softplus, coef_self, coef_prev, has_map, row, row_E,
                    Dl, E, U, DU, Dprev, DUprev)
            for t in range(K):
                i = t0 + t
                for n in range(N):
                    bn = Bt[b, g, i, n]
                    for w in range(wc):
                        H[1, n, w] = fast_exp(E[t, w] * AT[n, w]) * H[0, n, w] + DU[t, w] * bn
                if has_hold and hold[b, i] > 0:
                    _held_step(b, g, i, t, wc, hold[b, i], AT, Dl, DU, Dprev, DUprev, Bt, H[1], Wh[0], XS)
                H[0] = H[1]
        # Sweep 2: the chunks in reverse, each recomputed from its start state.
        for c in range(nchunks - 1, -1, -1):
            t0 = c * K
            tn = min(K, M - t0)
            Bc, Cc = Bt[b, g, t0:t0 + tn], Ct[b, g, t0:t0 + tn]
            dBc, dCc = dB_part[b, g, k, t0:t0 + tn], dC_part[b, g, k, t0:t0 + tn]
            hr = hold[b, t0:t0 + tn] if has_hold else hold[0, :1]
            # 1. The chunk's tokens, transposed; Δ and E per channel (SPEC §1).
            _gather(b, d0, wc, t0, tn, u, delta, bias, use_softplus, coef_self, coef_prev, has_map, row, row_E,
                    Dl, E, U, DU, Dprev, DUprev)
            # 2. dy = dL/dy before the gate (it does not need y).
            for w in range(wc):
                d = d0 + w
                dr = dout[b, d, t0:t0 + tn]
                if has_z:
                    zr = z[b, d, t0:t0 + tn]
                    for t in range(tn):
                        DY[t, w] = dr[t] * zr[t] * sigmoid(zr[t])
                else:
                    for t in range(tn):
                        DY[t, w] = dr[t]
            # 3. Recompute the states from the chunk's start; y (for dz) and dC_i += dy_i·h_i.
            for n in range(N):
                for w in range(wc):
                    H[0, n, w] = ckpt[task, c, n, w]
            for t in range(tn):
                i = t0 + t
                for w in range(wc):
                    Y[t, w] = D[d0 + w] * U[t, w] if has_D else zero
                q = hr[t] if has_hold else zero
                if q > 0:
                    for n in range(N):
                        bn = Bc[t, n]
                        for w in range(wc):
                            a = fast_exp(E[t, w] * AT[n, w])
                            Adec[t, n, w] = a
                            H[t + 1, n, w] = a * H[t, n, w] + DU[t, w] * bn
                    _held_step(b, g, i, t, wc, q, AT, Dl, DU, Dprev, DUprev, Bt, H[t + 1], Wh[t], XS)
                    for n in range(N):
                        cn = Cc[t, n]
                        acc_C = zero
                        for w in range(wc):
                            Y[t, w] += cn * H[t + 1, n, w]
                            acc_C += DY[t, w] * H[t + 1, n, w]
                        dCc[t, n] = acc_C
                    continue
                if has_hold:
                    for n in range(N):
                        for w in range(wc):
                            Wh[t, n, w] = zero
                for n in range(N):
                    for w in range(wc):
                        Adec[t, n, w] = fast_exp(E[t, w] * AT[n, w])
                    bn = Bc[t, n]
                    cn = Cc[t, n]
                    acc_C = zero
                    for w in range(wc):
                        hn = Adec[t, n, w] * H[t, n, w] + DU[t, w] * bn
                        H[t + 1, n, w] = hn
                        Y[t, w] += cn * hn
                        acc_C += DY[t, w] * hn
                    dCc[t, n] = acc_C     # this task alone writes its block's partial
            if has_z:
                for w in range(wc):
                    d = d0 + w
                    dr, zr, dzr = dout[b, d, t0:t0 + tn], z[b, d, t0:t0 + tn], dz[b, d, t0:t0 + tn]
                    for t in range(tn):
                        sig = sigmoid(zr[t])
                        dzr[t] = dr[t] * Y[t, w] * sig * (one + zr[t] * (one - sig))
            # 4. Reverse scan: dh_i = dy_i·C_i + deltaA_{i+1}·dh_{i+1} (as the reference); a
            #    token's own input Δ·B·u reaches h_i and, held, h_{i+1} ("hold").
            for t in range(tn - 1, -1, -1):
                i = t0 + t
                S[t, :wc] = 0
                dE[t, :wc] = 0
                # The same loop twice: without "hold" it needs neither `held` nor DH, and one
                # loop with has_hold tests inside ran the whole backward ~15 % slower (ViM-S
                # layer, 1 thread, measured).
                if not has_hold:
                    for n in range(N):
                        bn = Bc[t, n]
                        cn = Cc[t, n]
                        acc_B = zero
                        for w in range(wc):
                            a = Adec[t, n, w]
                            dhn = Gc[n, w] + DY[t, w] * cn
                            grad_a = dhn * a * H[t, n, w]
                            S[t, w] += dhn * bn
                            dE[t, w] += grad_a * AT[n, w]
                            dAT[n, w] += grad_a * E[t, w]
                            acc_B += dhn * DU[t, w]
                            Gc[n, w] = dhn * a
                        dBc[t, n] = acc_B
                    continue
                for n in range(N):
                    bn = Bc[t, n]
                    cn = Cc[t, n]
                    acc_B = zero
                    for w in range(wc):
                        a = Adec[t, n, w]
                        dhn = Gc[n, w] + DY[t, w] * cn
                        d_own = dhn + held[n, w]
                        grad_a = dhn * a * H[t, n, w]
                        S[t, w] += d_own * bn
                        dE[t, w] += grad_a * AT[n, w]
                        dAT[n, w] += grad_a * E[t, w]
                        acc_B += d_own * DU[t, w]
                        Gc[n, w] = dhn * a
                        DH[n, w] = dhn
                    dBc[t, n] = acc_B
                # w_i = exp(Δ_i·A)·S_q(x), x = Δ_{i-1}·A (reference.hold): its gradient goes to
                # Δ_i (DS), to Δ_{i-1} (HO) and to A; and w_i·dh_i to token i-1's own input.
                q = hr[t]
                DS[t, :wc] = 0
                HO[t, :wc] = 0
                for n in range(N):
                    if q <= 0:
                        for w in range(wc):
                            held[n, w] = zero
                        continue
                    bp = Bt[b, g, i - 1, n]
                    for w in range(wc):
                        XS[0, w] = (Dl[t - 1, w] if t > 0 else Dprev[w]) * AT[n, w]
                    hold_sums(q, XS[0, :wc], XS[1], XS[2], XS[3], XS[4], True)
                    for w in range(wc):
                        dl_prev = Dl[t - 1, w] if t > 0 else Dprev[w]
                        du_prev = DU[t - 1, w] if t > 0 else DUprev[w]
                        weight = Wh[t, n, w]
                        dw = DH[n, w] * du_prev * bp
                        dw_dx = fast_exp(Dl[t, w] * AT[n, w]) * XS[4, w]
                        DS[t, w] += dw * weight * AT[n, w]
                        HO[t, w] += dw * dw_dx * AT[n, w]
                        dAT[n, w] += dw * (weight * Dl[t, w] + dw_dx * dl_prev)
                        held[n, w] = weight * DH[n, w]
            # 5. Per channel: du, ddelta (E_i's coefficients and w_i route the gradients of
            #    Δ_{i-1}, SPEC §1), dD, ddelta_bias; the next chunk's first token sent `carry`.
            cs = coef_self[b if has_map else 0, t0:t0 + tn] if has_map else coef_self[0, :1]
            cp = coef_prev[b if has_map else 0, t0:t0 + tn] if has_map else coef_prev[0, :1]
            for w in range(wc):
                d = d0 + w
                xr, dur, ddr = delta[b, d, t0:t0 + tn], du[b, d, t0:t0 + tn], ddelta[b, d, t0:t0 + tn]
                Dd = D[d] if has_D else zero
                for t in range(tn):
                    dur[t] = DY[t, w] * Dd + S[t, w] * Dl[t, w]
                    dDelta = S[t, w] * U[t, w] + (cs[t] * dE[t, w] if has_map else dE[t, w])
                    if t + 1 < tn:
                        if has_map:
                            dDelta += cp[t + 1] * dE[t + 1, w]   # "prev": E_{i+1} holds Δ_i
                        if has_hold:
                            dDelta += HO[t + 1, w]
                    else:
                        dDelta += carry[w]
                    if has_hold:
                        dDelta += DS[t, w]
                    if use_softplus:
                        dDelta *= softplus_grad(cast_like(xr[t] + bias[w], zero))
                    ddr[t] = dDelta
                    row[t] = DY[t, w] * U[t, w]
                dD_acc = _ordered_sum(row[:tn], zero)     # in token order, whatever the vectoriser does
                dbias_acc = _ordered_sum(ddr, zero)
                carry[w] = (cp[0] * dE[0, w] if has_map else zero) + (HO[0, w] if has_hold else zero)
                if c == nchunks - 1:
                    dD_part[b, d] = dD_acc
                    dbias_part[b, d] = dbias_acc
                else:
                    dD_part[b, d] += dD_acc
                    dbias_part[b, d] += dbias_acc
        for w in range(wc):
            for n in range(N):
                dA_part[b, d0 + w, n] = dAT[n, w]
        if nchunks == 0:
            for w in range(wc):
                dD_part[b, d0 + w] = zero
                dbias_part[b, d0 + w] = zero


@cached_njit(parallel=True, **_KERNEL)
def _sum_blocks(part, out):
    """out[b, g, i, n] = Σ_k part[b, g, k, i, n], k in order (deterministic)."""
    batch, groups, nblk, M, N = part.shape
    for task in prange(batch * groups):
        b, g = task // groups, task % groups
        for i in range(M):
            for n in range(N):
                acc = part[b, g, 0, i, n]
                for k in range(1, nblk):
                    acc += part[b, g, k, i, n]
                out[b, g, i, n] = acc


def _prepared(params):
    """The kernels' inputs (``ScanParams.INPUTS`` order) in the compute dtype: B/C transposed
    to (batch, G, M, N) so a token's states are contiguous, small dummies for absent ones."""
    dt = params.dtype

    def convert(x, name):
        if name in ("B", "C"):
            return np.ascontiguousarray(np.asarray(x, dtype=dt).transpose(0, 1, 3, 2))
        return np.ascontiguousarray(x, dtype=dt)

    shapes = {"z": (1, 1, 1), "coef_self": (1, 1), "coef_prev": (1, 1), "hold": (1, 1)}
    return params.inputs(convert, lambda name: np.zeros(shapes.get(name, (1,)), dt))


def _check_out(arr, name, shape, dtype):
    """An output array to fill, or a new one. Writability is the front door's one rule
    (``cuda_kernels._check_writeable``); this checks what this backend's layout needs."""
    if arr is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape) or arr.dtype != dtype \
            or not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {dtype} NumPy array of shape {tuple(shape)}")
    return arr


def _tasks(args):
    per_group = args.dim // args.groups
    return args.batch * args.groups * (-(-per_group // CHANNEL_BLOCK)), -(-per_group // CHANNEL_BLOCK)


def forward(params, out=None, last_state=None, stream=None):
    """Run the forward kernel on a scan's ``ScanParams``.

    ``out`` (batch, dim, M) and ``last_state`` (batch, dim, N) may be given (C-contiguous,
    compute dtype) to be filled in place (``stream`` is ignored: CPU). Returns out, or
    (out, last_state).
    """
    p, dt = params, params.dtype
    inputs = _prepared(p)
    out = _check_out(out, "out", (p.batch, p.dim, p.length), dt)
    last = _check_out(last_state, "last_state", (p.batch, p.dim, p.dstate), dt) if p.want_last \
        else np.zeros((1, 1, 1), dt)
    with compile_notice(_forward_kernel, "forward"):
        _forward_kernel(*inputs, *p.flags(), p.want_last, out, last)
    return (out, last) if p.want_last else out


def backward(dout, params, grads_out=None, stream=None):
    """Run the backward kernel: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), None where the
    input was None. ``grads_out`` may map names ("du", "ddelta", "dz") to arrays to fill."""
    p, dt = params, params.dtype
    inputs = _prepared(p)
    batch, dim, length, dstate, groups = p.batch, p.dim, p.length, p.dstate, p.groups
    ntasks, nblk = _tasks(p)
    grads_out = grads_out or {}
    dout = np.ascontiguousarray(dout, dtype=dt)
    du = _check_out(grads_out.get("du"), "du", (batch, dim, length), dt)
    ddelta = _check_out(grads_out.get("ddelta"), "ddelta", (batch, dim, length), dt)
    dz = _check_out(grads_out.get("dz"), "dz", (batch, dim, length), dt) if p.has_z else np.zeros((1, 1, 1), dt)
    dBt = np.empty((batch, groups, length, dstate), dt)
    dCt = np.empty((batch, groups, length, dstate), dt)
    # One block per group: the block's partial is the result; else partials, summed in order.
    dB_part = dBt[:, :, None] if nblk == 1 else np.empty((batch, groups, nblk, length, dstate), dt)
    dC_part = dCt[:, :, None] if nblk == 1 else np.empty((batch, groups, nblk, length, dstate), dt)
    # The state at every chunk start (the kernel's chunk: CHUNK tokens, fewer for short sequences).
    ckpt = np.empty((ntasks, -(-length // max(1, min(CHUNK, length))), dstate, CHANNEL_BLOCK), dt)
    dA_part = np.empty((batch, dim, dstate), dt)
    dD_part = np.empty((batch, dim), dt)
    dbias_part = np.empty((batch, dim), dt)
    with compile_notice(_backward_kernel, "backward"):
        _backward_kernel(dout, *inputs, *p.flags(), ckpt, du, ddelta, dz, dB_part, dC_part, dA_part, dD_part,
                         dbias_part)
    if nblk > 1:
        _sum_blocks(dB_part, dBt)
        _sum_blocks(dC_part, dCt)
    dB, dC = p.grouped(dBt.transpose(0, 1, 3, 2), dCt.transpose(0, 1, 3, 2))
    # Sums over the batch in a fixed order: deterministic whatever the thread count.
    dA = dA_part.sum(axis=0)
    dD = dD_part.sum(axis=0) if p.has_D else None
    dbias = dbias_part.sum(axis=0) if p.has_bias else None
    return du, ddelta, dA, np.ascontiguousarray(dB), np.ascontiguousarray(dC), dD, (dz if p.has_z else None), dbias
