// spline_mix: out (M, d) = W (M, K) @ x (K, d), mixing along the batch axis.
//
// One block per (row tile of W, column tile of x); blocks are numbered row tile fastest, so the
// blocks sharing a column tile of x run together and all but the first read it from L2. x is read
// once from DRAM and out written once; W chunks live in shared memory. Accumulation in Acc (float32,
// float64 for float64), results converted to x's dtype once, at the store. The tile is wide or narrow by d
// (tile_gemm.cuh: d < 128, or 64 for float64, takes 32-column tiles); W^T is read in place.
#include "dres_kernels.h"
#include "tile_gemm.cuh"

#include <climits>
#include <type_traits>

namespace dres {
namespace {

// Blocks per multiprocessor the register budget is set for (launch bounds): one for the wide float tile,
// whose two-level summation (tile_gemm.cuh) holds a second TM x TD tile (at two blocks ptxas caps the
// kernel at 128 registers, which the accumulator and its partial sum, 128 floats, alone would fill: it
// spills 724-1076 bytes); two for the wide float64 tile; three for the narrow tiles (at most 80
// registers, no spills), so that a block's prologue overlaps the other blocks' multiply-adds.
template <class C>
constexpr int kSplineMixBlocksPerSm =
    kIsNarrow<C> ? 3 : std::is_same<typename C::Acc, float>::value ? 1 : 2;

// C: the tile (tile_gemm.cuh; wide or narrow by d). kWeightsTransposed: the weights are the transpose of a
// contiguous (K, M) matrix (backward passes W^T as a view), read in place by the transposed loader: no copy.
template <typename T, class C, bool kWeightsTransposed>
__global__ void __launch_bounds__(256, kSplineMixBlocksPerSm<C>)
spline_mix_kernel(const typename Elem<T>::Acc* weights, const T* x, T* out, int64_t M, int64_t K,
                  int64_t d, int64_t x_stride_k, int64_t x_stride_d, int64_t num_row_tiles,
                  bool x_vec_ok, bool out_vec_ok) {
  using Acc = typename Elem<T>::Acc;
  __shared__ SmemTiles<C> smem;

  const int tid = threadIdx.x;
  const int tx = tid % C::NTX, ty = tid / C::NTX;
  const int64_t block = blockIdx.x;
  const int64_t m0 = (block % num_row_tiles) * C::BM;
  const int64_t col0 = (block / num_row_tiles) * C::BD;

  ALoader<C, kWeightsTransposed> a_loader(weights, /*lda=*/kWeightsTransposed ? M : K, /*rows=*/M, /*depth=*/K, m0);
  BLoader<T, C> b_loader(x, x_stride_k, x_stride_d, /*depth=*/K, /*cols=*/d, col0, x_vec_ok);
  Acc acc[C::TM][C::TD];
  zero_and_gemm_tile<C, false>(a_loader, b_loader, K, smem, tx, ty, acc);
  store_tile<T, C>(acc, out, m0, M, col0, d, out_vec_ok, tx, ty);
}

#ifndef DRES_HOST_EMULATION  // launchers: nvcc only
template <typename T, class C>
cudaError_t launch(const void* weights, bool weights_transposed, const void* x, void* out, int64_t M, int64_t K,
                   int64_t d, int64_t x_stride_k, int64_t x_stride_d, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  if (M <= 0 || d <= 0) return cudaSuccess;  // nothing to write
  if (K < 0) return cudaErrorInvalidValue;
  const int64_t row_tiles = (M + C::BM - 1) / C::BM;
  const int64_t col_tiles = (d + C::BD - 1) / C::BD;
  const int64_t blocks = row_tiles * col_tiles;
  // 32-bit index math inside the kernels: weights and the reduction depth must fit.
  if (blocks > INT_MAX || M * K >= INT_MAX || K >= INT_MAX - C::BK) return cudaErrorInvalidValue;

  constexpr int kVec = 16 / sizeof(T);
  const bool x_vec_ok = x_stride_d == 1 && x_stride_k % kVec == 0 && is_aligned(x, 16);
  constexpr int kHalf = C::TD / 2;
  const bool out_vec_ok = d % kHalf == 0 && is_aligned(out, sizeof(Pack<T, kHalf>));

  auto kernel = weights_transposed ? spline_mix_kernel<T, C, true> : spline_mix_kernel<T, C, false>;
  kernel<<<static_cast<unsigned>(blocks), C::THREADS, 0, stream>>>(
      static_cast<const Acc*>(weights), static_cast<const T*>(x), static_cast<T*>(out), M, K, d,
      x_stride_k, x_stride_d, row_tiles, x_vec_ok, out_vec_ok);
  return cudaGetLastError();
}

#endif  // DRES_HOST_EMULATION
}  // namespace
}  // namespace dres
#ifndef DRES_HOST_EMULATION

extern "C" cudaError_t dres_spline_mix(const void* weights, int weights_transposed, const void* x, void* out,
                                       int64_t M, int64_t K, int64_t d, int64_t x_stride_k,
                                       int64_t x_stride_d, DresDType dtype, cudaStream_t stream) {
  return dres::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dres::with_tile<typename dres::Elem<T>::Acc>(d, [&](auto tile) {
      using C = typename decltype(tile)::type;
      return dres::launch<T, C>(weights, weights_transposed != 0, x, out, M, K, d, x_stride_k, x_stride_d, stream);
    });
  });
}
#endif  // DRES_HOST_EMULATION
