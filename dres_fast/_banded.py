r"""Banded linear algebra for the Reinsch form of the cubic smoothing spline (see :mod:`dres_fast.splines`).

With :math:`m = n - 2` interior knots the system matrix, scaled so its entries stay
:math:`O(1/h^2)` for any :math:`\lambda`,

.. math::

    M = (R + \lambda Q^T Q) / (1 + \lambda) = U^T U ,

is symmetric positive definite with two off-diagonals. It is factored once by LAPACK's banded
Cholesky (``scipy.linalg.cholesky_banded``, :math:`O(m)`); everything else here is :math:`O(m)` per
right-hand side, with memory a small multiple of the right-hand sides':

* solves by forward and back substitution one *row* at a time, vectorized over all right-hand sides
  (LAPACK's banded solve loops over right-hand sides one at a time, several times slower for the
  thousands of columns of a weight matrix);
* one step of iterative refinement whose residual is formed in the factored form
  :math:`Q^T (y - \lambda Q \gamma) - R \gamma` (not with the assembled bands): it brings the fit at
  1024 near-coincident Chebyshev knots and large :math:`\lambda` from ~6e-9 to ~4e-12 relative error;
* the band of :math:`M^{-1}` (Hutchinson & de Hoog 1985) for the trace of the smoother,
  :math:`\operatorname{tr} S_\lambda = 2 + \operatorname{tr}\big((R + \lambda Q^T Q)^{-1} R\big)`,
  which follows from :math:`S_\lambda = I - \lambda Q (R + \lambda Q^TQ)^{-1} Q^T` and
  :math:`\lambda Q^T Q = (R + \lambda Q^T Q) - R`, and has no cancellation at large :math:`\lambda`.

scipy is imported inside the functions so that importing the package stays cheap.
"""

from __future__ import annotations

import numpy as np

#: A refinement step is applied to the full weight matrix only when, on a random probe, it moves the
#: spline by more than this (relative to the probe's size). At the default smoothing the float64 solve
#: is already that accurate (a probe moves ~4e-14 at 4096 Chebyshev knots), and refining the dense
#: (n-2, n) block would cost several solves.
REFINE_THRESHOLD = 1e-13

#: Below this many right-hand sides LAPACK's banded solve (one column at a time) beats row sweeps,
#: whose Python loop costs the same for one column as for thousands.
_ROW_SWEEP_MIN_COLUMNS = 32

#: From this many knots the trace's scalar loop runs compiled (``dres_fast.backends.banded_cpu``) when that
#: library loads: a Python step costs about 0.5 us, and the lam search evaluates the trace 10-25 times.
_COMPILED_TRACE_MIN_KNOTS = 2048


def reinsch_bands(t: np.ndarray):
    """Columns of Q as three diagonals (a, b, c) and the two diagonals of R."""
    h = np.diff(t)
    a = 1.0 / h[:-1]
    c = 1.0 / h[1:]
    b = -a - c
    r_diag = (h[:-1] + h[1:]) / 3.0
    r_off = h[1:-1] / 6.0
    return h, a, b, c, r_diag, r_off


class PenalizedSystem:
    r"""The Reinsch system of knots ``t`` at smoothing ``lam`` (finite), factored once.

    :meth:`second_derivatives` gives :math:`(R + \lambda Q^T Q)^{-1} Q^T`;
    :meth:`smoother_trace` gives :math:`\operatorname{tr} S_\lambda`."""

    def __init__(self, t: np.ndarray, lam: float):
        from scipy.linalg import cholesky_banded

        self.n = t.shape[0]
        self.lam = float(lam)
        _, self.a, self.b, self.c, self.r_diag, self.r_off = reinsch_bands(t)
        a, b, c, lam = self.a, self.b, self.c, self.lam
        scale = 1.0 / (1.0 + lam)
        bands = np.zeros((3, self.n - 2))  # upper banded storage: bands[2 - o, j] = M[j - o, j]
        bands[2] = scale * (self.r_diag + lam * (a * a + b * b + c * c))
        bands[1, 1:] = scale * (self.r_off + lam * (b[:-1] * a[1:] + c[:-1] * b[1:]))
        bands[0, 2:] = scale * lam * (c[:-2] * a[2:])
        self.factor = cholesky_banded(bands, lower=False, check_finite=False)

    # -- products with the sparse factors, for (n-2, k) or (n, k) blocks --------------------------
    # Each term goes through one scratch block instead of a fresh temporary: for a weight matrix
    # these are (n, n) arrays, and every fresh one costs its page faults again.
    @staticmethod
    def _add_scaled(out: np.ndarray, coefficients: np.ndarray, block: np.ndarray, scratch: np.ndarray) -> None:
        """out += coefficients[:, None] * block, without a temporary the size of block."""
        scratch = scratch[: block.shape[0]]
        np.multiply(coefficients[:, None], block, out=scratch)
        out += scratch

    def apply_q(self, gamma: np.ndarray, scratch: np.ndarray = None) -> np.ndarray:
        """Q @ gamma: row i gets a_i g_i + b_{i-1} g_{i-1} + c_{i-2} g_{i-2}."""
        scratch = np.empty_like(gamma) if scratch is None else scratch
        m = gamma.shape[0]
        out = np.empty((m + 2,) + gamma.shape[1:])
        np.multiply(self.a[:, None], gamma, out=out[:m])
        out[m:] = 0.0
        self._add_scaled(out[1 : m + 1], self.b, gamma, scratch)
        self._add_scaled(out[2:], self.c, gamma, scratch)
        return out

    def apply_qt(self, g: np.ndarray, scratch: np.ndarray = None) -> np.ndarray:
        """Q^T @ g: row j gets a_j g_j + b_j g_{j+1} + c_j g_{j+2}."""
        scratch = np.empty_like(g[2:]) if scratch is None else scratch
        out = np.multiply(self.a[:, None], g[:-2])
        self._add_scaled(out, self.b, g[1:-1], scratch)
        self._add_scaled(out, self.c, g[2:], scratch)
        return out

    def subtract_r(self, gamma: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """out -= R @ gamma (R tridiagonal)."""
        self._add_scaled(out, -self.r_diag, gamma, scratch)
        self._add_scaled(out[:-1], -self.r_off, gamma[1:], scratch)
        self._add_scaled(out[1:], -self.r_off, gamma[:-1], scratch)
        return out

    # -- solves -----------------------------------------------------------------------------------
    def _solve_inplace(self, rhs: np.ndarray, q_transpose_rhs: bool = False) -> np.ndarray:
        """rhs <- M^{-1} rhs by row sweeps (rhs C-contiguous float64, (n-2, k)). With
        ``q_transpose_rhs`` the rhs has Q^T's pattern (row j nonzero only in columns j..j+2), so the
        forward sweep touches only the nonzero prefix U^{-T} keeps: half the work."""
        from scipy.linalg import blas

        m, width = rhs.shape
        if width < _ROW_SWEEP_MIN_COLUMNS:
            from scipy.linalg import cho_solve_banded

            rhs[...] = cho_solve_banded((self.factor, False), rhs, check_finite=False)
            return rhs
        # BLAS axpy/scal update a row in place in one call each; they would silently work on a
        # copy of a non-contiguous row
        if not (rhs.flags.c_contiguous and rhs.dtype == np.float64):
            raise ValueError("_solve_inplace needs a C-contiguous float64 array")
        axpy, scal = blas.daxpy, blas.dscal
        inverse_diag = (1.0 / self.factor[2]).tolist()  # U[i, i]
        minus_sup1 = (-self.factor[1]).tolist()  # -U[i-1, i]
        minus_sup2 = (-self.factor[0]).tolist()  # -U[i-2, i]
        for i in range(m):  # U^T z = rhs
            w = min(i + 3, width) if q_transpose_rhs else width
            row = rhs[i, :w]
            if i >= 1:
                axpy(rhs[i - 1, :w], row, a=minus_sup1[i])
            if i >= 2:
                axpy(rhs[i - 2, :w], row, a=minus_sup2[i])
            scal(inverse_diag[i], row)
        for i in range(m - 1, -1, -1):  # U x = z
            row = rhs[i]
            if i + 1 < m:
                axpy(rhs[i + 1], row, a=minus_sup1[i + 1])
            if i + 2 < m:
                axpy(rhs[i + 2], row, a=minus_sup2[i + 2])
            scal(inverse_diag[i], row)
        return rhs

    def _refinement_step(self, y, gamma: np.ndarray) -> np.ndarray:
        """gamma + M^{-1} rho / (1 + lam), rho = Q^T (y - lam Q gamma) - R gamma (``y`` None: I)."""
        if y is None and gamma.shape[1] >= _ROW_SWEEP_MIN_COLUMNS:
            residual = self._identity_residual_by_rows(gamma)
        else:
            scratch = np.empty_like(gamma)
            fit = self.apply_q(gamma, scratch)
            fit *= -self.lam
            if y is None:
                fit[np.diag_indices(self.n)] += 1.0
            else:
                fit += y
            residual = self.apply_qt(fit, scratch)
            del fit
            self.subtract_r(gamma, residual, scratch)
            del scratch
        residual /= 1.0 + self.lam
        gamma += self._solve_inplace(residual)
        return gamma

    def _identity_residual_by_rows(self, gamma: np.ndarray) -> np.ndarray:
        """rho = Q^T (I - lam Q gamma) - R gamma one row at a time with BLAS calls (broadcast numpy
        products over (n, n) blocks run at a fraction of memory speed), keeping only the three rows
        of the fit that the current row of rho needs."""
        from scipy.linalg import blas

        axpy = blas.daxpy
        m, width = gamma.shape
        a, b, c = self.a.tolist(), self.b.tolist(), self.c.tolist()
        r_diag, r_off = self.r_diag.tolist(), self.r_off.tolist()
        fit_rows = np.empty((3, width))
        residual = np.empty_like(gamma)
        for i in range(m + 2):
            fit = fit_rows[i % 3]  # row i of y - lam Q gamma: a_i g_i + b_{i-1} g_{i-1} + c_{i-2} g_{i-2}
            fit[:] = 0.0
            if i < m:
                axpy(gamma[i], fit, a=a[i])
            if 1 <= i <= m:
                axpy(gamma[i - 1], fit, a=b[i - 1])
            if i >= 2:
                axpy(gamma[i - 2], fit, a=c[i - 2])
            fit *= -self.lam
            fit[i] += 1.0
            if i < 2:
                continue
            j = i - 2  # row j of rho = a_j fit_j + b_j fit_{j+1} + c_j fit_{j+2} - (R gamma)_j
            row = residual[j]
            np.multiply(fit_rows[j % 3], a[j], out=row)
            axpy(fit_rows[(j + 1) % 3], row, a=b[j])
            axpy(fit, row, a=c[j])
            axpy(gamma[j], row, a=-r_diag[j])
            if j + 1 < m:
                axpy(gamma[j + 1], row, a=-r_off[j])
            if j >= 1:
                axpy(gamma[j - 1], row, a=-r_off[j - 1])
        return residual

    def second_derivatives(self) -> np.ndarray:
        r"""The (n-2, n) map :math:`\Gamma = (R + \lambda Q^T Q)^{-1} Q^T` from data to interior second
        derivatives, refined once when a probe shows the plain float64 solve is off by more than
        :data:`REFINE_THRESHOLD`."""
        scale = 1.0 / (1.0 + self.lam)
        m = self.n - 2
        rhs = np.zeros((m, self.n))
        rows = np.arange(m)
        rhs[rows, rows], rhs[rows, rows + 1], rhs[rows, rows + 2] = scale * self.a, scale * self.b, scale * self.c
        gamma = self._solve_inplace(rhs, q_transpose_rhs=True)
        if self._probe_correction() > REFINE_THRESHOLD:
            gamma = self._refinement_step(None, gamma)
        return gamma

    def _probe_correction(self) -> float:
        """How far one refinement step moves the spline of a fixed random probe, relative to its
        size: at the knots (lam Q delta) and between them (a second derivative's weight in g(s) is
        at most h^2/16 on each adjacent interval)."""
        probe = np.random.default_rng(0).standard_normal((self.n, 1))
        gamma = self._solve_inplace(self.apply_qt(probe) / (1.0 + self.lam))
        delta = self._refinement_step(probe, gamma.copy()) - gamma
        h = 1.0 / self.c  # h_{j+1}; h_j = 1 / a_j
        curvature_weight = np.maximum(1.0 / self.a, h) ** 2 / 16.0
        at_knots = self.lam * np.max(np.abs(self.apply_q(delta)))
        between = np.max(curvature_weight * np.abs(delta[:, 0]))
        return float(max(at_knots, between) / np.max(np.abs(probe)))

    # -- trace ------------------------------------------------------------------------------------
    def smoother_trace(self) -> float:
        r""":math:`\operatorname{tr} S_\lambda = 2 + \operatorname{tr}(\Sigma R) / (1 + \lambda)`, where
        :math:`\Sigma = M^{-1} = U^{-1} U^{-T}`. Only the band of :math:`\Sigma` is needed, and
        :math:`U \Sigma = U^{-T}` (lower triangular, diagonal :math:`1/U_{ii}`) gives it from the
        bottom up: for :math:`j \ge i`,
        :math:`\Sigma_{ij} = (\delta_{ij}/U_{ii} - U_{i,i+1}\Sigma_{i+1,j} - U_{i,i+2}\Sigma_{i+2,j})/U_{ii}`
        (Hutchinson & de Hoog). O(n) scalar steps."""
        if self.n >= _COMPILED_TRACE_MIN_KNOTS:
            from .backends.banded_cpu import trace_sigma_r

            total = trace_sigma_r(self.factor[2], np.append(self.factor[1, 1:], 0.0), np.append(self.factor[0, 2:], [0.0, 0.0]),
                                  self.r_diag, np.append(self.r_off, 0.0))
            if total is not None:
                return 2.0 + total / (1.0 + self.lam)
        diag = self.factor[2].tolist()
        sup1 = self.factor[1, 1:].tolist() + [0.0]  # U[i, i+1], zero past the end
        sup2 = self.factor[0, 2:].tolist() + [0.0, 0.0]  # U[i, i+2]
        r_off = self.r_off.tolist() + [0.0]
        s11 = s12 = s22 = 0.0  # Sigma[i+1,i+1], Sigma[i+1,i+2], Sigma[i+2,i+2] of the row below
        total = 0.0
        for d, p, q, r0, r1 in zip(reversed(diag), reversed(sup1), reversed(sup2), reversed(self.r_diag.tolist()), reversed(r_off)):
            s02 = -(p * s12 + q * s22) / d
            s01 = -(p * s11 + q * s12) / d
            s00 = (1.0 / d - p * s01 - q * s02) / d
            total += r0 * s00 + 2.0 * r1 * s01
            s11, s12, s22 = s00, s01, s11
        return 2.0 + total / (1.0 + self.lam)
