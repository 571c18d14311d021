// Torch binding of the dres_fast CUDA kernels: the ops dres_fast_C::spline_mix,
// dres_fast_C::reconstruction_loss and dres_fast_C::banded_apply (CUDA and Meta implementations),
// registered with TORCH_LIBRARY so that they are torch ops (visible to torch.compile as ops, not opaque
// Python calls).
//
// This is the only file that includes torch. It validates the inputs with messages that name the
// argument, allocates outputs and scratch buffers, and calls the raw-pointer launchers declared in
// dres_kernels.h on the current CUDA stream. Semantics: docs/ARCHITECTURE.md, "The backend contract".
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "dres_kernels.h"

namespace {

constexpr const char* kWho = "dres_fast cuda backend: ";

DresDType to_dres_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DRES_F32;
    case at::kDouble: return DRES_F64;
    case at::kHalf: return DRES_F16;
    case at::kBFloat16: return DRES_BF16;
    default:
      break;
  }
  TORCH_CHECK(false, kWho, name, " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
}

// Op rules (C++ mirror of dres_fast/contract.py; change both together):
//   compute dtype: float64 for float64 data, float32 for everything else (compute_dtype below);
//   loss dtype:    the compute dtype (allocate_outputs below);
//   gradient scale c in grad_y = c * r: 2 / (K * d) for "mean", 2 for "sum" and "none"
//                  (grad_scale in csrc/reconstruction_loss.cu, dres_reconstruction_loss).
at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_2d(const at::Tensor& t, const char* name, bool need_cuda) {
  TORCH_CHECK(!need_cuda || t.is_cuda(), kWho, name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.dim() == 2, kWho, name, " must be 2-D, got shape ", t.sizes());
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), kWho, a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// The small weight matrices are converted to the compute dtype and made contiguous (a no-op for
// what the ops layer passes); a non-floating matrix is an error.
at::Tensor weights_in_compute_dtype(const at::Tensor& w, const char* name, at::ScalarType acc) {
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), kWho, name,
              " must be a floating-point tensor, got ", w.scalar_type());
  return w.to(acc).contiguous();
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, kWho, what, " failed: ", cudaGetErrorString(err));
}

int parse_reduction(const std::string& reduction) {
  if (reduction == "mean") return DRES_REDUCTION_MEAN;
  if (reduction == "sum") return DRES_REDUCTION_SUM;
  if (reduction == "none") return DRES_REDUCTION_NONE;
  TORCH_CHECK(false, kWho, "reduction must be \"mean\", \"sum\" or \"none\", got \"", reduction,
              "\"");
  return -1;
}

// Shape checks use symbolic sizes so that the Meta implementations also work under torch.compile
// with dynamic shapes (concrete sizes on real tensors).
void check_spline_mix(const at::Tensor& weights, const at::Tensor& x, bool need_cuda) {
  check_2d(weights, "weights", need_cuda);
  check_2d(x, "x", need_cuda);
  check_same_device(weights, "weights", x, "x");
  to_dres_dtype(x, "x");
  TORCH_CHECK(weights.sym_size(1) == x.sym_size(0), kWho,
              "weights (M, K) and x (K, d) disagree on K: weights ", weights.sym_sizes(), ", x ",
              x.sym_sizes());
}

at::Tensor spline_mix_cuda(const at::Tensor& weights_arg, const at::Tensor& x) {
  check_spline_mix(weights_arg, x, /*need_cuda=*/true);
  const DresDType dtype = to_dres_dtype(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = compute_dtype(x.scalar_type());
  // W^T of a contiguous W (what backward passes) is read in place by the transposed loader: no copy.
  const bool transposed = weights_arg.scalar_type() == acc && weights_arg.size(0) > 1 && weights_arg.stride(0) == 1 &&
                          weights_arg.stride(1) == weights_arg.size(0);
  const at::Tensor weights = transposed ? weights_arg : weights_in_compute_dtype(weights_arg, "weights", acc);
  const int64_t M = weights.size(0), K = x.size(0), d = x.size(1);
  at::Tensor out = at::empty({M, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || d == 0) return out;
  if (K == 0) return out.zero_();  // empty sum
  check_cuda(dres_spline_mix(weights.data_ptr(), transposed ? 1 : 0, x.data_ptr(), out.data_ptr(), M, K, d,
                             x.stride(0), x.stride(1), dtype, c10::cuda::getCurrentCUDAStream().stream()),
             "spline_mix kernel launch");
  return out;
}

at::Tensor spline_mix_meta(const at::Tensor& weights, const at::Tensor& x) {
  check_spline_mix(weights, x, /*need_cuda=*/false);
  return at::empty_symint({weights.sym_size(0), x.sym_size(1)}, x.options());
}

void check_reconstruction(const at::Tensor& y, const at::Tensor& y_coded,
                          const at::Tensor& decoder, bool need_cuda) {
  check_2d(y, "y", need_cuda);
  check_2d(y_coded, "y_coded", need_cuda);
  check_2d(decoder, "decoder", need_cuda);
  check_same_device(y, "y", y_coded, "y_coded");
  check_same_device(y, "y", decoder, "decoder");
  to_dres_dtype(y, "y");
  TORCH_CHECK(y_coded.scalar_type() == y.scalar_type(), kWho,
              "y_coded must have the dtype of y (", y.scalar_type(), "), got ",
              y_coded.scalar_type());
  TORCH_CHECK(y_coded.sym_size(1) == y.sym_size(1), kWho,
              "y (K, d) and y_coded (N, d) disagree on d: y ", y.sym_sizes(), ", y_coded ",
              y_coded.sym_sizes());
  TORCH_CHECK(decoder.sym_size(0) == y.sym_size(0) && decoder.sym_size(1) == y_coded.sym_size(0),
              kWho, "decoder must be (K, N) = (", y.sym_size(0), ", ", y_coded.sym_size(0),
              "), got ", decoder.sym_sizes());
}

struct LossShapes {
  at::Tensor loss, grad_y, grad_y_coded;
};

// Outputs with the contract's shapes and dtypes (also used for fake/meta tensors).
LossShapes allocate_outputs(const at::Tensor& y, const at::Tensor& y_coded, int reduction,
                            bool compute_grads) {
  const c10::SymInt K = y.sym_size(0), N = y_coded.sym_size(0), d = y.sym_size(1);
  const auto loss_options = y.options().dtype(compute_dtype(y.scalar_type()));
  LossShapes out;
  out.loss = reduction == DRES_REDUCTION_NONE ? at::empty_symint({K}, loss_options)
                                              : at::empty(c10::IntArrayRef{}, loss_options);
  out.grad_y = compute_grads ? at::empty_symint({K, d}, y.options())
                             : at::empty({0}, y.options());
  out.grad_y_coded = (compute_grads && reduction != DRES_REDUCTION_NONE)
                         ? at::empty_symint({N, d}, y.options())
                         : at::empty({0}, y.options());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reconstruction_loss_cuda(
    const at::Tensor& y, const at::Tensor& y_coded, const at::Tensor& decoder_arg,
    c10::string_view reduction_name, bool compute_grads) {
  check_reconstruction(y, y_coded, decoder_arg, /*need_cuda=*/true);
  const int reduction = parse_reduction(std::string(reduction_name));
  const DresDType dtype = to_dres_dtype(y, "y");
  const c10::cuda::CUDAGuard guard(y.device());
  const at::ScalarType acc = compute_dtype(y.scalar_type());
  const at::Tensor decoder = weights_in_compute_dtype(decoder_arg, "decoder", acc);
  const int64_t K = y.size(0), N = y_coded.size(0), d = y.size(1);
  LossShapes out = allocate_outputs(y, y_coded, reduction, compute_grads);

  if (K == 0 || d == 0) {  // no elements: r is empty, every sum is 0 (mean: 0 / 0 = nan)
    if (reduction == DRES_REDUCTION_NONE) out.loss.zero_();
    else out.loss.fill_(reduction == DRES_REDUCTION_MEAN ? NAN : 0.0);
    if (compute_grads) {
      out.grad_y.zero_();
      if (reduction != DRES_REDUCTION_NONE) out.grad_y_coded.zero_();
    }
    return {out.loss, out.grad_y, out.grad_y_coded};
  }

  int64_t partial_elems = 0, scratch_elems = 0;
  check_cuda(dres_reconstruction_loss_workspace(K, N, d, dtype, reduction, compute_grads ? 1 : 0,
                                                &partial_elems, &scratch_elems),
             "reconstruction_loss workspace query");
  const at::Tensor partials = at::empty({partial_elems}, y.options().dtype(acc));
  const at::Tensor scratch =
      scratch_elems > 0 ? at::empty({scratch_elems}, y.options().dtype(at::kFloat)) : at::Tensor();

  check_cuda(dres_reconstruction_loss(
                 y.data_ptr(), y.stride(0), y.stride(1), y_coded.data_ptr(), y_coded.stride(0),
                 y_coded.stride(1), decoder.data_ptr(), K, N, d, dtype, reduction,
                 compute_grads ? 1 : 0, out.loss.data_ptr(),
                 compute_grads ? out.grad_y.data_ptr() : nullptr,
                 (compute_grads && reduction != DRES_REDUCTION_NONE) ? out.grad_y_coded.data_ptr()
                                                                     : nullptr,
                 partials.data_ptr(), partial_elems,
                 scratch.defined() ? scratch.data_ptr() : nullptr,
                 c10::cuda::getCurrentCUDAStream().stream()),
             "reconstruction_loss kernel launch");
  return {out.loss, out.grad_y, out.grad_y_coded};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reconstruction_loss_meta(
    const at::Tensor& y, const at::Tensor& y_coded, const at::Tensor& decoder,
    c10::string_view reduction_name, bool compute_grads) {
  check_reconstruction(y, y_coded, decoder, /*need_cuda=*/false);
  const int reduction = parse_reduction(std::string(reduction_name));
  LossShapes out = allocate_outputs(y, y_coded, reduction, compute_grads);
  return {out.loss, out.grad_y, out.grad_y_coded};
}

// banded_apply: out = W x (transpose false; x (n, d)) or W^T x (true; x (p, d)) for a BandedSpline's
// coefficients (dres_fast/banded.py; m = n - 2): factor, stencil (3, m), chord (p, 2), curvature (p, 4)
// float64; index (p,), gather (p, 4) int64; with q_bands (3, m), r_bands (2, m) float64 and lam, one step
// of iterative refinement (the spline's, where it has refine). Output contiguous in x's dtype.
using OptTensor = std::optional<at::Tensor>;

void check_banded(const at::Tensor& factor, const at::Tensor& stencil, const at::Tensor& index,
                  const at::Tensor& chord, const at::Tensor& curvature, const at::Tensor& gather,
                  const at::Tensor& x, bool transpose, const OptTensor& q_bands, const OptTensor& r_bands,
                  bool need_cuda) {
  check_2d(x, "x", need_cuda);
  to_dres_dtype(x, "x");
  const struct { const at::Tensor& t; const char* name; at::ScalarType type; int64_t dim; } arrays[] = {
      {factor, "factor", at::kDouble, 2}, {stencil, "stencil", at::kDouble, 2}, {index, "index", at::kLong, 1},
      {chord, "chord", at::kDouble, 2}, {curvature, "curvature", at::kDouble, 2}, {gather, "gather", at::kLong, 2}};
  for (const auto& a : arrays) {
    TORCH_CHECK(!need_cuda || a.t.is_cuda(), kWho, a.name, " must be a CUDA tensor, got device ", a.t.device());
    check_same_device(a.t, a.name, x, "x");
    TORCH_CHECK(a.t.scalar_type() == a.type, kWho, a.name, " must be ", a.type, ", got ", a.t.scalar_type());
    TORCH_CHECK(a.t.dim() == a.dim, kWho, a.name, " must be ", a.dim, "-D, got shape ", a.t.sym_sizes());
  }
  const c10::SymInt m = factor.sym_size(1), p = index.sym_size(0);
  TORCH_CHECK(factor.sym_size(0) == 3 && stencil.sym_size(0) == 3 && stencil.sym_size(1) == m && m >= 1, kWho,
              "factor and stencil must be (3, m) with m >= 1, got ", factor.sym_sizes(), " and ",
              stencil.sym_sizes());
  TORCH_CHECK(chord.sym_size(0) == p && chord.sym_size(1) == 2 && curvature.sym_size(0) == p &&
                  curvature.sym_size(1) == 4 && gather.sym_size(0) == p && gather.sym_size(1) == 4,
              kWho, "index (p,), chord (p, 2), curvature (p, 4), gather (p, 4) disagree: ", index.sym_sizes(),
              ", ", chord.sym_sizes(), ", ", curvature.sym_sizes(), ", ", gather.sym_sizes());
  TORCH_CHECK(q_bands.has_value() == r_bands.has_value(), kWho, "q_bands and r_bands come together");
  if (q_bands.has_value()) {
    using Band = std::tuple<const at::Tensor&, const char*, int64_t>;
    for (const auto& [band, name, width] : {Band{*q_bands, "q_bands", 3}, Band{*r_bands, "r_bands", 2}}) {
      TORCH_CHECK(!need_cuda || band.is_cuda(), kWho, name, " must be a CUDA tensor, got device ", band.device());
      check_same_device(band, name, x, "x");
      TORCH_CHECK(band.scalar_type() == at::kDouble && band.dim() == 2 && band.sym_size(0) == width &&
                      band.sym_size(1) == m,
                  kWho, name, " must be float64 (", width, ", m = ", m, "), got ", band.scalar_type(), " ",
                  band.sym_sizes());
    }
  }
  const c10::SymInt rows = transpose ? p : m + 2;
  TORCH_CHECK(x.sym_size(0) == rows, kWho, "x must have ", transpose ? "p = " : "n = ", rows,
              " rows, got shape ", x.sym_sizes());
}

at::Tensor banded_apply_cuda(const at::Tensor& factor, const at::Tensor& stencil, const at::Tensor& index,
                             const at::Tensor& chord, const at::Tensor& curvature, const at::Tensor& gather,
                             const at::Tensor& x_arg, bool transpose, const OptTensor& q_bands,
                             const OptTensor& r_bands, double lam) {
  check_banded(factor, stencil, index, chord, curvature, gather, x_arg, transpose, q_bands, r_bands,
               /*need_cuda=*/true);
  const c10::cuda::CUDAGuard guard(x_arg.device());
  const at::Tensor x = x_arg.contiguous();
  const at::Tensor f = factor.contiguous(), st = stencil.contiguous(), idx = index.contiguous(),
                   ch = chord.contiguous(), cu = curvature.contiguous(), ga = gather.contiguous();
  const bool refine = q_bands.has_value();
  const at::Tensor qb = refine ? q_bands->contiguous() : at::Tensor();
  const at::Tensor rb = refine ? r_bands->contiguous() : at::Tensor();
  const int64_t n = f.size(1) + 2, p = idx.size(0), d = x.size(1);
  at::Tensor out = at::empty({transpose ? n : p, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  int64_t scratch_elems = 0;
  check_cuda(dres_banded_workspace(n, p, d, transpose ? 1 : 0, refine ? 1 : 0, &scratch_elems),
             "banded_apply workspace query");
  const at::Tensor scratch = at::empty({scratch_elems}, x.options().dtype(at::kDouble));
  check_cuda(dres_banded_apply(f.data_ptr<double>(), st.data_ptr<double>(), idx.data_ptr<int64_t>(),
                               ch.data_ptr<double>(), cu.data_ptr<double>(), ga.data_ptr<int64_t>(),
                               refine ? qb.data_ptr<double>() : nullptr, refine ? rb.data_ptr<double>() : nullptr,
                               lam, n, p,
                               x.data_ptr(), out.data_ptr(), d, transpose ? 1 : 0, scratch.data_ptr(),
                               to_dres_dtype(x, "x"), c10::cuda::getCurrentCUDAStream().stream()),
             "banded_apply kernel launch");
  return out;
}

at::Tensor banded_apply_meta(const at::Tensor& factor, const at::Tensor& stencil, const at::Tensor& index,
                             const at::Tensor& chord, const at::Tensor& curvature, const at::Tensor& gather,
                             const at::Tensor& x, bool transpose, const OptTensor& q_bands,
                             const OptTensor& r_bands, double lam) {
  check_banded(factor, stencil, index, chord, curvature, gather, x, transpose, q_bands, r_bands,
               /*need_cuda=*/false);
  return at::empty_symint({transpose ? factor.sym_size(1) + 2 : index.sym_size(0), x.sym_size(1)}, x.options());
}

}  // namespace

TORCH_LIBRARY(dres_fast_C, m) {
  m.def("spline_mix(Tensor weights, Tensor x) -> Tensor");
  m.def(
      "reconstruction_loss(Tensor y, Tensor y_coded, Tensor decoder, str reduction, "
      "bool compute_grads) -> (Tensor, Tensor, Tensor)");
  m.def(
      "banded_apply(Tensor factor, Tensor stencil, Tensor index, Tensor chord, Tensor curvature, "
      "Tensor gather, Tensor x, bool transpose, Tensor? q_bands=None, Tensor? r_bands=None, float lam=0.0) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(dres_fast_C, CUDA, m) {
  m.impl("spline_mix", &spline_mix_cuda);
  m.impl("reconstruction_loss", &reconstruction_loss_cuda);
  m.impl("banded_apply", &banded_apply_cuda);
}

TORCH_LIBRARY_IMPL(dres_fast_C, Meta, m) {
  m.impl("spline_mix", &spline_mix_meta);
  m.impl("reconstruction_loss", &reconstruction_loss_meta);
  m.impl("banded_apply", &banded_apply_meta);
}

// `import dres_fast._C` (the install-time build) needs a Python module init; the ops are registered
// by the static initialisers above when the library is loaded. TORCH_EXTENSION_NAME is defined by
// torch's build helpers (_C for setup.py, dres_fast_C_jit for the first-use build).
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define DRES_CONCAT_INNER(a, b) a##b
#define DRES_CONCAT(a, b) DRES_CONCAT_INNER(a, b)
#define DRES_STRINGIFY_INNER(a) #a
#define DRES_STRINGIFY(a) DRES_STRINGIFY_INNER(a)

PyMODINIT_FUNC DRES_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      DRES_STRINGIFY(TORCH_EXTENSION_NAME),
      "dres_fast CUDA kernels; the ops live in torch.ops.dres_fast_C",
      -1,       // m_size: no per-module state
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module_def);
}
