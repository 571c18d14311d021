// reconstruction_loss: r = y - D @ y_coded, per-sample sums of r^2, loss and (optionally) gradients.
//
//   y (K, d), y_coded (N, d), D (K, N) in the compute type Acc.
//   per_sample[k] = sum_j r[k, j]^2;   loss = sum_k per_sample[k] / (K d)  (mean), sum (sum),
//   per_sample (none).  Gradients for an incoming gradient of 1:
//     grad_y = c r,  c = 2 / (K d) (mean) or 2 (sum, none);
//     grad_y_coded = -D^T grad_y  (mean and sum; for none it depends on the per-sample incoming
//     gradient and is computed by the caller with spline_mix).
//
// Kernel 1 (persistent grid of col_blocks x row_groups blocks, one BD-column tile at a time per block):
//   for each row tile of D owned by the block's row group: acc = y[rows, tile], then acc -= D[rows] @
//   y_coded[:, tile] (tile GEMM with negated products), so acc ends as r; per-row partial sums of r^2
//   reduced across the threads sharing a row (fixed shuffle tree), added to the
//   column block's own row of `partials` (column block b owns partials[b, :], split by rows among its
//   row groups: no atomics); grad_y = c r written.
//   Then (one row group only) for each row tile of D^T: grad_y_coded[:, tile] = -(D^T @ grad_y[:, tile]),
//   reading back the grad_y tile this block has just written (L2-resident; for float16/bfloat16 inputs
//   a float32 copy in grad_scratch, so that grad_y_coded sees c r before rounding to the input dtype).
// Kernel 1b (row split only): the same grad_y_coded tiles, one block per (row tile of D^T, column tile).
//   Small d (logits: d = 10..1000) has fewer column tiles than multiprocessors, e.g. one at d = 10, so
//   the launcher splits the row tiles of D among row_groups blocks per column tile; grad_y_coded then
//   needs every row group's grad_y and moves to this second launch. Both paths call the same
//   grad_y_coded_tile, and r, grad_y and the partials are summed in the same order either way, so the
//   split changes no bit of any output (tests/cuda_emulation/harness.cpp checks it).
// Tiles (tile_gemm.cuh): wide (128 columns; 64 for float64) for d at least that wide, else narrow (32
//   columns, half the rows): at d < 128 a block no longer computes 128 columns to use d of them.
// Kernel 2: per_sample[k] = sum_b partials[b, k] in a fixed order. Kernel 3 (mean/sum): loss =
// (fixed-order tree sum of per_sample) / divisor.
// The order of every floating-point sum depends only on the shapes and the device's multiprocessor
// count (narrow tiles: on the shapes only, as d < 128 has at most 4 column tiles, each its own column
// block), so repeated calls give bitwise-identical results.
#include "dres_kernels.h"
#include "tile_gemm.cuh"
#include "loss_reductions.cuh"  // row_sum_kernel, total_kernel

#include <atomic>
#include <climits>
#include <type_traits>

namespace dres {
namespace {

// Wide tiles: one block of 256 threads per multiprocessor (launch bounds (256, 1)): at two blocks ptxas
// caps the kernels at 128 registers and the wide tile's accumulator and partial sum spill (fp32/fp16/bf16
// 888-2628 bytes per thread, fp64 4-8 bytes; nvcc 13). Narrow tiles (d below the wide tile's width): three
// blocks (at most 80 registers, no spills; docs/KERNEL_NOTES.md), so that one block's prologue and
// epilogue overlap the others' multiply-adds. The persistent grid sizes itself with the occupancy API.
template <class C>
constexpr int kReconBlocksPerSm = kIsNarrow<C> ? 3 : 1;

// grad_y_coded[n0:n0+BM, col0:col0+BD] = -(D^T @ grad_source)[n0:..., col0:...]: a depth-K tile GEMM
// with negated products from 0. Shared by the fused kernel and the row-split second launch.
template <typename T, class C>
__device__ __forceinline__ void grad_y_coded_tile(const typename Elem<T>::Acc* decoder,
                                                  const typename Elem<T>::Acc* grad_source,
                                                  T* grad_y_coded, int64_t n0, int64_t col0, int64_t K,
                                                  int64_t N, int64_t d, bool grad_src_vec_ok, bool grad_vec_ok,
                                                  SmemTiles<C>& smem, int tx, int ty) {
  using Acc = typename Elem<T>::Acc;
  ALoader<C, true> a_loader(decoder, /*lda=*/N, /*rows=*/N, /*depth=*/K, n0);
  BLoader<Acc, C> b_loader(grad_source, /*sk=*/d, /*sd=*/1, /*depth=*/K, /*cols=*/d, col0, grad_src_vec_ok);
  Acc acc[C::TM][C::TD];
  zero_and_gemm_tile<C, /*kSubtract=*/true>(a_loader, b_loader, K, smem, tx, ty, acc);
  store_tile<T, C>(acc, grad_y_coded, n0, N, col0, d, grad_vec_ok, tx, ty);
}

// Row tile m0 of D (a multiple of BM) belongs to row group (m0 / BM) % row_groups.
template <class C>
__device__ __forceinline__ bool owns_row_tile(int64_t m0, int64_t row_group, int64_t row_groups) {
  return (m0 / C::BM) % row_groups == row_group;
}

template <typename T, class C>
__global__ void __launch_bounds__(256, kReconBlocksPerSm<C>)
reconstruction_kernel(const T* y, int64_t y_stride_k, int64_t y_stride_d, const T* y_coded,
                      int64_t yc_stride_n, int64_t yc_stride_d,
                      const typename Elem<T>::Acc* decoder, int64_t K, int64_t N, int64_t d,
                      int64_t num_tiles, typename Elem<T>::Acc grad_scale, bool write_grad_y,
                      bool write_grad_y_coded, T* grad_y, T* grad_y_coded,
                      typename Elem<T>::Acc* grad_scratch, typename Elem<T>::Acc* partials,
                      int64_t row_groups, bool y_vec_ok, bool yc_vec_ok, bool grad_vec_ok,
                      bool grad_src_vec_ok) {
  using Acc = typename Elem<T>::Acc;
  constexpr int kHalf = C::TD / 2;
  __shared__ SmemTiles<C> smem;

  const int tid = threadIdx.x;
  const int tx = tid % C::NTX, ty = tid / C::NTX;
  // Blocks are numbered column block fastest; with row_groups = 1 this is the plain persistent grid.
  const int64_t col_blocks = gridDim.x / row_groups;
  const int64_t col_block = blockIdx.x % col_blocks;
  const int64_t row_group = blockIdx.x / col_blocks;
  Acc* block_partials = partials + col_block * K;
  // Each row group zeroes only the rows it owns: the other groups of this column block add to theirs.
  for (int64_t k = tid; k < K; k += C::THREADS)
    if (owns_row_tile<C>(k - k % C::BM, row_group, row_groups)) block_partials[k] = Acc(0);
  // (the barrier at the start of gemm_tile orders these stores before the owners' updates)

  // What the grad_y_coded GEMM reads: grad_y itself when it is stored in Acc, else the fp32 copy.
  const Acc* grad_source =
      grad_scratch != nullptr ? grad_scratch : reinterpret_cast<const Acc*>(grad_y);

  for (int64_t tile = col_block; tile < num_tiles; tile += col_blocks) {
    const int64_t col0 = tile * C::BD;
    for (int64_t m0 = row_group * C::BM; m0 < K; m0 += row_groups * C::BM) {
      // acc starts at y and the GEMM subtracts D @ y_coded from it: acc ends as r, and y needs no
      // registers of its own in the epilogue. Rows/columns outside the matrices stay 0.
      Acc acc[C::TM][C::TD];
#pragma unroll
      for (int i = 0; i < C::TM; ++i) {
        const int64_t row = m0 + tile_row<C>(ty, i);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          Acc y_vals[kHalf];
          if (row < K) {
            load_segment<T, kHalf>(y + row * y_stride_k, col0 + tile_col<C>(tx, h), d,
                                   y_stride_d, y_vec_ok, y_vals);
          } else {
#pragma unroll
            for (int v = 0; v < kHalf; ++v) y_vals[v] = Acc(0);
          }
#pragma unroll
          for (int v = 0; v < kHalf; ++v) acc[i][h * kHalf + v] = y_vals[v];
        }
      }
      ALoader<C, false> a_loader(decoder, /*lda=*/N, /*rows=*/K, /*depth=*/N, m0);
      BLoader<T, C> b_loader(y_coded, yc_stride_n, yc_stride_d, /*depth=*/N, /*cols=*/d, col0,
                          yc_vec_ok);
      gemm_tile<C, /*kSubtract=*/true>(a_loader, b_loader, N, smem, tx, ty, acc);

#pragma unroll
      for (int i = 0; i < C::TM; ++i) {
        const int64_t row = m0 + tile_row<C>(ty, i);
        const bool row_inside = row < K;
        Acc row_sq = Acc(0);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          Acc grads[kHalf];
#pragma unroll
          for (int v = 0; v < kHalf; ++v) {
            const Acc r = acc[i][h * kHalf + v];
            row_sq = fma(r, r, row_sq);
            grads[v] = grad_scale * r;
          }
          if (write_grad_y && row_inside) {
            const int64_t c = col0 + tile_col<C>(tx, h);
            store_segment<T, kHalf>(grad_y + row * d, c, d, grad_vec_ok, grads);
            if (grad_scratch != nullptr)
              store_segment<Acc, kHalf>(grad_scratch + row * d, c, d, grad_vec_ok, grads);
          }
        }
        // Sum over the NTX threads holding this row (same warp, lanes differing in tx): a fixed
        // butterfly, identical in every lane and on every run.
#pragma unroll
        for (int offset = C::NTX / 2; offset > 0; offset /= 2)
          row_sq += __shfl_xor_sync(0xffffffffu, row_sq, offset);
        // Row `row` of this row tile always belongs to the same thread: no race across tiles.
        if (tx == 0 && row_inside) block_partials[row] += row_sq;
      }
    }

    // Only without a row split (the launcher passes false otherwise): this block then holds every
    // row of grad_y's tile. gemm_tile's opening barrier makes its grad_y stores visible to all threads.
    if (write_grad_y_coded)
      for (int64_t n0 = 0; n0 < N; n0 += C::BM)
        grad_y_coded_tile<T, C>(decoder, grad_source, grad_y_coded, n0, col0, K, N, d, grad_src_vec_ok,
                             grad_vec_ok, smem, tx, ty);
  }
}

// Kernel 1b: one block per (row tile of D^T, column tile), row tile fastest.
template <typename T, class C>
__global__ void __launch_bounds__(256, kReconBlocksPerSm<C>)
grad_y_coded_kernel(const typename Elem<T>::Acc* decoder, const typename Elem<T>::Acc* grad_source,
                    T* grad_y_coded, int64_t K, int64_t N, int64_t d, int64_t num_row_tiles,
                    bool grad_src_vec_ok, bool grad_vec_ok) {
  __shared__ SmemTiles<C> smem;
  const int tid = threadIdx.x;
  const int64_t block = blockIdx.x;
  grad_y_coded_tile<T, C>(decoder, grad_source, grad_y_coded, (block % num_row_tiles) * C::BM,
                       (block / num_row_tiles) * C::BD, K, N, d, grad_src_vec_ok, grad_vec_ok, smem,
                       tid % C::NTX, tid / C::NTX);
}

#ifndef DRES_HOST_EMULATION  // launchers: nvcc only
// Shape of the persistent grid: col_blocks blocks along the column tiles, as many as fit on the device
// at once (at most one per tile), times row_groups blocks per column tile when the tiles alone would
// leave multiprocessors idle (small d) and D has the row tiles to share.
struct GridShape {
  int64_t col_blocks = 0, row_groups = 1;
};

// Blocks of reconstruction_kernel<T> resident on the current device, queried once per device (the
// answer depends on the device and the kernel only; every call of the op needs it).
template <typename T, class C>
cudaError_t resident_blocks(int64_t* resident) {
  constexpr int kMaxCachedDevices = 64;
  static std::atomic<int64_t> cache[kMaxCachedDevices] = {};
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable && (*resident = cache[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, reconstruction_kernel<T, C>,
                                                      C::THREADS, 0);
  if (err != cudaSuccess) return err;
  *resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  if (cacheable) cache[device].store(*resident, std::memory_order_relaxed);
  return cudaSuccess;
}

template <typename T, class C>
cudaError_t grid_shape(int64_t num_tiles, int64_t K, GridShape* shape) {
  int64_t resident = 0;
  cudaError_t err = resident_blocks<T, C>(&resident);
  if (err != cudaSuccess) return err;
  shape->col_blocks = num_tiles < resident ? num_tiles : resident;
  const int64_t row_tiles = (K + C::BM - 1) / C::BM;
  const int64_t spare = resident / (shape->col_blocks > 0 ? shape->col_blocks : 1);
  shape->row_groups = spare < row_tiles ? spare : row_tiles;
  if (shape->row_groups < 1) shape->row_groups = 1;
  return cudaSuccess;
}

template <typename T, class C>
cudaError_t workspace(int64_t K, int64_t N, int64_t d, int reduction, int compute_grads,
                      int64_t* partial_elems, int64_t* grad_scratch_elems) {
  using Acc = typename Elem<T>::Acc;
  *partial_elems = 0;
  *grad_scratch_elems = 0;
  if (K <= 0 || d <= 0) return cudaSuccess;
  const int64_t num_tiles = (d + C::BD - 1) / C::BD;
  GridShape shape;
  cudaError_t err = grid_shape<T, C>(num_tiles, K, &shape);
  if (err != cudaSuccess) return err;
  *partial_elems = (shape.col_blocks + 1) * K;  // a row of partials per column block, then per_sample
  const bool needs_copy = !std::is_same<T, Acc>::value && compute_grads &&
                          reduction != DRES_REDUCTION_NONE && N > 0;
  if (needs_copy) *grad_scratch_elems = K * d;
  (void)N;
  return cudaSuccess;
}

template <typename T, class C>
cudaError_t launch(const void* y_, int64_t y_stride_k, int64_t y_stride_d, const void* yc_,
                   int64_t yc_stride_n, int64_t yc_stride_d, const void* decoder_, int64_t K,
                   int64_t N, int64_t d, int reduction, int compute_grads, void* loss_,
                   void* grad_y_, void* grad_y_coded_, void* partials_, int64_t partial_elems,
                   void* grad_scratch_, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  constexpr int kHalf = C::TD / 2;
  if (reduction != DRES_REDUCTION_MEAN && reduction != DRES_REDUCTION_SUM &&
      reduction != DRES_REDUCTION_NONE)
    return cudaErrorInvalidValue;
  // Empty inputs (no rows or no columns) are handled by the caller; 32-bit index math for D.
  if (K <= 0 || d <= 0 || N < 0 || K * N >= INT_MAX || K >= INT_MAX - C::BM ||
      N >= INT_MAX - C::BM)
    return cudaErrorInvalidValue;
  const int64_t num_tiles = (d + C::BD - 1) / C::BD;
  GridShape shape;
  cudaError_t err = grid_shape<T, C>(num_tiles, K, &shape);
  if (err != cudaSuccess) return err;
  const int64_t blocks = shape.col_blocks;  // rows of partials
  // The workspace must come from dres_reconstruction_loss_workspace for this shape and device.
  if (blocks < 1 || partial_elems != (blocks + 1) * K || blocks * shape.row_groups > INT_MAX)
    return cudaErrorInvalidValue;

  const T* y = static_cast<const T*>(y_);
  const T* y_coded = static_cast<const T*>(yc_);
  const Acc* decoder = static_cast<const Acc*>(decoder_);
  Acc* loss = static_cast<Acc*>(loss_);
  T* grad_y = static_cast<T*>(grad_y_);
  T* grad_y_coded = static_cast<T*>(grad_y_coded_);
  Acc* partials = static_cast<Acc*>(partials_);
  Acc* per_sample = reduction == DRES_REDUCTION_NONE ? loss : partials + blocks * K;

  const bool write_grad_y = compute_grads != 0;
  const bool write_grad_y_coded = write_grad_y && reduction != DRES_REDUCTION_NONE && N > 0;
  Acc* grad_scratch = nullptr;
  if (write_grad_y_coded && !std::is_same<T, Acc>::value) {
    if (grad_scratch_ == nullptr) return cudaErrorInvalidValue;
    grad_scratch = static_cast<Acc*>(grad_scratch_);
  }
  const double kd = static_cast<double>(K) * static_cast<double>(d);
  const Acc grad_scale = static_cast<Acc>(reduction == DRES_REDUCTION_MEAN ? 2.0 / kd : 2.0);

  constexpr int kVec = 16 / sizeof(T);
  const bool y_vec_ok = y_stride_d == 1 && y_stride_k % kHalf == 0 &&
                        is_aligned(y, sizeof(Pack<T, kHalf>));
  const bool yc_vec_ok = yc_stride_d == 1 && yc_stride_n % kVec == 0 && is_aligned(y_coded, 16);
  const bool grad_vec_ok = d % kHalf == 0 && is_aligned(grad_y, sizeof(Pack<T, kHalf>)) &&
                           (grad_y_coded == nullptr ||
                            is_aligned(grad_y_coded, sizeof(Pack<T, kHalf>))) &&
                           (grad_scratch == nullptr ||
                            is_aligned(grad_scratch, sizeof(Pack<Acc, kHalf>)));
  constexpr int kAccVec = 16 / sizeof(Acc);
  const void* grad_source = grad_scratch != nullptr ? static_cast<const void*>(grad_scratch)
                                                    : static_cast<const void*>(grad_y);
  const bool grad_src_vec_ok = d % kAccVec == 0 && is_aligned(grad_source, 16);

  const bool split = shape.row_groups > 1;
  reconstruction_kernel<T, C><<<static_cast<unsigned>(blocks * shape.row_groups), C::THREADS, 0,
                             stream>>>(
      y, y_stride_k, y_stride_d, y_coded, yc_stride_n, yc_stride_d, decoder, K, N, d, num_tiles,
      grad_scale, write_grad_y, write_grad_y_coded && !split, grad_y, grad_y_coded, grad_scratch,
      partials, shape.row_groups, y_vec_ok, yc_vec_ok, grad_vec_ok, grad_src_vec_ok);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (split && write_grad_y_coded) {
    const int64_t n_tiles = (N + C::BM - 1) / C::BM;
    if (n_tiles * num_tiles > INT_MAX) return cudaErrorInvalidValue;
    grad_y_coded_kernel<T, C><<<static_cast<unsigned>(n_tiles * num_tiles), C::THREADS, 0, stream>>>(
        decoder, static_cast<const Acc*>(grad_source), grad_y_coded, K, N, d, n_tiles,
        grad_src_vec_ok, grad_vec_ok);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  const int64_t row_blocks = (K + kRowSumRows - 1) / kRowSumRows;
  if (row_blocks > INT_MAX) return cudaErrorInvalidValue;
  row_sum_kernel<Acc><<<static_cast<unsigned>(row_blocks), kRowSumRows * kRowSumGroups, 0,
                        stream>>>(partials, blocks, K, per_sample);
  err = cudaGetLastError();
  if (err != cudaSuccess || reduction == DRES_REDUCTION_NONE) return err;

  const Acc divisor = static_cast<Acc>(reduction == DRES_REDUCTION_MEAN ? kd : 1.0);
  total_kernel<Acc><<<1, kTotalThreads, 0, stream>>>(per_sample, K, divisor, loss);
  return cudaGetLastError();
}

#endif  // DRES_HOST_EMULATION
}  // namespace
}  // namespace dres
#ifndef DRES_HOST_EMULATION

extern "C" cudaError_t dres_reconstruction_loss_workspace(int64_t K, int64_t N, int64_t d,
                                                          DresDType dtype, int reduction,
                                                          int compute_grads,
                                                          int64_t* partial_elems,
                                                          int64_t* grad_scratch_elems) {
  return dres::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dres::with_tile<typename dres::Elem<T>::Acc>(d, [&](auto tile) {
      using C = typename decltype(tile)::type;
      return dres::workspace<T, C>(K, N, d, reduction, compute_grads, partial_elems, grad_scratch_elems);
    });
  });
}

extern "C" cudaError_t dres_reconstruction_loss(
    const void* y, int64_t y_stride_k, int64_t y_stride_d, const void* y_coded,
    int64_t yc_stride_n, int64_t yc_stride_d, const void* decoder, int64_t K, int64_t N,
    int64_t d, DresDType dtype, int reduction, int compute_grads, void* loss, void* grad_y,
    void* grad_y_coded, void* partials, int64_t partial_elems, void* grad_scratch,
    cudaStream_t stream) {
  return dres::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dres::with_tile<typename dres::Elem<T>::Acc>(d, [&](auto tile) {
      using C = typename decltype(tile)::type;
      return dres::launch<T, C>(y, y_stride_k, y_stride_d, y_coded, yc_stride_n, yc_stride_d, decoder, K, N, d,
                                reduction, compute_grads, loss, grad_y, grad_y_coded, partials, partial_elems,
                                grad_scratch, stream);
    });
  });
}
#endif  // DRES_HOST_EMULATION
