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
// Not emulated: warps (no shuffles or votes), the memory model of a real GPU beyond
// barriers and atomics, streams, launch bounds, dynamic shared memory.
#pragma once

#include <math.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
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
