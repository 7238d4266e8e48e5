// The position-map selective scan (SPEC §1) in CUDA C++: forward and backward kernels,
// templated on the input type T (mamba_ssm's input_t): float, double, __half or
// __nv_bfloat16. u, delta, B, C, z and dout are read in T, and out, du, ddelta, dz, dB and
// dC written in T; A, D, delta_bias and the map's coefficients are the accumulation type
// (mamba_ssm's weight_t: float, double for double inputs), and so are last_state and the
// partials of dA, dD and ddelta_bias (SPEC §1, Precision). Half inputs are widened once per
// load and the state is kept in float: no float copy of an input is ever made.
// Loaded by cuda_kernels/cupy_raw.py through cupy.RawModule, and compiled for the CPU
// against cuda_emu.h by cuda_kernels/cuda_emu.py.
//
// Design, after mamba_ssm's selective_scan_fwd_kernel.cuh:
// - One block per (batch, channel): grid = (dim, batch), SCAN_THREADS threads per block.
//   The channel's sequence is processed in chunks of SCAN_THREADS x SCAN_ITEMS tokens; each
//   thread owns SCAN_ITEMS consecutive tokens of a chunk, so a warp reads 32 x SCAN_ITEMS
//   consecutive elements of u, delta, z, dout and of each B/C row: coalesced loads.
// - The recurrence h_i = a_i·h_{i-1} + b_i is linear, so it is a scan of (a, b) pairs under
//   (a1, b1) ∘ (a0, b0) = (a1·a0, a1·b0 + b1). Per state n a thread composes its items,
//   a block-wide scan (Hillis–Steele in shared memory) gives each thread the pair of
//   everything before it, and the running prefix (the state at the chunk's start) is carried
//   across chunks: long sequences are parallel along L.
// - The gap is fused: a_i = exp(E_i·A[n]) with E_i = coef_self_i·Δ_i + coef_prev_i·Δ_{i-1}
//   (PositionMap.coefficients; has_map = 0 means no map: E_i = Δ_i): one exp per
//   (token, channel, state), whatever the gaps;
//   pruned positions are never visited. Δ_{i-1} of a thread's first item comes from its
//   neighbour through shared memory, or from the previous chunk.
// - Alignment "hold" (reference.hold): a token after a gap also receives its predecessor's
//   input Δ·B·u with weight w_i = exp(Δ_i·A)·S_q(Δ_{i-1}·A), folded into b_i of the pair; the
//   adjoint gives that input dh_i + w_{i+1}·dh_{i+1} (one more exchange between neighbours).
// - Backward: the forward kernel, run first with write_out = 0, saves only the state at the
//   start of every chunk (batch, dim, chunks, N). The backward walks the chunks in reverse,
//   recomputes each chunk's states from its saved start state with the same block scan,
//   and runs the adjoint as a second scan in reverse thread order on the carried quantity
//   G_i = deltaA_i·dh_i (G_{i} = a_i·(G_{i+1} + dy_i·C_i): again a linear pair scan).
//   dA, dD and ddelta_bias are reduced per block (fixed order) and summed over the batch by
//   the caller. dB and dC are deterministic, unlike mamba_ssm's atomicAdds: each block (one
//   channel) writes its own partials dB_part, dC_part (batch, dim, N, M), written once each,
//   and reduce_channels sums the channels of a group in ascending order, so the gradients
//   are the same bits on every run. The cost: 2·batch·dim·N·M accumulators of memory (ViM-S
//   layer, batch 64: 1.24 GB) and one extra pass that writes and reads them.
// - Accumulation is in float for float, __half and __nv_bfloat16 inputs and in double for
//   double inputs.
// - An exploding state overflows as the reference's sequential recurrence does, to ±inf and
//   not to NaN, wherever the sequential order decides it (advance_state).

#ifdef __CUDACC__
// nvcc and NVRTC; on the CPU cuda_emu.h provides the two types and their conversions.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

#ifndef SCAN_THREADS
#define SCAN_THREADS 128   // set by cupy_raw.COMPILE_OPTIONS
#endif
#ifndef SCAN_ITEMS
#define SCAN_ITEMS 4
#endif
#ifndef SCAN_SOFTPLUS_THRESHOLD
#error "SCAN_SOFTPLUS_THRESHOLD must be defined (cupy_raw.COMPILE_OPTIONS takes it from reference.SOFTPLUS_THRESHOLD)"
#endif
#define SCAN_CHUNK (SCAN_THREADS * SCAN_ITEMS)
#define SCAN_MAX_DSTATE 256

template <typename T> struct AccType { typedef float type; };   // float, __half, __nv_bfloat16
template <> struct AccType<double> { typedef double type; };

// An input element in the accumulation type, and a result back in the input type (round to
// nearest even, as mamba_ssm's stores).
__device__ __forceinline__ float load_acc(float x) { return x; }
__device__ __forceinline__ double load_acc(double x) { return x; }
__device__ __forceinline__ float load_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float load_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T store_as(typename AccType<T>::type x);
template <> __device__ __forceinline__ float store_as<float>(float x) { return x; }
template <> __device__ __forceinline__ double store_as<double>(double x) { return x; }
template <> __device__ __forceinline__ __half store_as<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The state a·h + b at the end of a segment of tokens, from the state h at its start, where a
// is the product of the segment's decays exp(E·A) and b its inputs' sum run from a zero state:
// the block scan's composition. The reference runs the recurrence one token at a time, and
// forming a and b first loses three of its IEEE behaviours, which are restored here:
// - a zero state stays zero (0 times one finite decay at a time), while the product a may
//   have overflowed to inf, and inf·0 is NaN;
// - a state that has overflowed to ±inf keeps that infinity through every later token (a
//   positive decay and a finite input cannot undo it), while b, run on its own from zero,
//   may have overflowed the other way, and inf - inf is NaN;
// - when a·h and b both overflow with opposite signs, the exact sum has the sign of the
//   larger, and that is a·h: the earlier state, grown by every decay of the segment, against
//   the segment's own inputs, each grown by only the decays after it. (It is not when the
//   state at the segment's start had nearly cancelled; the sequential order then overflows
//   with b's sign, which no finite-range composition can know.)
template <typename A>
__device__ __forceinline__ A advance_state(A a, A h, A b) {
    if (h == A(0)) return b;
    if (isinf(h)) return a == a ? h : a;       // a > 0 (a product of exps), unless NaN
    const A carried = a * h;
    if (isinf(carried) && isinf(b) && (carried > A(0)) != (b > A(0))) return carried;
    return carried + b;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log1p_acc(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_acc(double x) { return log1p(x); }

template <typename A>
__device__ __forceinline__ A softplus_acc(A x) {
    return x <= A(SCAN_SOFTPLUS_THRESHOLD) ? log1p_acc(exp_acc(x)) : x;   // the mamba kernel's threshold
}

template <typename A>
__device__ __forceinline__ A sigmoid_acc(A x) { return A(1) / (A(1) + exp_acc(-x)); }

__device__ __forceinline__ float expm1_acc(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_acc(double x) { return expm1(x); }
__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

// Alignment "hold" (reference.hold): the q pruned steps of a gap repeat the input of the
// token before it. S_q(x) = Σ_{k<q} exp(k·x) = expm1(q·x)/expm1(x) and T_q(x) = dS_q/dx,
// both without cancellation; the Langevin function L(y) = coth(y) - 1/y is summed as a
// series below |y| = 0.5 (float) / 0.1 (double).
template <typename A> __device__ __forceinline__ A langevin_series_below() { return A(0.5); }
template <> __device__ __forceinline__ double langevin_series_below<double>() { return 0.1; }

template <typename A>
__device__ __forceinline__ A langevin(A y) {
    if ((y < A(0) ? -y : y) < langevin_series_below<A>()) {
        const A y2 = y * y;
        return y * (A(1) / A(3) + y2 * (A(-1) / A(45) + y2 * (A(2) / A(945) + y2 * (A(-1) / A(4725)
                    + y2 * (A(2) / A(93555))))));
    }
    return A(1) / tanh_acc(y) - A(1) / y;
}

template <typename A>
__device__ __forceinline__ A hold_sum(A q, A x) { return x == A(0) ? q : expm1_acc(q * x) / expm1_acc(x); }

template <typename A>
__device__ __forceinline__ A hold_sum_grad(A q, A x) {
    if (x == A(0)) return q * (q - A(1)) / A(2);
    const A qx = q * x;
    if ((qx < A(0) ? -qx : qx) < A(1))
        return hold_sum(q, x) * ((q - A(1)) / A(2) + (q * langevin(qx / A(2)) - langevin(x / A(2))) / A(2));
    const A em1 = expm1_acc(x);
    return (q * exp_acc(qx) * em1 - exp_acc(x) * expm1_acc(qx)) / (em1 * em1);
}

// Exclusive block scan of (a, b) pairs in the order given by rank (0 .. SCAN_THREADS-1).
// On return (a, b) holds the composition of every pair of lower rank ((1, 0) for rank 0)
// and (tot_a, tot_b) the composition of all of them.
template <typename A>
__device__ __forceinline__ void block_scan(A& a, A& b, int rank, A* s_a, A* s_b, A& tot_a, A& tot_b) {
    s_a[rank] = a;
    s_b[rank] = b;
    __syncthreads();
    for (int off = 1; off < SCAN_THREADS; off <<= 1) {
        A pa = A(1), pb = A(0);
        if (rank >= off) { pa = s_a[rank - off]; pb = s_b[rank - off]; }
        __syncthreads();
        if (rank >= off) { b = advance_state(a, pb, b); a = a * pa; }
        s_a[rank] = a;
        s_b[rank] = b;
        __syncthreads();
    }
    tot_a = s_a[SCAN_THREADS - 1];
    tot_b = s_b[SCAN_THREADS - 1];
    A ea = A(1), eb = A(0);
    if (rank > 0) { ea = s_a[rank - 1]; eb = s_b[rank - 1]; }
    __syncthreads();
    a = ea;
    b = eb;
}

// Sum of v over the block (fixed order: a tree in shared memory); valid in every thread.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* s) {
    s[threadIdx.x] = v;
    __syncthreads();
    for (int off = SCAN_THREADS / 2; off > 0; off >>= 1) {
        if (threadIdx.x < off) s[threadIdx.x] += s[threadIdx.x + off];
        __syncthreads();
    }
    A total = s[0];
    __syncthreads();
    return total;
}

// The scan's inputs, shapes and flags, in the one form both kernels take them
// (cuda_kernels/params.py: INPUTS, then dim, dstate, groups, length, then FLAGS). Absent
// optional inputs are null pointers with their flag 0.
#define SCAN_INPUTS(T)                                                                          \
    const T* __restrict__ u, const T* __restrict__ delta,                                       \
    const typename AccType<T>::type* __restrict__ A,                                            \
    const T* __restrict__ B, const T* __restrict__ C,                                           \
    const typename AccType<T>::type* __restrict__ D, const T* __restrict__ z,                   \
    const typename AccType<T>::type* __restrict__ delta_bias,                                   \
    const typename AccType<T>::type* __restrict__ coef_self,                                    \
    const typename AccType<T>::type* __restrict__ coef_prev,                                    \
    const typename AccType<T>::type* __restrict__ hold,                                         \
    const typename AccType<T>::type* __restrict__ trailing,                                     \
    int dim, int dstate, int groups, int length,                                                \
    int use_softplus, int has_D, int has_z, int has_bias, int has_map, int has_hold

// Forward. write_out = 0 computes only chunk_states (the backward's first sweep).
template <typename T>
__global__ void
selective_scan_fwd(SCAN_INPUTS(T), int write_out, int want_last,
                   T* __restrict__ out, typename AccType<T>::type* __restrict__ last_state,
                   typename AccType<T>::type* __restrict__ chunk_states) {
    typedef typename AccType<T>::type acc_t;
    __shared__ acc_t s_a[SCAN_THREADS], s_b[SCAN_THREADS], s_dl[SCAN_THREADS];
    __shared__ acc_t s_hc[SCAN_MAX_DSTATE];
    __shared__ acc_t s_delta_last;
    const int rank = threadIdx.x;
    const int d = blockIdx.x, b = blockIdx.y;
    const int g = d / (dim / groups);
    const long row = ((long)b * dim + d) * length;               // u, delta, z, out
    const long bc_row = ((long)b * groups + g) * dstate;          // B, C: + n, then * length
    const int nchunks = (length + SCAN_CHUNK - 1) / SCAN_CHUNK;
    const acc_t bias = has_bias ? delta_bias[d] : acc_t(0);
    for (int n = rank; n < dstate; n += SCAN_THREADS) s_hc[n] = acc_t(0);
    if (rank == 0) s_delta_last = acc_t(0);
    acc_t delta_carry = acc_t(0);
    __syncthreads();

    for (int c = 0; c < nchunks; ++c) {
        const int first = c * SCAN_CHUNK + rank * SCAN_ITEMS;
        acc_t uv[SCAN_ITEMS], dl[SCAN_ITEMS], E[SCAN_ITEMS], y[SCAN_ITEMS];
        bool valid[SCAN_ITEMS];
#pragma unroll
        for (int j = 0; j < SCAN_ITEMS; ++j) {
            const int i = first + j;
            valid[j] = i < length;
            uv[j] = valid[j] ? load_acc(u[row + i]) : acc_t(0);
            acc_t x = valid[j] ? load_acc(delta[row + i]) + bias : acc_t(0);
            dl[j] = use_softplus ? softplus_acc(x) : x;
            y[j] = has_D ? D[d] * uv[j] : acc_t(0);
        }
        s_dl[rank] = dl[SCAN_ITEMS - 1];
        __syncthreads();
        acc_t prev = rank > 0 ? s_dl[rank - 1] : delta_carry;
        const acc_t dl_before = prev;                        // Δ of the token before this thread's items
        const acc_t u_before = first > 0 && first <= length ? load_acc(u[row + first - 1]) : acc_t(0);
        acc_t q[SCAN_ITEMS];                                 // "hold": pruned steps before each item
#pragma unroll
        for (int j = 0; j < SCAN_ITEMS; ++j) {
            const int i = first + j;
            E[j] = !valid[j] ? acc_t(0)
                 : has_map ? coef_self[(long)b * length + i] * dl[j] + coef_prev[(long)b * length + i] * prev
                 : dl[j];
            q[j] = has_hold && valid[j] ? hold[(long)b * length + i] : acc_t(0);
            prev = dl[j];
            if (i == length - 1) s_delta_last = dl[j];
        }
        delta_carry = s_dl[SCAN_THREADS - 1];
        __syncthreads();

        for (int n = 0; n < dstate; ++n) {
            const acc_t An = A[(long)d * dstate + n];
            const long brow = (bc_row + n) * length;
            acc_t a[SCAN_ITEMS], bb[SCAN_ITEMS];
            acc_t ta = acc_t(1), tb = acc_t(0);
#pragma unroll
            for (int j = 0; j < SCAN_ITEMS; ++j) {
                const int i = first + j;
                a[j] = valid[j] ? exp_acc(E[j] * An) : acc_t(1);
                bb[j] = valid[j] ? dl[j] * uv[j] * load_acc(B[brow + i]) : acc_t(0);
            }
            if (has_hold) {   // + w_i·(Δ·u·B)_{i-1}, w_i = exp(Δ_i·A)·S_q(Δ_{i-1}·A); descending: bb[j-1] still own
#pragma unroll
                for (int j = SCAN_ITEMS - 1; j >= 0; --j) {
                    if (q[j] <= acc_t(0)) continue;
                    const acc_t dlp = j > 0 ? dl[j - 1] : dl_before;
                    // A token's predecessor in an earlier thread or chunk; none before token 0
                    // (its held input is zero, as in the backward), which a map never gives a
                    // gap but hand-built coefficients may.
                    const acc_t own_prev = j > 0 ? bb[j - 1]
                                         : first > 0 ? dl_before * u_before * load_acc(B[brow + first - 1]) : acc_t(0);
                    bb[j] += exp_acc(dl[j] * An) * hold_sum(q[j], dlp * An) * own_prev;
                }
            }
#pragma unroll
            for (int j = 0; j < SCAN_ITEMS; ++j) {
                tb = a[j] * tb + bb[j];
                ta = a[j] * ta;
            }
            const acc_t h_start = s_hc[n];
            if (chunk_states != nullptr && rank == 0)
                chunk_states[(((long)b * dim + d) * nchunks + c) * dstate + n] = h_start;
            acc_t tot_a, tot_b;
            block_scan(ta, tb, rank, s_a, s_b, tot_a, tot_b);
            if (write_out) {
                acc_t h = advance_state(ta, h_start, tb);
#pragma unroll
                for (int j = 0; j < SCAN_ITEMS; ++j) {
                    h = a[j] * h + bb[j];
                    if (valid[j]) y[j] += load_acc(C[brow + first + j]) * h;
                }
            }
            if (rank == 0) s_hc[n] = advance_state(tot_a, h_start, tot_b);
            // s_hc[n] is read again only after the next chunk's __syncthreads.
        }
        if (write_out) {
#pragma unroll
            for (int j = 0; j < SCAN_ITEMS; ++j) {
                const int i = first + j;
                if (!valid[j]) continue;
                acc_t o = y[j];
                if (has_z) {
                    const acc_t zz = load_acc(z[row + i]);
                    o *= zz * sigmoid_acc(zz);
                }
                out[row + i] = store_as<T>(o);
            }
        }
        __syncthreads();
    }
    if (want_last) {
        __syncthreads();
        for (int n = rank; n < dstate; n += SCAN_THREADS) {
            const acc_t steps = has_map ? trailing[b] : acc_t(0);
            const acc_t x = s_delta_last * A[(long)d * dstate + n];
            acc_t value = length > 0 ? exp_acc(steps * x) * s_hc[n] : acc_t(0);
            if (has_hold && length > 0 && steps > acc_t(0))   // the trailing steps repeat the last input
                value += hold_sum(steps, x) * s_delta_last * load_acc(u[row + length - 1])
                         * load_acc(B[(bc_row + n) * length + length - 1]);
            last_state[((long)b * dim + d) * dstate + n] = value;
        }
    }
}

// Backward: gradients of sum(dout · out). Needs chunk_states from selective_scan_fwd with
// write_out = 0. dB_part, dC_part (acc type, batch x dim x N x M): this channel's share of
// dB and dC, every element written exactly once (reduce_channels sums them, in order); so
// is every element of du, ddelta, dz, dA_part, dD_part and dbias_part: none of them needs
// zeroing before the launch.
template <typename T>
__global__ void
selective_scan_bwd(SCAN_INPUTS(T), const T* __restrict__ dout,
                   const typename AccType<T>::type* __restrict__ chunk_states,
                   T* __restrict__ du, T* __restrict__ ddelta, T* __restrict__ dz,
                   typename AccType<T>::type* __restrict__ dB_part, typename AccType<T>::type* __restrict__ dC_part,
                   typename AccType<T>::type* __restrict__ dA_part,
                   typename AccType<T>::type* __restrict__ dD_part,
                   typename AccType<T>::type* __restrict__ dbias_part) {
    typedef typename AccType<T>::type acc_t;
    __shared__ acc_t s_a[SCAN_THREADS], s_b[SCAN_THREADS], s_x[SCAN_THREADS];
    __shared__ acc_t s_gc[SCAN_MAX_DSTATE], s_dA[SCAN_MAX_DSTATE];
    __shared__ acc_t s_held[SCAN_MAX_DSTATE];   // "hold": w·dh of the next chunk's first token
    const int rank = threadIdx.x;
    const int rev = SCAN_THREADS - 1 - rank;
    const int d = blockIdx.x, b = blockIdx.y;
    const int g = d / (dim / groups);
    const long row = ((long)b * dim + d) * length;
    const long bc_row = ((long)b * groups + g) * dstate;
    const long crow = (long)b * length;
    const int nchunks = (length + SCAN_CHUNK - 1) / SCAN_CHUNK;
    const acc_t bias = has_bias ? delta_bias[d] : acc_t(0);
    const acc_t Dd = has_D ? D[d] : acc_t(0);
    for (int n = rank; n < dstate; n += SCAN_THREADS) { s_gc[n] = acc_t(0); s_dA[n] = acc_t(0); s_held[n] = acc_t(0); }
    acc_t dD_acc = acc_t(0), dbias_acc = acc_t(0);
    acc_t owed_next_chunk = acc_t(0);   // what the first token of the chunk after this one sends to dΔ
    __syncthreads();

    for (int c = nchunks - 1; c >= 0; --c) {
        const int first = c * SCAN_CHUNK + rank * SCAN_ITEMS;
        acc_t uv[SCAN_ITEMS], xv[SCAN_ITEMS], dl[SCAN_ITEMS], E[SCAN_ITEMS], dy[SCAN_ITEMS], y[SCAN_ITEMS];
        acc_t s[SCAN_ITEMS], dE[SCAN_ITEMS], q[SCAN_ITEMS], dself[SCAN_ITEMS], howed[SCAN_ITEMS];
        bool valid[SCAN_ITEMS];
#pragma unroll
        for (int j = 0; j < SCAN_ITEMS; ++j) {
            const int i = first + j;
            valid[j] = i < length;
            uv[j] = valid[j] ? load_acc(u[row + i]) : acc_t(0);
            xv[j] = valid[j] ? load_acc(delta[row + i]) + bias : acc_t(0);
            dl[j] = use_softplus ? softplus_acc(xv[j]) : xv[j];
            const acc_t go = valid[j] ? load_acc(dout[row + i]) : acc_t(0);
            if (has_z && valid[j]) {
                const acc_t zz = load_acc(z[row + i]);
                dy[j] = go * zz * sigmoid_acc(zz);
            } else {
                dy[j] = go;
            }
            y[j] = Dd * uv[j];
            s[j] = acc_t(0);
            dE[j] = acc_t(0);
            q[j] = has_hold && valid[j] ? hold[(long)b * length + i] : acc_t(0);
            dself[j] = acc_t(0);     // "hold": the gradient of Δ_i through w_i
            howed[j] = acc_t(0);     // "hold": what w_i sends to Δ_{i-1}
        }
        s_x[rank] = dl[SCAN_ITEMS - 1];
        __syncthreads();
        acc_t prev;
        if (rank > 0) {
            prev = s_x[rank - 1];
        } else if (c > 0) {
            const acc_t xp = load_acc(delta[row + c * SCAN_CHUNK - 1]) + bias;
            prev = use_softplus ? softplus_acc(xp) : xp;
        } else {
            prev = acc_t(0);
        }
        const acc_t dl_before = prev;                        // Δ of the token before this thread's items
        const acc_t u_before = first > 0 && first <= length ? load_acc(u[row + first - 1]) : acc_t(0);
#pragma unroll
        for (int j = 0; j < SCAN_ITEMS; ++j) {
            const int i = first + j;
            E[j] = !valid[j] ? acc_t(0) : has_map ? coef_self[crow + i] * dl[j] + coef_prev[crow + i] * prev : dl[j];
            prev = dl[j];
        }
        __syncthreads();

        for (int n = 0; n < dstate; ++n) {
            const acc_t An = A[(long)d * dstate + n];
            const long brow = (bc_row + n) * length;
            const long prow = (((long)b * dim + d) * dstate + n) * length;   // this channel's partials
            acc_t a[SCAN_ITEMS], bb[SCAN_ITEMS], Bv[SCAN_ITEMS], Cv[SCAN_ITEMS], hp[SCAN_ITEMS];
            acc_t own[SCAN_ITEMS], wgt[SCAN_ITEMS], dhv[SCAN_ITEMS];
            // Recompute this chunk's states from its saved start state.
            acc_t ta = acc_t(1), tb = acc_t(0);
            const acc_t own_before = has_hold && first > 0 && first <= length
                                   ? dl_before * u_before * load_acc(B[brow + first - 1]) : acc_t(0);
#pragma unroll
            for (int j = 0; j < SCAN_ITEMS; ++j) {
                const int i = first + j;
                Bv[j] = valid[j] ? load_acc(B[brow + i]) : acc_t(0);
                Cv[j] = valid[j] ? load_acc(C[brow + i]) : acc_t(0);
                a[j] = valid[j] ? exp_acc(E[j] * An) : acc_t(1);
                own[j] = dl[j] * uv[j] * Bv[j];
                // "hold": w_i = exp(Δ_i·A)·S_q(Δ_{i-1}·A) carries the previous token's own input.
                wgt[j] = q[j] > acc_t(0) ? exp_acc(dl[j] * An) * hold_sum(q[j], (j > 0 ? dl[j - 1] : dl_before) * An)
                                         : acc_t(0);
                bb[j] = own[j] + wgt[j] * (j > 0 ? own[j - 1] : own_before);
                tb = a[j] * tb + bb[j];
                ta = a[j] * ta;
            }
            acc_t tot_a, tot_b;
            block_scan(ta, tb, rank, s_a, s_b, tot_a, tot_b);
            acc_t h = advance_state(ta, chunk_states[(((long)b * dim + d) * nchunks + c) * dstate + n], tb);
#pragma unroll
            for (int j = 0; j < SCAN_ITEMS; ++j) {
                hp[j] = h;                       // h_{i-1}
                h = a[j] * h + bb[j];
                y[j] += Cv[j] * h;
                if (valid[j]) dC_part[prow + first + j] = dy[j] * h;           // this channel's dC_i
            }
            // Adjoint, in reverse thread order: G_i = a_i·(G_{i+1} + dy_i·C_i).
            ta = acc_t(1);
            tb = acc_t(0);
#pragma unroll
            for (int j = SCAN_ITEMS - 1; j >= 0; --j) {
                tb = a[j] * (tb + dy[j] * Cv[j]);
                ta = a[j] * ta;
            }
            const acc_t g_end = s_gc[n];
            block_scan(ta, tb, rev, s_a, s_b, tot_a, tot_b);
            acc_t G = advance_state(ta, g_end, tb);   // G_{i+1} for this thread's last item
#pragma unroll
            for (int j = SCAN_ITEMS - 1; j >= 0; --j) {
                dhv[j] = G + dy[j] * Cv[j];      // dh_i
                G = a[j] * dhv[j];
            }
            // "hold": a token's own input reaches h_i and, held, h_{i+1}: it gets
            // dh_i + w_{i+1}·dh_{i+1}; the next thread's first item (or the next chunk's first
            // token) supplies w·dh for this thread's last one.
            acc_t held = acc_t(0);
            if (has_hold) {
                s_x[rank] = wgt[0] * dhv[0];
                __syncthreads();
                held = rank < SCAN_THREADS - 1 ? s_x[rank + 1] : s_held[n];
                __syncthreads();
                if (rank == 0) s_held[n] = wgt[0] * dhv[0];     // for the previous chunk's last token
            }
            acc_t dA_acc = acc_t(0);
#pragma unroll
            for (int j = SCAN_ITEMS - 1; j >= 0; --j) {
                const acc_t dh = dhv[j];
                const acc_t d_own = dh + held;
                const acc_t t = dh * a[j] * hp[j];
                s[j] += d_own * Bv[j];
                dE[j] += t * An;
                dA_acc += t * E[j];
                if (valid[j]) dB_part[prow + first + j] = d_own * dl[j] * uv[j];
                if (q[j] > acc_t(0)) {       // w_i's gradient to Δ_i, Δ_{i-1} and A (reference.hold)
                    const acc_t dlp = j > 0 ? dl[j - 1] : dl_before;
                    const acc_t dw = dh * (j > 0 ? own[j - 1] : own_before);
                    const acc_t dw_dx = exp_acc(dl[j] * An) * hold_sum_grad(q[j], dlp * An);
                    dself[j] += dw * wgt[j] * An;
                    howed[j] += dw * dw_dx * An;
                    dA_acc += dw * (wgt[j] * dl[j] + dw_dx * dlp);
                }
                held = wgt[j] * dh;
            }
            if (rank == 0) s_gc[n] = advance_state(tot_a, g_end, tot_b);
            const acc_t dA_block = block_sum(dA_acc, s_x);
            if (rank == 0) s_dA[n] += dA_block;
        }

        // Per token: du, dz, and ddelta with what token i+1 sends to token i: the gap term of
        // E_{i+1} ("prev") and the held input's (w_{i+1}, "hold").
        acc_t owed[SCAN_ITEMS];
#pragma unroll
        for (int j = 0; j < SCAN_ITEMS; ++j)
            owed[j] = (has_map && valid[j] ? coef_prev[crow + first + j] * dE[j] : acc_t(0)) + howed[j];
        s_x[rank] = owed[0];
        __syncthreads();
        acc_t owed_after = rank < SCAN_THREADS - 1 ? s_x[rank + 1] : owed_next_chunk;
#pragma unroll
        for (int j = SCAN_ITEMS - 1; j >= 0; --j) {
            const int i = first + j;
            if (valid[j]) {
                acc_t dDelta = s[j] * uv[j] + (has_map ? coef_self[crow + i] * dE[j] : dE[j]) + dself[j];
                if (i + 1 < length) dDelta += owed_after;
                if (use_softplus && xv[j] <= acc_t(SCAN_SOFTPLUS_THRESHOLD)) dDelta *= sigmoid_acc(xv[j]);
                du[row + i] = store_as<T>(dy[j] * Dd + s[j] * dl[j]);
                ddelta[row + i] = store_as<T>(dDelta);
                if (has_z) {
                    const acc_t zz = load_acc(z[row + i]);
                    const acc_t sg = sigmoid_acc(zz);
                    dz[row + i] = store_as<T>(load_acc(dout[row + i]) * y[j] * sg * (acc_t(1) + zz * (acc_t(1) - sg)));
                }
                dD_acc += dy[j] * uv[j];
                dbias_acc += dDelta;
            }
            owed_after = owed[j];
        }
        owed_next_chunk = s_x[0];
        __syncthreads();
    }
    const acc_t dD_total = block_sum(dD_acc, s_a);
    const acc_t dbias_total = block_sum(dbias_acc, s_a);
    if (rank == 0) {
        dD_part[(long)b * dim + d] = dD_total;
        dbias_part[(long)b * dim + d] = dbias_total;
    }
    for (int n = rank; n < dstate; n += SCAN_THREADS)
        dA_part[((long)b * dim + d) * dstate + n] = s_dA[n];
}

// dB, dC of each group (batch, G, N, M) = the sum of its channels' partials (batch, dim, N, M),
// channel by channel in ascending order: the same bits whatever the launch order; summed in
// the accumulation type, written in B's and C's type T, every element once. One thread per
// output element; reads are coalesced along M.
template <typename T>
__global__ void
reduce_channels(const typename AccType<T>::type* __restrict__ part, T* __restrict__ out,
                int batch, int dim, int groups, int dstate, int length) {
    typedef typename AccType<T>::type acc_t;
    const long total = (long)batch * groups * dstate * length;
    const long k = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= total) return;
    const int i = k % length;
    const int n = (k / length) % dstate;
    const int g = (k / ((long)length * dstate)) % groups;
    const int b = k / ((long)length * dstate * groups);
    const int per_group = dim / groups;
    acc_t sum = acc_t(0);
    for (int c = 0; c < per_group; ++c) {
        const int d = g * per_group + c;
        sum += part[(((long)b * dim + d) * dstate + n) * length + i];
    }
    out[k] = store_as<T>(sum);
}
