"""numba.cuda kernels of the position-map selective scan (SPEC §1), forward and backward.

How the work maps to threads, and why:

- One thread per (batch, channel): the recurrence over tokens is sequential per channel,
  while channels are independent. A block holds CH channels of one (batch, group), so every
  thread of a block reads the same B and C rows; grid = (groups x channel blocks, batch).
- Tokens go in tiles of T. Per tile the block stages B and C (T x N, loaded once for all its
  channels) and u, delta, z (CH x T) in shared memory with consecutive threads reading
  consecutive tokens, so global loads are coalesced; outputs are staged the same way and
  written back coalesced. The state h (N values) and the row A[d] live in each thread's
  local memory.
- The gap is fused (SPEC §1, "Cost"): token i advances h by exp(E_i·A) with
  E_i = coef_self_i·Δ_i + coef_prev_i·Δ_{i-1} (``PositionMap.coefficients``), one exp per
  (token, channel, state), whatever the gaps.
- Backward: a first sweep saves the state at the start of every tile (b, d, tiles, N);
  the reverse sweep recomputes each tile's states from its checkpoint and runs the adjoint.
  dB and dC sum over the channels of a block with a shared-memory tree reduction per token
  (no atomics, no warp shuffles: the CUDA simulator has none, and the result is the same
  run to run), then over the blocks of a group, and dA, dD, ddelta_bias over the batch, in
  small kernels that add in a fixed order.

Inputs may be NumPy arrays (copied to the device and back) or device arrays (anything with
``__cuda_array_interface__``: numba, CuPy, torch), which are used in place; device arrays
must already be C-contiguous and in their dtype for the kernels: u, delta, B, C, z and dout
in the storage dtype (``ScanParams.storage``), the others in the compute dtype.

Dtypes (SPEC §1, Precision): float16 inputs are read in place (widened as they are staged)
and out, du, ddelta, dz, dB, dC written in float16; the state and every sum are float32.
bfloat16 is not read here: numba.cuda has no bfloat16 arrays (``__cuda_array_interface__``
has no type string for it) and its simulator no bfloat16 at all, so ``bridges`` converts a
bfloat16 call to float32 once, on the way in (``STORAGE_DTYPES`` says what is read in place).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, types

from alignscan.reference.scan import SOFTPLUS_THRESHOLD

from .params import STREAMED

__all__ = ["forward", "backward", "kernel_functions", "kernel_signatures", "launch_config", "STORAGE_DTYPES"]

# What the kernels read and write in place beyond the compute dtypes (``bridges.dlpack`` asks).
STORAGE_DTYPES = ("float16",)


def launch_config(dstate, per_group, tile=None):
    """(channels per block CH, tokens per tile T): shared memory stays below 48 KiB for N up
    to 256; CH is a power of two (for the tree reduction), no larger than a group needs."""
    ch = 1
    while ch < min(32 if dstate <= 32 else 16, per_group):
        ch *= 2
    if tile is None:
        tile = max(4, min(32, 1024 // dstate))
    return ch, tile


def _is_device(x):
    """A numba device array (real or simulated) or anything with __cuda_array_interface__."""
    return x is not None and (hasattr(x, "copy_to_host") or hasattr(x, "__cuda_array_interface__"))


def _device_view(x):
    """A numba device array over x's memory (zero-copy)."""
    return x if hasattr(x, "copy_to_host") else cuda.as_cuda_array(x)


@functools.lru_cache(maxsize=None)
def kernel_functions(dstate, ch, tile, dtype_name):
    """The Python kernel functions for one (N, CH, T, dtype) specialisation (to cuda.jit or
    to compile_ptx): {"forward", "backward", "reduce_blocks", "reduce_batch"}."""
    NS, CH, T = int(dstate), int(ch), int(tile)
    TP, TNS = T + 1, T * NS     # shared/local array shapes must be compile-time constants
    DT = np.dtype(dtype_name).type
    nbt = types.float32 if dtype_name == "float32" else types.float64
    ZERO, ONE, HALF, THRESH = DT(0.0), DT(1.0), DT(0.5), DT(SOFTPLUS_THRESHOLD)
    # "hold" (reference.hold): the Langevin function's series below this |y| (5 terms: < 1e-8
    # relative in float32 up to 0.5, < 1e-16 in float64 up to 0.1).
    LANGEVIN_SERIES_BELOW = DT(0.1 if dtype_name == "float64" else 0.5)
    L1, L3, L5, L7, L9 = (DT(c) for c in (1 / 3, -1 / 45, 2 / 945, -1 / 4725, 2 / 93555))

    @cuda.jit(device=True, inline=True)
    def softplus(x):
        return math.log1p(math.exp(x)) if x <= THRESH else x

    @cuda.jit(device=True, inline=True)
    def sigmoid(x):
        return ONE / (ONE + math.exp(-x))

    @cuda.jit(device=True, inline=True)
    def langevin(y):
        """coth(y) - 1/y without cancellation near 0."""
        if abs(y) < LANGEVIN_SERIES_BELOW:
            y2 = y * y
            return y * (L1 + y2 * (L3 + y2 * (L5 + y2 * (L7 + y2 * L9))))
        return ONE / math.tanh(y) - ONE / y

    @cuda.jit(device=True, inline=True)
    def hold_sum(q, x):
        """S_q(x) = expm1(q·x)/expm1(x), q at x = 0 (reference.hold)."""
        if x == ZERO:
            return q
        return math.expm1(q * x) / math.expm1(x)

    @cuda.jit(device=True, inline=True)
    def hold_sum_grad(q, x):
        """T_q(x) = dS_q/dx without cancellation (reference.hold)."""
        if x == ZERO:
            return q * (q - ONE) * HALF
        if abs(q * x) < ONE:
            return hold_sum(q, x) * ((q - ONE) * HALF + (q * langevin(q * x * HALF) - langevin(x * HALF)) * HALF)
        em1 = math.expm1(x)
        return (q * math.exp(q * x) * em1 - math.exp(x) * math.expm1(q * x)) / (em1 * em1)

    @cuda.jit(device=True, inline=True)
    def block_channels(u, B):
        """(batch b, group g, first channel c0, channels nch, this thread's channel d, active)."""
        tid = cuda.threadIdx.x
        per_group = u.shape[1] // B.shape[1]
        bpg = (per_group + CH - 1) // CH
        g = cuda.blockIdx.x // bpg
        c0 = g * per_group + (cuda.blockIdx.x % bpg) * CH
        nch = min(CH, (g + 1) * per_group - c0)
        active = tid < nch
        return cuda.blockIdx.y, g, c0, nch, (c0 + tid if active else c0), active

    @cuda.jit(device=True, inline=True)
    def stage_states(src, dst, b, g, t0, tn):
        """dst[t, n] = src[b, g, n, t0 + t] (a B or C tile): consecutive threads, consecutive tokens."""
        for idx in range(cuda.threadIdx.x, NS * T, CH):
            t = idx % T
            if t < tn:
                dst[t, idx // T] = src[b, g, idx // T, t0 + t]

    @cuda.jit(device=True, inline=True)
    def stage_channels(src, dst, b, c0, nch, t0, tn):
        """dst[c, t] = src[b, c0 + c, t0 + t] (a (channels x tokens) tile), coalesced along tokens."""
        for idx in range(cuda.threadIdx.x, CH * T, CH):
            c = idx // T
            t = idx % T
            if c < nch and t < tn:
                dst[c, t] = src[b, c0 + c, t0 + t]

    @cuda.jit(device=True, inline=True)
    def unstage_channels(src, dst, b, c0, nch, t0, tn):
        """dst[b, c0 + c, t0 + t] = src[c, t]: the way back, coalesced along tokens."""
        for idx in range(cuda.threadIdx.x, CH * T, CH):
            c = idx // T
            t = idx % T
            if c < nch and t < tn:
                dst[b, c0 + c, t0 + t] = src[c, t]

    @cuda.jit(device=True, inline=True)
    def sum_over_channels(sRed, out, t):
        """out[n, t] = Σ_c sRed[n, c]: a tree over the block's channels, in a fixed order (no
        atomics, no warp shuffles). Every thread of the block must call it."""
        tid = cuda.threadIdx.x
        cuda.syncthreads()
        step = CH // 2
        while step > 0:
            for idx in range(tid, NS * step, CH):
                n = idx // step
                j = idx % step
                sRed[n, j] += sRed[n, j + step]
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            for n in range(NS):
                out[n, t] = sRed[n, 0]
        cuda.syncthreads()

    @cuda.jit(device=True, inline=True)
    def timescales(x, use_softplus, has_map, coef_self, coef_prev, b, i, Delta_prev):
        """(Δ, E) of token i from its raw delta + bias x (SPEC §1, PositionMap.coefficients);
        without a map E = Δ."""
        Delta = softplus(x) if use_softplus else x
        if not has_map:
            return Delta, Delta
        return Delta, coef_self[b, i] * Delta + coef_prev[b, i] * Delta_prev

    @cuda.jit(device=True, inline=True)
    def step(h, a_row, E, Delta, Delta_prev, du, du_prev, q, sB, B, b, g, t, i):
        """h <- exp(E_i·A)·h + Δ_i·u_i·B_i, in place (SPEC §1); under "hold" (q > 0 pruned steps
        before token i) also + exp(Δ_i·A)·S_q(Δ_{i-1}·A)·Δ_{i-1}·u_{i-1}·B_{i-1}, the input of
        token i-1 held over the gap (reference.hold). B_i is staged in sB[t]; B_{i-1} in
        sB[t - 1], or read from B at a tile's first token."""
        for n in range(NS):
            hn = math.exp(E * a_row[n]) * h[n] + du * sB[t, n]
            if q > ZERO:
                bp = sB[t - 1, n] if t > 0 else DT(B[b, g, n, i - 1])
                hn += math.exp(Delta * a_row[n]) * hold_sum(q, Delta_prev * a_row[n]) * du_prev * bp
            h[n] = hn

    @cuda.jit(device=True, inline=True)
    def advance(h, a_row, x, u_t, use_softplus, has_map, coef_self, coef_prev, has_hold, hold, b, i, Delta_prev,
                du_prev, sB, B, g, t):
        """Token i, in place on h: its (Δ, E) from raw delta + bias x, Δ·u, and the one
        recurrence step (``step``); returns (Δ, E, Δ·u)."""
        Delta, E = timescales(x, use_softplus, has_map, coef_self, coef_prev, b, i, Delta_prev)
        du = Delta * u_t
        # Token 0 has no predecessor whose input could be held: no gap term, whatever the
        # coefficients say (a map never gives it one; hand-built coefficients may).
        q = hold[b, i] if has_hold and i > 0 else ZERO
        step(h, a_row, E, Delta, Delta_prev, du, du_prev, q, sB, B, b, g, t, i)
        return Delta, E, du

    def forward_kernel(u, delta, A, B, C, D, z, bias, coef_self, coef_prev, hold, trailing,
                       use_softplus, has_D, has_z, has_bias, has_map, has_hold, want_last, out, last):
        tid = cuda.threadIdx.x
        M = u.shape[2]
        b, g, c0, nch, d, active = block_channels(u, B)
        sB = cuda.shared.array((T, NS), nbt)
        sC = cuda.shared.array((T, NS), nbt)
        sU = cuda.shared.array((CH, TP), nbt)    # u, then the outputs
        sX = cuda.shared.array((CH, TP), nbt)    # raw delta
        sZ = cuda.shared.array((CH, TP), nbt)
        h = cuda.local.array(NS, nbt)
        a_row = cuda.local.array(NS, nbt)
        for n in range(NS):
            h[n] = ZERO
            a_row[n] = A[d, n]
        bias_d = bias[d] if has_bias else ZERO
        D_d = D[d] if has_D else ZERO
        Delta_prev = ZERO
        du_prev = ZERO                            # Δ·u of the previous token ("hold")
        for t0 in range(0, M, T):
            tn = min(T, M - t0)
            stage_states(B, sB, b, g, t0, tn)
            stage_states(C, sC, b, g, t0, tn)
            stage_channels(u, sU, b, c0, nch, t0, tn)
            stage_channels(delta, sX, b, c0, nch, t0, tn)
            if has_z:
                stage_channels(z, sZ, b, c0, nch, t0, tn)
            cuda.syncthreads()
            if active:
                for t in range(tn):
                    i = t0 + t
                    Delta, E, du = advance(h, a_row, sX[tid, t] + bias_d, sU[tid, t], use_softplus, has_map,
                                           coef_self, coef_prev, has_hold, hold, b, i, Delta_prev, du_prev, sB, B,
                                           g, t)
                    y = ZERO
                    for n in range(NS):
                        y += sC[t, n] * h[n]
                    y += D_d * sU[tid, t]
                    du_prev = du
                    if has_z:
                        y *= sZ[tid, t] * sigmoid(sZ[tid, t])
                    sU[tid, t] = y
                    Delta_prev = Delta
            cuda.syncthreads()
            unstage_channels(sU, out, b, c0, nch, t0, tn)
            cuda.syncthreads()
        if want_last and active:
            for n in range(NS):
                steps = trailing[b] if has_map else ZERO
                decay = math.exp(steps * Delta_prev * a_row[n]) if M > 0 else ZERO
                value = decay * h[n]
                if has_hold and M > 0 and steps > ZERO:
                    value += hold_sum(steps, Delta_prev * a_row[n]) * du_prev * DT(B[b, g, n, M - 1])
                last[b, d, n] = value

    def backward_kernel(u, delta, A, B, C, D, z, bias, coef_self, coef_prev, hold, trailing,
                        use_softplus, has_D, has_z, has_bias, has_map, has_hold, dout, ckpt,
                        du_out, ddelta_out, dz_out, dB_part, dC_part, dA_part, dD_part, dbias_part):
        tid = cuda.threadIdx.x
        blk = cuda.blockIdx.x
        M = u.shape[2]
        b, g, c0, nch, d, active = block_channels(u, B)
        ntiles = (M + T - 1) // T
        sB = cuda.shared.array((T, NS), nbt)
        sC = cuda.shared.array((T, NS), nbt)
        sU = cuda.shared.array((CH, TP), nbt)
        sX = cuda.shared.array((CH, TP), nbt)
        sZ = cuda.shared.array((CH, TP), nbt)     # z, then dz
        sG = cuda.shared.array((CH, TP), nbt)     # dout, then du
        sDd = cuda.shared.array((CH, TP), nbt)    # ddelta
        sRed = cuda.shared.array((NS, CH), nbt)      # per-token reduction over channels
        sOutB = cuda.shared.array((NS, T), nbt)
        sOutC = cuda.shared.array((NS, T), nbt)
        h = cuda.local.array(NS, nbt)
        a_row = cuda.local.array(NS, nbt)
        hs = cuda.local.array(TNS, nbt)           # states of the current tile
        h0 = cuda.local.array(NS, nbt)               # state before the tile
        dh = cuda.local.array(NS, nbt)
        dA_loc = cuda.local.array(NS, nbt)
        held = cuda.local.array(NS, nbt)         # w_{i+1}·dh_{i+1}: token i's input, held ("hold")
        Dl = cuda.local.array(T, nbt)
        El = cuda.local.array(T, nbt)
        for n in range(NS):
            h[n] = ZERO
            a_row[n] = A[d, n]
            dh[n] = ZERO
            dA_loc[n] = ZERO
            held[n] = ZERO
        bias_d = bias[d] if has_bias else ZERO
        D_d = D[d] if has_D else ZERO

        # Sweep 1: forward, keeping the state at the start of every tile.
        Delta_prev = ZERO
        du_prev = ZERO
        for k in range(ntiles):
            t0 = k * T
            tn = min(T, M - t0)
            stage_states(B, sB, b, g, t0, tn)
            stage_channels(u, sU, b, c0, nch, t0, tn)
            stage_channels(delta, sX, b, c0, nch, t0, tn)
            cuda.syncthreads()
            if active:
                for n in range(NS):
                    ckpt[b, d, k, n] = h[n]
                for t in range(tn):
                    i = t0 + t
                    Delta, E, du = advance(h, a_row, sX[tid, t] + bias_d, sU[tid, t], use_softplus, has_map,
                                           coef_self, coef_prev, has_hold, hold, b, i, Delta_prev, du_prev, sB, B,
                                           g, t)
                    Delta_prev = Delta
                    du_prev = du
            cuda.syncthreads()

        # Sweep 2: reverse, tile by tile, recomputing each tile from its checkpoint.
        pending = ZERO       # coef_prev_{i+1}·dE_{i+1}: the "prev" gap term owed to token i
        dD_acc = ZERO
        dbias_acc = ZERO
        for kk in range(ntiles):
            k = ntiles - 1 - kk
            t0 = k * T
            tn = min(T, M - t0)
            stage_states(B, sB, b, g, t0, tn)
            stage_states(C, sC, b, g, t0, tn)
            stage_channels(u, sU, b, c0, nch, t0, tn)
            stage_channels(delta, sX, b, c0, nch, t0, tn)
            stage_channels(dout, sG, b, c0, nch, t0, tn)
            if has_z:
                stage_channels(z, sZ, b, c0, nch, t0, tn)
            cuda.syncthreads()
            Delta_before = ZERO      # Δ and Δ·u of the token before the tile
            du_before = ZERO
            if active:
                if t0 > 0:
                    xp = DT(delta[b, d, t0 - 1]) + bias_d
                    Delta_before = softplus(xp) if use_softplus else xp
                    du_before = Delta_before * DT(u[b, d, t0 - 1])
                Delta_prev = Delta_before
                du_prev = du_before
                for n in range(NS):
                    h0[n] = ckpt[b, d, k, n]
                    h[n] = h0[n]
                for t in range(tn):
                    i = t0 + t
                    Delta, E, du = advance(h, a_row, sX[tid, t] + bias_d, sU[tid, t], use_softplus, has_map,
                                           coef_self, coef_prev, has_hold, hold, b, i, Delta_prev, du_prev, sB, B,
                                           g, t)
                    Dl[t] = Delta
                    El[t] = E
                    for n in range(NS):
                        hs[t * NS + n] = h[n]
                    Delta_prev = Delta
                    du_prev = du
            for tt in range(tn):
                t = tn - 1 - tt
                i = t0 + t
                dy = ZERO
                if active:
                    g_out = sG[tid, t]
                    dy = g_out
                    if has_z:
                        y = D_d * sU[tid, t]
                        for n in range(NS):
                            y += sC[t, n] * hs[t * NS + n]
                        zz = sZ[tid, t]
                        sig = sigmoid(zz)
                        dy = g_out * zz * sig
                        sZ[tid, t] = g_out * y * sig * (ONE + zz * (ONE - sig))
                    dD_acc += dy * sU[tid, t]
                    Delta = Dl[t]
                    E = El[t]
                    dBu = Delta * sU[tid, t]
                    q = hold[b, i] if has_hold and i > 0 else ZERO
                    Delta_p = Dl[t - 1] if t > 0 else Delta_before
                    du_p = Dl[t - 1] * sU[tid, t - 1] if t > 0 else du_before
                    s = ZERO
                    dE = ZERO
                    d_self = ZERO        # "hold": the gradient of Δ_i through w_i
                    hold_owed = ZERO     # "hold": what w_i sends to Δ_{i-1}
                    for n in range(NS):
                        hprev = hs[(t - 1) * NS + n] if t > 0 else h0[n]
                        a = math.exp(E * a_row[n])
                        dhn = dh[n] + dy * sC[t, n]
                        d_own = dhn + held[n]      # own input reaches h_i, and held, h_{i+1}
                        s += d_own * sB[t, n]
                        ge = dhn * hprev * a
                        dE += ge * a_row[n]
                        dA_loc[n] += ge * E
                        sRed[n, tid] = d_own * dBu
                        dh[n] = dhn * a
                        if q > ZERO:   # w_i = exp(Δ_i·A)·S_q(x), x = Δ_{i-1}·A (reference.hold)
                            bp = sB[t - 1, n] if t > 0 else DT(B[b, g, n, i - 1])
                            e_self = math.exp(Delta * a_row[n])
                            weight = e_self * hold_sum(q, Delta_p * a_row[n])
                            dw = dhn * du_p * bp
                            dw_dx = e_self * hold_sum_grad(q, Delta_p * a_row[n])
                            d_self += dw * weight * a_row[n]
                            hold_owed += dw * dw_dx * a_row[n]
                            dA_loc[n] += dw * (weight * Delta + dw_dx * Delta_p)
                            held[n] = weight * dhn
                        else:
                            held[n] = ZERO
                    sG[tid, t] = dy * D_d + s * Delta
                    if has_map:
                        dDelta = s * sU[tid, t] + coef_self[b, i] * dE + pending + d_self
                        pending = coef_prev[b, i] * dE + hold_owed
                    else:
                        dDelta = s * sU[tid, t] + dE
                    if use_softplus:
                        x = sX[tid, t] + bias_d
                        if x <= THRESH:
                            dDelta *= sigmoid(x)
                    sDd[tid, t] = dDelta
                    dbias_acc += dDelta
                else:
                    for n in range(NS):
                        sRed[n, tid] = ZERO
                sum_over_channels(sRed, sOutB, t)        # dB_i = Σ_channels dh·Δ·u
                for n in range(NS):
                    sRed[n, tid] = dy * hs[t * NS + n] if active else ZERO
                sum_over_channels(sRed, sOutC, t)        # dC_i = Σ_channels dy·h_i
            for idx in range(tid, NS * T, CH):
                n = idx // T
                t = idx % T
                if t < tn:
                    dB_part[b, blk, n, t0 + t] = sOutB[n, t]
                    dC_part[b, blk, n, t0 + t] = sOutC[n, t]
            unstage_channels(sG, du_out, b, c0, nch, t0, tn)
            unstage_channels(sDd, ddelta_out, b, c0, nch, t0, tn)
            if has_z:
                unstage_channels(sZ, dz_out, b, c0, nch, t0, tn)
            cuda.syncthreads()
        if active:
            for n in range(NS):
                dA_part[b, d, n] = dA_loc[n]
            dD_part[b, d] = dD_acc
            dbias_part[b, d] = dbias_acc

    def reduce_blocks(part, bpg, out):
        """out[b, g, n, i] = Σ_k part[b, g·bpg + k, n, i], k in order."""
        idx = cuda.grid(1)
        batch, groups, nstate, M = out.shape
        if idx < batch * groups * nstate * M:
            i = idx % M
            n = (idx // M) % nstate
            g = (idx // (M * nstate)) % groups
            b = idx // (M * nstate * groups)
            acc = ZERO
            for k in range(bpg):
                acc += part[b, g * bpg + k, n, i]
            out[b, g, n, i] = acc

    def reduce_batch(part, out):
        """out[x] = Σ_b part[b, x], b in order (part flattened to (batch, X))."""
        x = cuda.grid(1)
        if x < out.shape[0]:
            acc = ZERO
            for b in range(part.shape[0]):
                acc += part[b, x]
            out[x] = acc

    return {"forward": forward_kernel, "backward": backward_kernel,
            "reduce_blocks": reduce_blocks, "reduce_batch": reduce_batch}


def kernel_signatures(dtype_name, storage=None):
    """numba type signatures of every kernel (for ``cuda.compile_ptx`` without a GPU): the
    compute dtype ``dtype_name``, and u, delta, B, C, z, dout and the outputs out, du, ddelta,
    dz, dB, dC in ``storage`` (default: the compute dtype; "float16" for half inputs)."""
    f = types.float32 if dtype_name == "float32" else types.float64
    s = {None: f, "float16": types.float16}.get(storage, f if storage == dtype_name else None)
    if s is None:
        raise ValueError(f"storage must be None, {dtype_name!r} or one of {STORAGE_DTYPES}, got {storage!r}")
    a1, a2, a3, a4 = (types.Array(f, n, "C") for n in (1, 2, 3, 4))
    s3, s4 = types.Array(s, 3, "C"), types.Array(s, 4, "C")
    flag = types.boolean
    return {
        "forward": (s3, s3, a2, s4, s4, a1, s3, a1, a2, a2, a2, a1, flag, flag, flag, flag, flag, flag, flag, s3, a3),
        "backward": (s3, s3, a2, s4, s4, a1, s3, a1, a2, a2, a2, a1, flag, flag, flag, flag, flag, flag, s3, a4,
                     s3, s3, s3, a4, a4, a3, a2, a2),
        "reduce_blocks": (a4, types.int64, s4),
        "reduce_batch": (a2, a1),
    }


@functools.lru_cache(maxsize=None)
def _compiled(dstate, ch, tile, dtype_name):
    return {name: cuda.jit(fn) for name, fn in kernel_functions(dstate, ch, tile, dtype_name).items()}


def _stream(stream):
    if stream is None:
        return cuda.default_stream()
    if isinstance(stream, int):
        return cuda.external_stream(stream) if stream else cuda.default_stream()
    return stream


def _storage(params):
    """The dtype the kernels read the streamed inputs in and write their outputs in: the
    scan's storage dtype when it is one read in place here, else the compute dtype."""
    if params.storage == "bfloat16":
        raise TypeError("numba-cuda cannot read bfloat16 (numba has no bfloat16 arrays): convert u, delta, B, C, z "
                        "to float32 first (bridges.selective_scan_fn does)")
    return np.dtype(params.storage) if params.storage in STORAGE_DTYPES else params.dtype


class _Staging:
    """Moves host inputs to the device (the streamed ones in the storage dtype, the others
    in the compute dtype) and leaves device ones alone."""

    def __init__(self, dtype, storage, stream):
        self.dtype, self.storage, self.stream = dtype, storage, stream
        self.on_host = False

    def dtype_of(self, name):
        return self.storage if name in STREAMED + ("dout",) else self.dtype

    def __call__(self, x, name, shape=None):
        dtype = self.dtype_of(name)
        if x is None:
            return cuda.to_device(np.zeros(shape or (1,), dtype), stream=self.stream)
        if _is_device(x):
            arr = _device_view(x)
            if np.dtype(arr.dtype) != dtype or not arr.is_c_contiguous():
                raise TypeError(f"{name}: device arrays must be C-contiguous {dtype}, "
                                f"got {arr.dtype}{'' if arr.is_c_contiguous() else ' (non-contiguous)'}")
            return arr
        self.on_host = True
        return cuda.to_device(np.ascontiguousarray(x, dtype=dtype), stream=self.stream)


def _inputs(params, stage):
    """The kernels' inputs (``params.INPUTS`` order) on the device, 1-element dummies (z:
    (1, 1, 1); coefficients: (1, 1)) for absent ones, then the flags."""
    shapes = {"z": (1, 1, 1), "coef_self": (1, 1), "coef_prev": (1, 1), "hold": (1, 1)}
    return (*params.inputs(stage, lambda name: stage(None, name, shapes.get(name))), *params.flags())


def _output(given, name, shape, stage, dtype=None):
    """An output in ``dtype`` (default: the storage dtype): ``given`` (checked) or a new one."""
    dtype = stage.storage if dtype is None else dtype
    if given is not None:
        arr = _device_view(given) if _is_device(given) else None
        if arr is None or tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != dtype \
                or not arr.is_c_contiguous():
            raise ValueError(f"{name} must be a C-contiguous {dtype} device array of shape {tuple(shape)}")
        return arr
    return cuda.device_array(shape, dtype=dtype, stream=stage.stream)


def _grid(params, ch):
    return (params.groups * ((params.per_group + ch - 1) // ch), params.batch)


def forward(params, out=None, last_state=None, stream=None, tile=None):
    """Forward of a scan's ``ScanParams``; NumPy in gives NumPy out, device in gives device out.
    ``stream``: a numba stream or a raw CUDA stream handle; ``tile``: tokens per tile (tests)."""
    p, dt = params, params.dtype
    st = _stream(stream)
    stage = _Staging(dt, _storage(p), st)
    inputs = _inputs(p, stage)
    ch, tile = launch_config(p.dstate, p.per_group, tile)
    out_d = _output(out, "out", (p.batch, p.dim, p.length), stage)
    last_d = _output(last_state, "last_state", (p.batch, p.dim, p.dstate), stage, dt) if p.want_last \
        else cuda.device_array((1, 1, 1), dtype=dt, stream=st)
    if p.batch * p.dim:
        k = _compiled(p.dstate, ch, tile, dt.name)["forward"]
        k[_grid(p, ch), ch, st](*inputs, p.want_last, out_d, last_d)
    if stage.on_host and out is None:
        result = out_d.copy_to_host(stream=st)
        last_h = last_d.copy_to_host(stream=st) if p.want_last else None
        st.synchronize()
        return (result, last_h) if p.want_last else result
    return (out_d, last_d) if p.want_last else out_d


def backward(dout, params, grads_out=None, stream=None, tile=None):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); host in gives host out. du, ddelta, dB, dC,
    dz in the storage dtype, dA, dD, ddelta_bias in the compute dtype."""
    p, dt = params, params.dtype
    st = _stream(stream)
    stage = _Staging(dt, _storage(p), st)
    inputs = _inputs(p, stage)
    dout_d = stage(dout, "dout")
    batch, dim, M, N, G = p.batch, p.dim, p.length, p.dstate, p.groups
    ch, tile = launch_config(N, p.per_group, tile)
    grid = _grid(p, ch)
    nblk = grid[0]
    ntiles = (M + tile - 1) // tile
    grads_out = grads_out or {}
    du = _output(grads_out.get("du"), "du", (batch, dim, M), stage)
    ddelta = _output(grads_out.get("ddelta"), "ddelta", (batch, dim, M), stage)
    dz = _output(grads_out.get("dz"), "dz", (batch, dim, M), stage) if p.has_z \
        else cuda.device_array((1, 1, 1), dtype=stage.storage, stream=st)
    ckpt = cuda.device_array((batch, dim, max(ntiles, 1), N), dtype=dt, stream=st)
    dB_part = cuda.device_array((batch, nblk, N, M), dtype=dt, stream=st)
    dC_part = cuda.device_array((batch, nblk, N, M), dtype=dt, stream=st)
    dA_part = cuda.device_array((batch, dim, N), dtype=dt, stream=st)
    dD_part = cuda.device_array((batch, dim), dtype=dt, stream=st)
    dbias_part = cuda.device_array((batch, dim), dtype=dt, stream=st)
    dB = cuda.device_array((batch, G, N, M), dtype=stage.storage, stream=st)
    dC = cuda.device_array((batch, G, N, M), dtype=stage.storage, stream=st)
    dA = cuda.device_array((dim, N), dtype=dt, stream=st)
    dD = cuda.device_array((dim,), dtype=dt, stream=st)
    dbias = cuda.device_array((dim,), dtype=dt, stream=st)
    kernels = _compiled(N, ch, tile, dt.name)
    if batch * dim:
        kernels["backward"][grid, ch, st](*inputs, dout_d, ckpt, du, ddelta, dz, dB_part, dC_part, dA_part, dD_part,
                                          dbias_part)
    threads = 128
    total = batch * G * N * M
    if total:
        blocks = (total + threads - 1) // threads
        kernels["reduce_blocks"][blocks, threads, st](dB_part, nblk // G, dB)
        kernels["reduce_blocks"][blocks, threads, st](dC_part, nblk // G, dC)
    for part, target in ((dA_part.reshape(batch, dim * N), dA.reshape(dim * N)),
                         (dD_part, dD), (dbias_part, dbias)):
        n_out = target.shape[0]
        if n_out:
            kernels["reduce_batch"][(n_out + threads - 1) // threads, threads, st](part, target)
    dB, dC = p.grouped(dB, dC)
    grads = [du, ddelta, dA, dB, dC, dD if p.has_D else None, dz if p.has_z else None,
             dbias if p.has_bias else None]
    if stage.on_host:
        grads = [g.copy_to_host(stream=st) if g is not None else None for g in grads]
        st.synchronize()
    return tuple(grads)
