"""The banded path (``dres_fast/banded.py``, ``dres_fast/ops/banded.py``, the compiled CPU kernel).

What each case means:
* the banded map IS the dense map: ``BandedSpline.forward64`` / ``transpose64`` against the library's float64
  dense weights (themselves tested against scipy in test_splines.py), for every point kind, ragged
  ``K != N``, ``lam`` from 0 to 1e6 and ``inf``, ``dof`` from just above 2 to ``K``;
* the transpose is exact: ``<W x, g> == <x, W^T g>`` to rounding (the backward of every order relies on it);
* the compiled CPU kernel computes what the torch ops compute, for float32 and float64 data, widths below
  one chunk, several chunks, a prime width, strided rows;
* through the public ops and ``dres_loss``: the banded path gives the dense path's loss and gradients (a
  non-unit incoming gradient, every reduction), gradcheck and gradgradcheck in float64;
* ``auto`` and ``DRES_SPLINE_PATH`` choose as documented; set-up stays O(K + N) (K = N = 65536 under 2 s).
"""

import math
import time

import numpy as np
import pytest
import torch

import dres_fast
from dres_fast import ops, splines
from dres_fast.backends import banded_cpu
from dres_fast.banded import BandedSpline, banded_coding
from dres_fast.cache import default_cache
from dres_fast.ops import banded as banded_path
from dres_fast.smoothing import SmoothingSpec

import reference as ref

#: float64 agreement with the dense weights. Both apply the same factor with one refinement step; at
#: large lam on 1024 clustered knots each is off the exact map by ~4e-12 (a 3-step refined solve), so
#: they differ by that much there.
F64_TOL = {"plain": 1e-12, "ill": 5e-11}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _knots(n, kind):
    return splines._points_np(n, kind)


CASES = [(3, 3), (5, 4), (7, 11), (17, 64), (64, 64), (200, 17), (97, 300)]
LAMS = [0.0, 1e-6, 1e-3, 1.0, 1e6, math.inf]


@pytest.mark.parametrize("kind", ["chebyshev", "uniform", "lobatto"])
@pytest.mark.parametrize("n,p", CASES)
@pytest.mark.parametrize("lam", LAMS)
def test_forward_and_transpose_match_dense(kind, n, p, lam):
    t, s = _knots(n, kind), _knots(p, "lobatto" if kind != "lobatto" else "chebyshev")
    dense = splines.spline_weights(t, s, lam)
    spline = BandedSpline(t, s, lam)
    x = torch.randn(n, 5, dtype=torch.float64)
    g = torch.randn(p, 5, dtype=torch.float64)
    tol = F64_TOL["ill" if lam >= 1.0 else "plain"]
    assert _rel(spline.forward64(x), dense @ x) < tol
    assert _rel(spline.transpose64(g), dense.t() @ g) < tol
    # the transpose is exact, not merely close: <W x, g> = <x, W^T g>
    lhs, rhs = (spline.forward64(x) * g).sum(), (x * spline.transpose64(g)).sum()
    assert abs(lhs - rhs) <= 1e-13 * spline.forward64(x).norm() * g.norm()


@pytest.mark.parametrize("kind", ["chebyshev", "uniform"])
@pytest.mark.parametrize("fraction", [None, 0.02, 0.1, 0.75, 1.0])
def test_every_dof_at_1024(kind, fraction):
    """dof from just above 2 (a near-line: the hardest smoothing for the factor) to K (interpolation)."""
    n = 1024
    t, s = _knots(n, kind), _knots(700, "lobatto")
    dof = 2.0 + 1e-3 if fraction is None else max(2.5, fraction * n)
    lam = splines.lam_for_dof(t, dof)
    dense = splines.spline_weights(t, s, lam)
    spline = BandedSpline(t, s, lam)
    x = torch.randn(n, 3, dtype=torch.float64)
    assert _rel(spline.forward64(x), dense @ x) < F64_TOL["ill"]
    assert _rel(spline.forward64(x.float()), dense @ x) < 2e-6  # float32 data: the float64 sweeps keep it


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chebyshev", "uniform"])
@pytest.mark.parametrize("dof_fraction", [0.002, 0.1, 0.75])
def test_accuracy_at_8192(kind, dof_fraction):
    """K = 8192 against the dense path's own math applied column by column (LAPACK's banded solve and one
    refinement step, :mod:`dres_fast._banded`): no blocking, no kernel, shared only the factor's formulas."""
    from scipy.linalg import cho_solve_banded

    from dres_fast._banded import PenalizedSystem

    n = 8192
    t, s = _knots(n, kind), _knots(n, "lobatto")
    lam = splines.lam_for_dof(t, max(2.5, dof_fraction * n))
    y = np.random.default_rng(0).standard_normal((n, 3))
    system = PenalizedSystem(t, lam)
    gamma = cho_solve_banded((system.factor, False), system.apply_qt(y) / (1.0 + lam))
    gamma = system._refinement_step(y, gamma)
    idx, p0, p1, c0, c1 = splines._evaluation_coefficients(t, s)
    expected = splines._curvature_rows(system, lam, idx, p0, p1, c0, c1) @ gamma + p0[:, None] * y[idx] + p1[:, None] * y[idx + 1]
    spline = BandedSpline(t, s, lam)
    expected = torch.from_numpy(expected)
    assert _rel(spline.forward64(torch.from_numpy(y)), expected) < 1e-9
    assert _rel(ops.spline_mix(spline, torch.from_numpy(y).float(), backend="torch"), expected) < 2e-6


needs_cpu_kernel = pytest.mark.skipif(not banded_cpu.available(), reason="no C compiler for the CPU kernel")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 7, 31, 32, 131])
@pytest.mark.parametrize("n,p,lam", [(3, 3, 1e-4), (17, 64, 1e-4), (200, 17, 1.0), (97, 300, 1e6), (1024, 1024, 1e6)])
def test_cpu_kernel_matches_torch_ops(dtype, d, n, p, lam):
    """Plain and refined solves (the refinement step is in the kernel: without it float32 data is 6e-5
    off at 4096 knots and lam = 1e6); float64 refined results differ by the refinement's own accuracy."""
    spline = BandedSpline(_knots(n, "chebyshev"), _knots(p, "lobatto"), lam)
    x = torch.randn(n, 2 * d, dtype=torch.float64)[:, ::2]  # strided rows
    g = torch.randn(p, d, dtype=torch.float64)
    tol = (1e-10 if spline.refine else 1e-12) if dtype == torch.float64 else 2e-6
    forward = banded_cpu.banded_apply(spline.arrays, x.to(dtype), False, spline.refinement)
    transposed = banded_cpu.banded_apply(spline.arrays, g.to(dtype), True, spline.refinement)
    assert _rel(forward, spline.forward64(x)) < tol
    assert _rel(transposed, spline.transpose64(g)) < tol
    if n == 1024:
        assert spline.refine  # the case exercises the kernel's refinement


@needs_cpu_kernel
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [7, 32, 131])
@pytest.mark.parametrize("n,p,lam", [(17, 64, 1e-4), (1024, 1024, 1e6)])
def test_cpu_kernel_extras(threads, dtype, d, n, p, lam, monkeypatch):
    """The fused loss's two extras, against torch ops on the kernel's own outputs. row_sumsq (forward):
    the output is unchanged and each row's sum of squares comes back in float64. row_scale (transposed):
    the scaled rows are exactly torch's product in x's dtype (one rounding), and the map is the plain
    transposed map of those rows, bitwise. Partial chunks (d = 7, 131), several threads (per-thread row
    sums added in thread order), the refined solve (n = 1024, lam = 1e6)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what banded_apply passes the kernel
    spline = BandedSpline(_knots(n, "chebyshev"), _knots(p, "lobatto"), lam)
    x, base = torch.randn(n, d, dtype=dtype), torch.randn(p, d, dtype=dtype)
    out, sums = banded_cpu.banded_apply(spline.arrays, x, False, spline.refinement, base=base, scale=-1.0,
                                        row_sumsq=True)
    assert torch.equal(out, banded_cpu.banded_apply(spline.arrays, x, False, spline.refinement, base=base, scale=-1.0))
    assert sums.dtype == torch.float64 and sums.shape == (p,)
    torch.testing.assert_close(sums, out.double().square().sum(1), rtol=1e-13, atol=0)
    g, row_scale = torch.randn(p, d, dtype=dtype), torch.randn(p, dtype=dtype)
    out_t, scaled = banded_cpu.banded_apply(spline.arrays, g, True, spline.refinement, scale=-1.0, row_scale=row_scale)
    assert torch.equal(scaled, g * row_scale[:, None])
    assert torch.equal(out_t, banded_cpu.banded_apply(spline.arrays, scaled, True, spline.refinement, scale=-1.0))


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and f" {flag}" in line for line in fh)
    except OSError:
        return False


BUILDS = {"native": ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
          "avx2": ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"],
          "generic": ["-O3", "-ffp-contract=off", "-fopenmp"]}


@needs_cpu_kernel
@pytest.mark.parametrize("build", list(BUILDS))
def test_every_build_streams_the_same_results(build, monkeypatch, tmp_path):
    """The kernel built for this CPU (AVX-512 here: streamed 64-byte stores), for AVX2 (32-byte streamed
    stores) and generic (plain stores) computes the same maps: outputs past STREAM_MIN_BYTES (4 MiB) with
    rows aligned for streaming (d = 2048) and not (d = 2047, the last chunk partial), both dtypes, both
    directions, with base and scale (the fused residual). Each build goes to its own cache directory."""
    if build == "avx2" and not _cpu_has("avx2"):
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setattr(banded_cpu, "_FLAG_SETS", (BUILDS[build],))
    monkeypatch.setenv("DRES_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(banded_cpu, "_LIBRARY", None)
    assert banded_cpu.available(), banded_cpu._LIBRARY
    spline = BandedSpline(_knots(600, "chebyshev"), _knots(557, "lobatto"), 1e-4)
    refinement = spline.refinement
    for d in (2048, 2047):
        x, g = torch.randn(600, d, dtype=torch.float64), torch.randn(557, d, dtype=torch.float64)
        for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-10)):
            forward = banded_cpu.banded_apply(spline.arrays, x.to(dtype), False, refinement)
            assert _rel(forward, spline.forward64(x)) < tol
            assert _rel(banded_cpu.banded_apply(spline.arrays, g.to(dtype), True, refinement), spline.transpose64(g)) < tol
            residual = banded_cpu.banded_apply(spline.arrays, x.to(dtype), False, refinement, base=g.to(dtype), scale=-1.0)
            assert _rel(residual, g - spline.forward64(x)) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ops_match_dense_path(dtype, reduction):
    """Both ops, forward and backward with a non-unit incoming gradient, banded against dense."""
    spec = SmoothingSpec(num_coded=37)
    dense_enc, dense_dec = default_cache.weights(spec, 41, "cpu", dtype)
    enc, dec = default_cache.banded(spec, 41, "cpu")
    x = torch.randn(41, 3, 67, dtype=dtype)
    y, y_coded = torch.randn(41, 3, 67, dtype=dtype), torch.randn(37, 3, 67, dtype=dtype)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    grad_mixed = (torch.randn(37, 3, 67, dtype=torch.float64) * 0.37).to(dtype)
    results = []
    for e, dmap in ((dense_enc, dense_dec), (enc, dec)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, y_coded)]
        mixed = ops.spline_mix(e, leaves[0])
        loss = ops.reconstruction_loss(leaves[1], leaves[2], dmap, reduction)
        weight = torch.linspace(0.3, 1.7, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        torch.autograd.backward([mixed, loss], [grad_mixed, weight])
        results.append([mixed, loss] + [leaf.grad for leaf in leaves])
    for name, dense_value, banded_value in zip(["mix", "loss", "grad x", "grad y", "grad y_coded"], *results):
        assert banded_value.dtype == dense_value.dtype, name
        assert _rel(banded_value, dense_value) < tol, name


@pytest.mark.parametrize("backend", ["torch"])
def test_gradcheck_and_gradgradcheck(backend):
    enc, dec = banded_coding(SmoothingSpec(num_coded=6, dof_enc=4.5), 7)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y_coded = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    mix = lambda a: ops.spline_mix(enc, a, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(mix, (x,)) and torch.autograd.gradgradcheck(mix, (x,))
    for reduction in ("mean", "sum", "none"):
        loss = lambda a, b: ops.reconstruction_loss(a, b, dec, reduction, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(loss, (y, y_coded)) and torch.autograd.gradgradcheck(loss, (y, y_coded))


def test_dres_loss_same_on_both_paths(monkeypatch):
    """A whole step, and a second derivative through it (an input-gradient penalty on the DReS loss): the
    two paths wire the same maps into the step. In float64, so that agreement is to rounding (~1e-13) and
    no float32 BLAS path is part of the claim: each op's float32 accuracy against float64 is
    test_ops_match_dense_path's. (A CI run once saw this step's dense float32 loss 2.7e-5 off float64;
    40+ local runs, fresh clones included, did not reproduce it.)"""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(80, 96), torch.nn.Tanh(), torch.nn.Linear(96, 70)).double()
    x = torch.randn(40, 80, dtype=torch.float64, requires_grad=True)
    out = {}
    for path in ("dense", "banded"):
        monkeypatch.setenv(banded_path.ENV_VAR, path)
        net.zero_grad()
        loss = dres_fast.dres_loss(net, x, num_coded=37, reduction="sum")
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + grad_x.square().sum()).backward()
        out[path] = [loss.detach()] + [p.grad.clone() for p in net.parameters()]
    scale = max(value.abs().max().item() for value in out["dense"])
    for name, dense_value, banded_value in zip(["loss", "w1", "b1", "w2", "b2"], out["dense"], out["banded"]):
        error = (dense_value - banded_value).abs().max().item()
        assert error < 1e-10 * scale, f"{name}: dense and banded differ by {error:.3g} (largest entry {scale:.4g})"


def test_auto_choice(monkeypatch):
    monkeypatch.delenv(banded_path.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    # the ops tests above run the fused loss where the CPU kernel builds (else the composed one)
    assert banded_path._fuses(banded_path.kernel_for("auto", cpu, torch.float32)) == banded_cpu.available()
    expect = "banded" if banded_cpu.available() else "dense"
    assert banded_path.AUTO_CPU == ((256, 64), (128, 1024))
    assert banded_path.choose("auto", cpu, 256, 256, 1024) == expect
    assert banded_path.choose("auto", cpu, 256, 256, 64) == expect
    assert banded_path.choose("auto", cpu, 256, 256, 63) == "dense"
    assert banded_path.choose("auto", cpu, 128, 128, 1024) == expect  # the second pair
    assert banded_path.choose("auto", cpu, 128, 128, 1023) == "dense"
    assert banded_path.choose("auto", cpu, 255, 4096, 1023) == "dense"  # the smaller batch counts
    assert banded_path.choose("auto", cpu, 127, 64, 4096) == "dense"
    # float64 data: banded from K, N >= 128 and d >= 128 (dense float64 GEMMs cost twice float32's)
    assert banded_path.AUTO_CPU_BY_DTYPE[torch.float64] == ((256, 64), (128, 128))
    assert banded_path.choose("auto", cpu, 128, 128, 128, torch.float64) == expect
    assert banded_path.choose("auto", cpu, 128, 128, 128, torch.float32) == "dense"
    assert banded_path.choose("auto", cpu, 128, 127, 4096, torch.float64) == "dense"
    assert banded_path.choose("auto", cpu, 4096, 4096, 63, torch.float64) == "dense"
    for half in (torch.float16, torch.bfloat16):  # measured with float32's boundary
        assert banded_path.choose("auto", cpu, 255, 255, 1023, half) == "dense"
        assert banded_path.choose("auto", cpu, 256, 256, 64, half) == expect
    monkeypatch.setenv(banded_path.ENV_VAR, "auto")  # said explicitly: the same as unset
    assert banded_path.choose("auto", cpu, 256, 256, 1024) == expect
    monkeypatch.setenv(banded_path.ENV_VAR, "banded")
    assert banded_path.choose("auto", cpu, 8, 8, 2) == "banded"
    monkeypatch.setenv(banded_path.ENV_VAR, "dense")
    assert banded_path.choose("auto", cpu, 4096, 4096, 4096) == "dense"
    monkeypatch.setenv(banded_path.ENV_VAR, "sparse")
    with pytest.raises(ValueError, match="DRES_SPLINE_PATH"):
        banded_path.choose("auto", cpu, 64, 64, 64)


def test_step_uses_the_banded_maps(monkeypatch):
    """With the banded path forced, the step's ops receive BandedSpline maps (and dense ones otherwise)."""
    seen = []
    for name in ("spline_mix", "reconstruction_loss"):
        real = getattr(banded_path, name)
        monkeypatch.setattr(banded_path, name, lambda spline, *args, _real=real, _name=name, **kwargs: (
            seen.append((_name, type(spline).__name__)), _real(spline, *args, **kwargs))[1])
    monkeypatch.setenv(banded_path.ENV_VAR, "banded")
    dres_fast.dres_loss(torch.nn.Linear(8, 8), torch.randn(12, 8))
    assert seen == [("spline_mix", "BandedSpline"), ("reconstruction_loss", "Tensor")]  # y first, the map third
    seen.clear()
    monkeypatch.setenv(banded_path.ENV_VAR, "dense")
    dres_fast.dres_loss(torch.nn.Linear(8, 8), torch.randn(12, 8))
    assert seen == []
    if banded_cpu.available():  # auto asks with the data's dtype: float64 goes banded from K = 128, d = 128
        monkeypatch.setenv(banded_path.ENV_VAR, "auto")
        dres_fast.dres_loss(torch.nn.Linear(128, 128), torch.randn(128, 128), num_coded=128)
        assert seen == []
        dres_fast.dres_loss(torch.nn.Linear(128, 128).double(), torch.randn(128, 128, dtype=torch.float64),
                            num_coded=128)
        assert seen == [("spline_mix", "BandedSpline"), ("reconstruction_loss", "Tensor")]


def test_setup_is_linear_in_k():
    """K = N = 65536 with a dof target (the lam search included): no (N, K) matrix, well under 2 s here."""
    start = time.perf_counter()
    enc, dec = banded_coding(SmoothingSpec(dof_enc=1000.5, dof_dec=3000.5), 65536)
    assert time.perf_counter() - start < 2.0
    assert sum(t.numel() for t in enc.arrays) < 20 * 65536


def test_bad_device_is_named():
    spline = BandedSpline(_knots(5, "chebyshev"), _knots(4, "lobatto"), 0.1)
    with pytest.raises(ValueError, match="weights"):
        ops.spline_mix(spline, torch.randn(5, 2, device="meta"))
    with pytest.raises(ValueError, match="columns"):
        ops.spline_mix(spline, torch.randn(6, 2))


def test_masked_submodule_same_on_both_paths(monkeypatch):
    """Padding masks take the masked loss (a spline_mix and plain torch): the same on both paths (float64,
    as the test above: the wiring, to rounding)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                                                  batch_first=True)).double()
    layer = model[0]
    x = torch.randn(9, 6, 16, dtype=torch.float64)
    pad = torch.zeros(9, 6, dtype=torch.bool)
    pad[::2, 4:] = True
    losses = {}
    for path in ("dense", "banded"):
        monkeypatch.setenv(banded_path.ENV_VAR, path)
        reg = dres_fast.SubmoduleDReS(model, "0", num_coded=8)
        with reg:
            layer(x, src_key_padding_mask=pad)
        losses[path] = reg.loss.detach()
    assert losses["dense"] > 0 and torch.allclose(losses["dense"], losses["banded"], rtol=1e-10, atol=0)


@needs_cpu_kernel
@pytest.mark.parametrize("lam", [1e-12, 1e-6, 1.0, 1e6])
def test_compiled_trace_is_the_python_loop(lam, monkeypatch):
    """The lam search's trace runs compiled from 2048 knots: the same recurrence in the same order."""
    from dres_fast import _banded

    system = _banded.PenalizedSystem(_knots(3000, "chebyshev"), lam)
    compiled = system.smoother_trace()
    monkeypatch.setattr(_banded, "_COMPILED_TRACE_MIN_KNOTS", 10**9)
    assert system.smoother_trace() == compiled


INTERPRETER_SLOW = pytest.mark.slow  # 15-35 s a case in Triton's interpreter


@pytest.mark.parametrize("lam,dtype", [(1e-4, torch.float32), pytest.param(1e-4, torch.float64, marks=INTERPRETER_SLOW),
                                       pytest.param(1e-4, torch.float16, marks=INTERPRETER_SLOW),
                                       (1e6, torch.float64), (1e6, torch.float32),
                                       pytest.param(1e6, torch.float16, marks=INTERPRETER_SLOW)])
@pytest.mark.parametrize("backend", ref.backend_params("triton", "cuda"))
def test_kernel_backends_through_the_ops(backend, lam, dtype):
    """Both ops on banded maps through each kernel backend, forward and backward (non-unit incoming
    gradients, every reduction), against the torch backend's banded path; a refined configuration (lam = 1e6
    at 80 knots) runs each kernel's refinement step (about 35 s a case in Triton's interpreter)."""
    device = ref.backend_device(backend)
    encoder = BandedSpline(_knots(80, "chebyshev"), _knots(29, "lobatto"), lam, device)
    decoder = BandedSpline(_knots(29, "lobatto"), _knots(80, "chebyshev"), lam, device)
    assert encoder.refine == (lam > 1)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(80, 37, generator=gen, dtype=torch.float64), torch.randn(80, 37, generator=gen, dtype=torch.float64)
    y_coded, grad_mix = torch.randn(29, 37, generator=gen, dtype=torch.float64), torch.randn(29, 37, generator=gen, dtype=torch.float64)
    tol = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3}[dtype]
    for reduction in ("mean", "sum", "none"):
        results = []
        for name in (backend, "torch"):
            on = "cpu" if name == "torch" else device
            maps = (encoder, decoder) if on == device else tuple(BandedSpline(*a, lam) for a in (
                (_knots(80, "chebyshev"), _knots(29, "lobatto")), (_knots(29, "lobatto"), _knots(80, "chebyshev"))))
            leaves = [t.to(on, dtype).requires_grad_() for t in (x, y, y_coded)]
            mixed = ops.spline_mix(maps[0], leaves[0], backend=name)
            loss = ops.reconstruction_loss(leaves[1], leaves[2], maps[1], reduction, backend=name)
            weight = torch.linspace(0.3, 1.7, loss.numel(), dtype=loss.dtype, device=on).reshape(loss.shape)
            torch.autograd.backward([mixed, loss], [grad_mix.to(on, dtype), weight])
            results.append([t.detach().cpu() for t in [mixed, loss] + [leaf.grad for leaf in leaves]])
        for what, got, want in zip(["mix", "loss", "grad x", "grad y", "grad y_coded"], *results):
            assert _rel(got, want) < tol, (reduction, what)


def test_banded_step_never_builds_the_dense_matrices(monkeypatch):
    """A step on the banded path fetches no (N, K) matrix: its set-up stays O(K + N)."""
    monkeypatch.setenv(banded_path.ENV_VAR, "banded")
    built = []
    monkeypatch.setattr(default_cache, "weights", lambda *a, **k: built.append(a) or (_ for _ in ()).throw(AssertionError))
    loss = dres_fast.dres_loss(torch.nn.Linear(16, 8), torch.randn(20, 16))
    loss.backward()
    assert built == [] and loss.item() > 0


def test_the_c_source_ships_in_the_wheel():
    """An installed (non-editable) package needs banded_cpu.c to build the kernel: setup.py's package_data
    names it (checked by reading setup.py's literal; `pip wheel .` lists dres_fast/backends/banded_cpu.c)."""
    import ast
    import pathlib

    setup = pathlib.Path(__file__).resolve().parents[1] / "setup.py"
    call = next(node for node in ast.walk(ast.parse(setup.read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    assert "*.c" in package_data["dres_fast.backends"]
    assert pathlib.Path(banded_cpu._SOURCE).is_file()


def test_without_a_compiler_the_torch_ops_apply_the_maps(monkeypatch, tmp_path):
    """No C compiler: the kernel says why it is missing, auto keeps the dense path, and a forced banded path
    runs on the spline's own torch ops with the same results."""
    import shutil

    monkeypatch.setenv("DRES_FAST_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    monkeypatch.setattr(banded_cpu, "_LIBRARY", None)
    assert not banded_cpu.available() and "not available" in banded_cpu._LIBRARY
    cpu = torch.device("cpu")
    monkeypatch.delenv(banded_path.ENV_VAR, raising=False)
    assert banded_path.choose("auto", cpu, 4096, 4096, 4096) == "dense"
    assert banded_path.kernel_for("auto", cpu, torch.float32) is None
    spec = SmoothingSpec(num_coded=37)
    dense_enc, _ = default_cache.weights(spec, 41, "cpu", torch.float64)
    enc, _ = default_cache.banded(spec, 41, "cpu")
    x = torch.randn(41, 9, dtype=torch.float64)
    assert _rel(ops.spline_mix(enc, x), dense_enc @ x) < 1e-12
