// The CUDA kernel bodies of csrc/ run on the CPU (csrc/host_emulation.h: every block as 256 std::threads)
// and checked against float64 loops. Built and run by tests/test_cuda_backend.py:
//   g++ -std=c++20 -O1 -pthread -DDRES_HOST_EMULATION -I csrc -I <cuda include> harness.cpp
// Includes the .cu files with DRES_HOST_EMULATION (kernels only, no launchers); replicates the
// launchers' grid and vector-path decisions. The persistent grid runs with fewer blocks than column
// tiles; layouts cover contiguous, transposed/strided and misaligned. Prints one OK/FAIL line per check
// and "<n> failure(s)"; exits non-zero on any failure.
//
// File mode, for fp32 accuracy against torch (tests/test_cuda_backend.py writes the inputs, judges the
// outputs by the fp32 rule of tests/reference.py): contiguous float32 arrays as raw files in DIR.
//   harness recon K N d REDUCTION DIR   reads decoder y y_coded, writes loss grad_y grad_y_coded
//   harness mix M K d DIR               reads weights x, writes out
// (REDUCTION: 0 mean, 1 sum, 2 none; the launchers' tile for d, a persistent block per column tile.)
#include "spline_mix.cu"
#include "reconstruction_loss.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

using namespace dres;

static std::mt19937_64 rng(12345);
static double randn() { static std::normal_distribution<double> n(0.0, 1.0); return n(rng); }

template <typename T>
struct Mat {  // a (rows, cols) view with element strides into its own storage
  std::vector<T> storage;
  int64_t rows = 0, cols = 0, sr = 0, sc = 0, offset = 0;
  T* ptr() { return storage.data() + offset; }
  double at(int64_t i, int64_t j) const {
    return static_cast<double>(Elem<T>::in(storage[offset + i * sr + j * sc]));
  }
};

// layout 0: contiguous; 1: transposed storage with a stride-2 slice (no unit stride);
// 2: contiguous rows of a larger matrix, offset by one row and one column (misaligned, odd stride).
template <typename T>
Mat<T> make(int64_t rows, int64_t cols, int layout) {
  using Acc = typename Elem<T>::Acc;
  Mat<T> m;
  m.rows = rows; m.cols = cols;
  if (layout == 0) { m.storage.resize(rows * cols); m.sr = cols; m.sc = 1; }
  if (layout == 1) { m.storage.resize(2 * cols * rows); m.sr = 1; m.sc = 2 * rows; }
  if (layout == 2) { m.storage.resize((rows + 1) * (cols + 1)); m.sr = cols + 1; m.sc = 1; m.offset = cols + 2; }
  for (auto& v : m.storage) v = Elem<T>::out(static_cast<Acc>(randn()));
  return m;
}

template <typename Acc>
std::vector<Acc> weights(int64_t rows, int64_t cols) {
  std::vector<Acc> w(rows * cols);
  for (auto& v : w) v = static_cast<Acc>(randn() / std::sqrt(static_cast<double>(cols)));
  return w;
}

template <typename T> constexpr double tolerance() {
  if (std::is_same<T, double>::value) return 1e-12;
  if (std::is_same<T, float>::value) return 2e-6;
  if (std::is_same<T, __half>::value) return 2e-3;  // one rounding to fp16 (relative to max |ref|)
  return 1e-2;                                          // bf16
}

static int failures = 0;

// The tile a check runs: kByD the launchers' choice (with_tile: narrow below the wide tile's width), or forced.
enum TileChoice { kByD = 0, kWide = 1, kNarrow = 2 };

// f(TypeTag<config>{}) for the chosen tile of compute type Acc at d columns.
template <typename Acc, class F>
auto with_config(int64_t d, TileChoice choice, F&& f) {
  if (choice == kWide) return f(TypeTag<typename Tiles<Acc>::Wide>{});
  if (choice == kNarrow) return f(TypeTag<typename Tiles<Acc>::Narrow>{});
  return with_tile<Acc>(d, f);
}

template <class C>
const char* tile_name() { return kIsNarrow<C> ? "narrow" : "wide"; }

template <typename T>
void report(const char* what, double max_err, double max_ref, double tol, const char* name) {
  const double rel = max_err / std::max(max_ref, 1e-300);
  const bool ok = rel <= tol && std::isfinite(rel);
  if (!ok) ++failures;
  std::printf("%s %-44s %-9s rel err %.3e (tol %.1e)\n", ok ? "OK  " : "FAIL", what, name, rel, tol);
}

// spline_mix_kernel on tile C as its launcher runs it (grid, vector-path decisions); unwritten entries keep a
// sentinel that fails the checks.
template <typename T, class C, bool kTransposed>
std::vector<T> run_spline_mix(const std::vector<typename C::Acc>& w, const std::vector<typename C::Acc>& w_t,
                              Mat<T>& x, int64_t M, int64_t K, int64_t d) {
  using Acc = typename C::Acc;
  std::vector<T> out(M * d, Elem<T>::out(Acc(1e4)));
  const int64_t row_tiles = (M + C::BM - 1) / C::BM, col_tiles = (d + C::BD - 1) / C::BD;
  constexpr int kVec = 16 / sizeof(T), kHalf = C::TD / 2;
  const bool x_vec_ok = x.sc == 1 && x.sr % kVec == 0 && is_aligned(x.ptr(), 16);
  const bool out_vec_ok = d % kHalf == 0 && is_aligned(out.data(), sizeof(Pack<T, kHalf>));
  dres_emu::launch(static_cast<unsigned>(row_tiles * col_tiles), C::THREADS, [&] {
    spline_mix_kernel<T, C, kTransposed>(kTransposed ? w_t.data() : w.data(), x.ptr(), out.data(), M, K, d, x.sr,
                                         x.sc, row_tiles, x_vec_ok, out_vec_ok);
  });
  return out;
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Against float64 loops; also bit for bit against the other tile (each output is the same FMA chain over k,
// flushed every 32 terms, whatever the tile's shape).
template <typename T, bool kTransposed = false>
void check_spline_mix(int64_t M, int64_t K, int64_t d, int layout, const char* name, TileChoice choice = kByD) {
  using Acc = typename Elem<T>::Acc;
  auto w = weights<Acc>(M, K);
  std::vector<Acc> w_t(M * K);  // the same weights stored as a contiguous (K, M) matrix
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) w_t[k * M + m] = w[m * K + k];
  auto x = make<T>(K, d, layout);
  const char* tile = "";
  const std::vector<T> out = with_config<Acc>(d, choice, [&](auto cfg) {
    using C = typename decltype(cfg)::type;
    tile = tile_name<C>();
    return run_spline_mix<T, C, kTransposed>(w, w_t, x, M, K, d);
  });
  double max_err = 0, max_ref = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < d; ++j) {
      double ref = 0;
      for (int64_t k = 0; k < K; ++k) ref += static_cast<double>(w[m * K + k]) * x.at(k, j);
      max_err = std::max(max_err, std::abs(static_cast<double>(Elem<T>::in(out[m * d + j])) - ref));
      max_ref = std::max(max_ref, std::abs(ref));
    }
  char what[128];
  std::snprintf(what, sizeof what, "spline_mix%s M=%ld K=%ld d=%ld layout=%d %s", kTransposed ? " W^T" : "", (long)M,
                (long)K, (long)d, layout, tile);
  report<T>(what, max_err, max_ref, tolerance<T>(), name);
  const bool narrow = std::string(tile) == "narrow";
  const std::vector<T> other = with_config<Acc>(d, narrow ? kWide : kNarrow, [&](auto cfg) {
    return run_spline_mix<T, typename decltype(cfg)::type, kTransposed>(w, w_t, x, M, K, d);
  });
  const bool same = same_bits(out, other);
  if (!same) ++failures;
  std::printf("%s %-44s %-9s bits equal to the %s tile\n", same ? "OK  " : "FAIL", what, name,
              narrow ? "wide" : "narrow");
}

// The outputs of one reconstruction_loss call (what the launcher's three kernels write).
template <typename T>
struct ReconOut {
  using Acc = typename Elem<T>::Acc;
  std::vector<Acc> loss;
  std::vector<T> grad_y, grad_yc;
  bool write_gyc = false;
};

// The launcher's sequence (reconstruction kernel on `grid` persistent column blocks times `row_groups`,
// the grad_y_coded kernel when row_groups > 1, row sums, total) with its vector-path decisions;
// unwritten outputs keep a sentinel that fails the checks.
template <typename T, class C>
ReconOut<T> run_reconstruction(Mat<T>& y, Mat<T>& yc, std::vector<typename Elem<T>::Acc>& D, int64_t K,
                               int64_t N, int64_t d, int reduction, bool grads, int64_t grid,
                               int64_t row_groups = 1) {
  using Acc = typename Elem<T>::Acc;
  ReconOut<T> out;
  const int64_t num_tiles = (d + C::BD - 1) / C::BD;
  const int64_t blocks = std::min(grid, num_tiles);
  std::vector<Acc> partials((blocks + 1) * K, Acc(-7));
  out.loss.assign(reduction == DRES_REDUCTION_NONE ? K : 1, Acc(-7));
  out.grad_y.assign(K * d, Elem<T>::out(Acc(1e4)));
  out.grad_yc.assign(N * d, Elem<T>::out(Acc(1e4)));
  out.write_gyc = grads && reduction != DRES_REDUCTION_NONE && N > 0;
  std::vector<Acc> scratch(!std::is_same<T, Acc>::value && out.write_gyc ? K * d : 0);
  Acc* scratch_ptr = scratch.empty() ? nullptr : scratch.data();
  const double kd = static_cast<double>(K) * static_cast<double>(d);
  const Acc scale = static_cast<Acc>(reduction == DRES_REDUCTION_MEAN ? 2.0 / kd : 2.0);
  constexpr int kVec = 16 / sizeof(T), kHalf = C::TD / 2, kAccVec = 16 / sizeof(Acc);
  const bool y_vec_ok = y.sc == 1 && y.sr % kHalf == 0 && is_aligned(y.ptr(), sizeof(Pack<T, kHalf>));
  const bool yc_vec_ok = yc.sc == 1 && yc.sr % kVec == 0 && is_aligned(yc.ptr(), 16);
  const bool grad_vec_ok = d % kHalf == 0;
  const void* source = scratch_ptr ? static_cast<const void*>(scratch_ptr) : static_cast<const void*>(out.grad_y.data());
  const bool src_vec_ok = d % kAccVec == 0 && is_aligned(source, 16);
  const bool split = row_groups > 1;
  dres_emu::launch(static_cast<unsigned>(blocks * row_groups), C::THREADS, [&] {
    reconstruction_kernel<T, C>(y.ptr(), y.sr, y.sc, yc.ptr(), yc.sr, yc.sc, D.data(), K, N, d, num_tiles,
                             scale, grads, out.write_gyc && !split, out.grad_y.data(), out.grad_yc.data(),
                             scratch_ptr, partials.data(), row_groups, y_vec_ok, yc_vec_ok, grad_vec_ok,
                             src_vec_ok);
  });
  if (split && out.write_gyc) {
    const int64_t n_tiles = (N + C::BM - 1) / C::BM;
    const Acc* source_acc = static_cast<const Acc*>(source);
    dres_emu::launch(static_cast<unsigned>(n_tiles * num_tiles), C::THREADS, [&] {
      grad_y_coded_kernel<T, C>(D.data(), source_acc, out.grad_yc.data(), K, N, d, n_tiles, src_vec_ok,
                             grad_vec_ok);
    });
  }
  Acc* per_sample = reduction == DRES_REDUCTION_NONE ? out.loss.data() : partials.data() + blocks * K;
  dres_emu::launch(static_cast<unsigned>((K + kRowSumRows - 1) / kRowSumRows), kRowSumRows * kRowSumGroups,
                   [&] { row_sum_kernel<Acc>(partials.data(), blocks, K, per_sample); });
  if (reduction != DRES_REDUCTION_NONE) {
    const Acc divisor = static_cast<Acc>(reduction == DRES_REDUCTION_MEAN ? kd : 1.0);
    dres_emu::launch(1, kTotalThreads, [&] { total_kernel<Acc>(per_sample, K, divisor, out.loss.data()); });
  }
  return out;
}

// run_reconstruction on the chosen tile.
template <typename T>
ReconOut<T> run_reconstruction_on(TileChoice choice, Mat<T>& y, Mat<T>& yc, std::vector<typename Elem<T>::Acc>& D,
                                  int64_t K, int64_t N, int64_t d, int reduction, bool grads, int64_t grid,
                                  int64_t row_groups = 1) {
  return with_config<typename Elem<T>::Acc>(d, choice, [&](auto cfg) {
    return run_reconstruction<T, typename decltype(cfg)::type>(y, yc, D, K, N, d, reduction, grads, grid, row_groups);
  });
}

template <typename T>
void check_reconstruction(int64_t K, int64_t N, int64_t d, int reduction, bool grads, int layout,
                          int64_t grid, const char* name, int64_t row_groups = 1, TileChoice choice = kByD) {
  using Acc = typename Elem<T>::Acc;
  auto D = weights<Acc>(K, N);
  auto y = make<T>(K, d, layout);
  auto yc = make<T>(N, d, layout == 1 ? 2 : layout);
  int64_t bd = 0;
  with_config<Acc>(d, choice, [&](auto cfg) { return bd = decltype(cfg)::type::BD; });
  const bool narrow = bd != Tiles<Acc>::Wide::BD;
  const int64_t blocks = std::min(grid, (d + bd - 1) / bd);
  const ReconOut<T> out = run_reconstruction_on<T>(choice, y, yc, D, K, N, d, reduction, grads, grid, row_groups);
  const std::vector<Acc>& loss = out.loss;
  const std::vector<T>& grad_y = out.grad_y;
  const std::vector<T>& grad_yc = out.grad_yc;
  const bool write_gyc = out.write_gyc;
  const double kd = static_cast<double>(K) * static_cast<double>(d);
  // float64 reference from the same (rounded) inputs
  std::vector<double> r(K * d), ps(K, 0.0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < d; ++j) {
      double s = 0;
      for (int64_t n = 0; n < N; ++n) s += static_cast<double>(D[k * N + n]) * yc.at(n, j);
      r[k * d + j] = y.at(k, j) - s;
      ps[k] += r[k * d + j] * r[k * d + j];
    }
  double total = 0;
  for (double v : ps) total += v;
  const double c = reduction == DRES_REDUCTION_MEAN ? 2.0 / kd : 2.0;
  char what[160];
  const char* red = reduction == DRES_REDUCTION_MEAN ? "mean" : reduction == DRES_REDUCTION_SUM ? "sum" : "none";
  std::snprintf(what, sizeof what, "recon K=%ld N=%ld d=%ld %s grads=%d lay=%d grid=%ldx%ld %s", (long)K,
                (long)N, (long)d, red, (int)grads, layout, (long)blocks, (long)row_groups, narrow ? "narrow" : "wide");
  if (row_groups > 1) {
    // The row split must not change a bit of any output: same run without it.
    const ReconOut<T> plain = run_reconstruction_on<T>(choice, y, yc, D, K, N, d, reduction, grads, grid, 1);
    const bool same = same_bits(out.loss, plain.loss) && same_bits(out.grad_y, plain.grad_y) &&
                      (!out.write_gyc || same_bits(out.grad_yc, plain.grad_yc));
    if (!same) ++failures;
    std::printf("%s %-44s %-9s bits equal to the unsplit grid\n", same ? "OK  " : "FAIL", what, name);
  }
  if (grads) {
    // r's entries are the same FMA chains whatever the tile: grad_y and grad_y_coded bit for bit as on the other
    // tile (the loss is not: a row's squares are summed over the threads of a tile row, a tile-shaped order).
    const ReconOut<T> other = run_reconstruction_on<T>(narrow ? kWide : kNarrow, y, yc, D, K, N, d, reduction, grads,
                                                       grid, row_groups);
    const bool same = same_bits(out.grad_y, other.grad_y) && (!out.write_gyc || same_bits(out.grad_yc, other.grad_yc));
    if (!same) ++failures;
    std::printf("%s %-44s %-9s gradient bits equal to the %s tile\n", same ? "OK  " : "FAIL", what, name,
                narrow ? "wide" : "narrow");
  }
  const double loss_tol = std::is_same<Acc, double>::value ? 1e-12 : 1e-5;
  if (reduction == DRES_REDUCTION_NONE) {
    double e = 0, m = 0;
    for (int64_t k = 0; k < K; ++k) { e = std::max(e, std::abs(loss[k] - ps[k])); m = std::max(m, ps[k]); }
    report<T>((std::string(what) + " loss").c_str(), e, m, loss_tol, name);
  } else {
    const double ref = reduction == DRES_REDUCTION_MEAN ? total / kd : total;
    report<T>((std::string(what) + " loss").c_str(), std::abs(loss[0] - ref), std::abs(ref), loss_tol, name);
  }
  if (!grads) return;
  double e = 0, m = 0;
  for (int64_t i = 0; i < K * d; ++i) {
    e = std::max(e, std::abs(static_cast<double>(Elem<T>::in(grad_y[i])) - c * r[i]));
    m = std::max(m, std::abs(c * r[i]));
  }
  report<T>((std::string(what) + " grad_y").c_str(), e, m, tolerance<T>(), name);
  if (!write_gyc) return;
  e = 0; m = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < d; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s -= static_cast<double>(D[k * N + n]) * c * r[k * d + j];
      e = std::max(e, std::abs(static_cast<double>(Elem<T>::in(grad_yc[n * d + j])) - s));
      m = std::max(m, std::abs(s));
    }
  report<T>((std::string(what) + " grad_y_coded").c_str(), e, m, tolerance<T>() * 2, name);
}

static std::vector<float> read_floats(const std::string& path, int64_t count) {
  std::vector<float> v(count);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr || std::fread(v.data(), sizeof(float), count, f) != static_cast<size_t>(count)) {
    std::fprintf(stderr, "cannot read %ld floats from %s\n", (long)count, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

static void write_floats(const std::string& path, const std::vector<float>& v) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(v.data(), sizeof(float), v.size(), f) != v.size()) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

// A contiguous (rows, cols) float32 matrix read from a raw file.
static Mat<float> read_matrix(const std::string& path, int64_t rows, int64_t cols) {
  Mat<float> m;
  m.storage = read_floats(path, rows * cols);
  m.rows = rows; m.cols = cols; m.sr = cols; m.sc = 1;
  return m;
}

static void recon_files(int64_t K, int64_t N, int64_t d, int reduction, const std::string& dir) {
  auto D = read_floats(dir + "/decoder", K * N);
  auto y = read_matrix(dir + "/y", K, d);
  auto yc = read_matrix(dir + "/y_coded", N, d);
  // a persistent block per column tile, as on a GPU with at least that many resident blocks
  const ReconOut<float> out = run_reconstruction_on<float>(kByD, y, yc, D, K, N, d, reduction, true, /*grid=*/1 << 20);
  write_floats(dir + "/loss", out.loss);
  write_floats(dir + "/grad_y", out.grad_y);
  write_floats(dir + "/grad_y_coded", out.write_gyc ? out.grad_yc : std::vector<float>());
}

static void mix_files(int64_t M, int64_t K, int64_t d, const std::string& dir) {
  auto w = read_floats(dir + "/weights", M * K);
  auto x = read_matrix(dir + "/x", K, d);
  const std::vector<float> out = with_tile<float>(d, [&](auto cfg) {
    return run_spline_mix<float, typename decltype(cfg)::type, false>(w, w, x, M, K, d);
  });
  write_floats(dir + "/out", out);
}

int main(int argc, char** argv) {
  if (argc == 7 && std::string(argv[1]) == "recon") {
    recon_files(std::atol(argv[2]), std::atol(argv[3]), std::atol(argv[4]), std::atoi(argv[5]), argv[6]);
    return 0;
  }
  if (argc == 6 && std::string(argv[1]) == "mix") {
    mix_files(std::atol(argv[2]), std::atol(argv[3]), std::atol(argv[4]), argv[5]);
    return 0;
  }
  // spline_mix: one and several row/column tiles, ragged edges, K not a multiple of BK, all layouts
  check_spline_mix<float>(3, 3, 1, 0, "fp32");
  check_spline_mix<float>(17, 17, 131, 0, "fp32");
  check_spline_mix<float>(130, 20, 260, 0, "fp32");
  check_spline_mix<float>(5, 40, 7, 1, "fp32");
  check_spline_mix<float>(17, 33, 131, 2, "fp32");
  check_spline_mix<__half>(17, 33, 136, 0, "fp16");
  check_spline_mix<__half>(9, 5, 131, 2, "fp16");
  check_spline_mix<__nv_bfloat16>(140, 18, 129, 1, "bf16");
  check_spline_mix<double>(70, 20, 131, 0, "fp64");
  check_spline_mix<double>(3, 17, 65, 2, "fp64");
  check_spline_mix<double>(66, 18, 130, 0, "fp64");
  // weights given as the transpose of a contiguous matrix (backward's W^T), read in place
  check_spline_mix<float, true>(17, 33, 131, 0, "fp32");
  check_spline_mix<float, true>(130, 20, 260, 2, "fp32");
  check_spline_mix<__half, true>(9, 5, 131, 1, "fp16");
  check_spline_mix<double, true>(70, 20, 131, 0, "fp64");
  // reconstruction_loss: every reduction, with and without grads, persistent grid (grid < tiles)
  for (int reduction = 0; reduction < 3; ++reduction) {
    check_reconstruction<float>(17, 5, 131, reduction, true, 0, 2, "fp32");
    check_reconstruction<float>(130, 140, 300, reduction, true, 0, 2, "fp32");
    check_reconstruction<float>(3, 17, 7, reduction, true, 1, 4, "fp32");
    check_reconstruction<__half>(20, 9, 133, reduction, true, 0, 1, "fp16");
    check_reconstruction<__nv_bfloat16>(33, 130, 64, reduction, true, 2, 3, "bf16");
    check_reconstruction<double>(70, 3, 131, reduction, true, 0, 2, "fp64");
    check_reconstruction<double>(5, 66, 130, reduction, true, 0, 2, "fp64");
    check_reconstruction<__half>(9, 20, 136, reduction, true, 0, 1, "fp16");
    check_reconstruction<__nv_bfloat16>(130, 7, 264, reduction, true, 0, 2, "bf16");
  }
  // row split (small d): row tiles of D shared by 2-3 blocks per column tile, uneven and ragged
  for (int reduction = 0; reduction < 3; ++reduction) {
    check_reconstruction<float>(300, 140, 10, reduction, true, 0, 1, "fp32", 3);
    check_reconstruction<__half>(257, 9, 131, reduction, true, 2, 2, "fp16", 2);
    check_reconstruction<double>(130, 70, 7, reduction, true, 1, 1, "fp64", 3);
  }
  check_reconstruction<__nv_bfloat16>(260, 33, 70, DRES_REDUCTION_MEAN, true, 0, 1, "bf16", 2);
  check_reconstruction<float>(200, 20, 257, DRES_REDUCTION_SUM, false, 0, 2, "fp32", 2);
  check_reconstruction<float>(17, 20, 257, DRES_REDUCTION_MEAN, false, 0, 2, "fp32");
  check_reconstruction<float>(1, 1, 1, DRES_REDUCTION_SUM, true, 0, 1, "fp32");
  // Narrow tiles (d below the wide tile's width) and the widths at the switch, every dtype, both weight layouts,
  // sizes 3, 17 and 256 in turn, every layout and reduction, persistent and row-split grids.
  const int64_t widths[] = {1, 7, 10, 13, 31, 61, 63, 64, 127, 128};
  const int64_t sizes[] = {3, 17, 256};
  for (int i = 0; i < 10; ++i) {
    const int64_t d = widths[i], a = sizes[i % 3], b = sizes[(i + 1) % 3];
    const int lay = i % 3, red = i % 3;
    check_spline_mix<float>(a, b, d, lay, "fp32");
    check_spline_mix<float, true>(b, a, d, (lay + 1) % 3, "fp32");
    check_spline_mix<__half>(b, a, d, (lay + 2) % 3, "fp16");
    check_spline_mix<__half, true>(a, b, d, lay, "fp16");
    check_spline_mix<__nv_bfloat16>(a, b, d, (lay + 1) % 3, "bf16");
    check_spline_mix<__nv_bfloat16, true>(b, a, d, (lay + 2) % 3, "bf16");
    check_spline_mix<double>(b, a, d, lay, "fp64");
    check_spline_mix<double, true>(a, b, d, (lay + 1) % 3, "fp64");
    check_reconstruction<float>(a, b, d, red, true, lay, 1 << 20, "fp32", 1 + i % 3);
    check_reconstruction<__half>(b, a, d, (red + 1) % 3, true, (lay + 1) % 3, 1 << 20, "fp16", 1 + (i + 1) % 3);
    check_reconstruction<__nv_bfloat16>(a, b, d, (red + 2) % 3, true, (lay + 2) % 3, 1, "bf16", 1 + (i + 2) % 3);
    check_reconstruction<double>(b, a, d, red, true, lay, 2, "fp64", 1 + i % 3);
  }
  // the narrow tile on several column tiles and 256-row weights; persistent blocks fewer than the tiles
  check_spline_mix<float, true>(256, 256, 131, 0, "fp32", kNarrow);
  check_reconstruction<float>(256, 256, 100, DRES_REDUCTION_MEAN, true, 0, 3, "fp32", 2);
  check_reconstruction<double>(256, 17, 40, DRES_REDUCTION_SUM, true, 2, 1, "fp64", 3, kNarrow);
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
