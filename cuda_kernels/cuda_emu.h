// cuda_emu.h: the CUDA execution model on the CPU, enough of it to compile scan.cu
// unmodified with a host C++20 compiler (g++, clang++) and run it (backend "cuda-emu").
//
// What is emulated, and how:
// - A launch runs a grid of blocks on blockDim real threads (std::thread). Each thread runs
//   every block of the grid in turn, so the threads of one block are truly concurrent and a
//   data race between them is a real race (ThreadSanitizer sees it); blocks run one after
//   another, each closed by a barrier.
// - __syncthreads() is a pthread barrier across the block's threads (a full memory fence,
//   as on the GPU); two barriers used in turn (see syncthreads).
// - __shared__ storage is a function-static variable: shared by the threads of the block
//   that is running, and, since blocks do not overlap in time, private to it. As on the
//   GPU its contents are undefined when a block starts (here: what the last block left).
// - threadIdx / blockIdx are per-thread variables; blockDim / gridDim the launch's.
// - atomicAdd is std::atomic_ref<T>::fetch_add (any order of additions, as on the GPU).
// - __global__ / __device__ / __forceinline__ / __restrict__ map to host C++; the math
//   functions (expf, log1pf, expm1f, ...) are the C library's.
// - __half and __nv_bfloat16 (cuda_fp16.h, cuda_bf16.h) are 16-bit storage types with the
//   conversion intrinsics __half2float, __float2half_rn, __bfloat162float and
//   __float2bfloat16_rn, bit-exact: widening is exact, narrowing rounds to nearest even,
//   overflows to inf, and a NaN becomes the canonical NaN 0x7fff, as the GPU's cvt.rn does.
//   They have no arithmetic and no implicit conversions (scan.cu is compiled with
//   __CUDA_NO_HALF_CONVERSIONS__ and friends on the GPU too), so a kernel that converts any
//   other way does not compile here.
// Not emulated: warps (no shuffles or votes), the memory model of a real GPU beyond
// barriers and atomics, streams, launch bounds, dynamic shared memory.
#pragma once

#include <math.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emu {

inline thread_local dim3 thread_index;
inline thread_local dim3 block_index;
inline dim3 block_dim;
inline dim3 grid_dim;
inline pthread_barrier_t block_barriers[2];
inline thread_local unsigned barrier_round;

// Barrier rounds alternate between two barrier objects. ThreadSanitizer models a barrier as
// one synchronisation object whose clock accumulates over rounds: a thread leaving round k
// late would acquire what a fast thread released on arriving at round k + 1, and so miss a
// race between the fast thread's accesses in between and its own (under load it missed a
// removed __syncthreads a third of the time). With two objects each round synchronises only
// itself: no thread reaches round k + 2 before every thread has left round k.
inline void syncthreads() { pthread_barrier_wait(&block_barriers[barrier_round++ & 1u]); }

// The order blocks run in, and threads start in: grid order, or with
// $ALIGNSCAN_EMU_SHUFFLE_SEED set a permutation drawn from that seed (a GPU runs blocks in
// any order, concurrently: a kernel whose result depends on it shows it here).
inline std::vector<unsigned> launch_order(unsigned n, unsigned salt) {
    std::vector<unsigned> order(n);
    for (unsigned k = 0; k < n; ++k) order[k] = k;
    const char* seed = std::getenv("ALIGNSCAN_EMU_SHUFFLE_SEED");
    if (seed != nullptr && *seed != '\0') {
        std::mt19937 rng(static_cast<unsigned>(std::strtoul(seed, nullptr, 10)) * 2654435761u + salt);
        std::shuffle(order.begin(), order.end(), rng);
    }
    return order;
}

// Runs kernel() for every (block, thread) of the launch: blockDim threads, each walking the
// grid's blocks in the launch order; a barrier after every block keeps blocks from overlapping.
template <typename Kernel>
void launch(dim3 grid, dim3 block, Kernel&& kernel) {
    grid_dim = grid;
    block_dim = block;
    const unsigned nthreads = block.x * block.y * block.z;
    const unsigned nblocks = grid.x * grid.y * grid.z;
    const std::vector<unsigned> blocks = launch_order(nblocks, 1u), starts = launch_order(nthreads, 2u);
    for (auto& barrier : block_barriers) pthread_barrier_init(&barrier, nullptr, nthreads);
    std::vector<std::thread> threads;
    threads.reserve(nthreads);
    for (unsigned t : starts) {
        threads.emplace_back([&, t] {
            thread_index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            barrier_round = 0;
            for (unsigned k : blocks) {
                block_index = dim3(k % grid.x, (k / grid.x) % grid.y, k / (grid.x * grid.y));
                kernel();
                syncthreads();
            }
        });
    }
    for (auto& thread : threads) thread.join();
    for (auto& barrier : block_barriers) pthread_barrier_destroy(&barrier);
}

// cuLaunchKernel's calling convention: params[i] points at the value of argument i.
template <typename... Args, std::size_t... I>
void call_with_params(void (*kernel)(Args...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<Args>*>(params[I])...);
}

template <typename... Args>
int launch_kernel(void (*kernel)(Args...), dim3 grid, dim3 block, void** params) {
    launch(grid, block, [&] { call_with_params(kernel, params, std::index_sequence_for<Args...>{}); });
    return 0;
}

}  // namespace cuda_emu

#define threadIdx (cuda_emu::thread_index)
#define blockIdx (cuda_emu::block_index)
#define blockDim (cuda_emu::block_dim)
#define gridDim (cuda_emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() cuda_emu::syncthreads()

template <typename T>
T atomicAdd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}

// 16-bit floating-point storage (cuda_fp16.h, cuda_bf16.h): the bits and nothing else; the
// layout is the GPU's (2 bytes), so NumPy float16 arrays and bfloat16 bit arrays are read
// in place.
struct __half { std::uint16_t x; };
struct __nv_bfloat16 { std::uint16_t x; };
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage types must be 2 bytes");

inline float __half2float(__half h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h.x & 0x8000u) << 16;
    const std::uint32_t exponent = (h.x >> 10) & 0x1fu, mantissa = h.x & 0x3ffu;
    if (exponent == 0x1fu)                 // inf, NaN (payload kept)
        return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {                   // zero, subnormal: mantissa · 2^-24, exact in float
        const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
        return sign ? -magnitude : magnitude;
    }
    return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float f) {
    std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
    const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
    bits &= 0x7fffffffu;
    if (bits > 0x7f800000u) return __half{0x7fffu};                          // NaN: canonical
    if (bits >= 0x47800000u) return __half{static_cast<std::uint16_t>(sign | 0x7c00u)};  // >= 2^16: inf
    if (bits < 0x38800000u) {
        // Below 2^-14 the result is subnormal (or zero): add 0.5 so that the float adder,
        // which rounds to nearest even, rounds at the half's last place (2^-24), and read the
        // 10 mantissa bits off the bottom.
        const float aligned = std::bit_cast<float>(bits) + 0.5f;
        return __half{static_cast<std::uint16_t>(sign | (std::bit_cast<std::uint32_t>(aligned) - 0x3f000000u))};
    }
    // Normal: rebias the exponent, round the 13 dropped bits to nearest even; a carry out of
    // the mantissa moves to the exponent (and from the largest half to inf), as it should.
    const std::uint32_t odd = (bits >> 13) & 1u;
    bits += 0xc8000fffu + odd;              // (15 - 127) << 23, plus the rounding increment
    return __half{static_cast<std::uint16_t>(sign | (bits >> 13))};
}

inline float __bfloat162float(__nv_bfloat16 b) {
    return std::bit_cast<float>(static_cast<std::uint32_t>(b.x) << 16);    // exact: bfloat16 is float's top half
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fffu};  // NaN: canonical
    // Round the low 16 bits to nearest even; the carry rounds the largest values to inf.
    return __nv_bfloat16{static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16)};
}
