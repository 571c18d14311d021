r"""Natural cubic smoothing splines as linear maps between point sets.

Given knots :math:`t_1 < \dots < t_n` and values :math:`y`, the natural cubic smoothing spline is

.. math::

    g_\lambda = \arg\min_g \sum_{k=1}^n (y_k - g(t_k))^2 + \lambda \int g''(t)^2\,dt ,

exactly the convention of :func:`scipy.interpolate.make_smoothing_spline` with unit weights.
:math:`g` is a cubic between knots, linear beyond the end knots (``g'' = 0`` there), and
:math:`\lambda = 0` interpolates; :math:`\lambda = \infty` gives the least-squares line.

Reinsch form (Green & Silverman, *Nonparametric Regression and Generalized Linear Models*, 2.3).
With :math:`h_i = t_{i+1} - t_i`, let :math:`Q` be the :math:`n \times (n-2)` second-difference
matrix (column :math:`j` holds :math:`1/h_j,\ -1/h_j - 1/h_{j+1},\ 1/h_{j+1}` in rows
:math:`j, j+1, j+2`) and :math:`R` the :math:`(n-2)\times(n-2)` tridiagonal matrix with
:math:`R_{jj} = (h_j + h_{j+1})/3`, :math:`R_{j,j+1} = h_{j+1}/6`. The fitted values
:math:`g = g(t)` and the interior second derivatives :math:`\gamma = g''(t_{2..n-1})` solve

.. math::

    (R + \lambda Q^T Q)\,\gamma = Q^T y, \qquad g = y - \lambda Q \gamma ,

a symmetric positive definite *pentadiagonal* system, solved by banded Cholesky in float64 with one
step of iterative refinement where it matters (large :math:`\lambda`; :mod:`dres_fast._banded`). At any
point :math:`s \in [t_i, t_{i+1}]` the spline is

.. math::

    g(s) = \frac{(t_{i+1}-s) g_i + (s-t_i) g_{i+1}}{h_i}
           - \frac{(s-t_i)(t_{i+1}-s)}{6}\Big[\big(1+\tfrac{s-t_i}{h_i}\big)\gamma_{i+1}
           + \big(1+\tfrac{t_{i+1}-s}{h_i}\big)\gamma_i\Big],

with :math:`\gamma_1 = \gamma_n = 0`, and beyond the ends it continues along the end tangents.
Everything is linear in :math:`y`, so evaluating at points :math:`s_1..s_m` is a matrix
:math:`W \in \mathbb{R}^{m \times n}`: :func:`spline_weights`. Substituting :math:`g = y - \lambda Q\gamma`,

.. math::

    W = P + V\,(R + \lambda Q^T Q)^{-1} Q^T ,

with :math:`P` (two entries per row: the chord) and :math:`V` (four per row: the curvature terms and
:math:`-\lambda` times the chord's rows of :math:`Q`) sparse: one banded solve with :math:`n`
right-hand sides and one sparse-dense product, :math:`O(n(n + m))` time and :math:`O(nm)` memory.

The *effective degrees of freedom* of a fit is the trace of its smoother matrix
:math:`S_\lambda = W(t \to t, \lambda)`: :math:`n` at :math:`\lambda = 0`, falling monotonically
to 2 (a line) as :math:`\lambda \to \infty`. It costs :math:`O(n)` (the band of a banded inverse), so
searching :math:`\lambda` for a given trace is cheap. Unlike :math:`\lambda`, it does not depend on the number
or spacing of knots, which makes it the portable way to choose smoothing: :func:`lam_for_dof`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence, Union

import numpy as np
import torch

from ._banded import PenalizedSystem
from .smoothing import DEFAULT_DOF_FRACTION, POINT_KINDS, SmoothingSpec, check_dof, check_lam

# scipy is imported inside the functions that use it, so that importing the package stays cheap.

__all__ = ["points", "spline_weights", "degrees_of_freedom", "lam_for_dof", "float64_weights", "POINT_KINDS"]

PointsLike = Union[str, torch.Tensor, np.ndarray, Sequence[float]]


def points(n: int, kind: str = "chebyshev") -> torch.Tensor:
    r"""``n`` ascending points in ``[-1, 1]`` (float64).

    * ``"chebyshev"``: Chebyshev nodes of the first kind, :math:`\cos((2k-1)\pi/(2n))`, k = 1..n
      (all strictly inside the interval);
    * ``"lobatto"``: Chebyshev-Lobatto nodes, :math:`\cos(k\pi/(n-1))`, k = 0..n-1 (both ends included);
    * ``"uniform"``: ``linspace(-1, 1, n)``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"points: n must be an int, got {type(n).__name__}")
    if n < 2:
        raise ValueError(f"points: n must be at least 2, got {n}")
    return torch.from_numpy(_points_np(int(n), kind).copy())


@functools.lru_cache(maxsize=256)
def _points_np(n: int, kind: str) -> np.ndarray:
    if kind == "chebyshev":
        k = np.arange(1, n + 1)
        out = np.cos((2 * k - 1) * np.pi / (2 * n))
    elif kind == "lobatto":
        k = np.arange(n)
        out = np.cos(k * np.pi / (n - 1))
    elif kind == "uniform":
        out = np.linspace(-1.0, 1.0, n)
    else:
        raise ValueError(f"points: kind must be one of {POINT_KINDS}, got {kind!r}")
    out = np.sort(out)
    out.setflags(write=False)
    return out


def as_knots(value: PointsLike, n: int, name: str) -> np.ndarray:
    """Resolve a point specification (a kind name or explicit values) to ``n`` float64 knots,
    checking that they are finite and strictly ascending. ``name`` is the argument's name for errors."""
    if isinstance(value, str):
        if value not in POINT_KINDS:
            raise ValueError(f"{name} must be one of {POINT_KINDS} or a 1-D tensor, got {value!r}")
        return _points_np(n, value)
    if isinstance(value, torch.Tensor):
        arr = value.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a point kind or a 1-D sequence of numbers, got {type(value).__name__}") from err
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} must have {n} points (one per sample), got {arr.shape[0]}")
    _check_knots(arr, name)
    return arr


def _check_knots(arr: np.ndarray, name: str) -> None:
    if arr.shape[0] < 3:
        raise ValueError(f"{name} needs at least 3 points for a cubic smoothing spline, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if not np.all(np.diff(arr) > 0):
        raise ValueError(f"{name} must be strictly ascending")


def _to_numpy_1d(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        arr = value.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    return arr


# ---------------------------------------------------------------------------------------------
# Weights: W = P + V Gamma


def _evaluation_coefficients(t: np.ndarray, s: np.ndarray):
    """For each point s: its knot interval ``idx`` (clipped to the end intervals), the weights
    (p0, p1) of g(t_idx), g(t_idx+1) and (c0, c1) of g''(t_idx), g''(t_idx+1) in g(s)."""
    n = t.shape[0]
    h = np.diff(t)
    idx = np.clip(np.searchsorted(t, s, side="right") - 1, 0, n - 2)
    hi = h[idx]
    left = s - t[idx]
    right = t[idx + 1] - s
    # the chord: also the linear part of the continuation beyond the ends
    p0, p1 = right / hi, left / hi
    c0 = -left * right / 6.0 * (1.0 + right / hi)
    c1 = -left * right / 6.0 * (1.0 + left / hi)
    # beyond the ends, along the end tangents: g'(t_1) = (g_2-g_1)/h_1 - h_1 g''_2/6, mirrored at t_n
    below, above = s < t[0], s > t[-1]
    c0[below], c1[below] = 0.0, -left[below] * hi[below] / 6.0
    c0[above], c1[above] = -right[above] * hi[above] / 6.0, 0.0
    return idx, p0, p1, c0, c1


def _curvature_entries(system, lam: float, idx, p0, p1, c0, c1):
    """The rows of V: ``(data, cols)``, each ``(len(s), 4)``, with g(s) = p0 y_idx + p1 y_idx+1 +
    sum_k data[:, k] gamma[cols[:, k]]: the curvature terms plus -lam (p0 Q[idx] + p1 Q[idx+1]) from
    g = y - lam Q gamma. Row r has interior columns idx-2 .. idx+1 (gamma_j is g'' at knot j+1);
    columns outside 0..n-3 (the end knots, where g'' = 0) carry zero and are clipped into range."""
    m = system.n - 2

    def padded(diag):  # diag[j] at position j + 2, zero outside 0 <= j < m
        out = np.zeros(m + 4)
        out[2 : m + 2] = diag
        return out

    a, b, c = padded(system.a), padded(system.b), padded(system.c)
    j = idx + 2
    data = np.stack(
        [
            -lam * p0 * c[j - 2],
            c0 - lam * (p0 * b[j - 1] + p1 * c[j - 1]),
            c1 - lam * (p0 * a[j] + p1 * b[j]),
            -lam * p1 * a[j + 1],
        ],
        axis=1,
    )
    cols = idx[:, None] + np.arange(-2, 2)
    outside = (cols < 0) | (cols >= m)
    data[outside] = 0.0  # curvature at the end knots is zero; Q has no such columns
    return data, np.clip(cols, 0, m - 1)


def _curvature_rows(system, lam: float, idx, p0, p1, c0, c1):
    """V (len(s), n-2) as CSR (:func:`_curvature_entries`)."""
    import scipy.sparse

    data, cols = _curvature_entries(system, lam, idx, p0, p1, c0, c1)
    indptr = np.arange(0, 4 * len(idx) + 1, 4)
    return scipy.sparse.csr_matrix((data.ravel(), cols.ravel(), indptr), shape=(len(idx), system.n - 2))


def _line_weights(t: np.ndarray, idx, p0, p1) -> np.ndarray:
    """lam = inf: the least-squares line (orthogonal projection, via a stable QR) at the points."""
    basis, _ = np.linalg.qr(np.stack([np.ones_like(t), t - t.mean()], axis=1))
    return (p0[:, None] * basis[idx] + p1[:, None] * basis[idx + 1]) @ basis.T


def _weights_np(t: np.ndarray, s: np.ndarray, lam: float) -> np.ndarray:
    """W (len(s), len(t)) = P + V Gamma, Gamma = (R + lam Q^T Q)^{-1} Q^T: one banded solve with
    len(t) right-hand sides and one sparse-dense product; memory O(len(s) len(t))."""
    idx, p0, p1, c0, c1 = _evaluation_coefficients(t, s)
    if math.isinf(lam):
        return _line_weights(t, idx, p0, p1)
    system = PenalizedSystem(t, lam)
    gamma = system.second_derivatives()
    weights = _curvature_rows(system, lam, idx, p0, p1, c0, c1) @ gamma
    del gamma
    rows = np.arange(len(s))
    weights[rows, idx] += p0
    weights[rows, idx + 1] += p1
    return weights


def spline_weights(src, dst, lam: float = 0.0) -> torch.Tensor:
    r"""The ``(len(dst), len(src))`` float64 matrix ``W`` with ``W @ y = g(dst)``, where ``g`` is the
    natural cubic smoothing spline through ``(src, y)`` with smoothing ``lam`` (module docstring).

    ``src`` must be finite and strictly ascending with at least 3 points; ``dst`` any finite points
    (outside ``[src[0], src[-1]]`` the spline continues linearly). ``lam = 0`` interpolates,
    ``lam = math.inf`` fits the least-squares line. Properties: ``W @ 1 = 1``, ``W @ src = dst``.
    Cost O(len(src) (len(src) + len(dst))) time and O(len(src) len(dst)) memory. Accuracy: about 1e-13
    absolute between and near the knots; a point a distance d beyond an end knot whose interval is h
    carries the rounding of the end slope times d/h (~5e-11 at 0.5 beyond 1024 Chebyshev knots).
    """
    src_np = _to_numpy_1d(src, "src")
    dst_np = _to_numpy_1d(dst, "dst")
    _check_knots(src_np, "src")
    if not np.all(np.isfinite(dst_np)):
        raise ValueError("dst must be finite")
    lam = check_lam(lam, "lam")
    return torch.from_numpy(_weights_np(src_np, dst_np, lam))


# ---------------------------------------------------------------------------------------------
# Degrees of freedom


def degrees_of_freedom(src, lam: float) -> float:
    r"""Effective degrees of freedom :math:`\operatorname{tr} S_\lambda` of the smoothing spline on
    knots ``src``, in O(len(src)) (the band of a banded inverse; :mod:`dres_fast._banded`)."""
    src_np = _to_numpy_1d(src, "src")
    _check_knots(src_np, "src")
    return _trace_of_smoother(src_np, check_lam(lam, "lam"))


def _trace_of_smoother(t: np.ndarray, lam: float) -> float:
    if math.isinf(lam):
        return 2.0  # the least-squares line: a rank-2 projection
    return PenalizedSystem(t, lam).smoother_trace()


@functools.lru_cache(maxsize=256)
def _lam_for_dof_cached(src_key: tuple, dof: float) -> float:
    from scipy.optimize import brentq

    n = len(src_key)
    if dof >= n:
        return 0.0
    if dof <= 2.0:
        return math.inf
    t = np.asarray(src_key)
    # tr S - 2 falls like a power of lambda, lam^-p with 0 <= p <= 1 (about 1/4 for a fit with many
    # degrees of freedom, 1 near the line), so its logarithm is nearly linear in log-lambda: a
    # secant step from a guess brackets the root tightly, and Brent's interpolation finishes in a
    # few O(n) trace evaluations.
    target = math.log(dof - 2.0)
    values = {}

    def excess(log_lam: float) -> float:
        if log_lam not in values:
            trace = _trace_of_smoother(t, math.exp(log_lam))
            values[log_lam] = math.log(max(trace - 2.0, 1e-300)) - target
        return values[log_lam]

    # lam scales like (knot spacing)^3
    start = lo = hi = math.log(float(np.mean(np.diff(t))) ** 3)
    slope, last_step = -0.25, 0.0
    while (excess(lo) < 0) == (excess(hi) < 0):
        if lo < start - 200:
            return 0.0  # even the interpolating spline has too few degrees of freedom
        if hi > start + 200:
            return math.inf
        moving = hi if excess(hi) > 0 else lo  # the end that must move past the root
        if hi != lo:
            slope = min(-0.05, max(-1.0, (excess(hi) - excess(lo)) / (hi - lo)))
        # the secant prediction, overshooting a little; at least twice the last step where the
        # function is flat (dof near n), at most 20 (e^20 in lambda)
        step = -excess(moving) / slope
        step = math.copysign(min(max(abs(step) * 1.5, 2.0 * last_step, 0.05), 20.0), step)
        last_step = abs(step)
        if moving == hi:
            lo, hi = hi, hi + step
        else:
            lo, hi = lo + step, lo
    return math.exp(brentq(excess, lo, hi, xtol=1e-12, rtol=1e-12, maxiter=200))


def lam_for_dof(src, dof: float) -> float:
    r"""The smoothing :math:`\lambda` whose fit on knots ``src`` has ``dof`` effective degrees of
    freedom (``2 <= dof <= len(src)``; ``len(src)`` gives 0, 2 gives ``math.inf``). Solved by Brent's
    method on :math:`\log\lambda`; :math:`\operatorname{tr} S_\lambda` is strictly decreasing."""
    src_np = _to_numpy_1d(src, "src")
    _check_knots(src_np, "src")
    if isinstance(dof, bool) or not isinstance(dof, (int, float, np.floating, np.integer)):
        raise TypeError(f"dof must be a real number, got {type(dof).__name__}")
    n = src_np.shape[0]
    if not (2.0 <= float(dof) <= n):
        raise ValueError(f"dof must be between 2 and the number of knots ({n}), got {dof}")
    return _lam_for_dof_cached(tuple(src_np.tolist()), float(dof))


def spec_lam(spec: SmoothingSpec, spline: str, knots: np.ndarray) -> float:
    """The lambda of ``spec``'s spline ``"enc"`` or ``"dec"`` on ``knots``: given, from its dof, or the
    default (``DEFAULT_DOF_FRACTION`` of the knots' degrees of freedom, never below 2)."""
    lam, dof = getattr(spec, "lam_" + spline), getattr(spec, "dof_" + spline)
    if lam is not None:
        return lam
    if dof is None:
        dof = max(2.0, DEFAULT_DOF_FRACTION * len(knots))
    else:
        check_dof(dof, "dof_" + spline, knots=len(knots))
    return lam_for_dof(knots, dof)


def float64_weights(spec: SmoothingSpec, num_samples: int):
    """Float64 ``(E (N, K), D (K, N))`` of ``spec`` for a batch of ``num_samples`` (uncached)."""
    num_samples, num_coded = spec.sizes(num_samples)
    alpha = as_knots(spec.alpha if isinstance(spec.alpha, str) else list(spec.alpha), num_samples, "alpha")
    beta = as_knots(spec.beta if isinstance(spec.beta, str) else list(spec.beta), num_coded, "beta")
    encoder = spline_weights(alpha, beta, spec_lam(spec, "enc", alpha))
    decoder = spline_weights(beta, alpha, spec_lam(spec, "dec", beta))
    return encoder, decoder
