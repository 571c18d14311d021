// The banded_apply kernel bodies of csrc/banded.cu run on the CPU (csrc/host_emulation.h: every block as
// `threads` std::threads), driven by tests/test_banded_cuda.py, which judges the outputs against
// BandedSpline.forward64 / transpose64:
//   g++ -std=c++20 -O1 -pthread -DDRES_HOST_EMULATION -I csrc -I <cuda include> banded_harness.cpp
//   banded_harness DIR n p d DTYPE TRANSPOSE THREADS SCRATCH REFINE
// DIR holds raw little-endian files: factor stencil (3 * (n - 2) float64), index (p int64), chord (2 p),
// curvature (4 p) float64, gather (4 p int64), x (rows * d float64, values representable in DTYPE); with
// REFINE 1 also q_bands (3 (n - 2)), r_bands (2 (n - 2)) and lam (1 value), float64;
// writes DIR/out (float64, the kernel's output converted exactly). DTYPE: f64 f32 f16 bf16; TRANSPOSE 0/1;
// THREADS: columns per block (the launcher's 32, 64 or 128); SCRATCH: f64 (what the launcher uses) or
// f32 (to measure what a float32 scratch would cost). The output starts as NaN, the scratch as NaN: a
// row the kernel leaves unwritten, or a scratch value read before it is written, shows.
#include "banded.cu"

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

using namespace dres;

template <typename V>
static std::vector<V> read_file(const std::string& path, int64_t count) {
  std::vector<V> v(count);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr || std::fread(v.data(), sizeof(V), count, f) != static_cast<size_t>(count)) {
    std::fprintf(stderr, "cannot read %ld values from %s\n", (long)count, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

template <typename T, typename S>
static void run(const std::string& dir, int64_t n, int64_t p, int64_t d, bool transpose, unsigned threads,
                bool refine) {
  const int64_t m = n - 2, rows_in = transpose ? p : n, rows_out = transpose ? n : p;
  auto factor = read_file<double>(dir + "/factor", 3 * m), stencil = read_file<double>(dir + "/stencil", 3 * m);
  auto chord = read_file<double>(dir + "/chord", 2 * p), curvature = read_file<double>(dir + "/curvature", 4 * p);
  auto index = read_file<int64_t>(dir + "/index", p), gather = read_file<int64_t>(dir + "/gather", 4 * p);
  auto x64 = read_file<double>(dir + "/x", rows_in * d);
  std::vector<double> q_bands, r_bands, lam{0.0};
  if (refine) {
    q_bands = read_file<double>(dir + "/q_bands", 3 * m);
    r_bands = read_file<double>(dir + "/r_bands", 2 * m);
    lam = read_file<double>(dir + "/lam", 1);
  }
  std::vector<T> x(x64.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = Store<T>::out(x64[i]);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<T> out(rows_out * d, Store<T>::out(nan));
  std::vector<S> scratch(((transpose ? m + n : m) + (refine ? m : 0)) * d, static_cast<S>(nan));
  const BandedArgs args{factor.data(), stencil.data(), index.data(), chord.data(), curvature.data(), gather.data(),
                        n, p, m, d, refine ? q_bands.data() : nullptr, refine ? r_bands.data() : nullptr, lam[0]};
  const unsigned blocks = static_cast<unsigned>((d + threads - 1) / threads);
  dres_emu::launch(blocks, threads, [&] {
    if (transpose) banded_transpose_kernel<T, S>(args, x.data(), out.data(), scratch.data());
    else banded_forward_kernel<T, S>(args, x.data(), out.data(), scratch.data());
  });
  std::vector<double> out64(out.size());
  for (size_t i = 0; i < out.size(); ++i) out64[i] = load(&out[i]);
  FILE* f = std::fopen((dir + "/out").c_str(), "wb");
  if (f == nullptr || std::fwrite(out64.data(), sizeof(double), out64.size(), f) != out64.size()) {
    std::fprintf(stderr, "cannot write %s/out\n", dir.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

template <typename T>
static void run_scratch(const std::string& scratch, const std::string& dir, int64_t n, int64_t p, int64_t d,
                        bool transpose, unsigned threads, bool refine) {
  if (scratch == "f32") run<T, float>(dir, n, p, d, transpose, threads, refine);
  else run<T, double>(dir, n, p, d, transpose, threads, refine);
}

int main(int argc, char** argv) {
  if (argc != 10) {
    std::fprintf(stderr, "usage: %s DIR n p d DTYPE TRANSPOSE THREADS SCRATCH REFINE\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1], dtype = argv[5], scratch = argv[8];
  const int64_t n = std::atol(argv[2]), p = std::atol(argv[3]), d = std::atol(argv[4]);
  const bool transpose = std::atoi(argv[6]) != 0;
  const unsigned threads = static_cast<unsigned>(std::atoi(argv[7]));
  const bool refine = std::atoi(argv[9]) != 0;
  if (n < 3 || threads == 0 || threads > 1024) return 2;
  if (dtype == "f64") run_scratch<double>(scratch, dir, n, p, d, transpose, threads, refine);
  else if (dtype == "f32") run_scratch<float>(scratch, dir, n, p, d, transpose, threads, refine);
  else if (dtype == "f16") run_scratch<__half>(scratch, dir, n, p, d, transpose, threads, refine);
  else if (dtype == "bf16") run_scratch<__nv_bfloat16>(scratch, dir, n, p, d, transpose, threads, refine);
  else return 2;
  return 0;
}
