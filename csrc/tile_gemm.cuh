// Block-level tile GEMM shared by the spline_mix and reconstruction_loss kernels.
//
// A block computes an output tile  C[m0:m0+BM, col0:col0+BD] = A[m0:m0+BM, :] @ B[:, col0:col0+BD]
// with A small (the weights or the decoder, in the compute type "Acc") and B a column slab of a
// tall-and-wide activation matrix. The reduction dimension is walked in chunks of BK: each chunk of A
// (BM x BK, stored k-major) and of B (BK x BD, converted to Acc) is staged in shared memory, double
// buffered, with the next chunk's global loads issued into registers before the current chunk's
// multiply-adds so that their latency is hidden. Each thread owns a TM x TD register tile of C; its
// rows are two groups of TM/2 rows BM/2 apart (its columns likewise BD/2 apart), so the 16-byte
// shared-memory reads of a warp are contiguous and free of bank conflicts.
//
// Products and sums are IEEE fused multiply-adds in Acc (float32, or float64 for float64 inputs):
// never TF32, and no --use_fast_math.
//
// Two-level summation (Acc = float): one FMA chain over the whole depth n has a rounding error that
// grows like n u (u = 2^-24; about sqrt(n) u for random signs), 1024 u at a depth of 1024, where cuBLAS,
// which sums in blocks, is several times more accurate. So each kFlushChunks * BK = 32 products go into
// a fresh per-thread partial sum, which is then added to acc: the bound becomes (32 + n / 32) u, 64 u at
// n = 1024 (block size ~ sqrt(n) is the optimum there). Cost: one add per 32 FMAs and TM x TD more
// registers. float64 keeps the single chain (u = 2^-53 is accurate enough and its registers are scarce).
#pragma once

#include <type_traits>
#include "elem.cuh"  // Elem, Pack, dispatch_dtype, host emulation for the CPU test build

namespace dres {

// Tile shapes: a block of THREADS = (BM / TM) * (BD / TD) = 256 threads computes a BM x BD tile.
// Wide tiles serve d >= Wide::BD. Narrow ones serve smaller d (logits: d = 1..127), where a 128-column tile
// leaves most of a block idle (d = 10: 10 of 128 computed columns are used): a quarter of the columns and
// half the rows per block, so twice the row tiles (twice the blocks when d fits one column tile) and an
// eighth of the float register tile (4 x 2 against 8 x 8), which lets three blocks share a multiprocessor
// (launch bounds (256, 3), no spills; docs/KERNEL_NOTES.md) so that one block's prologue hides behind
// another's multiply-adds.
// The choice depends on d and the dtype only, so the order of every sum stays a function of the shapes.
template <typename AccT, int BM_, int BD_, int BK_, int TM_, int TD_>
struct TileCfg {
  using Acc = AccT;
  static constexpr int BM = BM_, BD = BD_, BK = BK_, TM = TM_, TD = TD_;
  static constexpr int NTX = BD / TD;  // threads along the columns of the tile
  static constexpr int NTY = BM / TM;  // threads along the rows
  static constexpr int THREADS = NTX * NTY;
  static constexpr int PAD = 16 / sizeof(Acc);  // keeps rows 16-byte aligned
  static constexpr int LDA = BM + PAD;
  static constexpr int LDB = BD + PAD;
  static_assert(THREADS == 256, "kernels are launched with 256 threads");
  static_assert(NTX <= 32 && (32 % NTX) == 0, "threads sharing a row must sit in one warp");
  static_assert((BM * BK) % THREADS == 0, "A chunk must split evenly over the threads");
  static_assert(TM % 2 == 0 && TD % 2 == 0, "register tiles are split into two halves");
};

template <typename Acc> struct Tiles;
template <> struct Tiles<float> {
  using Wide = TileCfg<float, 128, 128, 16, 8, 8>;
  using Narrow = TileCfg<float, 64, 32, 16, 4, 2>;
};
template <> struct Tiles<double> {
  using Wide = TileCfg<double, 64, 64, 16, 4, 4>;
  using Narrow = TileCfg<double, 32, 32, 16, 2, 2>;
};

// Whether tile C is its compute type's narrow tile (the kernels' launch bounds follow it).
template <class C>
constexpr bool kIsNarrow = std::is_same<C, typename Tiles<typename C::Acc>::Narrow>::value;

// The launchers' (and the emulation harness's) choice of tile for d columns: returns f(TypeTag<config>{}).
template <typename Acc, class F>
decltype(auto) with_tile(int64_t d, F&& f) {
  using W = typename Tiles<Acc>::Wide;
  if (d < W::BD) return f(TypeTag<typename Tiles<Acc>::Narrow>{});
  return f(TypeTag<W>{});
}

// Row of the block tile held in register row i of thread row ty (two groups BM/2 apart).
template <class C>
__device__ __forceinline__ int tile_row(int ty, int i) {
  return (i < C::TM / 2) ? ty * (C::TM / 2) + i : C::BM / 2 + ty * (C::TM / 2) + (i - C::TM / 2);
}

// First column of half h (0 or 1) of thread column tx; the half spans TD/2 consecutive columns.
template <class C>
__device__ __forceinline__ int tile_col(int tx, int h) {
  return h * (C::BD / 2) + tx * (C::TD / 2);
}

template <class C>
struct alignas(16) SmemTiles {
  typename C::Acc a[2][C::BK][C::LDA];  // A chunk, k-major: a[buf][k][m]
  typename C::Acc b[2][C::BK][C::LDB];  // B chunk: b[buf][k][j]
};

// Loads A(m, k) for m in [m0, m0 + BM), k in [k0, k0 + BK) (zero outside rows x depth).
//   kTransposed == false: A(m, k) = a[m * lda + k]   (weights or decoder, row-major)
//   kTransposed == true:  A(m, k) = a[k * lda + m]   (decoder^T, read straight from the decoder)
// Consecutive threads take consecutive addresses in both layouts (coalesced reads). A thread's
// elements share one index along the contiguous axis and step by a constant along the other, so it
// keeps one base offset instead of one address per element (register pressure). Offsets are 32-bit:
// the launchers check that A has fewer than 2^31 elements.
template <class C, bool kTransposed>
struct ALoader {
  using Acc = typename C::Acc;
  static constexpr int kPerThread = C::BM * C::BK / C::THREADS;
  // Layout of element r of a thread: fixed index along the contiguous axis, strided along the other.
  static constexpr int kFast = kTransposed ? C::BM : C::BK;   // extent along the contiguous axis
  static constexpr int kStep = C::THREADS / kFast;             // step of the other index per r
  static_assert(C::THREADS % kFast == 0, "a thread keeps one contiguous index");
  const Acc* a;
  int lda, rows, depth, m0;
  int fast, slow;  // this thread's index along the contiguous axis / first index along the other
  Acc regs[kPerThread];

  __device__ ALoader(const Acc* a_, int64_t lda_, int64_t rows_, int64_t depth_, int64_t m0_)
      : a(a_), lda(static_cast<int>(lda_)), rows(static_cast<int>(rows_)),
        depth(static_cast<int>(depth_)), m0(static_cast<int>(m0_)),
        fast(static_cast<int>(threadIdx.x) % kFast), slow(static_cast<int>(threadIdx.x) / kFast) {}

  __device__ __forceinline__ void fetch(int k0) {
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int s = slow + r * kStep;
      const int gm = m0 + (kTransposed ? fast : s);
      const int gk = k0 + (kTransposed ? s : fast);
      const bool inside = gm < rows && gk < depth;
      regs[r] = inside ? a[kTransposed ? gk * lda + gm : gm * lda + gk] : Acc(0);
    }
  }

  __device__ __forceinline__ void put(Acc (*tile)[C::LDA]) const {
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int s = slow + r * kStep;
      if (kTransposed) tile[s][fast] = regs[r];
      else             tile[fast][s] = regs[r];
    }
  }
};

// Loads B(k, j) = x[k * sk + j * sd] for k in [k0, k0 + BK), j in [col0, col0 + BD), as Acc
// (zero outside depth x cols). Each thread moves chunks of VEC consecutive columns (16 bytes): one
// vector load when vec_ok (sd == 1, sk and the base pointer aligned to VEC elements) and the chunk
// lies inside the matrix; otherwise element by element (any strides, ragged edges). A thread's
// chunks share their columns and step down the rows by a constant.
template <typename T, class C>
struct BLoader {
  using Acc = typename C::Acc;
  static_assert(std::is_same<Acc, typename Elem<T>::Acc>::value, "B is converted to the tile's compute type");
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int CHUNKS_PER_ROW = C::BD / VEC;
  static constexpr int CHUNKS = C::BK * CHUNKS_PER_ROW;
  static constexpr int kPerThread = (CHUNKS + C::THREADS - 1) / C::THREADS;
  static constexpr int kRowStep = C::THREADS / CHUNKS_PER_ROW;  // rows between a thread's chunks
  static_assert(C::BD % VEC == 0, "tile width must be a multiple of the vector width");
  static_assert(C::THREADS % CHUNKS_PER_ROW == 0, "a thread keeps one column chunk");
  const T* col_base;   // x + first row of this thread * sk + first column * sd
  int64_t sk, sd;
  int depth, row, jv;  // rows of x, this thread's first row in the chunk, its column chunk
  int cols_left;       // columns of x from this thread's first column on (may be <= 0)
  bool vector_path;    // whole chunk inside and vector loads allowed
  Pack<T, VEC> regs[kPerThread];

  __device__ BLoader(const T* x, int64_t sk_, int64_t sd_, int64_t depth_, int64_t cols,
                     int64_t col0, bool vec_ok)
      : sk(sk_), sd(sd_), depth(static_cast<int>(depth_)) {
    const int e = static_cast<int>(threadIdx.x);
    row = e / CHUNKS_PER_ROW;
    jv = e % CHUNKS_PER_ROW;
    const int64_t gj = col0 + jv * VEC;
    const int64_t left = cols - gj;
    cols_left = left > VEC ? VEC : static_cast<int>(left < 0 ? 0 : left);
    vector_path = vec_ok && left >= VEC;
    col_base = x + row * sk + (cols_left > 0 ? gj * sd : 0);
  }

  __device__ __forceinline__ void fetch(int k0) {
    const T* base = col_base + static_cast<int64_t>(k0) * sk;
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      if ((CHUNKS % C::THREADS) != 0 && row + r * kRowStep >= C::BK) break;
      const bool row_inside = k0 + row + r * kRowStep < depth;
      const T* p = base + static_cast<int64_t>(r * kRowStep) * sk;
      if (row_inside && vector_path) {
        regs[r] = *reinterpret_cast<const Pack<T, VEC>*>(p);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          regs[r].v[v] = (row_inside && v < cols_left) ? p[v * sd] : Elem<T>::out(Acc(0));
      }
    }
  }

  __device__ __forceinline__ void put(Acc (*tile)[C::LDB]) const {
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      if ((CHUNKS % C::THREADS) != 0 && row + r * kRowStep >= C::BK) break;
#pragma unroll
      for (int v = 0; v < VEC; ++v) tile[row + r * kRowStep][jv * VEC + v] = Elem<T>::in(regs[r].v[v]);
    }
  }
};

// acc += A_chunk @ B_chunk (acc -= ... when kSubtract) for one staged chunk.
template <class C, bool kSubtract, typename Acc = typename C::Acc>
__device__ __forceinline__ void multiply_chunk(const Acc (*as)[C::LDA], const Acc (*bs)[C::LDB], int tx, int ty,
                                               Acc (&acc)[C::TM][C::TD]) {
  using APack = Pack<Acc, C::TM / 2>;
  using BPack = Pack<Acc, C::TD / 2>;
#pragma unroll
  for (int kk = 0; kk < C::BK; ++kk) {
    const APack a_lo = *reinterpret_cast<const APack*>(&as[kk][ty * (C::TM / 2)]);
    const APack a_hi = *reinterpret_cast<const APack*>(&as[kk][C::BM / 2 + ty * (C::TM / 2)]);
    const BPack b_lo = *reinterpret_cast<const BPack*>(&bs[kk][tx * (C::TD / 2)]);
    const BPack b_hi = *reinterpret_cast<const BPack*>(&bs[kk][C::BD / 2 + tx * (C::TD / 2)]);
    Acc a[C::TM], b[C::TD];
#pragma unroll
    for (int i = 0; i < C::TM / 2; ++i) {
      // Negation is exact, so fma(-a, b, acc) rounds exactly like acc - a * b fused.
      a[i] = kSubtract ? -a_lo.v[i] : a_lo.v[i];
      a[i + C::TM / 2] = kSubtract ? -a_hi.v[i] : a_hi.v[i];
    }
#pragma unroll
    for (int j = 0; j < C::TD / 2; ++j) {
      b[j] = b_lo.v[j];
      b[j + C::TD / 2] = b_hi.v[j];
    }
#pragma unroll
    for (int i = 0; i < C::TM; ++i)
#pragma unroll
      for (int j = 0; j < C::TD; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
  }
}

constexpr int kFlushChunks = 2;  // staged chunks per partial sum (Acc = float; see the top)

template <class C, typename Acc = typename C::Acc>
__device__ __forceinline__ void zero_tile(Acc (&acc)[C::TM][C::TD]) {
#pragma unroll
  for (int i = 0; i < C::TM; ++i)
#pragma unroll
    for (int j = 0; j < C::TD; ++j) acc[i][j] = Acc(0);
}

// acc += A[m0:m0+BM, 0:depth] @ B[0:depth, col0:col0+BD] for the thread's register tile
// (acc -= ... when kSubtract); the caller initialises acc.
// Starts with a barrier, so the caller may reuse shared memory (and read global memory that other
// threads of the block wrote) right before calling; ends with a barrier after the last chunk.
// Acc = float: two-level sum, the partial sum flushed into acc every kFlushChunks chunks and after
// the last one (a fixed order: it depends on depth only).
template <class C, bool kSubtract, class AL, class BL, typename Acc = typename C::Acc>
__device__ __forceinline__ void gemm_tile(AL& a_loader, BL& b_loader, int64_t depth, SmemTiles<C>& smem, int tx,
                                          int ty, Acc (&acc)[C::TM][C::TD]) {
  constexpr bool kTwoLevel = std::is_same<Acc, float>::value;
  [[maybe_unused]] Acc part[C::TM][C::TD];  // the current partial sum (two-level summation only)
  if constexpr (kTwoLevel) zero_tile<C>(part);
  const int chunks = static_cast<int>((depth + C::BK - 1) / C::BK);
  __syncthreads();
  if (chunks == 0) return;
  a_loader.fetch(0);
  b_loader.fetch(0);
  a_loader.put(smem.a[0]);
  b_loader.put(smem.b[0]);
  __syncthreads();
  for (int t = 0; t < chunks; ++t) {
    const int buf = static_cast<int>(t & 1);
    const bool has_next = t + 1 < chunks;
    if (has_next) {  // global loads in flight during the multiply-adds below
      a_loader.fetch((t + 1) * C::BK);
      b_loader.fetch((t + 1) * C::BK);
    }
    if constexpr (kTwoLevel) {
      multiply_chunk<C, kSubtract>(smem.a[buf], smem.b[buf], tx, ty, part);
      if ((t + 1) % kFlushChunks == 0 || !has_next) {
#pragma unroll
        for (int i = 0; i < C::TM; ++i)
#pragma unroll
          for (int j = 0; j < C::TD; ++j) acc[i][j] += part[i][j];
        zero_tile<C>(part);
      }
    } else {
      multiply_chunk<C, kSubtract>(smem.a[buf], smem.b[buf], tx, ty, acc);
    }
    if (has_next) {  // the other buffer was last read before the previous barrier
      a_loader.put(smem.a[buf ^ 1]);
      b_loader.put(smem.b[buf ^ 1]);
    }
    __syncthreads();
  }
}

// Reads N consecutive columns c .. c+N-1 of one row (zero past cols). Vector read when vec_ok
// (column stride 1, row start aligned to the pack) and the pack lies inside the row.
template <typename T, int N>
__device__ __forceinline__ void load_segment(const T* row, int64_t c, int64_t cols, int64_t sd,
                                             bool vec_ok, typename Elem<T>::Acc (&out)[N]) {
  using Acc = typename Elem<T>::Acc;
  if (vec_ok && c + N <= cols) {
    const Pack<T, N> p = *reinterpret_cast<const Pack<T, N>*>(row + c);
#pragma unroll
    for (int v = 0; v < N; ++v) out[v] = Elem<T>::in(p.v[v]);
  } else {
#pragma unroll
    for (int v = 0; v < N; ++v) out[v] = (c + v < cols) ? Elem<T>::in(row[(c + v) * sd]) : Acc(0);
  }
}

// Writes N consecutive columns c .. c+N-1 of one row of a contiguous matrix (skips past cols).
template <typename T, int N>
__device__ __forceinline__ void store_segment(T* row, int64_t c, int64_t cols, bool vec_ok,
                                              const typename Elem<T>::Acc (&vals)[N]) {
  if (vec_ok && c + N <= cols) {
    Pack<T, N> p;
#pragma unroll
    for (int v = 0; v < N; ++v) p.v[v] = Elem<T>::out(vals[v]);
    *reinterpret_cast<Pack<T, N>*>(row + c) = p;
  } else {
#pragma unroll
    for (int v = 0; v < N; ++v)
      if (c + v < cols) row[c + v] = Elem<T>::out(vals[v]);
  }
}

// acc = 0, then acc (+/-)= A-tile @ B-tile over the whole depth (see gemm_tile).
template <class C, bool kSubtract, typename ALoaderT, typename BLoaderT, typename Acc = typename C::Acc>
__device__ __forceinline__ void zero_and_gemm_tile(ALoaderT& a_loader, BLoaderT& b_loader, int64_t depth,
                                                   SmemTiles<C>& smem, int tx, int ty, Acc (&acc)[C::TM][C::TD]) {
  zero_tile<C>(acc);
  gemm_tile<C, kSubtract>(a_loader, b_loader, depth, smem, tx, ty, acc);
}

// Writes this thread's part of a BM x BD output tile at (row0, col0) of a contiguous (rows, cols)
// matrix; rows at or past `rows` and columns past `cols` are skipped.
template <typename T, class C, typename Acc = typename C::Acc>
__device__ __forceinline__ void store_tile(const Acc (&acc)[C::TM][C::TD], T* out, int64_t row0, int64_t rows,
                                           int64_t col0, int64_t cols, bool vec_ok, int tx, int ty) {
  constexpr int kHalf = C::TD / 2;
#pragma unroll
  for (int i = 0; i < C::TM; ++i) {
    const int64_t row = row0 + tile_row<C>(ty, i);
    if (row >= rows) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      Acc vals[kHalf];
#pragma unroll
      for (int v = 0; v < kHalf; ++v) vals[v] = acc[i][h * kHalf + v];
      store_segment<T, kHalf>(out + row * cols, col0 + tile_col<C>(tx, h), cols, vec_ok, vals);
    }
  }
}

}  // namespace dres
