"""csrc/banded.cu (the cuda backend's banded_apply: W x and W^T g of a BandedSpline, float64 recurrences) on
the CPU: tests/cuda_emulation/banded_harness.cpp runs the kernel bodies (csrc/host_emulation.h, every block as
std::threads) on coefficients and data written by these tests, which judge the outputs against
BandedSpline.forward64 / transpose64 (dres_fast/banded.py).

Each output element must be the float64 reference rounded once to the data's dtype: |got - ref| <= u |ref|
(u the dtype's unit roundoff) plus a float64 allowance, ``F64_TOL * max |ref|``, or ``F64_TOL_REFINED`` for
splines with ``refine``, which the kernel applies like forward64 (the spline's q_bands, r_bands, lam): two
one-step-refined solves that round differently (4e-10 apart at 4096 Chebyshev knots and lam = 1e6, each 5e-9
from a three-step refinement there). Without that step the kernel is 6e-5 off at those knots
(test_refinement_step_is_needed_at_4096_clustered_knots).
"""

import copy
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from dres_fast.banded import BandedSpline
from dres_fast.splines import as_knots

ROOT = pathlib.Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cuda_emulation" / "banded_harness.cpp"
ARRAYS = ("factor", "stencil", "index", "chord", "curvature", "gather")
DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
UNIT_ROUNDOFF = {"f64": 0.0, "f32": 2.0**-24, "f16": 2.0**-11, "bf16": 2.0**-8}
SUBNORMAL = {"f64": 0.0, "f32": 0.0, "f16": 2.0**-25, "bf16": 0.0}  # half the smallest fp16 subnormal step
F64_TOL = 1e-12
F64_TOL_REFINED = 1e-9

pytestmark = pytest.mark.slow  # builds a C++ harness


def _cuda_include_dir():
    nvcc = shutil.which("nvcc")
    candidates = [pathlib.Path("/usr/local/cuda/include"), *sorted(pathlib.Path("/usr/local").glob("cuda*/include"))]
    if nvcc is not None:
        candidates.insert(0, pathlib.Path(nvcc).resolve().parents[1] / "include")
    return next((c for c in candidates if (c / "cuda_fp16.h").exists()), None)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The banded emulation harness, built once per module run."""
    include = _cuda_include_dir()
    if shutil.which("g++") is None or include is None:
        pytest.skip("needs g++ (C++20) and the CUDA headers (cuda_fp16.h)")
    binary = tmp_path_factory.mktemp("banded_harness") / "banded_harness"
    build = subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-DDRES_HOST_EMULATION", f"-I{ROOT / 'csrc'}",
                            f"-I{include}", str(HARNESS), "-o", str(binary)], capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stderr[-5000:]
    return binary


def run_kernel(harness, directory, spline, x, dtype, transpose, threads=64, scratch="f64", refine=None):
    """The kernel's output (float64) for float64 ``x`` (values representable in ``dtype``); with the spline's
    refinement step where it has one (``refine`` None), as the caller passes it."""
    refine = spline.refine if refine is None else refine
    for name in ARRAYS + (("q_bands", "r_bands") if refine else ()):
        getattr(spline, name).contiguous().numpy().tofile(directory / name)
    np.array([spline.lam]).tofile(directory / "lam")
    x.contiguous().numpy().tofile(directory / "x")
    p, n = spline.shape
    args = [directory, n, p, x.shape[1], dtype, int(transpose), threads, scratch, int(refine)]
    result = subprocess.run([str(harness), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.from_numpy(np.fromfile(directory / "out", dtype=np.float64)).reshape(n if transpose else p, -1)


def spline_of(n, p, kind, lam, s_kind=None):
    return BandedSpline(as_knots(kind, n, "t"), as_knots(s_kind or kind, p, "s"), lam)


def data(rows, d, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=generator, dtype=torch.float64).to(DTYPES[dtype]).to(torch.float64)


def max_rel(got, ref):
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def assert_rounded_once(got, ref, dtype, f64_tol, what):
    assert torch.isfinite(got).all(), f"{what}: unwritten (NaN) outputs"
    bound = UNIT_ROUNDOFF[dtype] * ref.abs() + f64_tol * ref.abs().max() + SUBNORMAL[dtype]
    excess = ((got - ref).abs() - bound).max().item()
    assert excess <= 0, f"{what}: max rel err {max_rel(got, ref):.3e} beyond one rounding + {f64_tol:g}"


# (n, p, knots, points, lam, d, threads): n = p = 3, ragged n != p, prime d, several blocks of 32/64/128 columns
CONFIGS = [
    (3, 3, "uniform", None, 0.0, 1, 32),
    (3, 3, "chebyshev", None, 1.0, 7, 64),
    (17, 64, "chebyshev", None, 1e-2, 131, 32),
    (17, 64, "uniform", "chebyshev", 1e6, 7, 128),
    (17, 64, "chebyshev", None, 0.0, 131, 64),
    (200, 17, "chebyshev", None, 1.0, 131, 128),
    (200, 17, "uniform", None, 0.0, 1, 64),
    (200, 17, "chebyshev", "uniform", 1e6, 131, 32),
    (4096, 4096, "uniform", "chebyshev", 1e-8, 7, 64),
    (4096, 1000, "chebyshev", "uniform", 0.0, 131, 128),
    (4096, 4096, "chebyshev", None, 1e6, 7, 64),
    (1024, 700, "uniform", "chebyshev", 1e-2, 131, 128),
]


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transpose"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "n{}-p{}-{}-{}-lam{:g}-d{}-t{}".format(*c[:2], c[2], c[3] or c[2], *c[4:]))
def test_matches_forward64_and_transpose64(harness, tmp_path, config, transpose):
    n, p, kind, s_kind, lam, d, threads = config
    spline = spline_of(n, p, kind, lam, s_kind)
    f64_tol = F64_TOL_REFINED if spline.refine else F64_TOL
    for dtype in DTYPES:
        x = data(p if transpose else n, d, dtype)
        ref = spline.transpose64(x) if transpose else spline.forward64(x)
        got = run_kernel(harness, tmp_path, spline, x, dtype, transpose, threads)
        assert_rounded_once(got, ref, dtype, f64_tol, f"{config} {dtype}")


@pytest.mark.parametrize("config", [(17, 64, "chebyshev", 1.0), (200, 17, "uniform", 1e-3), (64, 64, "chebyshev", 1e6),
                                    (1024, 700, "chebyshev", 1e6)])
def test_adjoint(harness, tmp_path, config):
    """<W x, g> = <x, W^T g> with both sides from the kernel (float64 data), per column."""
    n, p, kind, lam = config
    spline = spline_of(n, p, kind, lam)
    x, g = data(n, 7, "f64", seed=1), data(p, 7, "f64", seed=2)
    wx = run_kernel(harness, tmp_path, spline, x, "f64", False)
    wtg = run_kernel(harness, tmp_path, spline, g, "f64", True)
    lhs, rhs = (wx * g).sum(0), (x * wtg).sum(0)
    scale = wx.norm(dim=0) * g.norm(dim=0) + x.norm(dim=0) * wtg.norm(dim=0)
    assert ((lhs - rhs).abs() <= 1e-12 * scale).all(), (lhs - rhs).abs().max()


def test_block_size_does_not_change_a_bit(harness, tmp_path):
    """Each column's arithmetic is its thread's alone: 32, 64 and 128 columns per block give the same bits."""
    spline = spline_of(200, 17, "chebyshev", 1.0)
    for transpose in (False, True):
        x = data(17 if transpose else 200, 131, "f32")
        outs = [run_kernel(harness, tmp_path, spline, x, "f32", transpose, threads) for threads in (32, 64, 128)]
        assert all(torch.equal(outs[0], other) for other in outs[1:])


def test_refinement_step_is_needed_at_4096_clustered_knots(harness, tmp_path):
    """4096 Chebyshev knots at lam = 1e6 (the spline refines): without the refinement step the kernel is the
    unrefined float64 solve (equal to torch's to ~4e-9: the sweep orders round differently), 6e-5 from the
    refined map, beyond float32 data's rounding; with it (test_matches_forward64_and_transpose64), one rounding."""
    spline = spline_of(4096, 4096, "chebyshev", 1e6)
    assert spline.refine
    unrefined = copy.copy(spline)
    unrefined.refine = False
    for transpose in (False, True):
        x = data(4096, 7, "f32")
        got = run_kernel(harness, tmp_path, spline, x, "f32", transpose, 32, refine=False)
        ref, plain = (spline.transpose64(x), unrefined.transpose64(x)) if transpose else (spline.forward64(x),
                                                                                           unrefined.forward64(x))
        assert max_rel(got, plain) < 1e-6 and max_rel(got, ref) > 1e-5


def test_float32_scratch_would_lose_accuracy(harness, tmp_path):
    """Why z / gamma are kept in float64 in the scratch: rounding them to float32 between the sweeps (the
    harness's scratch=f32) costs ~1e-4 relative error on float32 data at 200 Chebyshev knots and lam = 1e6
    (1e-2 .. 1e-1 at 4096), against float32's one rounding (~6e-8) with the float64 scratch."""
    spline = spline_of(200, 17, "chebyshev", 1e6)
    for transpose in (False, True):
        x = data(17 if transpose else 200, 131, "f32")
        ref = spline.transpose64(x) if transpose else spline.forward64(x)
        f64 = max_rel(run_kernel(harness, tmp_path, spline, x, "f32", transpose, scratch="f64"), ref)
        f32 = max_rel(run_kernel(harness, tmp_path, spline, x, "f32", transpose, scratch="f32"), ref)
        assert f64 < 1e-7 and f32 > 1e-5, (f64, f32)


# --------------------------------------------------------------------------------------------------
# On a GPU: the op itself (dres_fast.backends.cuda.banded_apply), its argument checks and Meta kernel
# --------------------------------------------------------------------------------------------------
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def backend():
    from reference import backend_module

    return backend_module("cuda")  # a build failure on a GPU machine fails, not skips


def _gpu_args(spline):
    arrays = tuple(getattr(spline, name) for name in ARRAYS)
    return arrays, ((spline.q_bands, spline.r_bands, spline.lam) if spline.refine else None)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
class TestGPU:
    @pytest.mark.parametrize("config", [CONFIGS[2], CONFIGS[7], CONFIGS[10]], ids=lambda c: f"n{c[0]}-p{c[1]}")
    @pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transpose"])
    def test_matches_forward64(self, backend, config, transpose):
        n, p, kind, s_kind, lam, d, _ = config
        spline = BandedSpline(as_knots(kind, n, "t"), as_knots(s_kind or kind, p, "s"), lam, device="cuda")
        arrays, refinement = _gpu_args(spline)
        for dtype in DTYPES:
            x = data(d, p if transpose else n, dtype).t().cuda()  # non-contiguous: the binding copies
            ref = spline.transpose64(x) if transpose else spline.forward64(x)
            got = backend.banded_apply(arrays, x.to(DTYPES[dtype]), transpose, refinement)
            assert got.dtype == DTYPES[dtype] and got.is_contiguous()
            assert_rounded_once(got.double().cpu(), ref.cpu(), dtype, F64_TOL_REFINED if spline.refine else F64_TOL,
                                f"{config} {dtype}")

    def test_errors_name_the_argument(self, backend):
        spline = BandedSpline(as_knots("chebyshev", 17, "t"), as_knots("chebyshev", 9, "s"), 1.0, device="cuda")
        arrays, _ = _gpu_args(spline)
        with pytest.raises(RuntimeError, match="does not fit the map"):
            backend.banded_apply(arrays, torch.ones(9, 3, device="cuda"), False)
        with pytest.raises(RuntimeError, match="chord must be"):
            backend.banded_apply(arrays[:3] + (arrays[3].float(),) + arrays[4:], torch.ones(17, 3, device="cuda"))

    @pytest.mark.parametrize("transpose", [False, True])
    def test_meta_registration(self, backend, transpose):
        spline = BandedSpline(as_knots("chebyshev", 200, "t"), as_knots("uniform", 17, "s"), 1e6, device="cuda")
        arrays, refinement = _gpu_args(spline)
        x = torch.randn(17 if transpose else 200, 131, device="cuda")
        torch.library.opcheck(torch.ops.dres_fast_C.banded_apply.default, (*arrays, x, transpose))
        if refinement is not None:
            torch.library.opcheck(torch.ops.dres_fast_C.banded_apply.default, (*arrays, x, transpose, *refinement))
