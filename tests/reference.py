r"""What every op test shares: the float64 references, the input generators, the error measures, and
the one place that names the backends (which ones run here, on which device, and their modules). Also
what the other tests compare the library with: points and smoothing-spline weights computed without
the library (the spec's formulas and scipy), and the study intervals recomputed from per-seed values.

The two ops, for ``x`` viewed as ``(K, d)`` (trailing dimensions flattened):

* ``spline_mix``: :math:`\mathrm{out} = W x`, :math:`W \in \mathbb{R}^{M \times K}`.
* ``reconstruction_loss``: :math:`r = y - D y_c`, :math:`\ell_k = \sum_j r_{kj}^2`, loss
  :math:`\sum_k \ell_k / (K d)` ("mean"), :math:`\sum_k \ell_k` ("sum") or :math:`\ell` ("none").
  For a unit incoming gradient :math:`\nabla_y = c\, r` and :math:`\nabla_{y_c} = -D^\top \nabla_y`,
  with :math:`c = 2/(K d)` for "mean" and :math:`2` otherwise.

The references compute these in float64 from the same (already rounded) inputs the backend sees, so
the measured error is the backend's own. Accuracy rule (docs/ARCHITECTURE.md): an fp32 result may be
at most twice as far from float64 as the torch fp32 backend's result (IEEE fp32, no TF32).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import pathlib

import numpy as np
import pytest
import torch

import dres_fast  # noqa: F401  (a broken package must fail every test that imports this module, never skip it)
# fp16/bf16 outputs: bounds derived from torch.finfo (u = eps/2, subnormal spacing), see tests/half_bounds.py
from half_bounds import (assert_half_elementwise, assert_half_normwise, half_bound, half_norm_bound,  # noqa: F401
                         half_units, mix_magnitude, reconstruction_magnitudes)

BACKENDS = ("torch", "triton", "cuda")
HAS_GPU = torch.cuda.is_available()
REDUCTIONS = ("mean", "sum", "none")

# A few fp32 ulps: only matters for results made of a handful of numbers (a scalar loss from d = 1),
# where torch may land within a fraction of an ulp by luck; real errors are orders of magnitude larger.
FP32_FLOOR = 8 * 2.0 ** -24
# relative error of the ops through dres_fast.ops against float64 on small real spline weights
OPS_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


# --------------------------------------------------------------------------------------------------
# Backends: the one place the tests name them (a backend moving inside the package changes only this)
# --------------------------------------------------------------------------------------------------


TORCH_MODULE = "dres_fast.backends.reference"
TRITON_MODULE = "dres_fast.kernels"  # kernels/, shipped under this name (setup.py package_dir)
CUDA_LOADER_MODULE = "dres_fast.backends.cuda"  # finds, builds (first use) and loads csrc/ as the C++ ops
BUILD_SUPPORT_FILE = pathlib.Path(__file__).resolve().parents[1] / "dres_fast" / "_build_support.py"  # setup.py's


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_skip_reason(name: str):
    """``None`` when ``name`` must run here (and so must pass); else why it cannot run on this machine.

    Only a missing GPU, a missing optional package or an explicit opt-out skip: a backend that should
    run but is broken fails its tests instead."""
    if name == "torch":
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install -e '.[triton]')"
        if not HAS_GPU and not _interpreting():
            return "no CUDA GPU and TRITON_INTERPRET=0: the Triton kernels cannot run on CPU tensors"
        return None
    if name == "cuda":
        return None if HAS_GPU else "backend 'cuda' needs a CUDA GPU (its CPU checks are in test_cuda_backend.py)"
    raise ValueError(f"unknown backend {name!r}")


def backend_params(*names: str):
    """``names`` (default: every backend) as pytest parameters, each skipped with its reason here."""
    params = []
    for name in names or BACKENDS:
        reason = backend_skip_reason(name)
        marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
        if name == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


#: the op tests' parameter sets: every backend, and the fused ones (judged against the torch backend)
ALL = backend_params()
KERNELS = backend_params("triton", "cuda")


def backend_device(name: str) -> str:
    """Where a backend's tests put their tensors: Triton runs on CPU only through the interpreter."""
    if name == "cuda" or (name == "triton" and HAS_GPU and not _interpreting()):
        return "cuda"
    return "cpu"


def backend_module(name: str):
    """The backend's raw functions ``spline_mix(weights, x)`` and
    ``reconstruction_loss(y, y_coded, decoder, reduction, compute_grads) -> (loss, grad_y, grad_y_coded)``
    on 2-D inputs, below dispatch and autograd."""
    if name == "torch":
        return importlib.import_module(TORCH_MODULE)
    if name == "triton":
        return importlib.import_module(TRITON_MODULE)
    if name == "cuda":
        loader = cuda_loader()
        loader.load(verbose=True)  # a build failure on a GPU machine fails, not skips
        return loader  # its spline_mix / reconstruction_loss check the arguments, then call the C++ ops
    raise ValueError(f"unknown backend {name!r}")


def cuda_loader():
    """The module that builds and loads the CUDA backend (imports nothing heavy; builds only in ``load()``)."""
    return importlib.import_module(CUDA_LOADER_MODULE)


def registered_op(backend: str, op: str):
    """The ``torch.library`` op that ``dres_fast.ops`` dispatches ``op`` to on ``backend``."""
    from dres_fast.ops.dispatch import registered_ops

    packets = registered_ops(backend, torch.device(backend_device(backend)))
    return packets[("spline_mix", "reconstruction_loss").index(op)].default


def skip_if_interpreter_lacks(name: str, dtype: torch.dtype) -> None:
    """Triton's interpreter runs on numpy, which has no bfloat16."""
    if name == "triton" and backend_device(name) == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter (numpy) has no bfloat16")


def gpu_case(*values):
    """A parameter set too large for the Triton interpreter: it runs, for every backend, on a GPU."""
    marks = [pytest.mark.skipif(not HAS_GPU, reason="GPU-sized shape: too slow for the Triton interpreter"),
             pytest.mark.gpu]
    return pytest.param(*values, marks=marks)


def size_classes(sizes=(3, 17, 256, 1024), widths=(1, 7, 131, 65537)):
    """Every (rows, cols, d) of the size classes as GPU cases; d is cut to 65537 or 4099 where the
    float64 reference would cost more than 2^28 multiply-adds."""
    def affordable(rows, cols, d):
        return d if rows * cols * d <= 2 ** 28 else (65537 if rows * cols <= 2 ** 12 else 4099)

    shapes = dict.fromkeys((r, c, affordable(r, c, d)) for r in sizes for c in sizes for d in widths)
    return [gpu_case(*shape) for shape in shapes]


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def spline_weights(rows: int, cols: int, dtype=torch.float64) -> torch.Tensor:
    """Real DReS weights, ``W(chebyshev(cols) -> lobatto(rows), 1e-4)``: shape ``(rows, cols)``, from the
    independent float64 references below (scipy), not from the library."""
    return _spline_weights_cached(rows, cols).to(dtype, copy=True)


@functools.lru_cache(maxsize=None)
def _spline_weights_cached(rows: int, cols: int) -> torch.Tensor:
    return torch.from_numpy(spline_weights64(points64(cols, "chebyshev"), points64(rows, "lobatto"), 1e-4))


def randn(shape, dtype, device="cpu", noncontiguous=False, seed=0) -> torch.Tensor:
    """Standard normal values drawn in float64, then rounded to ``dtype``. ``noncontiguous`` (2-D only):
    a transposed view with a stride-2 slice, so neither dimension has unit stride."""
    g = torch.Generator().manual_seed(seed)
    if noncontiguous:
        rows, cols = shape
        t = torch.randn(2 * cols, rows, generator=g, dtype=torch.float64).t()[:, ::2]
        assert t.stride(0) == 1 and t.stride(1) == 2 * rows  # (a 1-column view still counts as contiguous)
    else:
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return t.to(device=device, dtype=dtype)


def mixing_matrix(rows: int, cols: int, seed=1, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """A dense ``(rows, cols)`` matrix with mixed signs whose rows sum to one, like spline weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    w = w - w.mean(dim=1, keepdim=True) + 1.0 / cols
    return w.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


# Points and smoothing-spline weights, independent of dres_fast: the formulas of the spec (README,
# dres_fast/splines.py) in numpy and the smoothing spline of scipy, which uses the same convention
# (min sum_k (y_k - g(t_k))^2 + lam * int g''(t)^2 dt over natural cubic splines g). A library bug in
# its points, its weights or its lambda search cannot cancel out of a comparison with these.


def points64(n: int, kind: str = "chebyshev") -> np.ndarray:
    """``n`` ascending float64 points in [-1, 1] from the spec's formulas: chebyshev
    ``cos((2k-1) pi / (2n))``, k = 1..n; lobatto ``cos(k pi / (n-1))``, k = 0..n-1; uniform
    ``linspace(-1, 1, n)``."""
    if kind == "chebyshev":
        return np.cos((2 * np.arange(1, n + 1) - 1) * np.pi / (2 * n))[::-1].copy()
    if kind == "lobatto":
        return np.cos(np.arange(n) * np.pi / (n - 1))[::-1].copy()
    if kind == "uniform":
        return np.linspace(-1.0, 1.0, n)
    raise ValueError(f"unknown point kind {kind!r}")


def _natural_interpolant_at(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``(len(s), len(t))``: the natural cubic interpolant of unit data at ``s`` (linear beyond the ends)."""
    from scipy.interpolate import CubicSpline

    return _evaluate(CubicSpline(t, np.eye(len(t)), bc_type="natural"), t, s)


def _evaluate(spline, t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """A natural spline (a scipy piecewise polynomial with ``len(t)`` columns) at ``s``: inside the
    knots the spline itself; beyond the end knots the straight line it continues as (``g'' = 0``
    there), i.e. the end value plus the end slope times the distance (scipy would extend the cubic)."""
    s = np.asarray(s, dtype=np.float64)
    out = spline(np.clip(s, t[0], t[-1]))
    slope = spline.derivative()
    for end, outside in ((t[0], s < t[0]), (t[-1], s > t[-1])):
        if outside.any():
            out[outside] = spline(end)[None, :] + (s[outside] - end)[:, None] * slope(end)[None, :]
    return out


def _penalised_interpolant_weights(t: np.ndarray, s: np.ndarray, lam: float) -> np.ndarray:
    """The smoothing spline for fewer than 5 knots (scipy's ``make_smoothing_spline`` needs 5): the
    minimiser is the natural cubic interpolant of its own fitted values ``v``, whose roughness
    ``int g''^2`` is the quadratic form ``v^T S^T G S v`` (``S v``: g'' at the knots, g'' linear in
    between, so ``G`` holds ``h/3`` and ``h/6``); hence ``v = (I + lam S^T G S)^{-1} y``."""
    from scipy.interpolate import CubicSpline

    n = len(t)
    h = np.diff(t)
    second = CubicSpline(t, np.eye(n), bc_type="natural").derivative(2)(t)  # (n, n): g''(t_i) per unit datum
    gram = np.zeros((n, n))
    for i in range(n - 1):
        gram[i:i + 2, i:i + 2] += h[i] / 6 * np.array([[2.0, 1.0], [1.0, 2.0]])
    smoother = np.linalg.solve(np.eye(n) + lam * second.T @ gram @ second, np.eye(n))
    return _natural_interpolant_at(t, s) @ smoother


def spline_weights64(src, dst, lam: float) -> np.ndarray:
    """``(len(dst), len(src))`` float64: column ``j`` is the smoothing spline of the unit vector
    ``e_j`` on knots ``src`` (ascending) evaluated at ``dst``. ``lam = 0``: the natural cubic
    interpolant (``CubicSpline(bc_type="natural")``); ``lam = inf``: the least-squares line; otherwise
    ``make_smoothing_spline(src, e_j, lam=lam)`` (for every ``j`` at once). Beyond the end knots the
    natural spline continues as a straight line. scipy agrees with exact arithmetic to ~1e-10 for
    moderate ``lam`` and up to 64 knots, the sizes used here."""
    from scipy.interpolate import make_smoothing_spline

    t = np.asarray(src, dtype=np.float64)
    s = np.asarray(dst, dtype=np.float64)
    n = len(t)
    if math.isinf(lam):
        line = np.stack([np.ones(n), t], axis=1)
        return np.stack([np.ones(len(s)), s], axis=1) @ np.linalg.pinv(line)
    if lam == 0.0:
        return _natural_interpolant_at(t, s)
    if n < 5:
        return _penalised_interpolant_weights(t, s, lam)
    return _evaluate(make_smoothing_spline(t, np.eye(n), lam=lam), t, s)


def degrees_of_freedom64(src, lam: float) -> float:
    """Effective degrees of freedom: the trace of the smoother ``W(src -> src, lam)``."""
    return float(np.trace(spline_weights64(src, src, lam)))


def lam_for_dof64(src, dof: float) -> float:
    """The ``lam`` whose smoother on ``src`` has trace ``dof`` (Brent on log-lambda; ``len(src)``
    gives 0, 2 gives inf)."""
    return _lam_for_dof64(tuple(float(v) for v in np.asarray(src, dtype=np.float64)), float(dof))


@functools.lru_cache(maxsize=None)
def _lam_for_dof64(src: tuple, dof: float) -> float:
    from scipy.optimize import brentq

    t = np.asarray(src)
    if dof >= len(t):
        return 0.0
    if dof <= 2.0:
        return math.inf

    def excess(log_lam):  # decreasing in lam
        return degrees_of_freedom64(t, math.exp(log_lam)) - dof

    lo = hi = 3 * math.log(float(np.mean(np.diff(t))))  # lam scales like (knot spacing)^3
    while excess(lo) < 0:
        lo -= 2.0
    while excess(hi) > 0:
        hi += 2.0
    return math.exp(brentq(excess, lo, hi, xtol=1e-13, rtol=1e-13, maxiter=500))


def dres_weights64(num_samples: int, num_coded=None, *, lam_enc=None, lam_dec=None, dof_enc=None, dof_dec=None,
                   alpha="chebyshev", beta="lobatto"):
    """float64 ``(E, D)`` of ``dres_loss`` from the references above: ``E = W(alpha -> beta, lam_enc)``
    (``(N, K)``), ``D = W(beta -> alpha, lam_dec)`` (``(K, N)``); a smoothing given as ``dof_*``, or
    neither (the documented default, ``0.75 * knots`` degrees of freedom), is turned into ``lam`` by
    :func:`lam_for_dof64`. ``alpha``/``beta``: a point kind or explicit ascending points."""
    num_coded = num_samples if num_coded is None else num_coded
    a = points64(num_samples, alpha) if isinstance(alpha, str) else np.asarray(alpha, dtype=np.float64)
    b = points64(num_coded, beta) if isinstance(beta, str) else np.asarray(beta, dtype=np.float64)

    def lam_of(lam, dof, knots):
        if lam is not None:
            return float(lam)
        return lam_for_dof64(knots, 0.75 * len(knots) if dof is None else dof)

    encoder = spline_weights64(a, b, lam_of(lam_enc, dof_enc, a))
    decoder = spline_weights64(b, a, lam_of(lam_dec, dof_dec, b))
    return torch.from_numpy(encoder), torch.from_numpy(decoder)



def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def mix64(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weights @ x`` in float64, ``x`` flattened to ``(K, d)``; returns ``(M, d)``."""
    return weights.double() @ _rows(x).double()


def reconstruction64(y, y_coded, decoder, reduction):
    """float64 ``(loss, grad_y, grad_y_coded)`` for a unit incoming gradient, inputs flattened to rows;
    ``grad_y_coded`` is ``None`` for "none" (the backends' fused pass does not form it)."""
    r = _rows(y).double() - decoder.double() @ _rows(y_coded).double()
    per_sample = (r * r).sum(dim=1)
    loss = {"mean": per_sample.sum() / r.numel(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    c = 2.0 / r.numel() if reduction == "mean" else 2.0
    grad_y = c * r
    grad_y_coded = None if reduction == "none" else -decoder.double().t() @ grad_y
    return loss, grad_y, grad_y_coded


def _ieee_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return a @ b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def torch_fp32_mix(weights, x):
    """What the torch fp32 backend computes for ``spline_mix`` (IEEE fp32), computed here."""
    return _ieee_matmul(weights.float(), _rows(x).float())


def torch_fp32_reconstruction(y, y_coded, decoder, reduction):
    """What the torch fp32 backend computes for ``reconstruction_loss`` (IEEE fp32), computed here."""
    r = _rows(y).float() - _ieee_matmul(decoder.float(), _rows(y_coded).float())
    per_sample = (r * r).sum(dim=1)
    loss = {"mean": per_sample.sum() / r.numel(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    c = 2.0 / r.numel() if reduction == "mean" else 2.0
    return loss, c * r, -_ieee_matmul(decoder.float().t(), c * r)


# --------------------------------------------------------------------------------------------------
# Error measures
# --------------------------------------------------------------------------------------------------


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64."""
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_fp32_accuracy(got, torch_fp32, ref, what, floor=FP32_FLOOR):
    """fp32 rule: error against float64 at most twice the torch fp32 backend's (plus ``floor``)."""
    ours, theirs = rel_err(got, ref), rel_err(torch_fp32, ref)
    assert ours <= 2 * theirs + floor, f"{what}: rel err {ours:.3e} > 2 x torch fp32 {theirs:.3e}"


# --------------------------------------------------------------------------------------------------
# Study statistics (bench/generalization): the intervals recomputed from the per-seed values
# --------------------------------------------------------------------------------------------------


def assert_mean_ci95(stats: dict, values, what: str, atol: float = 1e-12) -> float:
    """``stats`` (``{"mean", "ci95": [lo, hi], "std", "n"}`` of a study) against the per-seed ``values``
    it summarises: the mean, and the two-sided 95% Student-t interval
    ``mean -+ t.ppf(0.975, n - 1) * sd / sqrt(n)`` (``sd`` with ``n - 1``), which must contain the mean.
    ``atol``: for values stored rounded (generalization.json keeps 6 significant digits). Returns the
    half-width, so a caller can check that some interval is not trivially empty."""
    from scipy import stats as scipy_stats

    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    assert n >= 2, f"{what}: an interval needs at least 2 seeds, got {n}"
    mean = float(v.mean())
    sd = float(v.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    lo, hi = stats["ci95"]
    assert stats["mean"] == pytest.approx(mean, rel=1e-9, abs=atol), f"{what}: mean {stats['mean']} != {mean}"
    assert (lo, hi) == (pytest.approx(mean - half, rel=1e-9, abs=atol), pytest.approx(mean + half, rel=1e-9, abs=atol)), (
        f"{what}: ci95 [{lo}, {hi}] != mean -+ t sd / sqrt(n) = [{mean - half}, {mean + half}]")
    assert lo <= stats["mean"] <= hi, f"{what}: the mean {stats['mean']} is outside [{lo}, {hi}]"
    if "n" in stats:
        assert stats["n"] == n, f"{what}: n {stats['n']} != {n} seeds"
    if "std" in stats:
        assert stats["std"] == pytest.approx(sd, rel=1e-9, abs=atol), f"{what}: std {stats['std']} != {sd}"
    return half
