"""The recurrences of the Triton banded maps (``banded.py``): a program's column rows, the two triangular sweeps
of ``M = U^T U`` and the step of iterative refinement, each over the program's own ``(BLOCK_D,)`` columns of a
float64 scratch in global memory (the sweeps' layout and latency hiding: ``banded.py``'s docstring).

Refinement (``REFINE``, where ``BandedSpline.refine`` is set: it matters for every dtype, e.g. 8192 Chebyshev
knots at dof 2.5, where the unrefined float64 solve is 9.4e-5 from the refined one): one step of iterative
refinement of the solve, the residual in factored form as ``dres_fast/_banded.py`` and the CPU kernel form it
(``q_bands`` (3, m) Q's columns, ``r_bands`` (2, m) R's diagonal and off-diagonal, ``s = 1 / (1 + lam)``)::

    fit_i   = F_i - lam (qa_i g_i + qb_{i-1} g_{i-1} + qc_{i-2} g_{i-2})                     (F - lam Q gamma)
    res_j   = b_j + s (qa_j fit_j + qb_j fit_{j+1} + qc_j fit_{j+2} - rd_j g_j - ro_j g_{j+1} - ro_{j-1} g_{j-1})
    gamma  += M^{-1} res

Forward: ``F = x``, ``b = 0``; transpose: ``F = 0``, ``b = v`` (a copy of ``V^T g`` kept before the solve).
``res`` is parallel over rows (gamma's five neighbouring rows gathered, no ``fit`` scratch), then the same two
sweeps on a second ``(m, d)`` scratch, then the add.
"""

import triton
import triton.language as tl


@triton.jit
def _columns(BLOCK_D: tl.constexpr):
    """The program's columns (int64), declared non-contiguous: memory ops then get no per-thread vectors, so
    every ``(BLOCK_D,)`` row keeps the one-column-per-thread layout of the arithmetic (no conversions)."""
    return tl.max_contiguous(tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D), 1)


@triton.jit
def _both(mask, cond):
    """``mask & cond`` for a ``(BLOCK_D,)`` mask and a scalar condition, as a boolean mask also in the
    interpreter (there ``&`` with a scalar or a Python bool gives int32, which it refuses as a mask)."""
    return tl.where(cond, mask, False)


@triton.jit
def _rows(ptr, c0, stride_r, cols_s, col_ok, m, SHIFT: tl.constexpr, CHUNK: tl.constexpr):
    """Rows ``c0 + SHIFT + j`` (``j < CHUNK``) of a ``(rows, d)`` operand in its own dtype, a tuple of
    ``(BLOCK_D,)`` rows; rows whose ``c0 + j`` is outside ``0 .. m-1`` as 0."""
    tile = ()
    for j in tl.static_range(CHUNK):
        i = c0 + j
        ok = _both(_both(col_ok, i >= 0), i < m)
        tile = tile + (tl.load(ptr + tl.cast(i + SHIFT, tl.int64) * stride_r + cols_s, mask=ok, other=0.0),)
    return tile


@triton.jit
def _store_rows(ptr, r0, rows, stride_r, cols, col_ok, limit, R: tl.constexpr):
    """Rows ``r0 .. r0 + R - 1`` (those below ``limit``) of ``ptr`` from the tuple ``rows`` (float64)."""
    for j in tl.static_range(R):
        r = r0 + j
        tl.store(ptr + tl.cast(r, tl.int64) * stride_r + cols, rows[j].to(ptr.dtype.element_ty),
                 mask=_both(col_ok, r < limit))


@triton.jit
def _lower_sweep(src_ptr, stride_sr, stride_sd, z_ptr, stride_z, factor_ptr, stencil_ptr, m, cols, col_ok,
                 FROM_STENCIL: tl.constexpr, SHIFT: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """``z = U^{-T} rhs`` into ``z_ptr`` (rows 0..m-1). ``FROM_STENCIL``: ``rhs = s Q^T x`` from ``x`` at
    ``src_ptr`` (``n`` rows, data dtype); else ``rhs`` is the scratch at ``src_ptr`` (may be ``z_ptr``: the
    chunk loaded ahead is never one being written). Each step loads the next chunk before working through its
    own, so the load's latency overlaps the recurrence; its results are stored after its last row, so no store
    sits between its coefficient loads. ``SHIFT``: 2 with ``FROM_STENCIL`` (the chunk's rows of ``x`` are
    ``x_{i+2}``), else 0."""
    cols_s = cols * stride_sd
    z1 = tl.zeros((BLOCK_D,), dtype=tl.float64)  # z_{i-1}
    z2 = z1  # z_{i-2}
    xa = z1  # x_i, x_{i+1} (FROM_STENCIL)
    xb = z1
    if FROM_STENCIL:
        xa = tl.load(src_ptr + cols_s, mask=col_ok, other=0.0).to(tl.float64)
        xb = tl.load(src_ptr + stride_sr + cols_s, mask=col_ok, other=0.0).to(tl.float64)
    tile = _rows(src_ptr, 0, stride_sr, cols_s, col_ok, m, SHIFT, CHUNK)
    for c0 in range(0, m, CHUNK):
        ahead = _rows(src_ptr, c0 + CHUNK, stride_sr, cols_s, col_ok, m, SHIFT, CHUNK)
        zs = ()
        for j in tl.static_range(CHUNK):
            i = c0 + j
            inside = i < m
            f0 = tl.load(factor_ptr + i, mask=inside, other=0.0)  # 0 past the end: z = 0 there
            f1 = tl.load(factor_ptr + m + i, mask=inside, other=0.0)
            f2 = tl.load(factor_ptr + 2 * m + i, mask=inside, other=0.0)
            if FROM_STENCIL:
                s0 = tl.load(stencil_ptr + i, mask=inside, other=0.0)
                s1 = tl.load(stencil_ptr + m + i, mask=inside, other=0.0)
                s2 = tl.load(stencil_ptr + 2 * m + i, mask=inside, other=0.0)
                xc = tile[j].to(tl.float64)
                rhs = s0 * xa + s1 * xb + s2 * xc
                xa = xb
                xb = xc
            else:
                rhs = tile[j].to(tl.float64)
            z = (rhs - f1 * z1 - f2 * z2) * f0
            zs = zs + (z,)
            z2 = z1
            z1 = z
        _store_rows(z_ptr, c0, zs, stride_z, cols, col_ok, m, CHUNK)
        tile = ahead


@triton.jit
def _upper_sweep(z_ptr, stride_z, factor_ptr, m, cols, col_ok, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """``gamma = U^{-1} z`` in place (rows m-1 .. 0), chunks from the last, the next one loaded ahead."""
    g1 = tl.zeros((BLOCK_D,), dtype=tl.float64)  # gamma_{i+1}
    g2 = g1  # gamma_{i+2}
    num_chunks = tl.cdiv(m, CHUNK)
    tile = _rows(z_ptr, (num_chunks - 1) * CHUNK, stride_z, cols, col_ok, m, 0, CHUNK)
    for c in range(0, num_chunks):
        c0 = (num_chunks - 1 - c) * CHUNK
        ahead = _rows(z_ptr, c0 - CHUNK, stride_z, cols, col_ok, m, 0, CHUNK)
        gs = ()
        for j in tl.static_range(CHUNK - 1, -1, -1):
            i = c0 + j
            f0 = tl.load(factor_ptr + i, mask=i < m, other=0.0)  # 0 past the end: gamma = 0 there
            f1 = tl.load(factor_ptr + m + i + 1, mask=i + 1 < m, other=0.0)
            f2 = tl.load(factor_ptr + 2 * m + i + 2, mask=i + 2 < m, other=0.0)
            g = (tile[j].to(tl.float64) - f1 * g1 - f2 * g2) * f0
            gs = (g,) + gs  # gs[j]: row c0 + j
            g2 = g1
            g1 = g
        _store_rows(z_ptr, c0, gs, stride_z, cols, col_ok, m, CHUNK)
        tile = ahead


@triton.jit
def _solve_in_place(z_ptr, stride, factor_ptr, stencil_ptr, m, cols, col_ok, CHUNK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """``z = M^{-1} z`` for the scratch at ``z_ptr``: both sweeps, a barrier after each."""
    _lower_sweep(z_ptr, stride, 1, z_ptr, stride, factor_ptr, stencil_ptr, m, cols, col_ok, False, 0, CHUNK, BLOCK_D)
    tl.debug_barrier()
    _upper_sweep(z_ptr, stride, factor_ptr, m, cols, col_ok, CHUNK, BLOCK_D)
    tl.debug_barrier()


@triton.jit
def _refine(gamma_ptr, res_ptr, src_ptr, stride_sr, stride_sd, q_ptr, r_ptr, lam_ptr, factor_ptr, stencil_ptr, m,
            cols, col_ok, stride, SRC_IS_DATA: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """One refinement step of ``gamma`` (scratch ``(m, d)`` at ``gamma_ptr``; ``res_ptr``: a second one).
    ``SRC_IS_DATA``: the forward's, ``F = x`` from ``src_ptr`` (``n`` rows, data dtype) and ``b = 0``; else the
    transpose's, ``F = 0`` and ``b`` the scratch at ``src_ptr``. ``lam`` is read from memory (``lam_ptr``, one
    float64): a Python float argument would reach the kernel as float32, and the transposed residual cancels
    to ~1e-11 of its terms (1.3e-7 relative error through a float32 lam at 97 knots, lam = 1e6)."""
    lam = tl.load(lam_ptr)
    s = 1.0 / (1.0 + lam)
    cols_s = cols * stride_sd
    for j0 in range(0, m, BLOCK_R):
        res_rows = ()
        for jj in tl.static_range(BLOCK_R):
            j = j0 + jj
            g = ()  # gamma_{j-2} .. gamma_{j+2}, 0 outside 0..m-1
            for k in tl.static_range(5):
                i = j - 2 + k
                i_ok = _both(_both(col_ok, i >= 0), i < m)
                g = g + (tl.load(gamma_ptr + tl.cast(i, tl.int64) * stride + cols, mask=i_ok, other=0.0).to(tl.float64),)
            res = tl.zeros((BLOCK_D,), dtype=tl.float64)
            for t in tl.static_range(3):  # fit_{j+t} and its weight in (Q^T fit)_j
                i = j + t
                qa = tl.load(q_ptr + i, mask=i < m, other=0.0)
                qb = tl.load(q_ptr + m + i - 1, mask=_both(i - 1 >= 0, i - 1 < m), other=0.0)
                qc = tl.load(q_ptr + 2 * m + i - 2, mask=_both(i - 2 >= 0, i - 2 < m), other=0.0)
                fit = -lam * (qa * g[2 + t] + qb * g[1 + t] + qc * g[t])
                if SRC_IS_DATA:
                    fit += tl.load(src_ptr + tl.cast(i, tl.int64) * stride_sr + cols_s,
                                   mask=_both(col_ok, i < m + 2), other=0.0).to(tl.float64)
                weight = tl.load(q_ptr + t * m + j, mask=j < m, other=0.0)
                res += weight * fit
            rd = tl.load(r_ptr + j, mask=j < m, other=0.0)
            ro = tl.load(r_ptr + m + j, mask=j < m, other=0.0)
            ro_m = tl.load(r_ptr + m + j - 1, mask=_both(j >= 1, j - 1 < m), other=0.0)
            res = s * (res - rd * g[2] - ro * g[3] - ro_m * g[1])
            if not SRC_IS_DATA:
                res += tl.load(src_ptr + tl.cast(j, tl.int64) * stride_sr + cols_s,
                               mask=_both(col_ok, j < m), other=0.0).to(tl.float64)
            res_rows = res_rows + (res,)
        _store_rows(res_ptr, j0, res_rows, stride, cols, col_ok, m, BLOCK_R)
    tl.debug_barrier()
    _solve_in_place(res_ptr, stride, factor_ptr, stencil_ptr, m, cols, col_ok, CHUNK, BLOCK_D)
    for j0 in range(0, m, BLOCK_R):  # gamma += the correction
        rows = ()
        for jj in tl.static_range(BLOCK_R):
            j = j0 + jj
            ok = _both(col_ok, j < m)
            at = tl.cast(j, tl.int64) * stride + cols
            rows = rows + (tl.load(gamma_ptr + at, mask=ok, other=0.0).to(tl.float64)
                           + tl.load(res_ptr + at, mask=ok, other=0.0).to(tl.float64),)
        _store_rows(gamma_ptr, j0, rows, stride, cols, col_ok, m, BLOCK_R)
    tl.debug_barrier()
