r"""The spline maps without dense matrices: ``W x`` in :math:`O((n + p) d)` for ``W`` of shape ``(p, n)``.

A smoothing spline's map from values at ``n`` knots to values at ``p`` points is (:mod:`dres_fast.splines`)

.. math::

    W x = P x + V \gamma, \qquad M \gamma = s\, Q^T x, \qquad M = (R + \lambda Q^T Q) s = U^T U,
    \quad s = 1/(1 + \lambda),

with :math:`Q^T` a 3-point stencil, :math:`M` pentadiagonal (its banded Cholesky factor :math:`U` is
computed once, in float64, O(n)), :math:`P` the chord (2 entries per point) and :math:`V` the
curvature terms (4 entries per point: :math:`\gamma` at the interval's interior neighbours). So
applying ``W`` is a stencil, two triangular sweeps along the batch, and a 6-point gather per output
row; its transpose :math:`W^T g = P^T g + s\,Q\,U^{-1}U^{-T} V^T g` has the same structure (a scatter,
two sweeps, a stencil).

:class:`BandedSpline` holds these O(n + p) coefficients on a device (``float64``: the sweeps run in
float64 whatever the data's dtype, see ``ACCURACY`` below) and applies them with torch ops
(:meth:`BandedSpline.forward64`, :meth:`BandedSpline.transpose64`: the reference the kernels are tested
against; ``dres_fast.ops.banded`` makes them and the kernels differentiable). The sweeps are *blocked*, so a Python loop
over the batch never runs: the ``m = n - 2`` unknowns are cut into blocks of ``B``; each block's own
lower-triangular system is solved for all blocks at once (one batched triangular solve), and only the
last two unknowns of each block are carried to the next (a 2-wide recurrence over ``m / B`` blocks),
then a batched rank-2 correction adds the carry back. Work: ``2 m B d`` flops per sweep (``B`` = 32)
against ``2 n p d`` for the dense product.

ACCURACY. The factor of ``M`` is ill-conditioned for clustered knots at large :math:`\lambda` (Chebyshev
knots cluster like :math:`1/n^2` at the ends): in float32 the sweeps lose the contract at a few
thousand knots, in float64 they keep it (tests/test_banded.py). The solve gets the same one step of
iterative refinement as the dense weights (:mod:`dres_fast._banded`) when the configuration's probe says
the plain solve is off by more than ``REFINE_THRESHOLD``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ._banded import REFINE_THRESHOLD, PenalizedSystem

__all__ = ["BandedSpline", "BLOCK", "banded_coding"]

#: Rows per block of the blocked triangular sweeps: flops grow with it, the carry loop's length shrinks.
BLOCK = 32


class _BlockedSweep:
    r"""A triangular solve with two off-diagonals, by blocks of ``B`` rows, for all columns at once.

    Lower (``U^T z = r``, rows in order): with :math:`z_j` block ``j`` and :math:`t_{j-1}` the last two
    unknowns of the block before it, :math:`L_{jj} z_j = r_j - C_j t_{j-1}`, where :math:`C_j` (``B x 2``)
    has three entries. So :math:`z_j = y_j - S_j t_{j-1}` with :math:`y_j = L_{jj}^{-1} r_j` (all blocks in
    one batched solve) and :math:`S_j = L_{jj}^{-1} C_j` (precomputed); the carries follow
    :math:`t_j = y_j[-2:] - S_j[-2:] t_{j-1}`, a 2-row recurrence over the ``m / B`` blocks. Upper
    (``U x = z``) is the mirror image: blocks couple to the first two unknowns of the next block."""

    def __init__(self, diag: np.ndarray, sup1: np.ndarray, sup2: np.ndarray, upper: bool, block: int, device):
        # U[i, i] = diag[i], U[i-1, i] = sup1[i], U[i-2, i] = sup2[i]; the lower sweep solves with U^T
        m = diag.shape[0]
        block = max(2, min(block, m))
        blocks = -(-m // block)
        size = blocks * block  # padded with identity rows at the end, which couple to nothing
        d, s1, s2 = np.ones(size), np.zeros(size), np.zeros(size)
        d[:m], s1[1:m], s2[2:m] = diag, sup1[1:m], sup2[2:m]
        rows = np.arange(size).reshape(blocks, block)
        i = np.arange(block)
        local = np.zeros((blocks, block, block))  # the diagonal blocks of U (upper) or U^T (lower)
        local[:, i, i] = d[rows]
        coupling = np.zeros((blocks, block, 2))
        if upper:  # U[r, r+1] = s1[r+1], U[r, r+2] = s2[r+2]; t = (x[first], x[first+1]) of the next block
            local[:, i[:-1], i[1:]] = s1[rows[:, 1:]]
            local[:, i[:-2], i[2:]] = s2[rows[:, 2:]]
            following = np.minimum(rows[:, -1] + 1, size - 1)
            coupling[:, -2, 0] = s2[np.minimum(rows[:, -2] + 2, size - 1)]
            coupling[:, -1, 0] = s1[following]
            coupling[:, -1, 1] = s2[np.minimum(rows[:, -1] + 2, size - 1)]
            coupling[-1] = 0.0
        else:  # U^T[r, r-1] = s1[r], U^T[r, r-2] = s2[r]; t = (z[last-1], z[last]) of the block before
            local[:, i[1:], i[:-1]] = s1[rows[:, 1:]]
            local[:, i[2:], i[:-2]] = s2[rows[:, 2:]]
            coupling[:, 0, 0], coupling[:, 0, 1] = s2[rows[:, 0]], s1[rows[:, 0]]
            coupling[:, 1, 1] = s2[rows[:, 1]]
            coupling[0] = 0.0
        self.m, self.block, self.blocks, self.upper = m, block, blocks, upper
        self.local = torch.from_numpy(local)
        self.spikes = torch.linalg.solve_triangular(self.local, torch.from_numpy(coupling), upper=upper).to(device)
        self.local = self.local.to(device)
        ends = slice(0, 2) if upper else slice(-2, None)
        self.spike_ends = self.spikes[:, ends, :].contiguous()
        self._ends = ends

    def __call__(self, rhs: torch.Tensor) -> torch.Tensor:
        m, block, blocks = self.m, self.block, self.blocks
        d = rhs.shape[1]
        padded = rhs if blocks * block == m else torch.cat([rhs, rhs.new_zeros(blocks * block - m, d)])
        y = torch.linalg.solve_triangular(self.local, padded.reshape(blocks, block, d), upper=self.upper)
        ends = y[:, self._ends, :]
        carries = [None] * blocks  # carries[j]: the two unknowns block j sees of the block solved before it
        carry = y.new_zeros(2, d)  # the first block solved has no neighbour
        for j in (range(blocks - 1, -1, -1) if self.upper else range(blocks)):
            carries[j] = carry
            carry = torch.addmm(ends[j], self.spike_ends[j], carry, alpha=-1)  # t_j = y_j[ends] - S_j[ends] t
        z = torch.baddbmm(y, self.spikes, torch.stack(carries), alpha=-1)
        return z.reshape(blocks * block, d)[:m]


class BandedSpline:
    r"""``W`` (``(p, n)``: ``n`` knots ``t`` to ``p`` points ``s``, smoothing ``lam``) as O(n + p) float64
    coefficients on ``device``. :meth:`forward64` is ``W @ x`` for float64 ``x`` of shape ``(n, d)``,
    :meth:`transpose64` is ``W^T @ g``; :attr:`arrays` and :attr:`refinement` are what the kernels read.
    ``lam = inf`` (the least-squares line) is rank 2: ``W = A B^T``."""

    def __init__(self, t: np.ndarray, s: np.ndarray, lam: float, device=None, block: int = BLOCK):
        from .splines import _curvature_entries, _evaluation_coefficients  # the dense weights' coefficients

        device = torch.device(device if device is not None else "cpu")
        self.shape = (s.shape[0], t.shape[0])
        self.lam, self.device = float(lam), device
        m = t.shape[0] - 2
        idx, p0, p1, c0, c1 = _evaluation_coefficients(t, s)
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        self.index = as_tensor(idx.astype(np.int64))
        self.chord = as_tensor(np.stack([p0, p1], axis=1))
        self.refine = False
        if math.isinf(lam):
            basis, _ = np.linalg.qr(np.stack([np.ones_like(t), t - t.mean()], axis=1))
            self.line = (as_tensor(p0[:, None] * basis[idx] + p1[:, None] * basis[idx + 1]), as_tensor(basis))
            return
        self.line = None
        system = PenalizedSystem(t, lam)
        scale = 1.0 / (1.0 + lam)
        self.stencil = as_tensor(np.stack([system.a, system.b, system.c]) * scale)  # s Q^T: x_j, x_j+1, x_j+2
        factor = system.factor  # upper banded storage: U[i,i] = f[2, i], U[i-1,i] = f[1, i], U[i-2,i] = f[0, i]
        # for the kernels: 1/U_ii, U_i-1,i, U_i-2,i, with the unused corners (i < 1, i < 2) zero
        self.factor = as_tensor(np.stack([1.0 / factor[2], np.append(0.0, factor[1, 1:]),
                                          np.append([0.0, 0.0], factor[0, 2:])[: m]]))
        self._bands, self._block, self._sweeps = factor, block, None  # the sweeps are built on first use
        curvature, columns = _curvature_entries(system, lam, idx, p0, p1, c0, c1)
        self.curvature, self.gather = as_tensor(curvature), as_tensor(columns.astype(np.int64))
        self.refine = bool(system._probe_correction() > REFINE_THRESHOLD)
        if self.refine:
            self.q_bands = as_tensor(np.stack([system.a, system.b, system.c]))
            self.r_bands = as_tensor(np.stack([system.r_diag, np.append(system.r_off, 0.0)]))

    # -- the pieces (float64 in, float64 out, no autograd) --------------------------------------------
    @staticmethod
    def _q_transpose(x: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
        """``Q^T x`` with Q's columns scaled as ``bands``: row j is ``a_j x_j + b_j x_{j+1} + c_j x_{j+2}``."""
        out = bands[0, :, None] * x[:-2]
        out.addcmul_(bands[1, :, None], x[1:-1])
        return out.addcmul_(bands[2, :, None], x[2:])

    @staticmethod
    def _add_q(out: torch.Tensor, bands: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``out += Q v`` (Q's columns scaled as ``bands``): v_j goes to rows j, j+1, j+2."""
        out[:-2].addcmul_(bands[0, :, None], v)
        out[1:-1].addcmul_(bands[1, :, None], v)
        out[2:].addcmul_(bands[2, :, None], v)
        return out

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``M^{-1} rhs = U^{-1} U^{-T} rhs``: ``U^T z = rhs``, then ``U x = z``."""
        if self._sweeps is None:  # only the torch ops need them (the kernels read ``factor``)
            bands = self._bands
            self._sweeps = tuple(_BlockedSweep(bands[2], bands[1], bands[0], upper, self._block, self.device)
                                 for upper in (False, True))
        lower, upper = self._sweeps
        return upper(lower(rhs))

    def _residual(self, x, gamma: torch.Tensor) -> torch.Tensor:
        """``s (Q^T (x - lam Q gamma) - R gamma)``, the residual of ``M gamma = s Q^T x`` in factored form
        (:mod:`dres_fast._banded`); ``x`` None: ``-s (lam Q^T Q + R) gamma``."""
        fit = self._add_q(gamma.new_zeros(gamma.shape[0] + 2, gamma.shape[1]), self.q_bands, gamma).mul_(-self.lam)
        if x is not None:
            fit += x
        out = self._q_transpose(fit, self.q_bands)
        r_diag, r_off = self.r_bands
        out.addcmul_(r_diag[:, None], gamma, value=-1)
        out[:-1].addcmul_(r_off[:-1, None], gamma[1:], value=-1)
        out[1:].addcmul_(r_off[:-1, None], gamma[:-1], value=-1)
        return out.div_(1.0 + self.lam)

    def forward64(self, x: torch.Tensor) -> torch.Tensor:
        """``W x`` for float64 ``x`` ``(n, d)``."""
        if self.line is not None:
            points_basis, basis = self.line
            return points_basis @ (basis.t() @ x)
        rhs = self._q_transpose(x, self.stencil)
        gamma = self._solve(rhs)
        if self.refine:  # one step of iterative refinement: gamma + M^-1 s (Q^T (x - lam Q gamma) - R gamma)
            gamma += self._solve(self._residual(x, gamma))
        idx, chord, curvature, gather = self.index, self.chord, self.curvature, self.gather
        out = chord[:, :1] * x.index_select(0, idx)
        out.addcmul_(chord[:, 1:], x.index_select(0, idx + 1))
        for k in range(4):
            out.addcmul_(curvature[:, k, None], gamma.index_select(0, gather[:, k]))
        return out

    def transpose64(self, g: torch.Tensor) -> torch.Tensor:
        """``W^T g`` for float64 ``g`` ``(p, d)``: ``P^T g + s Q M^{-1} V^T g``. With refinement the forward
        map's ``gamma`` is ``(2 G - G N G) s Q^T x`` (``G = M^{-1}``, ``N = s (lam Q^T Q + R)``, both symmetric),
        so its transpose applies ``2 G - G N G`` to ``V^T g``: one refined solve."""
        n, d = self.shape[1], g.shape[1]
        if self.line is not None:
            points_basis, basis = self.line
            return basis @ (points_basis.t() @ g)
        idx, chord, curvature, gather = self.index, self.chord, self.curvature, self.gather
        out = g.new_zeros(n, d)
        out.index_add_(0, idx, g * chord[:, :1])
        out.index_add_(0, idx + 1, g * chord[:, 1:])
        v = g.new_zeros(n - 2, d)
        for k in range(4):
            v.index_add_(0, gather[:, k], g * curvature[:, k, None])
        u = self._solve(v)
        if self.refine:  # the same step for the transposed solve: u + M^-1 (v - M u), M u in factored form
            u += self._solve(self._residual(None, u) + v)
        return self._add_q(out, self.stencil, u)

    @property
    def arrays(self):
        """What the backend kernels read: ``(factor, stencil, index, chord, curvature, gather)``."""
        return (self.factor, self.stencil, self.index, self.chord, self.curvature, self.gather)

    @property
    def refinement(self):
        """``(q_bands, r_bands, lam)`` for the kernels' refinement step, or ``None`` when the plain solve is
        accurate enough (the configuration's probe: :data:`dres_fast._banded.REFINE_THRESHOLD`)."""
        return (self.q_bands, self.r_bands, self.lam) if self.refine else None


def banded_coding(spec, num_samples: int, device=None):
    """``(encoder, decoder)`` of ``spec`` for a batch of ``num_samples`` as :class:`BandedSpline` s: the
    same maps as :func:`dres_fast.splines.float64_weights`, in O(K + N) set-up and memory."""
    from .splines import as_knots, spec_lam

    num_samples, num_coded = spec.sizes(num_samples)
    alpha = as_knots(spec.alpha if isinstance(spec.alpha, str) else list(spec.alpha), num_samples, "alpha")
    beta = as_knots(spec.beta if isinstance(spec.beta, str) else list(spec.beta), num_coded, "beta")
    encoder = BandedSpline(alpha, beta, spec_lam(spec, "enc", alpha), device)
    decoder = BandedSpline(beta, alpha, spec_lam(spec, "dec", beta), device)
    return encoder, decoder
