"""Spline weights against scipy, a 60-digit mpmath reference, and the invariants of DESIGN.md 1."""

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.interpolate import CubicSpline, make_smoothing_spline

import dres_fast
from dres_fast.splines import degrees_of_freedom, lam_for_dof


def chebyshev(n):
    return dres_fast.points(n, "chebyshev").numpy()


def rel_err(a, b, scale):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / scale)


# -- points ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 8, 33])
def test_points_formulas(n):
    k = np.arange(1, n + 1)
    np.testing.assert_allclose(dres_fast.points(n, "chebyshev").numpy(), np.sort(np.cos((2 * k - 1) * np.pi / (2 * n))))
    np.testing.assert_allclose(dres_fast.points(n, "lobatto").numpy(), np.sort(np.cos(np.arange(n) * np.pi / (n - 1))))
    np.testing.assert_allclose(dres_fast.points(n, "uniform").numpy(), np.linspace(-1, 1, n))
    for kind in ("chebyshev", "lobatto", "uniform"):
        p = dres_fast.points(n, kind)
        assert p.dtype == torch.float64 and torch.all(p[1:] > p[:-1])


def test_points_bad_input():
    with pytest.raises(ValueError, match="kind"):
        dres_fast.points(5, "gauss")
    with pytest.raises(ValueError, match="n must be at least 2"):
        dres_fast.points(1)
    with pytest.raises(TypeError, match="n must be an int"):
        dres_fast.points(5.0)


# -- against scipy (same lambda convention) ------------------------------------------------------
@pytest.mark.parametrize("n", [5, 16, 64])
@pytest.mark.parametrize("lam", [0.0, 1e-12, 1e-6, 1e-4])
def test_matches_scipy_inside_knots(n, lam):
    rng = np.random.default_rng(n)
    t = chebyshev(n)
    y = rng.standard_normal(n) + 2 * t
    s = np.concatenate([t, rng.uniform(t[0], t[-1], 50)])
    ours = dres_fast.spline_weights(t, s, lam).numpy() @ y
    ref = make_smoothing_spline(t, y, lam=lam)(s)
    assert rel_err(ours, ref, np.max(np.abs(y))) < 1e-10


def test_interpolation_matches_natural_cubic_spline_at_1024_knots():
    # near-coincident Chebyshev knots at the ends: spacing ~ 1e-6 against ~3e-3 in the middle
    t = chebyshev(1024)
    y = np.sin(5 * t) + 0.1 * np.random.default_rng(1).standard_normal(1024)
    s = np.random.default_rng(2).uniform(t[0], t[-1], 300)
    ours = dres_fast.spline_weights(t, s, 0.0).numpy() @ y
    ref = CubicSpline(t, y, bc_type="natural")(s)
    assert rel_err(ours, ref, np.max(np.abs(y))) < 1e-10


def _mpmath_reinsch(t):
    """Q (n x n-2) and R (n-2 x n-2) of the Reinsch form at the knots ``t``, in mpmath's working precision."""
    n = len(t)
    tt = [mpmath.mpf(float(v)) for v in t]
    h = [tt[i + 1] - tt[i] for i in range(n - 1)]
    Q = mpmath.zeros(n, n - 2)
    R = mpmath.zeros(n - 2, n - 2)
    for j in range(n - 2):
        Q[j, j], Q[j + 1, j], Q[j + 2, j] = 1 / h[j], -1 / h[j] - 1 / h[j + 1], 1 / h[j + 1]
        R[j, j] = (h[j] + h[j + 1]) / 3
        if j + 1 < n - 2:
            R[j, j + 1] = R[j + 1, j] = h[j + 1] / 6
    return Q, R


def _mpmath_smoothing_fit(t, y, lam, digits=60):
    """g = y - lam Q (R + lam Q^T Q)^{-1} Q^T y in `digits`-digit arithmetic (dense)."""
    with mpmath.workdps(digits):
        Q, R = _mpmath_reinsch(t)
        Y = mpmath.matrix([mpmath.mpf(float(v)) for v in y])
        gamma = mpmath.lu_solve(R + lam * Q.T * Q, Q.T * Y)
        g = Y - lam * Q * gamma
        return np.array([float(v) for v in g])


def _mpmath_banded_fit(t, y, lam, digits=50):
    """The same fit for one y by elimination on the pentadiagonal system, O(n) operations in
    `digits`-digit arithmetic: an exact reference at 1024 knots, where a dense solve is too slow."""
    with mpmath.workdps(digits):
        n = len(t)
        tt = [mpmath.mpf(float(v)) for v in t]
        yy = [mpmath.mpf(float(v)) for v in y]
        lam = mpmath.mpf(lam)
        h = [tt[i + 1] - tt[i] for i in range(n - 1)]
        m = n - 2
        a = [1 / h[j] for j in range(m)]
        c = [1 / h[j + 1] for j in range(m)]
        b = [-a[j] - c[j] for j in range(m)]
        rhs = [a[j] * yy[j] + b[j] * yy[j + 1] + c[j] * yy[j + 2] for j in range(m)]
        # rows of the symmetric band: M[j][j+o] for o = 0, 1, 2
        band = [[(h[j] + h[j + 1]) / 3 + lam * (a[j] ** 2 + b[j] ** 2 + c[j] ** 2),
                 (h[j + 1] / 6 + lam * (b[j] * a[j + 1] + c[j] * b[j + 1])) if j + 1 < m else 0,
                 (lam * c[j] * a[j + 2]) if j + 2 < m else 0] for j in range(m)]
        full = {(j, j + o): band[j][o] for j in range(m) for o in range(3) if j + o < m}
        full.update({(j + o, j): band[j][o] for j in range(m) for o in range(1, 3) if j + o < m})
        for k in range(m):  # Gaussian elimination within the band (SPD: no pivoting needed)
            for i in range(k + 1, min(k + 3, m)):
                f = full[(i, k)] / full[(k, k)]
                for jj in range(k, min(k + 3, m)):
                    full[(i, jj)] = full.get((i, jj), 0) - f * full[(k, jj)]
                rhs[i] -= f * rhs[k]
        gamma = [0] * m
        for k in reversed(range(m)):
            acc = rhs[k] - sum(full.get((k, jj), 0) * gamma[jj] for jj in range(k + 1, min(k + 3, m)))
            gamma[k] = acc / full[(k, k)]
        g = list(yy)
        for j in range(m):
            g[j] -= lam * a[j] * gamma[j]
            g[j + 1] -= lam * b[j] * gamma[j]
            g[j + 2] -= lam * c[j] * gamma[j]
        return np.array([float(v) for v in g])


@pytest.mark.parametrize("lam", [0.0, 1e-12, 1e-6, 1e-3, 1.0, 1e6])
def test_1024_chebyshev_knots_match_high_precision_reference(lam):
    # near-coincident knots at the ends (spacing ~1e-6 against ~3e-3 in the middle)
    t = chebyshev(1024)
    y = np.sin(4 * t) + 0.3 * np.random.default_rng(5).standard_normal(1024)
    s = np.concatenate([t, np.random.default_rng(6).uniform(t[0], t[-1], 200)])
    ours = dres_fast.spline_weights(t, s, lam).numpy() @ y
    fitted = _mpmath_banded_fit(t, y, lam)
    # the smoothing spline is the natural cubic spline through its own fitted values
    ref = CubicSpline(t, fitted, bc_type="natural")(s)
    assert rel_err(ours, ref, np.max(np.abs(y))) < 1e-10


@pytest.mark.parametrize("n", [7, 40])
@pytest.mark.parametrize("lam", [1e-12, 1.0, 1e6])
def test_matches_high_precision_reference(n, lam):
    # scipy itself loses digits at large lambda (1.8e-4 relative at n=64, lam=1e6), so extreme
    # smoothing is checked against exact arithmetic instead.
    rng = np.random.default_rng(n)
    t = chebyshev(n)
    y = rng.standard_normal(n) + 3 * t
    ours = dres_fast.spline_weights(t, t, lam).numpy() @ y
    ref = _mpmath_smoothing_fit(t, y, mpmath.mpf(lam))
    assert rel_err(ours, ref, np.max(np.abs(y))) < 1e-10


# -- invariants -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 4, 17, 256, 1024])
@pytest.mark.parametrize("lam", [0.0, 1e-12, 1e-3, 1e6, math.inf])
def test_constants_and_lines_reproduced_inside_and_outside(n, lam):
    t = chebyshev(n)
    s = np.concatenate([np.linspace(-1.5, 1.5, 41), dres_fast.points(9, "lobatto").numpy()])
    W = dres_fast.spline_weights(t, s, lam).numpy()
    assert W.shape == (len(s), n)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-11)
    np.testing.assert_allclose(W @ t, s, atol=1e-11)


@pytest.mark.parametrize("n", [3, 10, 100])
def test_interpolation_is_identity_at_knots(n):
    t = chebyshev(n)
    np.testing.assert_allclose(dres_fast.spline_weights(t, t, 0.0).numpy(), np.eye(n), atol=1e-12)


def test_huge_lambda_tends_to_least_squares_line():
    t = chebyshev(30)
    y = np.random.default_rng(3).standard_normal(30)
    s = np.linspace(-2, 2, 11)
    line = np.polyval(np.polyfit(t, y, 1), s)
    exact = dres_fast.spline_weights(t, s, math.inf).numpy() @ y
    np.testing.assert_allclose(exact, line, atol=1e-12)
    errors = [np.max(np.abs(dres_fast.spline_weights(t, s, lam).numpy() @ y - line)) for lam in (1e0, 1e3, 1e6)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_linear_beyond_end_knots():
    t = chebyshev(12)
    y = np.random.default_rng(4).standard_normal(12)
    s = np.array([-3.0, -2.0, -1.5, 1.5, 2.0, 3.0])
    g = dres_fast.spline_weights(t, s, 1e-3).numpy() @ y
    # equal steps outside the knots give equal increments on each side
    assert abs((g[1] - g[0]) - 2 * (g[2] - g[1])) < 1e-10
    assert abs((g[5] - g[4]) - 2 * (g[4] - g[3])) < 1e-10


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(3, 40),
    log_lam=st.floats(-12, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_weights_reproduce_lines(n, log_lam, seed):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(-1, 1, n))
    if np.min(np.diff(t)) < 1e-6:
        t = np.linspace(-1, 1, n)
    s = rng.uniform(-1.3, 1.3, 7)
    W = dres_fast.spline_weights(t, s, 10.0**log_lam).numpy()
    assert np.all(np.isfinite(W))
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-8)
    np.testing.assert_allclose(W @ t, s, atol=1e-8)


# -- degrees of freedom ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 64, 300])
def test_dof_round_trip_and_monotone(n):
    t = chebyshev(n)
    assert degrees_of_freedom(t, 0.0) == pytest.approx(n)
    assert degrees_of_freedom(t, math.inf) == pytest.approx(2.0)
    targets = [2.5, 0.6 * n, 0.9 * n]
    lams = [lam_for_dof(t, d) for d in targets]
    assert lams[0] > lams[1] > lams[2] > 0
    for d, lam in zip(targets, lams):
        assert degrees_of_freedom(t, lam) == pytest.approx(d, rel=1e-8)
    assert lam_for_dof(t, n) == 0.0 and lam_for_dof(t, 2) == math.inf


def test_dof_is_trace_of_smoother():
    t = chebyshev(20)
    lam = 1e-3
    assert degrees_of_freedom(t, lam) == pytest.approx(np.trace(dres_fast.spline_weights(t, t, lam).numpy()), rel=1e-12)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "src, dst, lam, err, match",
    [
        ([0.0, 1.0], [0.5], 0.0, ValueError, "src needs at least 3"),
        ([0.0, 2.0, 1.0], [0.5], 0.0, ValueError, "src must be strictly ascending"),
        ([0.0, 1.0, 1.0], [0.5], 0.0, ValueError, "src must be strictly ascending"),
        ([0.0, float("nan"), 1.0], [0.5], 0.0, ValueError, "src must be finite"),
        ([0.0, 1.0, 2.0], [float("inf")], 0.0, ValueError, "dst must be finite"),
        ([0.0, 1.0, 2.0], [0.5], -1.0, ValueError, "lam must be >= 0"),
        ([0.0, 1.0, 2.0], [0.5], float("nan"), ValueError, "lam must be >= 0"),
        ([0.0, 1.0, 2.0], [0.5], "big", TypeError, "lam must be a real number"),
        ([[0.0, 1.0, 2.0]], [0.5], 0.0, ValueError, "src must be 1-D"),
    ],
)
def test_spline_weights_bad_input(src, dst, lam, err, match):
    with pytest.raises(err, match=match):
        dres_fast.spline_weights(src, dst, lam)


def test_lam_for_dof_bad_input():
    t = chebyshev(8)
    with pytest.raises(ValueError, match="dof must be between 2 and the number of knots"):
        lam_for_dof(t, 9)
    with pytest.raises(ValueError, match="dof must be between 2"):
        lam_for_dof(t, 1.5)


# -- banded solves, the trace recursion, large K ----------------------------------------------------
def _dense_reinsch(t, lam):
    """Fitted values G = I - lam Q (R + lam Q^T Q)^{-1} Q^T by a dense float64 solve (independent of
    the banded code)."""
    n = len(t)
    h = np.diff(t)
    Q = np.zeros((n, n - 2))
    R = np.zeros((n - 2, n - 2))
    for j in range(n - 2):
        Q[j, j], Q[j + 1, j], Q[j + 2, j] = 1 / h[j], -1 / h[j] - 1 / h[j + 1], 1 / h[j + 1]
        R[j, j] = (h[j] + h[j + 1]) / 3
        if j + 1 < n - 2:
            R[j, j + 1] = R[j + 1, j] = h[j + 1] / 6
    return np.eye(n) - lam * Q @ np.linalg.solve(R + lam * Q.T @ Q, Q.T)


@pytest.mark.parametrize("n", [3, 5, 40, 300])
@pytest.mark.parametrize("lam", [1e-9, 1e-4, 1.0])
def test_trace_recursion_matches_dense_trace(n, lam):
    t = chebyshev(n)
    assert degrees_of_freedom(t, lam) == pytest.approx(np.trace(_dense_reinsch(t, lam)), rel=1e-10)


def test_trace_recursion_at_huge_lambda_matches_high_precision():
    # tr S - 2 is tiny here; the recursion computes it directly (2 + tr((R + lam Q^T Q)^{-1} R)),
    # without the cancellation of n - lam tr(...)
    t = chebyshev(30)
    lam = 1e6
    with mpmath.workdps(50):
        n = len(t)
        Q, R = _mpmath_reinsch(t)
        inv = mpmath.inverse(R + lam * Q.T * Q)
        exact_excess = float(sum((inv * R)[i, i] for i in range(n - 2)))
    assert degrees_of_freedom(t, lam) - 2.0 == pytest.approx(exact_excess, rel=1e-9)


@pytest.mark.parametrize("columns", [1, 5, 200])
def test_banded_solve_matches_lapack(columns):
    from scipy.linalg import solveh_banded

    from dres_fast._banded import PenalizedSystem

    t = chebyshev(150)
    system = PenalizedSystem(t, 1e-4)
    rhs = np.random.default_rng(7).standard_normal((148, columns))
    # M = U^T U in the upper banded storage scipy uses for both
    upper = system.factor
    bands = np.zeros_like(upper)
    full = np.diag(upper[2]) + np.diag(upper[1, 1:], 1) + np.diag(upper[0, 2:], 2)
    dense = full.T @ full
    for offset in range(3):
        bands[2 - offset, offset:] = np.diagonal(dense, offset)
    expected = solveh_banded(bands, rhs)
    np.testing.assert_allclose(system._solve_inplace(rhs.copy()), expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("src_kind, dst_kind", [("chebyshev", "lobatto"), ("lobatto", "chebyshev"), ("uniform", "chebyshev")])
@pytest.mark.parametrize("n", [64, 400])
def test_banded_weights_match_dense_solve(src_kind, dst_kind, n):
    # the smoothing spline is the natural cubic spline through its own fitted values
    t = dres_fast.points(n, src_kind).numpy()
    s = dres_fast.points(n + 7, dst_kind).numpy()
    s = s[(s >= t[0]) & (s <= t[-1])]
    for lam in (lam_for_dof(t, 0.75 * n), 1e-3):
        ours = dres_fast.spline_weights(t, s, lam).numpy()
        dense = CubicSpline(t, _dense_reinsch(t, lam), bc_type="natural", axis=0)(s)
        assert np.max(np.abs(ours - dense)) < 1e-12


@pytest.mark.parametrize("lam", ["dof", 1e-2])
def test_large_batch_weights_reproduce_constants_and_lines(lam):
    n = 4096
    alpha = dres_fast.points(n, "chebyshev").numpy()
    beta = dres_fast.points(n, "lobatto").numpy()
    for src, dst in ((alpha, beta), (beta, alpha)):
        smoothing = lam_for_dof(src, 0.75 * n) if lam == "dof" else lam
        W = dres_fast.spline_weights(src, dst, smoothing).numpy()
        assert W.shape == (n, n) and np.all(np.isfinite(W))
        np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-11)
        np.testing.assert_allclose(W @ src, dst, atol=1e-11)
        del W


@pytest.mark.parametrize("lam", [1e-6, 1.0, 1e6])
def test_refinement_residual_by_rows_matches_block_form(lam):
    # the weight matrix's refinement residual is formed row by row with BLAS, a probe's in blocks:
    # one refinement step from the plain float64 solve must land on the same second derivatives
    from dres_fast._banded import PenalizedSystem

    n = 60
    system = PenalizedSystem(chebyshev(n), lam)
    q_transpose = np.zeros((n - 2, n))
    rows = np.arange(n - 2)
    q_transpose[rows, rows], q_transpose[rows, rows + 1], q_transpose[rows, rows + 2] = system.a, system.b, system.c
    plain = system._solve_inplace(q_transpose / (1 + lam))
    by_rows = system._refinement_step(None, plain.copy())
    in_blocks = system._refinement_step(np.eye(n), plain.copy())
    assert np.max(np.abs(by_rows - plain)) > 0  # the step did something
    np.testing.assert_allclose(by_rows, in_blocks, rtol=0, atol=1e-13 * np.abs(in_blocks).max())
