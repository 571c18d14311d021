// The fixed-order reductions at the end of reconstruction_loss (csrc/reconstruction_loss.cu): per-sample
// sums of the column blocks' partial sums, then the total. Plain loops in a fixed order: no atomics.
#pragma once

#include "elem.cuh"

namespace dres {
namespace {

constexpr int kRowSumRows = 32;    // rows of per_sample per block of the row-sum kernel
constexpr int kRowSumGroups = 8;   // partial-block groups summed in parallel per row
constexpr int kTotalThreads = 256;

// per_sample[k] = sum over b < blocks of partials[b, k]: each of kRowSumGroups warps sums the
// blocks b = group, group + kRowSumGroups, ... in order, then one thread adds the groups in order.
template <typename Acc>
__global__ void __launch_bounds__(kRowSumRows * kRowSumGroups)
row_sum_kernel(const Acc* partials, int64_t blocks, int64_t K, Acc* per_sample) {
  __shared__ Acc group_sums[kRowSumGroups][kRowSumRows];
  const int lane = threadIdx.x % kRowSumRows, group = threadIdx.x / kRowSumRows;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kRowSumRows + lane;
  Acc sum = Acc(0);
  if (k < K)
    for (int64_t b = group; b < blocks; b += kRowSumGroups) sum += partials[b * K + k];
  group_sums[group][lane] = sum;
  __syncthreads();
  if (group == 0 && k < K) {
    Acc total = Acc(0);
#pragma unroll
    for (int g = 0; g < kRowSumGroups; ++g) total += group_sums[g][lane];
    per_sample[k] = total;
  }
}

// loss[0] = (sum_k per_sample[k]) / divisor with a fixed-order tree; one block.
template <typename Acc>
__global__ void __launch_bounds__(kTotalThreads)
total_kernel(const Acc* per_sample, int64_t K, Acc divisor, Acc* loss) {
  __shared__ Acc sums[kTotalThreads];
  Acc sum = Acc(0);
  for (int64_t k = threadIdx.x; k < K; k += kTotalThreads) sum += per_sample[k];
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kTotalThreads / 2; width > 0; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss[0] = sums[0] / divisor;
}

}  // namespace
}  // namespace dres
