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

a symmetric positive definite *pentadiagonal* system, solved by banded Cholesky in float64 and
refined with long-double residuals (see ``_refined_penalized_solve``). At any
point :math:`s \in [t_i, t_{i+1}]` the spline is

.. math::

    g(s) = \frac{(t_{i+1}-s) g_i + (s-t_i) g_{i+1}}{h_i}
           - \frac{(s-t_i)(t_{i+1}-s)}{6}\Big[\big(1+\tfrac{s-t_i}{h_i}\big)\gamma_{i+1}
           + \big(1+\tfrac{t_{i+1}-s}{h_i}\big)\gamma_i\Big],

with :math:`\gamma_1 = \gamma_n = 0`, and beyond the ends it continues along the end tangents.
Everything is linear in :math:`y`, so evaluating at points :math:`s_1..s_m` is a matrix
:math:`W \in \mathbb{R}^{m \times n}`: :func:`spline_weights`.

The *effective degrees of freedom* of a fit is the trace of its smoother matrix
:math:`S_\lambda = W(t \to t, \lambda)`: :math:`n` at :math:`\lambda = 0`, falling monotonically
to 2 (a line) as :math:`\lambda \to \infty`. Unlike :math:`\lambda`, it does not depend on the number
or spacing of knots, which makes it the portable way to choose smoothing: :func:`lam_for_dof`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence, Union

import numpy as np
import torch
from scipy.linalg import solveh_banded
from scipy.optimize import brentq

__all__ = ["points", "spline_weights", "degrees_of_freedom", "lam_for_dof", "POINT_KINDS"]

POINT_KINDS = ("chebyshev", "lobatto", "uniform")
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


def _check_lam(lam, name: str = "lam") -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(lam).__name__}")
    lam = float(lam)
    if math.isnan(lam) or lam < 0:
        raise ValueError(f"{name} must be >= 0 (math.inf fits the least-squares line), got {lam}")
    return lam


# ---------------------------------------------------------------------------------------------
# Reinsch form


def _reinsch_bands(t: np.ndarray):
    """Columns of Q as three diagonals (a, b, c) and the two diagonals of R (in ``t``'s dtype)."""
    h = np.diff(t)
    a = 1.0 / h[:-1]
    c = 1.0 / h[1:]
    b = -a - c
    r_diag = (h[:-1] + h[1:]) / 3.0
    r_off = h[1:-1] / 6.0
    return h, a, b, c, r_diag, r_off


def _solve_banded_spd(upper: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Banded Cholesky solve; with a single interior knot (n = 3) the system is a scalar."""
    if upper.shape[1] == 1:
        return rhs / upper[-1, 0]
    return solveh_banded(upper, rhs, lower=False, check_finite=False)


def _penalized_diagonals(a, b, c, r_diag, r_off, lam: float):
    """Diagonals 0, 1, 2 of (R + lam Q^T Q) / (1 + lam) (entry j of diagonal o couples rows j - o
    and j); dividing by (1 + lam) keeps the entries O(1/h^2) for any lam."""
    lam = a.dtype.type(lam)
    scale = 1 / (1 + lam)
    d0 = scale * (r_diag + lam * (a * a + b * b + c * c))
    d1 = np.zeros_like(d0)
    d1[1:] = scale * (r_off + lam * (b[:-1] * a[1:] + c[:-1] * b[1:]))
    d2 = np.zeros_like(d0)
    d2[2:] = scale * lam * (c[:-2] * a[2:])
    return d0, d1, d2


def _penalized_bands(a, b, c, r_diag, r_off, lam: float) -> np.ndarray:
    """(R + lam Q^T Q) / (1 + lam) in the banded upper storage of scipy.linalg.solveh_banded."""
    d0, d1, d2 = _penalized_diagonals(a, b, c, r_diag, r_off, lam)
    return np.stack([d2, d1, d0]).astype(np.float64)


def _band_matvec(diagonals, x: np.ndarray) -> np.ndarray:
    """The symmetric pentadiagonal matrix given by its three diagonals, times x (n-2, k)."""
    d0, d1, d2 = diagonals
    out = d0[:, None] * x
    out[:-1] += d1[1:, None] * x[1:]
    out[1:] += d1[1:, None] * x[:-1]
    out[:-2] += d2[2:, None] * x[2:]
    out[2:] += d2[2:, None] * x[:-2]
    return out


def _float64_solve(t: np.ndarray, lam: float):
    """(Q^T, the float64 banded storage of M = (R + lam Q^T Q) / (1 + lam), M^{-1} Q^T / (1 + lam))."""
    _, a, b, c, r_diag, r_off = _reinsch_bands(t)
    qt = _q_transpose_identity(a, b, c)
    bands = _penalized_bands(a, b, c, r_diag, r_off, lam)
    return qt, bands, _solve_banded_spd(bands, qt / (1.0 + lam))


def _refined_penalized_solve(t: np.ndarray, lam: float, iterations: int = 2):
    """gamma = (R + lam Q^T Q)^{-1} Q^T (the knots' second derivatives per unit data vector),
    (n-2, n), in long double, and Q's diagonals (a, b, c) in long double.

    Banded Cholesky in float64, then iterative refinement with residuals in long double: at 1024
    near-coincident Chebyshev knots the plain float64 solve loses up to ~6e-9 of the fit (relative)
    at large lam, the refined one ~4e-12 (checked against 50-digit arithmetic). Where long double is
    float64 (MSVC builds), refinement gains nothing and costs little."""
    ext = np.longdouble
    _, factor_bands, gamma64 = _float64_solve(t, lam)
    _, a, b, c, r_diag, r_off = _reinsch_bands(t.astype(ext))
    diagonals = _penalized_diagonals(a, b, c, r_diag, r_off, lam)
    rhs = _q_transpose_identity(a, b, c) / (1 + ext(lam))
    gamma = gamma64.astype(ext)
    for _ in range(iterations):
        residual = rhs - _band_matvec(diagonals, gamma)
        gamma += _solve_banded_spd(factor_bands, residual.astype(np.float64))
    return gamma, (a, b, c)


def _apply_q(a, b, c, gamma: np.ndarray) -> np.ndarray:
    """Q @ gamma for gamma of shape (n-2, m): row i gets a_i g_i + b_{i-1} g_{i-1} + c_{i-2} g_{i-2}."""
    m = gamma.shape[0]
    out = np.zeros((m + 2,) + gamma.shape[1:], dtype=gamma.dtype)
    out[:m] += a[:, None] * gamma
    out[1 : m + 1] += b[:, None] * gamma
    out[2 : m + 2] += c[:, None] * gamma
    return out


def _q_transpose_identity(a, b, c) -> np.ndarray:
    """Q^T as a dense (n-2, n) matrix."""
    m = a.shape[0]
    qt = np.zeros((m, m + 2), dtype=a.dtype)
    rows = np.arange(m)
    qt[rows, rows] = a
    qt[rows, rows + 1] = b
    qt[rows, rows + 2] = c
    return qt


def _line_projection(t: np.ndarray) -> np.ndarray:
    """Orthogonal projection onto {alpha + beta t}: the lam = inf smoother, via a (stable) QR."""
    basis, _ = np.linalg.qr(np.stack([np.ones_like(t), t - t.mean()], axis=1))
    return basis @ basis.T


@functools.lru_cache(maxsize=128)
def _fit_operators(t_key: tuple, lam: float):
    """Smoother matrix G (n x n: y -> g(t)) and second-derivative map Gamma (n x n: y -> g''(t))."""
    t = np.asarray(t_key)
    n = t.shape[0]
    gamma_full = np.zeros((n, n))  # g'' = 0 at the end knots (natural), and everywhere for a line
    if math.isinf(lam):
        smoother = _line_projection(t)
    else:
        gamma, (a, b, c) = _refined_penalized_solve(t, lam)
        # g = y - lam Q gamma: formed in long double too, since for large lam it is a small
        # difference of two O(1) matrices
        smoother = (np.eye(n, dtype=gamma.dtype) - gamma.dtype.type(lam) * _apply_q(a, b, c, gamma)).astype(np.float64)
        gamma_full[1:-1] = gamma
    gamma_full.setflags(write=False)
    smoother.setflags(write=False)
    return smoother, gamma_full


def _evaluation_matrix(t: np.ndarray, s: np.ndarray, smoother: np.ndarray, gamma_full: np.ndarray) -> np.ndarray:
    n = t.shape[0]
    h = np.diff(t)
    idx = np.clip(np.searchsorted(t, s, side="right") - 1, 0, n - 2)
    t0, t1, hi = t[idx], t[idx + 1], h[idx]
    left = s - t0
    right = t1 - s
    inside = (s >= t[0]) & (s <= t[-1])
    # cubic piece
    w_g0 = right / hi
    w_g1 = left / hi
    w_c0 = -left * right / 6.0 * (1.0 + right / hi)
    w_c1 = -left * right / 6.0 * (1.0 + left / hi)
    out = (
        w_g0[:, None] * smoother[idx]
        + w_g1[:, None] * smoother[idx + 1]
        + w_c0[:, None] * gamma_full[idx]
        + w_c1[:, None] * gamma_full[idx + 1]
    )
    # linear continuation along the end tangents: g'(t_1) = (g_2-g_1)/h_1 - h_1 g''_2/6, mirrored at t_n
    if not np.all(inside):
        slope_lo = (smoother[1] - smoother[0]) / h[0] - h[0] * gamma_full[1] / 6.0
        slope_hi = (smoother[-1] - smoother[-2]) / h[-1] + h[-1] * gamma_full[-2] / 6.0
        below = s < t[0]
        above = s > t[-1]
        out[below] = smoother[0][None, :] + (s[below] - t[0])[:, None] * slope_lo[None, :]
        out[above] = smoother[-1][None, :] + (s[above] - t[-1])[:, None] * slope_hi[None, :]
    return out


def spline_weights(src, dst, lam: float = 0.0) -> torch.Tensor:
    r"""The ``(len(dst), len(src))`` float64 matrix ``W`` with ``W @ y = g(dst)``, where ``g`` is the
    natural cubic smoothing spline through ``(src, y)`` with smoothing ``lam`` (module docstring).

    ``src`` must be finite and strictly ascending with at least 3 points; ``dst`` any finite points
    (outside ``[src[0], src[-1]]`` the spline continues linearly). ``lam = 0`` interpolates,
    ``lam = math.inf`` fits the least-squares line. Properties: ``W @ 1 = 1``, ``W @ src = dst``.
    """
    src_np = _to_numpy_1d(src, "src")
    dst_np = _to_numpy_1d(dst, "dst")
    _check_knots(src_np, "src")
    if not np.all(np.isfinite(dst_np)):
        raise ValueError("dst must be finite")
    lam = _check_lam(lam)
    return torch.from_numpy(_weights_np(tuple(src_np.tolist()), tuple(dst_np.tolist()), lam).copy())


@functools.lru_cache(maxsize=128)
def _weights_np(src_key: tuple, dst_key: tuple, lam: float) -> np.ndarray:
    smoother, gamma_full = _fit_operators(src_key, lam)
    return _evaluation_matrix(np.asarray(src_key), np.asarray(dst_key), smoother, gamma_full)


def degrees_of_freedom(src, lam: float) -> float:
    r"""Effective degrees of freedom :math:`\operatorname{tr} S_\lambda` of the smoothing spline on knots ``src``."""
    src_np = _to_numpy_1d(src, "src")
    _check_knots(src_np, "src")
    return _trace_of_smoother(src_np, _check_lam(lam))


@functools.lru_cache(maxsize=256)
def _lam_for_dof_cached(src_key: tuple, dof: float) -> float:
    n = len(src_key)
    if dof >= n:
        return 0.0
    if dof <= 2.0:
        return math.inf
    t = np.asarray(src_key)
    # lam scales like (knot spacing)^3: search log-lambda around that scale.
    h = np.diff(t)
    centre = math.log(float(np.mean(h)) ** 3)

    def excess(log_lam: float) -> float:
        return _trace_of_smoother(t, math.exp(log_lam)) - dof

    lo, hi = centre - 10.0, centre + 10.0
    while excess(lo) < 0:
        lo -= 10.0
        if lo < centre - 200:
            return 0.0
    while excess(hi) > 0:
        hi += 10.0
        if hi > centre + 200:
            return math.inf
    return math.exp(brentq(excess, lo, hi, xtol=1e-12, rtol=1e-12, maxiter=200))


def _trace_of_smoother(t: np.ndarray, lam: float) -> float:
    # trace(I - lam Q M^{-1} Q^T) without building the n x n smoother: only the diagonal is needed.
    n = t.shape[0]
    if math.isinf(lam):
        return 2.0  # the least-squares line: a rank-2 projection
    qt, _, gamma = _float64_solve(t, lam)
    # trace(Q gamma) = sum_ij Q_ij gamma_ji = sum(Q^T * gamma)
    return float(n - lam * np.sum(qt * gamma))


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
