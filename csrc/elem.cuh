// Element types of the dres_fast CUDA kernels: the compute type of each input type with explicit
// conversions, the dtype dispatch of the C API, aligned vector packs. Shared by tile_gemm.cuh and banded.cu.
#pragma once

#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "dres_kernels.h"  // DresDType
#ifdef DRES_HOST_EMULATION
#include "host_emulation.h"  // CPU test build of the kernel bodies (tests/test_cuda_backend.py)
#else
#include <cuda_runtime.h>
#endif

namespace dres {

// Element traits: the compute type of each input type and explicit conversions (torch extension
// builds define __CUDA_NO_HALF_CONVERSIONS__, so nothing here relies on implicit half casts).
template <typename T> struct Elem;
template <> struct Elem<float> {
  using Acc = float;
  static __device__ __forceinline__ float in(float v) { return v; }
  static __device__ __forceinline__ float out(float v) { return v; }
};
template <> struct Elem<double> {
  using Acc = double;
  static __device__ __forceinline__ double in(double v) { return v; }
  static __device__ __forceinline__ double out(double v) { return v; }
};
template <> struct Elem<__half> {
  using Acc = float;
  static __device__ __forceinline__ float in(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half out(float v) { return __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float in(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 out(float v) { return __float2bfloat16_rn(v); }
};

// One switch from the C API's dtype tag to the element type, for every launcher (like torch's
// AT_DISPATCH): returns f(TypeTag<T>{}), where T is float, double, __half or __nv_bfloat16.
template <typename T> struct TypeTag { using type = T; };

template <class F>
cudaError_t dispatch_dtype(DresDType dtype, F&& f) {
  switch (dtype) {
    case DRES_F32: return f(TypeTag<float>{});
    case DRES_F64: return f(TypeTag<double>{});
    case DRES_F16: return f(TypeTag<__half>{});
    case DRES_BF16: return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// N consecutive elements moved as one aligned vector access (N * sizeof(T) is a power of two).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline bool is_aligned(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

}  // namespace dres
