// banded_apply: out = W x (forward) or W^T g (transpose) for the natural cubic smoothing spline map W
// (p, n) held as O(n + p) float64 coefficients (dres_fast/banded.py, BandedSpline with finite lam):
//
//   forward   rhs = s Q^T x (3-point stencil), z = U^{-T} rhs, gamma = U^{-1} z, out = P x + V gamma
//   transpose v = V^T g, acc = P^T g (scatters), u = U^{-1} U^{-T} v, out = acc + s Q u
//
// with U the banded (two super-diagonals) Cholesky factor of M = U^T U, m = n - 2 unknowns; and, given
// the spline's q_bands / r_bands (where it has refine), its one step of iterative refinement:
// gamma += M^{-1} s (Q^T (x - lam Q gamma) - R gamma), u += M^{-1} (v - M u). Without it the solve is
// 6e-5 off at 4096 Chebyshev knots and lam = 1e6, for every dtype; with it, within float32's rounding.
//
// Threads: one thread per column of the data (rows, d), consecutive threads on consecutive columns, so
// every row access of a warp is one coalesced segment. Each thread runs the recurrences along the rows
// of its column; the only parallelism is over d (the sweeps are sequential in the rows).
//
// Arithmetic: every product, sum and carry in float64, whatever the data's dtype (float32 sweeps lose
// the accuracy contract at a few thousand clustered knots: dres_fast/banded.py, ACCURACY); the data are
// read and written in their dtype (float, double, __half, __nv_bfloat16), each output rounded once.
//
// Scratch: z, gamma (forward: m rows) and v, u, acc (transpose: m + n rows) live in a global float64
// buffer of the data's layout (row-major, d columns: coalesced like the data). They cannot stay in
// registers or shared memory (m values per column: 32 KB a column at 4096 knots) and the evaluation
// gathers gamma at arbitrary rows. float64 and not the data's dtype: the back sweep and the gathers
// amplify a rounding of z or gamma by the condition of U: a float32 scratch costs 1e-4 relative error at
// 200 Chebyshev knots and lam = 1e6, 1e-2 .. 1e-1 at 4096 (measured in the emulation harness, scratch=f32,
// tests/test_banded_cuda.py), against float32's 6e-8 rounding with the float64 scratch.
// Each thread reads back only what it wrote itself, so no synchronisation is needed for the scratch.
//
// Coefficients: the same for every column, so all threads of a block read the same address. They are
// staged tile by tile (kTile rows) in shared memory by the whole block (one coalesced load per tile),
// then read as shared-memory broadcasts inside the recurrences; each tile's data values are loaded into
// registers before the dependent chain starts, so their latency overlaps.
#include "dres_kernels.h"
#include "elem.cuh"  // Elem (data loads), dispatch_dtype, host emulation for the CPU test build

namespace dres {
namespace {

constexpr int kBandedMaxThreads = 128;  // columns per block (the launcher may use 64 or 32 for small d)
constexpr int kTile = 32;               // coefficient rows staged per shared-memory tile

// double -> T with one rounding (the data conversions of Elem go through float for half types).
template <typename T> struct Store;
template <> struct Store<double> { static __device__ __forceinline__ double out(double v) { return v; } };
template <> struct Store<float> {
  static __device__ __forceinline__ float out(double v) { return static_cast<float>(v); }
};
template <> struct Store<__half> {
  static __device__ __forceinline__ __half out(double v) { return __double2half(v); }
};
template <> struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 out(double v) { return __double2bfloat16(v); }
};

template <typename T>
__device__ __forceinline__ double load(const T* p) { return static_cast<double>(Elem<T>::in(*p)); }

struct BandedArgs {
  const double* factor;     // (3, m): 1 / U[i, i], U[i-1, i], U[i-2, i]
  const double* stencil;    // (3, m): rhs_j = stencil[0, j] x_j + stencil[1, j] x_j+1 + stencil[2, j] x_j+2
  const int64_t* index;     // (p,): interval of point r
  const double* chord;      // (p, 2)
  const double* curvature;  // (p, 4)
  const int64_t* gather;    // (p, 4): rows of gamma
  int64_t n, p, m, d;
  const double* q_bands;  // (3, m): Q's columns (a, b, c); null: no refinement step
  const double* r_bands;  // (2, m): R's diagonal and off-diagonal (last entry 0)
  double lam;
};

struct SweepTile {  // three coefficient rows of kTile entries
  double c[3][kTile];
};
struct ResidualTile {  // Q's and R's bands at rows i0 - 1 .. i0 + kTile + 1 (entry e: row i0 - 1 + e)
  double q[3][kTile + 3], r[2][kTile + 3];
};
struct PointTile {  // the evaluation coefficients of kTile points
  double chord[2][kTile], curvature[4][kTile];
  int64_t index[kTile], gather[4][kTile];
};

// Rows [r0, r0 + kTile) of the (rows, width) row-major array src into dst[w][k] (w < width), zero past
// `rows`; by the whole block. Then a barrier.
template <typename V, int kWidth>
__device__ __forceinline__ void stage_points(V (&dst)[kWidth][kTile], const V* src, int64_t r0, int64_t rows) {
  for (int e = threadIdx.x; e < kWidth * kTile; e += blockDim.x) {
    const int k = e / kWidth, w = e % kWidth;  // consecutive threads, consecutive addresses
    dst[w][k] = r0 + k < rows ? src[(r0 + k) * kWidth + w] : V(0);
  }
}

__device__ __forceinline__ void stage_points(PointTile& t, const BandedArgs& a, int64_t r0) {
  for (int e = threadIdx.x; e < kTile; e += blockDim.x) t.index[e] = r0 + e < a.p ? a.index[r0 + e] : 0;
  stage_points<double, 2>(t.chord, a.chord, r0, a.p);
  stage_points<double, 4>(t.curvature, a.curvature, r0, a.p);
  stage_points<int64_t, 4>(t.gather, a.gather, r0, a.p);
  __syncthreads();
}

// z = U^{-T} rhs into scratch rows [0, m) of this thread's column (zcol: its first element):
//   z_i = (rhs_i - U[i-1,i] z_i-1 - U[i-2,i] z_i-2) / U[i,i],
// rhs from the data by the stencil (kFromData) or from the scratch rows of src (src == zcol: in place).
// S: the scratch type (double; float only in the emulation harness, to measure what it would cost).
template <bool kFromData, typename T, typename S>
__device__ __forceinline__ void lower_sweep(const BandedArgs& a, const T* __restrict__ xcol, const S* src, S* zcol,
                                            bool active, SweepTile& f, SweepTile& st) {
  const int64_t m = a.m, d = a.d;
  double z1 = 0, z2 = 0;  // z_i-1, z_i-2
  double xa = 0, xb = 0;  // x_i, x_i+1
  if (kFromData && active) {
    xa = load(xcol);
    xb = load(xcol + d);
  }
  for (int64_t i0 = 0; i0 < m; i0 += kTile) {
    for (int e = threadIdx.x; e < 3 * kTile; e += blockDim.x) {
      const int w = e / kTile, k = e % kTile;
      const bool in = i0 + k < m;
      f.c[w][k] = in ? a.factor[w * m + i0 + k] : 0.0;
      if (kFromData) st.c[w][k] = in ? a.stencil[w * m + i0 + k] : 0.0;
    }
    double r[kTile];  // x_i+2 (kFromData) or rhs_i of the tile's rows
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      const int64_t i = i0 + k;
      r[k] = 0.0;
      if (active && i < m) r[k] = kFromData ? load(xcol + (i + 2) * d) : static_cast<double>(src[i * d]);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      if (i0 + k < m) {
        double rhs = r[k];
        if (kFromData) {
          rhs = st.c[0][k] * xa + st.c[1][k] * xb + st.c[2][k] * r[k];
          xa = xb;
          xb = r[k];
        }
        const double z = (rhs - f.c[1][k] * z1 - f.c[2][k] * z2) * f.c[0][k];
        z2 = z1;
        z1 = z;
        if (active) zcol[(i0 + k) * d] = static_cast<S>(z);
      }
    }
    __syncthreads();
  }
}

// gamma = U^{-1} z in place, rows m-1 .. 0: gamma_i = (z_i - U[i,i+1] gamma_i+1 - U[i,i+2] gamma_i+2) / U[i,i];
// with sum_into (a refinement's correction), sum_into_i += gamma_i instead.
template <typename S>
__device__ __forceinline__ void upper_sweep(const BandedArgs& a, S* zcol, bool active, SweepTile& f,
                                            S* sum_into = nullptr) {
  const int64_t m = a.m, d = a.d;
  double g1 = 0, g2 = 0;  // gamma_i+1, gamma_i+2
  for (int64_t i1 = m - 1; i1 >= 0; i1 -= kTile) {  // tile rows i1, i1 - 1, ..., down to 0
    for (int e = threadIdx.x; e < 3 * kTile; e += blockDim.x) {
      const int w = e / kTile, k = e % kTile;
      const int64_t i = i1 - k + w;  // 1 / U[i,i], U[i,i+1] = factor[1, i+1], U[i,i+2] = factor[2, i+2]
      f.c[w][k] = (i1 - k >= 0 && i < m) ? a.factor[w * m + i] : 0.0;
    }
    double r[kTile];
#pragma unroll
    for (int k = 0; k < kTile; ++k) r[k] = (active && i1 - k >= 0) ? static_cast<double>(zcol[(i1 - k) * d]) : 0.0;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      if (i1 - k >= 0) {
        const double g = (r[k] - f.c[1][k] * g1 - f.c[2][k] * g2) * f.c[0][k];
        g2 = g1;
        g1 = g;
        S* dst = (sum_into ? sum_into : zcol) + (i1 - k) * d;
        if (active) *dst = static_cast<S>(sum_into ? g + static_cast<double>(*dst) : g);
      }
    }
    __syncthreads();
  }
}

// The right-hand side of one refinement step (dres_fast/banded.py, BandedSpline._residual), rows 0 .. m-1:
//   res_i = (a_i f_i + b_i f_i+1 + c_i f_i+2 - rd_i g_i - ro_i g_i+1 - ro_i-1 g_i-1) / (1 + lam)  [+ v_i],
//   f_j = x_j - lam (Q g)_j, (Q g)_j = a_j g_j + b_j-1 g_j-1 + c_j-2 g_j-2  (a, b, c zero past m - 1),
// for g the first solve (gcol); forward (kFromData): x the data; transpose: x = 0 and + v_i, read from
// rcol, which the result overwrites.
template <bool kFromData, typename T, typename S>
__device__ __forceinline__ void residual(const BandedArgs& a, const T* __restrict__ xcol, const S* gcol, S* rcol,
                                         bool active, ResidualTile& t) {
  const int64_t m = a.m, d = a.d;
  const double lam = a.lam;
  auto g_at = [&](int64_t i) { return (active && i < m) ? static_cast<double>(gcol[i * d]) : 0.0; };
  auto x_at = [&](int64_t j) { return (kFromData && active) ? load(xcol + j * d) : 0.0; };
  double gm1 = 0, g0 = g_at(0), g1 = g_at(1);  // g_i-1, g_i, g_i+1
  const double* q = a.q_bands;
  const double a0 = q[0], a1 = m > 1 ? q[1] : 0.0, b0 = q[m];
  double f0 = -(a0 * g0) * lam + x_at(0), f1 = -(a1 * g1 + b0 * g0) * lam + x_at(1);  // f_i, f_i+1
  for (int64_t i0 = 0; i0 < m; i0 += kTile) {
    for (int e = threadIdx.x; e < 5 * (kTile + 3); e += blockDim.x) {
      const int w = e / (kTile + 3), k = e % (kTile + 3);
      const int64_t i = i0 - 1 + k;
      const double v = (i >= 0 && i < m) ? (w < 3 ? q[w * m + i] : a.r_bands[(w - 3) * m + i]) : 0.0;
      if (w < 3) t.q[w][k] = v;
      else t.r[w - 3][k] = v;
    }
    double g2[kTile];  // g_i+2 of the tile's rows
#pragma unroll
    for (int k = 0; k < kTile; ++k) g2[k] = g_at(i0 + k + 2);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      const int64_t i = i0 + k;
      if (i < m) {
        const int e = k + 1;  // row i in the staged bands
        const double f2 = -(t.q[0][e + 2] * g2[k] + t.q[1][e + 1] * g1 + t.q[2][e] * g0) * lam + x_at(i + 2);
        double r = t.q[0][e] * f0 + t.q[1][e] * f1 + t.q[2][e] * f2;
        r = r - t.r[0][e] * g0 - t.r[1][e] * g1 - t.r[1][e - 1] * gm1;
        r /= 1.0 + lam;
        if (!kFromData && active) r += static_cast<double>(rcol[i * d]);
        if (active) rcol[i * d] = static_cast<S>(r);
        gm1 = g0;
        g0 = g1;
        g1 = g2[k];
        f0 = f1;
        f1 = f2;
      }
    }
    __syncthreads();
  }
}

// Forward: out (p, d) = W x, x (n, d) contiguous; scratch (m, d), (2 m, d) with refinement (the correction).
template <typename T, typename S>
__global__ void __launch_bounds__(kBandedMaxThreads)
banded_forward_kernel(BandedArgs a, const T* __restrict__ x, T* __restrict__ out, S* __restrict__ scratch) {
  __shared__ SweepTile f, st;
  __shared__ ResidualTile rt;
  __shared__ PointTile pt;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, d = a.d;
  const bool active = col < d;  // inactive threads still take part in every barrier
  const T* xcol = x + (active ? col : 0);
  S* zcol = scratch + (active ? col : 0);
  lower_sweep<true>(a, xcol, zcol, zcol, active, f, st);
  upper_sweep(a, zcol, active, f);
  if (a.q_bands != nullptr) {  // gamma += M^{-1} residual
    S* rcol = zcol + a.m * d;
    residual<true>(a, xcol, zcol, rcol, active, rt);
    lower_sweep<false>(a, xcol, rcol, rcol, active, f, st);
    upper_sweep(a, rcol, active, f, zcol);
  }
  for (int64_t r0 = 0; r0 < a.p; r0 += kTile) {  // out_r = P x + V gamma: 6 gathered rows per point
    stage_points(pt, a, r0);
#pragma unroll 4
    for (int k = 0; k < kTile; ++k) {
      if (r0 + k < a.p && active) {
        const int64_t j = pt.index[k];
        double v = pt.chord[0][k] * load(xcol + j * d) + pt.chord[1][k] * load(xcol + (j + 1) * d);
#pragma unroll
        for (int q = 0; q < 4; ++q) v += pt.curvature[q][k] * static_cast<double>(zcol[pt.gather[q][k] * d]);
        out[(r0 + k) * d + col] = Store<T>::out(v);
      }
    }
    __syncthreads();
  }
}

// Transpose: out (n, d) = W^T g, g (p, d) contiguous; scratch (m + n, d): v / u in rows [0, m), the
// float64 accumulator of P^T g in rows [m, m + n); with refinement (2 m + n, d): v, then the residual and
// the correction, in rows [0, m), u in rows [m + n, 2 m + n).
template <typename T, typename S>
__global__ void __launch_bounds__(kBandedMaxThreads)
banded_transpose_kernel(BandedArgs a, const T* __restrict__ g, T* __restrict__ out, S* __restrict__ scratch) {
  __shared__ SweepTile f, st;
  __shared__ ResidualTile rt;
  __shared__ PointTile pt;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, d = a.d, m = a.m;
  const bool active = col < d;
  const T* gcol = g + (active ? col : 0);
  S* vcol = scratch + (active ? col : 0);
  S* acc = vcol + m * d;
  if (active)
    for (int64_t i = 0; i < m + a.n; ++i) vcol[i * d] = S(0);
  for (int64_t r0 = 0; r0 < a.p; r0 += kTile) {  // v = V^T g, acc = P^T g (scatters, in row order)
    stage_points(pt, a, r0);
    if (active) {
#pragma unroll 4
      for (int k = 0; k < kTile; ++k) {
        if (r0 + k < a.p) {
          const double gr = load(gcol + (r0 + k) * d);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            S* v = vcol + pt.gather[q][k] * d;
            *v = static_cast<S>(static_cast<double>(*v) + pt.curvature[q][k] * gr);
          }
          S* o = acc + pt.index[k] * d;
          o[0] = static_cast<S>(static_cast<double>(o[0]) + pt.chord[0][k] * gr);
          o[d] = static_cast<S>(static_cast<double>(o[d]) + pt.chord[1][k] * gr);
        }
      }
    }
    __syncthreads();
  }
  const bool refine = a.q_bands != nullptr;
  S* ucol = refine ? acc + a.n * d : vcol;
  lower_sweep<false>(a, gcol, vcol, ucol, active, f, st);  // u = M^{-1} v
  upper_sweep(a, ucol, active, f);
  if (refine) {  // u += M^{-1} (v - M u), M u in factored form (the residual with x = 0)
    residual<false>(a, gcol, ucol, vcol, active, rt);
    lower_sweep<false>(a, gcol, vcol, vcol, active, f, st);
    upper_sweep(a, vcol, active, f, ucol);
  }
  // out_j = acc_j + s0_j u_j + s1_j-1 u_j-1 + s2_j-2 u_j-2 (u_i = 0 outside [0, m)), rows 0 .. n-1
  double u1 = 0, u2 = 0;  // u_j-1, u_j-2
  for (int64_t j0 = 0; j0 < a.n; j0 += kTile) {
    for (int e = threadIdx.x; e < 3 * kTile; e += blockDim.x) {
      const int w = e / kTile, k = e % kTile;
      const int64_t i = j0 + k - w;  // the column of Q^T feeding row j0 + k through stencil row w
      st.c[w][k] = (i >= 0 && i < m) ? a.stencil[w * m + i] : 0.0;
    }
    double u[kTile];
#pragma unroll
    for (int k = 0; k < kTile; ++k) u[k] = (active && j0 + k < m) ? static_cast<double>(ucol[(j0 + k) * d]) : 0.0;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      if (j0 + k < a.n) {
        const double s = active ? static_cast<double>(acc[(j0 + k) * d]) : 0.0;
        const double v = s + st.c[0][k] * u[k] + st.c[1][k] * u1 + st.c[2][k] * u2;
        u2 = u1;
        u1 = u[k];
        if (active) out[(j0 + k) * d + col] = Store<T>::out(v);
      }
    }
    __syncthreads();
  }
}

// Columns per block: 128, or fewer when d is small, so that more multiprocessors get a block.
inline int banded_threads(int64_t d, int multiprocessors) {
  int threads = kBandedMaxThreads;
  while (threads > 32 && (d + threads - 1) / threads < 2 * static_cast<int64_t>(multiprocessors)) threads /= 2;
  return threads;
}

#ifndef DRES_HOST_EMULATION  // launchers: nvcc only
template <typename T>
cudaError_t launch_banded(const BandedArgs& a, const void* x, void* out, bool transpose, void* scratch,
                          cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int threads = banded_threads(a.d, sms);
  const int64_t blocks = (a.d + threads - 1) / threads;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  if (transpose)
    banded_transpose_kernel<T, double><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        a, static_cast<const T*>(x), static_cast<T*>(out), static_cast<double*>(scratch));
  else
    banded_forward_kernel<T, double><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        a, static_cast<const T*>(x), static_cast<T*>(out), static_cast<double*>(scratch));
  return cudaGetLastError();
}
#endif  // DRES_HOST_EMULATION
}  // namespace
}  // namespace dres
#ifndef DRES_HOST_EMULATION

extern "C" cudaError_t dres_banded_workspace(int64_t n, int64_t p, int64_t d, int transpose, int refine,
                                             int64_t* scratch_elems) {
  if (n < 3 || p < 0 || d < 0 || scratch_elems == nullptr) return cudaErrorInvalidValue;
  const int64_t m = n - 2;
  *scratch_elems = ((transpose ? m + n : m) + (refine ? m : 0)) * d;
  return cudaSuccess;
}

extern "C" cudaError_t dres_banded_apply(const double* factor, const double* stencil, const int64_t* index,
                                         const double* chord, const double* curvature, const int64_t* gather,
                                         const double* q_bands, const double* r_bands, double lam, int64_t n,
                                         int64_t p, const void* x, void* out, int64_t d, int transpose,
                                         void* scratch, DresDType dtype, cudaStream_t stream) {
  if (n < 3 || p < 0 || d < 0 || (q_bands != nullptr && r_bands == nullptr)) return cudaErrorInvalidValue;
  if (d == 0 || (p == 0 && !transpose)) return cudaSuccess;  // nothing to write
  const dres::BandedArgs args{factor, stencil, index, chord, curvature, gather, n, p, n - 2, d,
                              q_bands, r_bands, lam};
  return dres::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dres::launch_banded<T>(args, x, out, transpose != 0, scratch, stream);
  });
}
#endif  // DRES_HOST_EMULATION
