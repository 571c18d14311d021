// Host emulation of the few CUDA features the kernels use, for CPU-only correctness tests.
//
// tests/test_cuda_backend.py compiles the kernel bodies of csrc/*.cu with g++ and
// -DDRES_HOST_EMULATION (the launchers, which use <<<...>>>, are left out) and runs each block as
// 256 std::threads: __syncthreads is a std::barrier, __shared__ variables are statics (one block runs
// at a time), __shfl_xor_sync exchanges through a static buffer between two barriers (the kernels
// call it uniformly from every thread). Index math, tiling, ragged edges, the vector/scalar load
// paths and the block-level reductions run exactly as written; timing and the memory model do not.
// Never included by nvcc builds.
#pragma once

#ifndef DRES_HOST_EMULATION
#error "host_emulation.h is for the CPU test build only"
#endif

#include <barrier>
#include <cmath>
#include <functional>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace dres_emu {
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 thread_idx;
inline Dim3 block_idx, grid_dim, block_dim;
inline std::barrier<>* block_barrier = nullptr;

inline void sync_threads() { block_barrier->arrive_and_wait(); }

template <typename T>
T shfl_xor(unsigned /*mask*/, T value, int lane_mask) {
  static T exchange[1024];
  const unsigned t = thread_idx.x;
  exchange[t] = value;
  sync_threads();
  const T other = exchange[t ^ static_cast<unsigned>(lane_mask)];
  sync_threads();
  return other;
}

// Runs body() for every thread of every block, one block at a time.
inline void launch(unsigned blocks, unsigned threads, const std::function<void()>& body) {
  grid_dim = {blocks, 1, 1};
  block_dim = {threads, 1, 1};
  for (unsigned b = 0; b < blocks; ++b) {
    block_idx = {b, 0, 0};
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([t, &body] {
        thread_idx = {t, 0, 0};
        body();
      });
    for (auto& th : pool) th.join();
    block_barrier = nullptr;
  }
}
}  // namespace dres_emu

#define threadIdx dres_emu::thread_idx
#define blockIdx dres_emu::block_idx
#define gridDim dres_emu::grid_dim
#define blockDim dres_emu::block_dim
#define __syncthreads() dres_emu::sync_threads()
#define __shfl_xor_sync(mask, value, lane_mask) dres_emu::shfl_xor(mask, value, lane_mask)

namespace dres {
using std::fma;  // float overload for float operands, as on the device
}
