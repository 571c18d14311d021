"""Backend "cuda" (csrc/ + dres_fast/_cuda_ext.py + dres_fast/_build_support.py): what is particular to
it. The numerics of both ops on a GPU (against float64 and the torch backend) are in
test_spline_mix.py and test_reconstruction_loss.py, shared with the other backends.

On any machine (CI has nvcc but no GPU and a CPU-only torch):
  * .ci/compile_cuda.sh reports a broken file as a failure (CI itself runs the script on every
    csrc/*.cu for every architecture before the tests, so the tests do not compile them again);
  * csrc/binding.cpp passes a C++ syntax check against torch's headers (when they are usable);
  * the kernel bodies run on the CPU (tests/cuda_emulation/harness.cpp) against float64 loops, and fp32
    against float64 by the rule of the GPU tests (at most 2x torch fp32's error) on 1024-term sums;
  * the Python side reports what is missing without building anything, and setup.py's extension
    list honours the environment.
On a CUDA machine: the C++ ops' argument checks and their meta (fake) registrations.
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
from reference import (BUILD_SUPPORT_FILE, HAS_GPU, assert_fp32_accuracy, backend_module, cuda_loader, mix64,
                       mixing_matrix, randn, reconstruction64, torch_fp32_mix, torch_fp32_reconstruction)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
COMPILE_SCRIPT = ROOT / ".ci" / "compile_cuda.sh"
NVCC = shutil.which("nvcc")
cuda_ext = cuda_loader()  # imports nothing heavy; builds only in load()


def _load_build_support():
    """The build-support module loaded by path, as setup.py does."""
    spec = importlib.util.spec_from_file_location("_dres_build_support_test", BUILD_SUPPORT_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# Compile checks (no GPU needed)
# --------------------------------------------------------------------------------------------------


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


@pytest.mark.slow
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

HARNESS = pathlib.Path(__file__).resolve().parent / "cuda_emulation" / "harness.cpp"


def _host_compiler_ok():
    return shutil.which("g++") is not None and _cuda_include_dir() is not None


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The emulation harness, built once per module run."""
    if not _host_compiler_ok():
        pytest.skip("needs g++ (C++20) and the CUDA headers (cuda_fp16.h)")
    binary = tmp_path_factory.mktemp("harness") / "harness"
    build = subprocess.run(
        ["g++", "-std=c++20", "-O1", "-pthread", "-DDRES_HOST_EMULATION", f"-I{CSRC}", f"-I{_cuda_include_dir()}",
         str(HARNESS), "-o", str(binary)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-5000:]
    return binary


@pytest.mark.slow
def test_kernel_bodies_on_cpu_match_float64(harness):
    run = subprocess.run([str(harness)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "0 failure(s)" in run.stdout, run.stdout[-8000:] + run.stderr[-2000:]
    assert run.stdout.count("OK  ") >= 500, run.stdout  # every check ran (528 with the narrow-tile checks)


def _run_harness(harness, args, directory, inputs, outputs):
    """Writes ``inputs`` (name -> fp32 tensor) as raw files, runs the harness in file mode, reads ``outputs``
    (name -> shape) back."""
    for name, tensor in inputs.items():
        tensor.float().contiguous().numpy().tofile(directory / name)
    run = subprocess.run([str(harness), *map(str, args), str(directory)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return {name: torch.from_file(str(directory / name), size=int(torch.Size(shape).numel()),
                                  dtype=torch.float32).reshape(shape) for name, shape in outputs.items()}


# Long reductions: N = 1024 (D @ y_coded) and K = 1024 (D^T (c r), and spline_mix's W @ x), judged by the
# rule of the GPU tests: error against float64 at most 2x torch fp32's, here torch's CPU sgemm. A single
# fp32 FMA chain over 1024 terms (the kernels before their two-level sum) is 3-9x less accurate than
# torch on every output below; the two-level sum of tile_gemm.cuh stays within 1.5x.
LONG_REDUCTIONS = [(17, 1024, 7, "sum"), (17, 1024, 1, "none"), (3, 1024, 131, "mean"), (1024, 3, 7, "sum")]


def _assert_fp32_rule(got, torch_fp32, ref, what):
    """``assert_fp32_accuracy``, whose ``FP32_FLOOR`` (4.8e-7 relative) is meant for results of a handful of
    numbers, where torch may be right by luck; for outputs of 7 or more elements the floor is dropped, as
    it would hide the difference measured here (CPU sgemm errors are 1-3e-7, cuBLAS's on the GPU ~1e-7)."""
    assert_fp32_accuracy(got, torch_fp32, ref, what, **({} if got.numel() < 7 else {"floor": 0.0}))


@pytest.mark.slow
@pytest.mark.parametrize("K,N,d,reduction", LONG_REDUCTIONS)
def test_kernel_bodies_fp32_accuracy_on_long_reductions(harness, tmp_path, K, N, d, reduction):
    decoder = mixing_matrix(K, N).float()
    y = randn((K, d), torch.float32, seed=K)
    y_coded = randn((N, d), torch.float32, seed=N + 1)
    got = _run_harness(harness, ["recon", K, N, d, "mean sum none".split().index(reduction)], tmp_path,
                       dict(decoder=decoder, y=y, y_coded=y_coded),
                       dict(loss=(K,) if reduction == "none" else (), grad_y=(K, d),
                            grad_y_coded=(0,) if reduction == "none" else (N, d)))
    refs = reconstruction64(y, y_coded, decoder, reduction)
    torch_fp32 = torch_fp32_reconstruction(y, y_coded, decoder, reduction)
    for name, ours, theirs, ref in zip(("loss", "grad_y", "grad_y_coded"), got.values(), torch_fp32, refs):
        if ref is not None:
            _assert_fp32_rule(ours, theirs, ref, f"recon K={K} N={N} d={d} {reduction} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("M,K,d", [(17, 1024, 7), (64, 1024, 7)])
def test_spline_mix_body_fp32_accuracy_on_a_long_reduction(harness, tmp_path, M, K, d):
    weights = mixing_matrix(M, K).float()
    x = randn((K, d), torch.float32, seed=K)
    got = _run_harness(harness, ["mix", M, K, d], tmp_path, dict(weights=weights, x=x), dict(out=(M, d)))
    _assert_fp32_rule(got["out"], torch_fp32_mix(weights, x), mix64(weights, x), f"spline_mix M={M} K={K}")

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
            dispatch.load_backend("cuda")
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
            spec = importlib.util.spec_from_file_location("bs", {str(BUILD_SUPPORT_FILE)!r})
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
# GPU: the C++ ops' own argument checks and meta registrations
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend():
    """The loaded CUDA backend; a build failure on a GPU machine fails (not skips) the tests."""
    return backend_module("cuda")


def _on_gpu(shape, dtype=torch.float32, seed=0):
    return randn(shape, dtype, "cuda", seed=seed)


def _weights(rows, cols):
    return mixing_matrix(rows, cols, device="cuda", dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
class TestGPUOps:
    def test_spline_mix_errors_name_the_argument(self, backend):
        with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
            backend.spline_mix(_weights(3, 3), torch.randn(3, 4))
        with pytest.raises(RuntimeError, match="disagree on K"):
            backend.spline_mix(_weights(3, 4), _on_gpu((3, 5)))
        with pytest.raises(RuntimeError, match="x must be float32"):
            backend.spline_mix(_weights(3, 3), torch.ones(3, 4, device="cuda", dtype=torch.int32))

    def test_spline_mix_meta_registration(self, backend):
        weights, x = _weights(17, 5), _on_gpu((5, 131))
        torch.library.opcheck(torch.ops.dres_fast_C.spline_mix.default, (weights, x))

    def test_reconstruction_loss_errors_name_the_argument(self, backend):
        decoder, y, y_coded = _weights(3, 4), _on_gpu((3, 5)), _on_gpu((4, 5))
        with pytest.raises(RuntimeError, match="reduction must be"):
            backend.reconstruction_loss(y, y_coded, decoder, "max", True)
        with pytest.raises(RuntimeError, match="decoder must be"):
            backend.reconstruction_loss(y, y_coded, _weights(4, 3), "mean", True)
        with pytest.raises(RuntimeError, match="y_coded must have the dtype of y"):
            backend.reconstruction_loss(y, y_coded.double(), decoder, "mean", True)
        with pytest.raises(RuntimeError, match="disagree on d"):
            backend.reconstruction_loss(y, _on_gpu((4, 6)), decoder, "mean", True)

    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_reconstruction_loss_meta_registration(self, backend, reduction):
        args = (_on_gpu((17, 131)), _on_gpu((5, 131), seed=1), _weights(17, 5), reduction, True)
        torch.library.opcheck(torch.ops.dres_fast_C.reconstruction_loss.default, args)

    @pytest.mark.parametrize("d", [1, 10, 127, 128, 300])
    def test_transposed_weights_and_narrow_tiles(self, backend, d):
        """W^T as a view (what backward passes) is read in place and gives the bits of its contiguous copy (each
        output is the same FMA chain); d < 128 runs the narrow tile, d >= 128 the wide one, both near float64;
        repeated calls give the same bits (reconstruction_loss at d = 10 runs the row split on narrow tiles)."""
        weights = _weights(17, 256)  # W (M, K) = (17, 256): W^T (256, 17) is a transposed view
        x = _on_gpu((17, d), seed=d)
        got = backend.spline_mix(weights.t(), x)
        assert torch.equal(got, backend.spline_mix(weights.t().contiguous(), x))
        assert torch.equal(got, backend.spline_mix(weights.t(), x))
        ref = mix64(weights.t(), x)
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 2e-6
        y, y_coded, decoder = _on_gpu((256, d), seed=1), _on_gpu((256, d), seed=2), _weights(256, 256)
        first = backend.reconstruction_loss(y, y_coded, decoder, "mean", True)
        again = backend.reconstruction_loss(y, y_coded, decoder, "mean", True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        for ours, ref in zip(first, reconstruction64(y, y_coded, decoder, "mean")):
            assert ((ours.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
