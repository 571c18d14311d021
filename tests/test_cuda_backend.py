"""Backend "cuda" (csrc/ + dres_fast/_cuda_ext.py + dres_fast/_build_support.py).

On any machine (CI has nvcc but no GPU and a CPU-only torch):
  * every csrc/*.cu compiles with nvcc for sm_90 (the script CI runs, on one arch here), and the
    script reports a broken file as a failure;
  * csrc/binding.cpp passes a C++ syntax check against torch's headers (when they are usable);
  * the Python side reports what is missing without building anything, and setup.py's extension
    list honours the environment.
On a CUDA machine (TestGPU*): the kernels against float64 math and the torch backend, every
reduction, forward and backward through dres_fast.ops, all dtypes, awkward and non-contiguous shapes,
determinism and the fp32 cancellation case of DESIGN.md section 4.
"""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
COMPILE_SCRIPT = ROOT / ".ci" / "compile_cuda.sh"
NVCC = shutil.which("nvcc")
HAS_GPU = torch.cuda.is_available()

import dres_fast._cuda_ext as cuda_ext  # noqa: E402  (imports nothing heavy; builds only in load())


def _load_build_support():
    """dres_fast/_build_support.py loaded by path, as setup.py does."""
    spec = importlib.util.spec_from_file_location("_dres_build_support_test", ROOT / "dres_fast" / "_build_support.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# Compile checks (no GPU needed)
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: CI runs .ci/compile_cuda.sh with the CUDA toolkit")
def test_cuda_sources_compile_for_sm90():
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "csrc/ has no .cu files"
    result = subprocess.run(
        ["bash", str(COMPILE_SCRIPT)], cwd=ROOT, env={**os.environ, "CUDA_ARCHS": "90"},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith(("OK", "FAIL"))]
    assert len(lines) == len(sources), result.stdout
    assert all(ln.startswith("OK") and "sm_90" in ln for ln in lines), result.stdout


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_compile_script_reports_a_broken_file(tmp_path):
    (tmp_path / "good.cu").write_text("__global__ void ok(float* p) { p[0] = 1.0f; }\n")
    (tmp_path / "broken.cu").write_text("__global__ void bad(float* p) { p[0] = not_declared; }\n")
    result = subprocess.run(
        ["bash", str(COMPILE_SCRIPT)], cwd=ROOT, env={**os.environ, "CUDA_ARCHS": "90", "CSRC_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "FAIL" in result.stdout and "broken.cu" in result.stdout and "not_declared" in result.stdout
    assert any(ln.startswith("OK") and "good.cu" in ln for ln in result.stdout.splitlines())


def _torch_include_dirs():
    base = pathlib.Path(torch.__file__).parent / "include"
    return [base, base / "torch" / "csrc" / "api" / "include"]


def _cuda_include_dir():
    if NVCC is None:
        return None
    for candidate in (pathlib.Path(os.path.realpath(NVCC)).parents[1] / "include",
                      pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include",
                      *sorted(pathlib.Path("/usr/local").glob("cuda*/include"))):
        if (candidate / "cuda_runtime_api.h").exists():
            return candidate
    return None


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include_dir() is None,
                    reason="needs g++ and the CUDA runtime headers")
def test_binding_passes_a_syntax_check(tmp_path):
    """g++ -fsyntax-only on csrc/binding.cpp against the installed torch's headers. A CPU-only torch
    wheel lacks one generated CUDA header (c10/cuda/impl/cuda_cmake_macros.h, a single define): a
    stand-in is provided for it."""
    include = _torch_include_dirs()
    if not (include[0] / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("torch headers without c10/cuda")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not (include[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"  # what torch's builder uses
    cmd = ["g++", std, "-fsyntax-only", "-Wall", "-Wextra", "-Wno-unused-parameter", "-DTORCH_EXTENSION_NAME=_C",
           *[f"-I{p}" for p in include], f"-I{tmp_path}", f"-I{_cuda_include_dir()}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}", str(CSRC / "binding.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "binding.cpp" not in result.stderr, result.stderr[-5000:]  # no warnings in our own file


# --------------------------------------------------------------------------------------------------
# The kernel bodies on the CPU (csrc/host_emulation.h): every block as 256 std::threads
# --------------------------------------------------------------------------------------------------

# Includes the .cu files with DRES_HOST_EMULATION (kernels only, no launchers); replicates the
# launchers' grid and vector-path decisions; checks against float64 loops. The persistent grid runs
# with fewer blocks than column tiles; layouts cover contiguous, transposed/strided and misaligned.
HOST_HARNESS = r"""
#include "spline_mix.cu"
#include "reconstruction_loss.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
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

template <typename T>
void report(const char* what, double max_err, double max_ref, double tol, const char* name) {
  const double rel = max_err / std::max(max_ref, 1e-300);
  const bool ok = rel <= tol && std::isfinite(rel);
  if (!ok) ++failures;
  std::printf("%s %-44s %-9s rel err %.3e (tol %.1e)\n", ok ? "OK  " : "FAIL", what, name, rel, tol);
}

template <typename T>
void check_spline_mix(int64_t M, int64_t K, int64_t d, int layout, const char* name) {
  using Acc = typename Elem<T>::Acc;
  using C = Cfg<Acc>;
  auto w = weights<Acc>(M, K);
  auto x = make<T>(K, d, layout);
  std::vector<T> out(M * d, Elem<T>::out(Acc(1e4)));  // sentinel: unwritten entries fail
  const int64_t row_tiles = (M + C::BM - 1) / C::BM, col_tiles = (d + C::BD - 1) / C::BD;
  constexpr int kVec = 16 / sizeof(T), kHalf = C::TD / 2;
  const bool x_vec_ok = x.sc == 1 && x.sr % kVec == 0 && is_aligned(x.ptr(), 16);
  const bool out_vec_ok = d % kHalf == 0 && is_aligned(out.data(), sizeof(Pack<T, kHalf>));
  dres_emu::launch(static_cast<unsigned>(row_tiles * col_tiles), C::THREADS, [&] {
    spline_mix_kernel<T>(w.data(), x.ptr(), out.data(), M, K, d, x.sr, x.sc, row_tiles, x_vec_ok,
                         out_vec_ok);
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
  std::snprintf(what, sizeof what, "spline_mix M=%ld K=%ld d=%ld layout=%d", (long)M, (long)K, (long)d, layout);
  report<T>(what, max_err, max_ref, tolerance<T>(), name);
}

template <typename T>
void check_reconstruction(int64_t K, int64_t N, int64_t d, int reduction, bool grads, int layout,
                          int64_t grid, const char* name) {
  using Acc = typename Elem<T>::Acc;
  using C = Cfg<Acc>;
  auto D = weights<Acc>(K, N);
  auto y = make<T>(K, d, layout);
  auto yc = make<T>(N, d, layout == 1 ? 2 : layout);
  const int64_t num_tiles = (d + C::BD - 1) / C::BD;
  const int64_t blocks = std::min(grid, num_tiles);
  std::vector<Acc> partials((blocks + 1) * K, Acc(-7)), loss(reduction == DRES_REDUCTION_NONE ? K : 1, Acc(-7));
  std::vector<T> grad_y(K * d, Elem<T>::out(Acc(1e4))), grad_yc(N * d, Elem<T>::out(Acc(1e4)));
  const bool write_gyc = grads && reduction != DRES_REDUCTION_NONE && N > 0;
  std::vector<Acc> scratch(!std::is_same<T, Acc>::value && write_gyc ? K * d : 0);
  Acc* scratch_ptr = scratch.empty() ? nullptr : scratch.data();
  const double kd = static_cast<double>(K) * static_cast<double>(d);
  const Acc scale = static_cast<Acc>(reduction == DRES_REDUCTION_MEAN ? 2.0 / kd : 2.0);
  constexpr int kVec = 16 / sizeof(T), kHalf = C::TD / 2, kAccVec = 16 / sizeof(Acc);
  const bool y_vec_ok = y.sc == 1 && y.sr % kHalf == 0 && is_aligned(y.ptr(), sizeof(Pack<T, kHalf>));
  const bool yc_vec_ok = yc.sc == 1 && yc.sr % kVec == 0 && is_aligned(yc.ptr(), 16);
  const bool grad_vec_ok = d % kHalf == 0;
  const void* source = scratch_ptr ? static_cast<const void*>(scratch_ptr) : static_cast<const void*>(grad_y.data());
  const bool src_vec_ok = d % kAccVec == 0 && is_aligned(source, 16);
  dres_emu::launch(static_cast<unsigned>(blocks), C::THREADS, [&] {
    reconstruction_kernel<T>(y.ptr(), y.sr, y.sc, yc.ptr(), yc.sr, yc.sc, D.data(), K, N, d, num_tiles,
                             scale, grads, write_gyc, grad_y.data(), grad_yc.data(), scratch_ptr,
                             partials.data(), y_vec_ok, yc_vec_ok, grad_vec_ok, src_vec_ok);
  });
  Acc* per_sample = reduction == DRES_REDUCTION_NONE ? loss.data() : partials.data() + blocks * K;
  dres_emu::launch(static_cast<unsigned>((K + kRowSumRows - 1) / kRowSumRows), kRowSumRows * kRowSumGroups,
                   [&] { row_sum_kernel<Acc>(partials.data(), blocks, K, per_sample); });
  if (reduction != DRES_REDUCTION_NONE) {
    const Acc divisor = static_cast<Acc>(reduction == DRES_REDUCTION_MEAN ? kd : 1.0);
    dres_emu::launch(1, kTotalThreads, [&] { total_kernel<Acc>(per_sample, K, divisor, loss.data()); });
  }
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
  std::snprintf(what, sizeof what, "recon K=%ld N=%ld d=%ld %s grads=%d lay=%d grid=%ld", (long)K, (long)N,
                (long)d, red, (int)grads, layout, (long)blocks);
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

int main() {
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
  check_reconstruction<float>(17, 20, 257, DRES_REDUCTION_MEAN, false, 0, 2, "fp32");
  check_reconstruction<float>(1, 1, 1, DRES_REDUCTION_SUM, true, 0, 1, "fp32");
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
"""


def _host_compiler_ok():
    return shutil.which("g++") is not None and _cuda_include_dir() is not None


@pytest.mark.skipif(not _host_compiler_ok(), reason="needs g++ (C++20) and the CUDA headers (cuda_fp16.h)")
def test_kernel_bodies_on_cpu_match_float64(tmp_path):
    source = tmp_path / "harness.cpp"
    source.write_text(HOST_HARNESS)
    binary = tmp_path / "harness"
    build = subprocess.run(
        ["g++", "-std=c++20", "-O1", "-pthread", "-DDRES_HOST_EMULATION", f"-I{CSRC}", f"-I{_cuda_include_dir()}",
         str(source), "-o", str(binary)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-5000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "0 failure(s)" in run.stdout, run.stdout[-8000:] + run.stderr[-2000:]
    assert run.stdout.count("OK  ") >= 80, run.stdout  # every check ran


# --------------------------------------------------------------------------------------------------
# Python-side build and load logic (error paths on CPU)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DRES_FAST_CACHE", str(cache))
    return cache


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only error path")
class TestCpuErrorPaths:
    def test_is_available_reports_without_building(self, empty_cache):
        ok, reason = cuda_ext.is_available()
        if torch.version.cuda is None:
            assert not ok and "CPU-only" in reason and "install a CUDA-enabled torch" in reason
        else:  # a CUDA build of torch on a machine without a GPU
            assert not ok and "no CUDA GPU" in reason
        assert not empty_cache.exists(), "is_available() must not create or build anything"

    def test_load_raises_naming_the_missing_piece(self, empty_cache):
        with pytest.raises(RuntimeError) as info:
            cuda_ext.load(verbose=True)
        message = str(info.value)
        assert ("CPU-only" in message) if torch.version.cuda is None else ("no CUDA GPU" in message)
        assert not empty_cache.exists()

    def test_backend_functions_raise_before_any_kernel(self, empty_cache):
        with pytest.raises(RuntimeError, match="CUDA"):
            cuda_ext.spline_mix(torch.eye(3), torch.randn(3, 4))

    def test_dispatch_names_the_reason(self):
        from dres_fast.ops import dispatch

        with pytest.raises(dispatch.BackendUnavailableError) as info:
            dispatch._cuda_module()
        assert "cuda" in str(info.value).lower()
        assert "CPU-only" in str(info.value) or "no CUDA GPU" in str(info.value)


class TestBuiltState:
    def test_is_built_false_with_empty_cache(self, empty_cache, monkeypatch):
        monkeypatch.setattr(cuda_ext, "_loaded_from", None)
        monkeypatch.setattr(cuda_ext, "_prebuilt_present", lambda: False)
        assert cuda_ext.is_built() is False

    def test_is_built_true_with_a_cached_first_use_build(self, empty_cache, monkeypatch):
        monkeypatch.setattr(cuda_ext, "_loaded_from", None)
        monkeypatch.setattr(cuda_ext, "_prebuilt_present", lambda: False)
        build_dir = pathlib.Path(cuda_ext.cache_dir())
        assert str(build_dir).startswith(str(empty_cache))
        assert torch.__version__ in str(build_dir)  # one cache per torch version
        build_dir.mkdir(parents=True)
        (build_dir / (cuda_ext.JIT_NAME + ".so")).write_bytes(b"")
        assert cuda_ext.is_built() is True

    def test_sources_are_found(self):
        files = cuda_ext.source_files()
        names = {pathlib.Path(f).name for f in files}
        assert "binding.cpp" in names and any(n.endswith(".cu") for n in names)
        assert all(pathlib.Path(f).is_file() for f in files)


class TestSimulatedCudaTorch:
    """Pretend torch is a CUDA build with a GPU, to reach the toolchain and build-failure paths."""

    @pytest.fixture
    def cuda_torch(self, monkeypatch, empty_cache):
        if HAS_GPU:
            pytest.skip("real GPU present: the real paths are tested in TestGPU")
        monkeypatch.setattr(torch.version, "cuda", "12.6")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda_ext, "_loaded_from", None)
        monkeypatch.setattr(cuda_ext, "_prebuilt_present", lambda: False)
        return empty_cache

    def test_missing_nvcc_is_named(self, cuda_torch, monkeypatch):
        import torch.utils.cpp_extension as cpp

        monkeypatch.setattr(cpp, "CUDA_HOME", None)
        ok, reason = cuda_ext.is_available()
        assert not ok and "nvcc" in reason
        with pytest.raises(RuntimeError, match="nvcc"):
            cuda_ext.load()

    def test_missing_ninja_is_named(self, cuda_torch, monkeypatch):
        import torch.utils.cpp_extension as cpp

        monkeypatch.setattr(cpp, "CUDA_HOME", "/usr/local/cuda")
        monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
        monkeypatch.setattr(cpp, "is_ninja_available", lambda: False)
        with pytest.raises(RuntimeError, match="ninja"):
            cuda_ext.load()

    def test_build_failure_points_to_the_log(self, cuda_torch, monkeypatch):
        import torch.utils.cpp_extension as cpp

        calls = []

        def failing_build(**kwargs):
            calls.append(kwargs)
            raise RuntimeError("Error building extension 'dres_fast_C_jit': nvcc fatal : synthetic failure")

        monkeypatch.setattr(cpp, "CUDA_HOME", "/usr/local/cuda")
        monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
        monkeypatch.setattr(cpp, "is_ninja_available", lambda: True)
        monkeypatch.setattr(cpp, "load", failing_build)
        ok, reason = cuda_ext.is_available()
        assert ok and "first use" in reason and not cuda_torch.exists()
        with pytest.raises(RuntimeError) as info:
            cuda_ext.load(verbose=False)
        log = pathlib.Path(cuda_ext.cache_dir()) / "build_error.log"
        assert str(log) in str(info.value)
        assert "synthetic failure" in log.read_text()
        (kwargs,) = calls
        assert kwargs["name"] == cuda_ext.JIT_NAME and kwargs["build_directory"] == cuda_ext.cache_dir()
        assert "--use_fast_math" not in kwargs["extra_cuda_cflags"]
        assert kwargs["verbose"] is False and kwargs["is_python_module"] is False
        assert {pathlib.Path(s).suffix for s in kwargs["sources"]} == {".cu", ".cpp"}
        assert cuda_ext._loaded_from is None  # a failed build is not remembered as loaded


class TestBuildSupport:
    def test_import_is_light(self):
        code = textwrap.dedent(f"""
            import importlib.util, sys
            spec = importlib.util.spec_from_file_location("bs", {str(ROOT / 'dres_fast' / '_build_support.py')!r})
            m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
            assert "torch" not in sys.modules, "importing _build_support imported torch"
            print(len(m.csrc_sources()))
        """)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert int(result.stdout.strip()) == len(list(CSRC.glob("*.cu"))) + len(list(CSRC.glob("*.cpp")))

    def test_sources_are_relative_to_setup_py(self):
        support = _load_build_support()
        sources = support.csrc_sources()
        assert sources and all(not os.path.isabs(s) and s.startswith("csrc" + os.sep) for s in sources)
        assert all((ROOT / s).is_file() for s in sources)

    def test_skip_wins_over_force(self, monkeypatch):
        support = _load_build_support()
        monkeypatch.setenv("DRES_SKIP_CUDA", "1")
        monkeypatch.setenv("FORCE_CUDA", "1")
        assert support.cuda_extensions() == []
        assert support.build_cmdclass([]) == {}
        assert "DRES_SKIP_CUDA" in support.cuda_build_decision()[1]

    @pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch case")
    def test_no_extension_with_cpu_torch(self, monkeypatch):
        support = _load_build_support()
        monkeypatch.delenv("DRES_SKIP_CUDA", raising=False)
        monkeypatch.delenv("FORCE_CUDA", raising=False)
        assert support.cuda_extensions() == []
        build, why = support.cuda_build_decision()
        assert not build and "not a CUDA build" in why

    @pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch case")
    def test_force_with_cpu_torch_fails_loudly(self, monkeypatch):
        support = _load_build_support()
        monkeypatch.delenv("DRES_SKIP_CUDA", raising=False)
        monkeypatch.setenv("FORCE_CUDA", "1")
        with pytest.raises(RuntimeError, match="FORCE_CUDA"):
            support.cuda_extensions()

    @pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
    def test_extension_declared_with_cuda_torch(self, monkeypatch):
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            pytest.skip("no CUDA toolkit")
        support = _load_build_support()
        monkeypatch.delenv("DRES_SKIP_CUDA", raising=False)
        (ext,) = support.cuda_extensions()
        assert ext.name == "dres_fast._C"
        assert "build_ext" in support.build_cmdclass([ext])


# --------------------------------------------------------------------------------------------------
# GPU: the kernels against float64 and the torch backend
# --------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
FP32_FLOOR = 8 * 2.0 ** -24
SIZES = (3, 17, 256, 1024)
WIDTHS = (1, 7, 131, 65537)


@pytest.fixture(scope="module")
def backend():
    """The loaded CUDA backend; a build failure on a GPU machine fails (not skips) the tests."""
    return cuda_ext.load(verbose=True)


def rel_err(got, ref):
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_fp32_accuracy(got, torch_fp32, ref, what):
    """DESIGN.md 4: error against float64 at most twice the torch fp32 backend's (plus a few ulps for
    results made of a handful of numbers, where torch can be exact by luck)."""
    ours, theirs = rel_err(got, ref), rel_err(torch_fp32, ref)
    assert ours <= 2 * theirs + FP32_FLOOR, f"{what}: cuda rel err {ours:.3e} > 2 x torch {theirs:.3e}"


def make(shape, dtype, noncontiguous=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    if noncontiguous:  # transposed storage with a stride-2 slice: no unit stride at all
        t = torch.randn(2 * cols, rows, generator=g, dtype=torch.float64).t()[:, ::2]
    else:
        t = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return t.to(device="cuda", dtype=dtype)


def make_weights(rows, cols, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    w = w - w.mean(dim=1, keepdim=True) + 1.0 / cols  # rows sum to one, like spline weights
    return w.to(device="cuda", dtype=dtype)


def torch_fp32_mix(weights, x):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return weights.float() @ x.float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def ref_reconstruction(y, y_coded, decoder, reduction):
    """float64 loss and unit-incoming-gradient grads of the same (rounded) inputs."""
    r = y.double() - decoder.double() @ y_coded.double()
    per_sample = (r * r).sum(dim=1)
    loss = {"mean": per_sample.sum() / r.numel(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    c = 2.0 / r.numel() if reduction == "mean" else 2.0
    grad_y = c * r
    grad_yc = None if reduction == "none" else -decoder.double().t() @ grad_y
    return loss, grad_y, grad_yc


def torch_fp32_reconstruction(y, y_coded, decoder, reduction):
    r = y.float() - torch_fp32_mix(decoder, y_coded)
    per_sample = (r * r).sum(dim=1)
    loss = {"mean": per_sample.sum() / r.numel(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    c = 2.0 / r.numel() if reduction == "mean" else 2.0
    return loss, c * r, -torch_fp32_mix(decoder.t(), c * r)


LOW_PRECISION_RTOL = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@gpu
@pytest.mark.gpu
class TestGPUSplineMix:
    @pytest.mark.parametrize("d", WIDTHS)
    @pytest.mark.parametrize("K", SIZES)
    @pytest.mark.parametrize("M", SIZES)
    def test_fp32_every_shape_class(self, backend, M, K, d):
        if M * K * d > 2 ** 28:
            d = 65537 if M * K <= 2 ** 12 else 4099  # keep the float64 reference affordable
        weights = make_weights(M, K)
        x = make((K, d), torch.float32, seed=M + K + d)
        out = backend.spline_mix(weights, x)
        assert out.shape == (M, d) and out.dtype == torch.float32 and out.is_contiguous()
        assert_fp32_accuracy(out, torch_fp32_mix(weights, x), weights.double() @ x.double(), "spline_mix")

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("M,K,d", [(3, 17, 131), (256, 256, 65537), (1024, 3, 7), (17, 1024, 1)])
    def test_half_types_accumulate_in_fp32(self, backend, dtype, M, K, d):
        weights = make_weights(M, K)
        x = make((K, d), dtype, seed=5)
        out = backend.spline_mix(weights, x)
        assert out.dtype == dtype and out.shape == (M, d)
        ref = weights.double() @ x.double()
        # only the final rounding to the output dtype may remain
        torch.testing.assert_close(out.double(), ref, rtol=LOW_PRECISION_RTOL[dtype], atol=1e-5)

    @pytest.mark.parametrize("M,K,d", [(17, 256, 131), (1024, 17, 7), (3, 3, 65537)])
    def test_float64(self, backend, M, K, d):
        weights = make_weights(M, K, dtype=torch.float64)
        x = make((K, d), torch.float64)
        torch.testing.assert_close(backend.spline_mix(weights, x), weights @ x, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
    @pytest.mark.parametrize("M,K,d", [(17, 256, 131), (256, 17, 65537), (3, 1024, 7)])
    def test_noncontiguous_and_misaligned(self, backend, dtype, M, K, d):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        weights_t = make_weights(K, M, dtype=acc).t()  # transposed weights (backward uses W^T)
        for x in (make((K, d), dtype, noncontiguous=True, seed=2),
                  make((K + 1, d + 1), dtype, seed=3)[1:, 1:]):  # offset storage: no 16-byte alignment
            out = backend.spline_mix(weights_t, x)
            ref = weights_t.double() @ x.double()
            if dtype == torch.float16:
                torch.testing.assert_close(out.double(), ref, rtol=2.0 ** -10, atol=1e-5)
            elif dtype == torch.float64:
                torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
            else:
                assert_fp32_accuracy(out, torch_fp32_mix(weights_t, x), ref, "strided spline_mix")

    def test_errors_name_the_argument(self, backend):
        with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
            backend.spline_mix(make_weights(3, 3), torch.randn(3, 4))
        with pytest.raises(RuntimeError, match="disagree on K"):
            backend.spline_mix(make_weights(3, 4), make((3, 5), torch.float32))
        with pytest.raises(RuntimeError, match="x must be float32"):
            backend.spline_mix(make_weights(3, 3), torch.ones(3, 4, device="cuda", dtype=torch.int32))

    def test_meta_registration(self, backend):
        weights, x = make_weights(17, 5), make((5, 131), torch.float32)
        torch.library.opcheck(torch.ops.dres_fast_C.spline_mix.default, (weights, x))


@gpu
@pytest.mark.gpu
class TestGPUReconstructionLoss:
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("d", WIDTHS)
    @pytest.mark.parametrize("N", SIZES)
    @pytest.mark.parametrize("K", SIZES)
    def test_fp32_every_shape_class(self, backend, K, N, d, reduction):
        if K * N * d > 2 ** 28:
            d = 65537 if K * N <= 2 ** 12 else 4099
        decoder = make_weights(K, N)
        y = make((K, d), torch.float32, seed=K)
        y_coded = make((N, d), torch.float32, seed=N + 1)
        loss, grad_y, grad_yc = backend.reconstruction_loss(y, y_coded, decoder, reduction, True)
        ref = ref_reconstruction(y, y_coded, decoder, reduction)
        fp32 = torch_fp32_reconstruction(y, y_coded, decoder, reduction)
        assert loss.dtype == torch.float32 and loss.shape == ref[0].shape
        assert grad_y.shape == (K, d) and grad_y.is_contiguous() and grad_y.dtype == torch.float32
        assert_fp32_accuracy(loss, fp32[0], ref[0], "loss")
        assert_fp32_accuracy(grad_y, fp32[1], ref[1], "grad_y")
        if reduction == "none":
            assert grad_yc.numel() == 0
        else:
            assert grad_yc.shape == (N, d) and grad_yc.is_contiguous()
            assert_fp32_accuracy(grad_yc, fp32[2], ref[2], "grad_y_coded")
        loss_only = backend.reconstruction_loss(y, y_coded, decoder, reduction, False)
        assert loss_only[1].numel() == 0 and loss_only[2].numel() == 0
        assert torch.equal(loss_only[0], loss)  # same kernel, same summation order

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("K,N,d", [(3, 17, 131), (256, 256, 65537), (1024, 17, 7), (17, 1024, 1)])
    def test_other_dtypes(self, backend, dtype, reduction, K, N, d):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        decoder = make_weights(K, N, dtype=acc)
        y, y_coded = make((K, d), dtype, seed=7), make((N, d), dtype, seed=8)
        loss, grad_y, grad_yc = backend.reconstruction_loss(y, y_coded, decoder, reduction, True)
        ref_loss, ref_gy, ref_gyc = ref_reconstruction(y, y_coded, decoder, reduction)
        assert loss.dtype == acc and grad_y.dtype == dtype
        if dtype == torch.float64:
            tol = dict(rtol=1e-11, atol=1e-13)
            torch.testing.assert_close(loss, ref_loss, **tol)
            torch.testing.assert_close(grad_y, ref_gy, **tol)
            if ref_gyc is not None:
                torch.testing.assert_close(grad_yc, ref_gyc, **tol)
            return
        # half inputs are exact in fp32: the loss follows the fp32 rule; grads are one rounding to dtype
        assert_fp32_accuracy(loss, torch_fp32_reconstruction(y, y_coded, decoder, reduction)[0], ref_loss, "loss")
        assert rel_err(grad_y, ref_gy) < LOW_PRECISION_RTOL[dtype]
        if ref_gyc is not None:
            assert rel_err(grad_yc, ref_gyc) < LOW_PRECISION_RTOL[dtype]

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("K,N,d", [(17, 256, 131), (256, 3, 65537), (1024, 1024, 7)])
    def test_noncontiguous(self, backend, reduction, K, N, d):
        decoder = make_weights(K, N)
        y = make((K, d), torch.float32, noncontiguous=True, seed=11)
        y_coded = make((N + 1, d + 1), torch.float32, seed=12)[1:, 1:]
        loss, grad_y, grad_yc = backend.reconstruction_loss(y, y_coded, decoder, reduction, True)
        ref = ref_reconstruction(y, y_coded, decoder, reduction)
        fp32 = torch_fp32_reconstruction(y, y_coded, decoder, reduction)
        assert_fp32_accuracy(loss, fp32[0], ref[0], "loss")
        assert_fp32_accuracy(grad_y, fp32[1], ref[1], "grad_y")
        if reduction != "none":
            assert_fp32_accuracy(grad_yc, fp32[2], ref[2], "grad_y_coded")

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("K,N,d", [(256, 256, 65537), (17, 1024, 131)])
    def test_fp32_cancellation(self, backend, reduction, K, N, d):
        """y = D y_coded + 1e-3 noise: r is 1000x smaller than y, so rounding in D y_coded shows."""
        decoder = make_weights(K, N)
        y_coded = make((N, d), torch.float32, seed=21)
        noise = 1e-3 * make((K, d), torch.float64, seed=22)
        y = (decoder.double() @ y_coded.double() + noise).float()
        loss, grad_y, grad_yc = backend.reconstruction_loss(y, y_coded, decoder, reduction, True)
        ref = ref_reconstruction(y, y_coded, decoder, reduction)
        fp32 = torch_fp32_reconstruction(y, y_coded, decoder, reduction)
        assert_fp32_accuracy(loss, fp32[0], ref[0], "cancellation loss")
        assert_fp32_accuracy(grad_y, fp32[1], ref[1], "cancellation grad_y")
        if reduction != "none":
            assert_fp32_accuracy(grad_yc, fp32[2], ref[2], "cancellation grad_y_coded")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_deterministic(self, backend, dtype):
        K, N, d = 256, 256, 300001  # many column tiles per block of the persistent grid
        decoder = make_weights(K, N)
        y, y_coded = make((K, d), dtype, seed=31), make((N, d), dtype, seed=32)
        for reduction in ("mean", "sum", "none"):
            first = backend.reconstruction_loss(y, y_coded, decoder, reduction, True)
            for _ in range(3):
                again = backend.reconstruction_loss(y, y_coded, decoder, reduction, True)
                for a, b in zip(first, again):
                    assert torch.equal(a, b), reduction
        mix = backend.spline_mix(decoder, y_coded)
        assert torch.equal(mix, backend.spline_mix(decoder, y_coded))

    def test_errors_name_the_argument(self, backend):
        decoder, y, y_coded = make_weights(3, 4), make((3, 5), torch.float32), make((4, 5), torch.float32)
        with pytest.raises(RuntimeError, match="reduction must be"):
            backend.reconstruction_loss(y, y_coded, decoder, "max", True)
        with pytest.raises(RuntimeError, match="decoder must be"):
            backend.reconstruction_loss(y, y_coded, make_weights(4, 3), "mean", True)
        with pytest.raises(RuntimeError, match="y_coded must have the dtype of y"):
            backend.reconstruction_loss(y, y_coded.double(), decoder, "mean", True)
        with pytest.raises(RuntimeError, match="disagree on d"):
            backend.reconstruction_loss(y, make((4, 6), torch.float32), decoder, "mean", True)

    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_meta_registration(self, backend, reduction):
        args = (make((17, 131), torch.float32), make((5, 131), torch.float32, seed=1), make_weights(17, 5),
                reduction, True)
        torch.library.opcheck(torch.ops.dres_fast_C.reconstruction_loss.default, args)


@gpu
@pytest.mark.gpu
class TestGPUThroughOps:
    """dres_fast.ops with backend="cuda" against backend="torch": forward, backward with a non-unit
    incoming gradient, every reduction."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("K,N,d", [(17, 17, 131), (256, 256, 4099), (3, 1024, 7)])
    def test_reconstruction_loss_fwd_bwd(self, backend, dtype, reduction, K, N, d):
        from dres_fast import ops

        decoder = make_weights(K, N, dtype=torch.float64)
        base_y, base_yc = make((K, d), dtype, seed=41), make((N, d), dtype, seed=42)
        incoming = make((K, 1), torch.float64, seed=43)[:, 0] if reduction == "none" else None
        results = {}
        for name in ("cuda", "torch"):
            y, y_coded = base_y.clone().requires_grad_(), base_yc.clone().requires_grad_()
            loss = ops.reconstruction_loss(y, y_coded, decoder, reduction=reduction, backend=name)
            weighted = (loss * incoming.to(loss.dtype)).sum() if reduction == "none" else 3.7 * loss
            weighted.backward()
            results[name] = (loss.detach(), y.grad, y_coded.grad)
        for what, ours, theirs in zip(("loss", "grad_y", "grad_y_coded"), results["cuda"], results["torch"]):
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
            tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7}[dtype]
            assert rel_err(ours, theirs) < tol, f"{what}: {rel_err(ours, theirs):.3e}"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_spline_mix_fwd_bwd(self, backend, dtype):
        from dres_fast import ops

        weights = make_weights(256, 17, dtype=torch.float64)
        base = make((17, 1000), dtype, seed=51)
        incoming = make((256, 1000), dtype, seed=52)
        results = {}
        for name in ("cuda", "torch"):
            x = base.clone().requires_grad_()
            out = ops.spline_mix(weights, x, backend=name)
            out.backward(incoming)
            results[name] = (out.detach(), x.grad)
        tol = 1e-5 if dtype == torch.float32 else 2.0 ** -9
        for ours, theirs in zip(results["cuda"], results["torch"]):
            assert rel_err(ours, theirs) < tol
