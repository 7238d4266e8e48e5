"""numba ``@njit`` kernels of the position-map selective scan for the CPU (SPEC §1).

Same arguments and semantics as ``reference.selective_scan`` / ``selective_scan_backward``.
float32 inputs compute and accumulate in float32, float64 in float64 (float16 inputs are
computed in float32 by the front door).

How the work is laid out:
- The gap is fused: token i advances the state by exp(E_i·A) with E_i from SPEC §1, so the
  cost is one exp per (token, channel, state), the same as a dense scan of the M tokens.
- B and C are transposed once to (batch, G, M, N) so the innermost loop, over the N
  states, reads contiguous memory and compiles to SIMD (fast_exp is branch-free).
- Forward: ``prange`` over blocks of (batch, channel) pairs; each pair writes only its own
  outputs, so there are no races.
- Backward: ``prange`` over (batch, group) tasks; a task walks its channels in order and is
  the only writer of dB/dC for that (batch, group), so the result is deterministic whatever
  the thread count. It recomputes the forward into a task-local (M, N) buffer and runs the
  reverse scan. dA, dD and ddelta_bias are written per (batch, channel) and summed over the
  batch afterwards in a fixed order. Memory beyond inputs and outputs:
  O(batch·dim·N + threads·M·N) — never a (batch, dim, N, M) temporary.
"""
from __future__ import annotations


import numpy as np
from numba import prange

from reference.arguments import compute_dtype

from ._numba_support import cached_njit, cast_like, fast_exp, sigmoid, softplus, softplus_grad

__all__ = ["forward", "backward"]

_PAIRS_PER_TASK = 16   # (batch, channel) pairs per forward task: amortises the state buffer
_CHANNEL_BLOCK = 32    # channels the backward processes side by side (its SIMD dimension)


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
def _effective_delta_row(Delta, coef_self, coef_prev, E):
    """E_i = coef_self_i·Δ_i + coef_prev_i·Δ_{i-1} (SPEC §1, ``PositionMap.coefficients``)."""
    if Delta.shape[0] and E.shape[0]:
        E[0] = coef_self[0] * Delta[0]
    for i in range(1, E.shape[0]):
        E[i] = coef_self[i] * Delta[i] + coef_prev[i] * Delta[i - 1]


@cached_njit(parallel=True, fastmath={"contract", "reassoc", "nsz", "arcp"})
def _forward_kernel(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, coef_self, coef_prev, trailing,
                    has_D, has_z, has_bias, want_last, out, last_state):
    batch, dim, length = u.shape
    dstate = A.shape[1]
    per_group = dim // Bt.shape[1]
    pairs = batch * dim
    ntasks = (pairs + _PAIRS_PER_TASK - 1) // _PAIRS_PER_TASK
    for task in prange(ntasks):
        h = np.empty(dstate, dtype=u.dtype)
        Delta = np.empty(length, dtype=u.dtype)
        E = np.empty(length, dtype=u.dtype)
        zero = cast_like(0.0, h[0])
        for pair in range(task * _PAIRS_PER_TASK, min(pairs, (task + 1) * _PAIRS_PER_TASK)):
            b, d = pair // dim, pair % dim
            g = d // per_group
            h[:] = 0
            _discretize_row(delta[b, d], delta_bias[d] if has_bias else zero, softplus, Delta)
            _effective_delta_row(Delta, coef_self[b], coef_prev[b], E)
            for i in range(length):
                du = Delta[i] * u[b, d, i]
                y = zero
                for n in range(dstate):
                    hn = fast_exp(E[i] * A[d, n]) * h[n] + du * Bt[b, g, i, n]
                    h[n] = hn
                    y += Ct[b, g, i, n] * hn
                out[b, d, i] = y + D[d] * u[b, d, i] if has_D else y
            if has_z:   # out = y·silu(z), a separate loop over tokens so it vectorises
                for i in range(length):
                    out[b, d, i] *= z[b, d, i] * sigmoid(z[b, d, i])
            if want_last:   # advance over the pruned steps after the last token (SPEC §1)
                for n in range(dstate):
                    decay = fast_exp(trailing[b] * Delta[length - 1] * A[d, n]) if length > 0 else zero
                    last_state[b, d, n] = decay * h[n]


@cached_njit(parallel=True, fastmath={"contract", "reassoc", "nsz", "arcp"})
def _backward_kernel(dout, u, delta, A, Bt, Ct, D, z, delta_bias, softplus, coef_self, coef_prev,
                     has_D, has_z, has_bias, du, ddelta, dz, dBt, dCt, dA_part, dD_part, dbias_part):
    batch, dim, length = u.shape
    dstate = A.shape[1]
    groups = Bt.shape[1]
    per_group = dim // groups
    W = _CHANNEL_BLOCK
    for task in prange(batch * groups):
        b, g = task // groups, task % groups
        # Task-local buffers, (token, [state,] channel of the block): the innermost loops run
        # over the block's channels, long enough to vectorise well.
        H = np.zeros((length + 1, dstate, W), dtype=u.dtype)   # H[i + 1] = h_i, H[0] = 0
        Adec = np.empty((length, dstate, W), dtype=u.dtype)    # deltaA_i = exp(E_i·A)
        Gc = np.empty((dstate, W), dtype=u.dtype)              # carry deltaA_{i+1}·dh_{i+1}
        AT = np.empty((dstate, W), dtype=u.dtype)
        dAT = np.empty((dstate, W), dtype=u.dtype)
        Dl = np.empty((length, W), dtype=u.dtype)              # Δ
        E = np.empty((length, W), dtype=u.dtype)
        U = np.empty((length, W), dtype=u.dtype)
        DU = np.empty((length, W), dtype=u.dtype)              # Δ·u
        DY = np.empty((length, W), dtype=u.dtype)              # dy = dL/dy before the gate
        Y = np.empty((length, W), dtype=u.dtype)
        S = np.empty((length, W), dtype=u.dtype)               # Σ_n dh_i·B_i (gradient of Δ·u)
        dE = np.empty((length, W), dtype=u.dtype)              # gradient of E_i
        row = np.empty(length, dtype=u.dtype)
        row_E = np.empty(length, dtype=u.dtype)
        dBt[b, g] = 0
        dCt[b, g] = 0
        zero = cast_like(0.0, Gc[0, 0])
        one = cast_like(1.0, Gc[0, 0])
        for d0 in range(g * per_group, (g + 1) * per_group, W):
            wc = min(W, (g + 1) * per_group - d0)
            # 1. Gather the block transposed; Δ and E per channel (SPEC §1).
            for w in range(wc):
                d = d0 + w
                _discretize_row(delta[b, d], delta_bias[d] if has_bias else zero, softplus, row)
                _effective_delta_row(row, coef_self[b], coef_prev[b], row_E)
                for i in range(length):
                    Dl[i, w] = row[i]
                    E[i, w] = row_E[i]
                    U[i, w] = u[b, d, i]
                    DU[i, w] = row[i] * u[b, d, i]
                for n in range(dstate):
                    AT[n, w] = A[d, n]
            # 2. dy = dL/dy before the gate (it does not need y), du and dD from the skip.
            for w in range(wc):
                d = d0 + w
                dD_acc = zero
                for i in range(length):
                    dy = dout[b, d, i] * z[b, d, i] * sigmoid(z[b, d, i]) if has_z else dout[b, d, i]
                    DY[i, w] = dy
                    du[b, d, i] = dy * D[d] if has_D else zero
                    dD_acc += dy * U[i, w]
                dD_part[b, d] = dD_acc
            # 3. Recompute the states; y (for dz) and dC_i += dy_i·h_i on the way.
            for i in range(length):
                for w in range(wc):
                    Y[i, w] = D[d0 + w] * U[i, w] if has_D else zero
                for n in range(dstate):
                    for w in range(wc):
                        Adec[i, n, w] = fast_exp(E[i, w] * AT[n, w])
                    bn = Bt[b, g, i, n]
                    cn = Ct[b, g, i, n]
                    acc_C = zero
                    for w in range(wc):
                        hn = Adec[i, n, w] * H[i, n, w] + DU[i, w] * bn
                        H[i + 1, n, w] = hn
                        Y[i, w] += cn * hn
                        acc_C += DY[i, w] * hn
                    dCt[b, g, i, n] += acc_C     # this task alone writes dB, dC of (b, g)
            if has_z:
                for w in range(wc):
                    d = d0 + w
                    for i in range(length):
                        sig = sigmoid(z[b, d, i])
                        dz[b, d, i] = dout[b, d, i] * Y[i, w] * sig * (one + z[b, d, i] * (one - sig))
            # 4. Reverse scan: dh_i = dy_i·C_i + deltaA_{i+1}·dh_{i+1} (as the reference).
            Gc[:, :wc] = 0
            dAT[:, :wc] = 0
            for i in range(length - 1, -1, -1):
                S[i, :wc] = 0
                dE[i, :wc] = 0
                for n in range(dstate):
                    bn = Bt[b, g, i, n]
                    cn = Ct[b, g, i, n]
                    acc_B = zero
                    for w in range(wc):
                        a = Adec[i, n, w]
                        dhn = Gc[n, w] + DY[i, w] * cn
                        t = dhn * a * H[i, n, w]
                        S[i, w] += dhn * bn
                        dE[i, w] += t * AT[n, w]
                        dAT[n, w] += t * E[i, w]
                        acc_B += dhn * DU[i, w]
                        Gc[n, w] = dhn * a
                    dBt[b, g, i, n] += acc_B
            # 5. Per channel: du, ddelta (E_i's coefficients route dE, SPEC §1), dA, ddelta_bias.
            for w in range(wc):
                d = d0 + w
                bias = delta_bias[d] if has_bias else zero
                acc = zero
                for i in range(length):
                    du[b, d, i] += S[i, w] * Dl[i, w]
                    dDelta = S[i, w] * U[i, w] + coef_self[b, i] * dE[i, w]
                    if i + 1 < length:
                        dDelta += coef_prev[b, i + 1] * dE[i + 1, w]   # "prev": E_{i+1} holds Δ_i
                    if softplus:
                        dDelta *= softplus_grad(cast_like(delta[b, d, i] + bias, zero))
                    ddelta[b, d, i] = dDelta
                    acc += dDelta
                dbias_part[b, d] = acc
                for n in range(dstate):
                    dA_part[b, d, n] = dAT[n, w]


def _dummy(dtype):
    return np.zeros(1, dtype=dtype)


def _prepared(args):
    """Inputs in the compute dtype, B/C transposed to (batch, G, M, N), dummies for None."""
    dt = compute_dtype(args.u.dtype)
    c = lambda x: np.ascontiguousarray(x, dtype=dt)
    return dict(
        u=c(args.u), delta=c(args.delta), A=c(args.A),
        Bt=np.ascontiguousarray(np.asarray(args.B, dtype=dt).transpose(0, 1, 3, 2)),
        Ct=np.ascontiguousarray(np.asarray(args.C, dtype=dt).transpose(0, 1, 3, 2)),
        D=c(args.D) if args.D is not None else _dummy(dt),
        z=c(args.z) if args.z is not None else np.zeros((1, 1, 1), dt),
        delta_bias=c(args.delta_bias) if args.delta_bias is not None else _dummy(dt),
        softplus=args.delta_softplus,
    ), dt


def _check_out(arr, name, shape, dtype):
    if arr is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape) or arr.dtype != dtype \
            or not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError(f"{name} must be a writeable C-contiguous {dtype} NumPy array of shape {tuple(shape)}")
    return arr


def _coefficients(args, coefficients, dt):
    """The map's coefficients, or the no-pruning map's when there is none."""
    return coefficients if coefficients is not None else args.position_map.coefficients(args.alignment, dt)


def forward(args, coefficients, out=None, last_state=None, stream=None):
    """Run the forward kernel on validated ``ScanArgs`` and the position map's
    ``GapCoefficients`` in the compute dtype (None: no map).

    ``out`` (batch, dim, M) and ``last_state`` (batch, dim, N) may be given (C-contiguous,
    compute dtype) to be filled in place (``stream`` is ignored: CPU). Returns out, or
    (out, last_state).
    """
    x, dt = _prepared(args)
    batch, dim, length = x["u"].shape
    out = _check_out(out, "out", (batch, dim, length), dt)
    want_last = args.return_last_state
    last = _check_out(last_state, "last_state", (batch, dim, x["A"].shape[1]), dt) if want_last \
        else np.zeros((1, 1, 1), dt)
    coef_self, coef_prev, _, trailing = _coefficients(args, coefficients, dt)
    _forward_kernel(x["u"], x["delta"], x["A"], x["Bt"], x["Ct"], x["D"], x["z"], x["delta_bias"], x["softplus"],
                    coef_self, coef_prev, trailing, args.D is not None, args.z is not None,
                    args.delta_bias is not None, want_last, out, last)
    return (out, last) if want_last else out


def backward(dout, args, coefficients, grads_out=None, stream=None):
    """Run the backward kernel: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), None where the
    input was None. ``grads_out`` may map names ("du", "ddelta", "dz") to arrays to fill."""
    x, dt = _prepared(args)
    batch, dim, length = x["u"].shape
    dstate = x["A"].shape[1]
    groups = x["Bt"].shape[1]
    grads_out = grads_out or {}
    dout = np.ascontiguousarray(dout, dtype=dt)
    du = _check_out(grads_out.get("du"), "du", (batch, dim, length), dt)
    ddelta = _check_out(grads_out.get("ddelta"), "ddelta", (batch, dim, length), dt)
    dz = _check_out(grads_out.get("dz"), "dz", (batch, dim, length), dt) if args.z is not None \
        else np.zeros((1, 1, 1), dt)
    dBt = np.empty((batch, groups, length, dstate), dt)
    dCt = np.empty((batch, groups, length, dstate), dt)
    dA_part = np.empty((batch, dim, dstate), dt)
    dD_part = np.empty((batch, dim), dt)
    dbias_part = np.empty((batch, dim), dt)
    coef_self, coef_prev, _, _ = _coefficients(args, coefficients, dt)
    _backward_kernel(dout, x["u"], x["delta"], x["A"], x["Bt"], x["Ct"], x["D"], x["z"], x["delta_bias"],
                     x["softplus"], coef_self, coef_prev, args.D is not None,
                     args.z is not None, args.delta_bias is not None, du, ddelta, dz, dBt, dCt,
                     dA_part, dD_part, dbias_part)
    dB = dBt.transpose(0, 1, 3, 2)
    dC = dCt.transpose(0, 1, 3, 2)
    dB = np.ascontiguousarray(dB if args.B_grouped else dB[:, 0])
    dC = np.ascontiguousarray(dC if args.C_grouped else dC[:, 0])
    # Sums over the batch in a fixed order: deterministic whatever the thread count.
    dA = dA_part.sum(axis=0)
    dD = dD_part.sum(axis=0) if args.D is not None else None
    dbias = dbias_part.sum(axis=0) if args.delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, (dz if args.z is not None else None), dbias
