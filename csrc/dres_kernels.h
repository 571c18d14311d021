// Launchers of the dres_fast CUDA kernels (backend "cuda").
//
// Plain CUDA runtime API: raw pointers, sizes, element strides, a dtype tag and a stream.
// No torch headers here, so the .cu files compile with plain nvcc on a machine without a GPU;
// csrc/binding.cpp is the only file that sees torch.
//
// Semantics follow docs/ARCHITECTURE.md ("The backend contract"):
//   spline_mix:          out (M, d) = W (M, K) @ x (K, d)
//   reconstruction_loss: r = y - D @ y_coded, per_sample[k] = sum_j r[k, j]^2, loss, grads.
//   banded_apply:        out = W x or W^T g, W a smoothing spline map as float64 coefficients.
// Accumulation is in the compute type ("Acc"): float64 for float64 inputs, float32 otherwise,
// with IEEE fp32 fused multiply-adds (no TF32). Every reduction is deterministic: per-block partial
// sums written to a buffer and summed in a fixed order by a second kernel, no floating-point atomics.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of x / y / y_coded. Weights and decoder are always in the compute type
// (float64 for DRES_F64, float32 otherwise).
typedef enum DresDType {
  DRES_F32 = 0,
  DRES_F64 = 1,
  DRES_F16 = 2,
  DRES_BF16 = 3,
} DresDType;

typedef enum DresReduction {
  DRES_REDUCTION_MEAN = 0,
  DRES_REDUCTION_SUM = 1,
  DRES_REDUCTION_NONE = 2,
} DresReduction;

// out[m, j] = sum_k weights[m, k] * x[k, j].
//   weights: (M, K) contiguous, compute type; or, with weights_transposed, the transpose of a contiguous
//   (K, M) matrix (read in place).   x: (K, d) with element strides (x_stride_k, x_stride_d).
//   out: (M, d) contiguous, dtype of x.
cudaError_t dres_spline_mix(const void* weights, int weights_transposed, const void* x, void* out, int64_t M,
                            int64_t K, int64_t d, int64_t x_stride_k, int64_t x_stride_d, DresDType dtype,
                            cudaStream_t stream);

// Sizes of the scratch buffers reconstruction_loss needs (elements of the compute type):
//   *partial_elems: per-block per-row partial sums plus the per-sample row sums;
//   *grad_scratch_elems: float32 copy of grad_y for float16/bfloat16 inputs with
//                        reduction mean/sum and compute_grads (0 otherwise).
// Reads the current device's multiprocessor count (the loss kernel uses a persistent grid).
cudaError_t dres_reconstruction_loss_workspace(int64_t K, int64_t N, int64_t d, DresDType dtype,
                                               int reduction, int compute_grads,
                                               int64_t* partial_elems,
                                               int64_t* grad_scratch_elems);

// r = y - decoder @ y_coded;  per_sample[k] = sum_j r[k, j]^2.
//   y: (K, d) strides (y_stride_k, y_stride_d); y_coded: (N, d) strides (yc_stride_n, yc_stride_d);
//   decoder: (K, N) contiguous, compute type.
//   loss: compute type; 1 element for mean/sum, K elements for none.
//   grad_y (K, d) / grad_y_coded (N, d): contiguous, dtype of y; written only when compute_grads
//   (grad_y_coded only for mean/sum):  c = 2/(K*d) (mean), 2 (sum), 2 (none)
//     grad_y = c * r;   grad_y_coded = -decoder^T @ grad_y.
//   partials / grad_scratch: buffers of the sizes dres_reconstruction_loss_workspace returned
//   (grad_scratch may be null when its size is 0).
cudaError_t dres_reconstruction_loss(const void* y, int64_t y_stride_k, int64_t y_stride_d,
                                     const void* y_coded, int64_t yc_stride_n, int64_t yc_stride_d,
                                     const void* decoder, int64_t K, int64_t N, int64_t d,
                                     DresDType dtype, int reduction, int compute_grads, void* loss,
                                     void* grad_y, void* grad_y_coded, void* partials,
                                     int64_t partial_elems, void* grad_scratch,
                                     cudaStream_t stream);

// Scratch banded_apply needs (float64 elements): (n - 2) * d forward, (2 n - 2) * d transpose, plus
// (n - 2) * d with refinement.
cudaError_t dres_banded_workspace(int64_t n, int64_t p, int64_t d, int transpose, int refine,
                                  int64_t* scratch_elems);

// out = W x (transpose = 0; x (n, d), out (p, d)) or out = W^T x (transpose = 1; x (p, d), out (n, d)) for
// the (p, n) natural cubic smoothing spline map of dres_fast/banded.py (BandedSpline, finite lam), m = n - 2:
//   factor (3, m), stencil (3, m), chord (p, 2), curvature (p, 4): float64; index (p,), gather (p, 4): int64;
//   q_bands (3, m), r_bands (2, m): float64, the spline's bands for its step of iterative refinement, with
//   its lam; q_bands null: no refinement. All contiguous. x, out: contiguous, the dtype's element type.
//   All arithmetic in float64 (csrc/banded.cu). scratch: dres_banded_workspace's float64 elements.
cudaError_t dres_banded_apply(const double* factor, const double* stencil, const int64_t* index,
                              const double* chord, const double* curvature, const int64_t* gather,
                              const double* q_bands, const double* r_bands, double lam, int64_t n, int64_t p,
                              const void* x, void* out, int64_t d, int transpose, void* scratch,
                              DresDType dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
