"""Triton ``banded_apply``: a smoothing spline map ``W`` (``(p, n)``) or its transpose applied along the rows
of ``x`` from the O(n + p) float64 coefficients of :class:`dres_fast.banded.BandedSpline`, never a matrix.

Math (``m = n - 2``; ``arrays = (factor, stencil, index, chord, curvature, gather)``, all float64 / int64)
------------------------------------------------------------------------------------------------------------
Forward ``out = W x`` (``x`` ``(n, d)``, ``out`` ``(p, d)``), per column::

    rhs_i   = stencil[0,i] x_i + stencil[1,i] x_{i+1} + stencil[2,i] x_{i+2}            (s Q^T x)
    z_i     = (rhs_i - factor[1,i] z_{i-1} - factor[2,i] z_{i-2}) factor[0,i]          i = 0 .. m-1 (U^T z = rhs)
    gamma_i = (z_i - factor[1,i+1] gamma_{i+1} - factor[2,i+2] gamma_{i+2}) factor[0,i]  i = m-1 .. 0 (U gamma = z)
    out_r   = chord[r,0] x_{index_r} + chord[r,1] x_{index_r+1} + sum_k curvature[r,k] gamma_{gather[r,k]}

Transpose ``out = W^T g`` (``g`` ``(p, d)``, ``out`` ``(n, d)``): ``v = V^T g`` and ``P^T g`` by a scatter over
the rows of ``g``, ``u = M^{-1} v`` by the same two sweeps, then ``out_j = (P^T g)_j + stencil[0,j] u_j +
stencil[1,j-1] u_{j-1} + stencil[2,j-2] u_{j-2}`` (``s Q u``, gathered: no second scatter).

Kernel layout
-------------
One program owns ``BLOCK_D`` columns (grid ``cdiv(d, BLOCK_D)``) and runs every phase for them, so no program
reads another's data and no atomics are needed; phases meet through a float64 scratch in global memory (the
program's own columns, ``(m, d)``; the transpose adds ``(n, d)`` for ``P^T g``) with a CTA barrier between
phases. The recurrences are sequential along the rows, so they are latency-bound per program: rows are taken
``CHUNK`` at a time, the chunk's row loads issued together a chunk ahead (a tuple of rows held across the step,
so they overlap the previous chunk's recurrence); the recurrence steps through the chunk in registers and its
results are stored after its last row (no store between a chunk's coefficient loads, which the compiler may
then issue together). The evaluation ``out_r`` (forward) and the final stencil (transpose) are parallel over
rows: ``BLOCK_R`` rows per step, their loads first. Narrow data (d below ~32 x the multiprocessors) leaves most
of the GPU idle.

The transpose's scatter steps through the rows of ``g`` in order (``SCATTER_CHUNK`` rows' loads at a time) and
keeps the sums for the six target rows of the current row (4 of ``v``, 2 of ``P^T g``) in registers while the
next rows have the same targets (sorted points: every point of one knot interval), so memory is
read-modified-written (a branch on the scalar targets) once per run of equal targets: once per interval for
sorted points (p >> n: few), once per row otherwise (p <= n or unsorted points: one dependent memory round
trip per row). Duplicate targets within a row (clipped ``gather`` entries) are merged first.

Only 1-D ``(BLOCK_D,)`` rows and scalar coefficients, no 2-D tiles: ``BLOCK_D = 32 num_warps``, one column per
thread in every phase (the columns are declared non-contiguous, ``_columns``, so loads get no per-thread
vectors), so a thread only ever reads what it wrote itself (in-place sweeps, read-modify-write scatter, the
gathers of ``gamma``); the barriers between phases are belt and braces. ``BLOCK_D`` changes neither the
arithmetic nor its order: results do not depend on it. (2-D ``(rows, BLOCK_D)`` tiles with a register pick per
row depend on the compiler's choice of layout: Triton 3.6 puts such a tile's rows on threads (its order for
equal contiguity), so every row pick became a cross-thread reduction and every vector 8 registers per thread;
the transpose spilled at 255 registers. Now: no spills, at most 128 registers on Triton 3.6 (sm_90), 161 on
Triton 3.9 (sm_80), .ci/triton_compile.py; with the refinement step 196 and 168.)

Precision
---------
Every recurrence, product and sum runs in float64 whatever the data dtype; data is read and written in its
own dtype. The scratch is float64: a float32 scratch for ``z`` / ``gamma`` (``scratch_dtype``, kept only for
that measurement) gave fp32-data relative errors of 4.5e-4 (W) and 1.1e-3 (W^T) at 1024 Chebyshev knots and
dof 2.5, 1.4e-2 at 4096 and 7.7e-2 at 8192, against 2.6e-8 with the float64 scratch (vs float64 math).
Refinement (``REFINE``, where ``BandedSpline.refine`` is set): one step of iterative refinement of the solve,
in ``banded_solve.py`` with the sweeps.
"""

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_device, device_guard, launch, multiprocessors
from .banded_solve import _both, _columns, _lower_sweep, _refine, _solve_in_place, _store_rows, _upper_sweep

CHUNK = 8  # rows per step of a sweep (loaded a step ahead)
SCATTER_CHUNK = 4  # rows of g per step of the transpose's scatter (their coefficients loaded together)
BLOCK_R = 4  # rows per step of the parallel phases (loads of the step's rows together, then the stores)


@triton.jit
def _banded_forward_kernel(
    x_ptr, out_ptr, z_ptr, res_ptr,
    factor_ptr, stencil_ptr, index_ptr, chord_ptr, curv_ptr, gather_ptr, q_ptr, r_ptr, lam_ptr,
    n, p, d, stride_xr, stride_xd,
    CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, REFINE: tl.constexpr,
):
    cols = _columns(BLOCK_D)
    col_ok = cols < d
    m = n - 2
    stride_z = d  # row offsets are int64 (rows, index and gather are), so products with d are too
    _lower_sweep(x_ptr, stride_xr, stride_xd, z_ptr, stride_z, factor_ptr, stencil_ptr, m, cols, col_ok,
                 True, 2, CHUNK, BLOCK_D)
    tl.debug_barrier()
    _upper_sweep(z_ptr, stride_z, factor_ptr, m, cols, col_ok, CHUNK, BLOCK_D)
    tl.debug_barrier()
    if REFINE:
        _refine(z_ptr, res_ptr, x_ptr, stride_xr, stride_xd, q_ptr, r_ptr, lam_ptr, factor_ptr, stencil_ptr, m, cols,
                col_ok, stride_z, True, CHUNK, BLOCK_R, BLOCK_D)
    cols_x = cols * stride_xd
    for r0 in range(0, p, BLOCK_R):
        accs = ()
        for rr in tl.static_range(BLOCK_R):
            r = r0 + rr
            row_ok = r < p
            ok = _both(col_ok, row_ok)
            x_at = x_ptr + tl.load(index_ptr + r, mask=row_ok, other=0) * stride_xr + cols_x
            acc = tl.load(chord_ptr + 2 * r, mask=row_ok, other=0.0) * \
                tl.load(x_at, mask=ok, other=0.0).to(tl.float64)
            acc += tl.load(chord_ptr + 2 * r + 1, mask=row_ok, other=0.0) * \
                tl.load(x_at + stride_xr, mask=ok, other=0.0).to(tl.float64)
            for k in tl.static_range(4):
                col = tl.load(gather_ptr + 4 * r + k, mask=row_ok, other=0)
                weight = tl.load(curv_ptr + 4 * r + k, mask=row_ok, other=0.0)
                acc += weight * tl.load(z_ptr + col * stride_z + cols, mask=ok, other=0.0).to(tl.float64)
            accs = accs + (acc,)
        _store_rows(out_ptr, r0, accs, d, cols, col_ok, p, BLOCK_R)


@triton.jit
def _flush(v_ptr, pg_ptr, stride, cols, mask, idx, k0, k1, k2, k3, a0, a1, a2, a3, p0, p1):
    """``pg[idx] += p0``, ``pg[idx + 1] += p1``, ``v[k_i] += a_i``; equal targets among ``k_i`` get the sum of
    their terms (and the same value is stored for each)."""
    pg_at = pg_ptr + idx * stride + cols
    v0 = v_ptr + k0 * stride + cols
    v1 = v_ptr + k1 * stride + cols
    v2 = v_ptr + k2 * stride + cols
    v3 = v_ptr + k3 * stride + cols
    o0 = tl.load(pg_at, mask=mask, other=0.0)
    o1 = tl.load(pg_at + stride, mask=mask, other=0.0)
    w0 = tl.load(v0, mask=mask, other=0.0).to(tl.float64)
    w1 = tl.load(v1, mask=mask, other=0.0).to(tl.float64)
    w2 = tl.load(v2, mask=mask, other=0.0).to(tl.float64)
    w3 = tl.load(v3, mask=mask, other=0.0).to(tl.float64)
    e0 = a0 + tl.where(k1 == k0, a1, 0.0) + tl.where(k2 == k0, a2, 0.0) + tl.where(k3 == k0, a3, 0.0)
    e1 = a1 + tl.where(k0 == k1, a0, 0.0) + tl.where(k2 == k1, a2, 0.0) + tl.where(k3 == k1, a3, 0.0)
    e2 = a2 + tl.where(k0 == k2, a0, 0.0) + tl.where(k1 == k2, a1, 0.0) + tl.where(k3 == k2, a3, 0.0)
    e3 = a3 + tl.where(k0 == k3, a0, 0.0) + tl.where(k1 == k3, a1, 0.0) + tl.where(k2 == k3, a2, 0.0)
    tl.store(pg_at, o0 + p0, mask=mask)
    tl.store(pg_at + stride, o1 + p1, mask=mask)
    tl.store(v0, (w0 + e0).to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(v1, (w1 + e1).to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(v2, (w2 + e2).to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(v3, (w3 + e3).to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_row(g_ptr, r, p, stride_gr, cols_g, col_ok, index_ptr, chord_ptr, curv_ptr, gather_ptr):
    """Row ``r`` of ``g`` (float64) and its coefficients (scalars): ``(g_r, index, gather[4], chord[2],
    curvature[4])``; past ``p``: targets -1 and weights 0."""
    ok = r < p
    g_r = tl.load(g_ptr + tl.cast(r, tl.int64) * stride_gr + cols_g, mask=_both(col_ok, ok), other=0.0)
    return (g_r.to(tl.float64),
            tl.load(index_ptr + r, mask=ok, other=-1),
            tl.load(gather_ptr + 4 * r, mask=ok, other=-1), tl.load(gather_ptr + 4 * r + 1, mask=ok, other=-1),
            tl.load(gather_ptr + 4 * r + 2, mask=ok, other=-1), tl.load(gather_ptr + 4 * r + 3, mask=ok, other=-1),
            tl.load(chord_ptr + 2 * r, mask=ok, other=0.0), tl.load(chord_ptr + 2 * r + 1, mask=ok, other=0.0),
            tl.load(curv_ptr + 4 * r, mask=ok, other=0.0), tl.load(curv_ptr + 4 * r + 1, mask=ok, other=0.0),
            tl.load(curv_ptr + 4 * r + 2, mask=ok, other=0.0), tl.load(curv_ptr + 4 * r + 3, mask=ok, other=0.0))


@triton.jit
def _banded_transpose_kernel(
    g_ptr, out_ptr, v_ptr, pg_ptr, b_ptr, res_ptr,
    factor_ptr, stencil_ptr, index_ptr, chord_ptr, curv_ptr, gather_ptr, q_ptr, r_ptr, lam_ptr,
    n, p, d, stride_gr, stride_gd,
    CHUNK: tl.constexpr, SCATTER_CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    REFINE: tl.constexpr,
):
    cols = _columns(BLOCK_D)
    col_ok = cols < d
    m = n - 2
    stride = d  # of both scratches (zeroed by the launcher); row offsets are int64
    cols_g = cols * stride_gd

    # 1. v = V^T g, pg = P^T g: the targets (scalars: the same for every column) and the sums of the current
    # run of rows with equal targets stay in registers; a run's sums are added to memory when it ends
    cur = tl.full((), -1, tl.int64)  # the current targets (-1: none yet)
    ck0 = cur
    ck1 = cur
    ck2 = cur
    ck3 = cur
    a0 = tl.zeros((BLOCK_D,), dtype=tl.float64)
    a1 = a0
    a2 = a0
    a3 = a0
    q0 = a0
    q1 = a0
    for r0 in range(0, p, SCATTER_CHUNK):
        step = ()  # the step's loads first: no flush's store sits between them
        for j in tl.static_range(SCATTER_CHUNK):
            step = step + (_scatter_row(g_ptr, r0 + j, p, stride_gr, cols_g, col_ok, index_ptr, chord_ptr,
                                        curv_ptr, gather_ptr),)
        for j in tl.static_range(SCATTER_CHUNK):
            gr, idx, k0, k1, k2, k3, h0, h1, c0, c1, c2, c3 = step[j]
            new = (idx != cur) | (k0 != ck0) | (k1 != ck1) | (k2 != ck2) | (k3 != ck3)
            if new & (cur >= 0):
                _flush(v_ptr, pg_ptr, stride, cols, col_ok, cur, ck0, ck1, ck2, ck3, a0, a1, a2, a3, q0, q1)
            q0 = tl.where(new, 0.0, q0) + h0 * gr
            q1 = tl.where(new, 0.0, q1) + h1 * gr
            a0 = tl.where(new, 0.0, a0) + c0 * gr
            a1 = tl.where(new, 0.0, a1) + c1 * gr
            a2 = tl.where(new, 0.0, a2) + c2 * gr
            a3 = tl.where(new, 0.0, a3) + c3 * gr
            cur = idx
            ck0 = k0
            ck1 = k1
            ck2 = k2
            ck3 = k3
    if cur >= 0:
        _flush(v_ptr, pg_ptr, stride, cols, col_ok, cur, ck0, ck1, ck2, ck3, a0, a1, a2, a3, q0, q1)
    tl.debug_barrier()

    # 2. u = M^{-1} v, in place (with REFINE: v kept in b first, then one refinement step)
    if REFINE:
        for j0 in range(0, m, BLOCK_R):
            rows = ()
            for jj in tl.static_range(BLOCK_R):
                rows = rows + (tl.load(v_ptr + tl.cast(j0 + jj, tl.int64) * stride + cols,
                                       mask=_both(col_ok, j0 + jj < m), other=0.0).to(tl.float64),)
            _store_rows(b_ptr, j0, rows, stride, cols, col_ok, m, BLOCK_R)
        tl.debug_barrier()
    _solve_in_place(v_ptr, stride, factor_ptr, stencil_ptr, m, cols, col_ok, CHUNK, BLOCK_D)
    if REFINE:
        _refine(v_ptr, res_ptr, b_ptr, stride, 1, q_ptr, r_ptr, lam_ptr, factor_ptr, stencil_ptr, m, cols, col_ok,
                stride, False, CHUNK, BLOCK_R, BLOCK_D)

    # 3. out_j = pg_j + stencil[0,j] u_j + stencil[1,j-1] u_{j-1} + stencil[2,j-2] u_{j-2}
    for j0 in range(0, n, BLOCK_R):
        accs = ()
        for jj in tl.static_range(BLOCK_R):
            j = j0 + jj
            ok = _both(col_ok, j < n)
            acc = tl.load(pg_ptr + tl.cast(j, tl.int64) * stride + cols, mask=ok, other=0.0)
            for k in tl.static_range(3):
                i = j - k
                i_ok = _both(_both(j < n, i >= 0), i < m)
                weight = tl.load(stencil_ptr + k * m + i, mask=i_ok, other=0.0)
                u = tl.load(v_ptr + tl.cast(i, tl.int64) * stride + cols, mask=_both(col_ok, i_ok), other=0.0)
                acc += weight * u.to(tl.float64)
            accs = accs + (acc,)
        _store_rows(out_ptr, j0, accs, d, cols, col_ok, n, BLOCK_R)


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------


def launch_num_warps(d, device):
    """Warps per program (``BLOCK_D = 32 num_warps``): 4 when that still gives 4 programs per multiprocessor,
    fewer for narrow data (down to one warp, 32 columns); numerics do not depend on it."""
    programs_wanted = 4 * multiprocessors(device)
    for warps in (4, 2):
        if triton.cdiv(d, 32 * warps) >= programs_wanted:
            return warps
    return 1


def banded_apply(arrays, x, transpose: bool, refinement=None, scratch_dtype=torch.float64):
    """``W @ x`` (``x`` ``(n, d)`` -> ``(p, d)``) or, with ``transpose``, ``W^T @ x`` (``(p, d)`` -> ``(n, d)``),
    in ``x``'s dtype, computed in float64. ``arrays = (factor, stencil, index, chord, curvature, gather)`` of a
    ``BandedSpline`` with finite ``lam`` (contiguous, on ``x``'s device). ``x`` may have any strides.
    ``refinement = (q_bands, r_bands, lam)`` (``BandedSpline.refinement``): one step of iterative refinement
    of the solve. ``scratch_dtype``: of the intermediate rows (float64; float32 only for measurements)."""
    factor, stencil, index, chord, curvature, gather = arrays
    check_device(x, factor)
    # validated where the spline is built: asserted here, not checked again
    m = factor.shape[1]
    n, p = m + 2, index.shape[0]
    assert x.dim() == 2 and x.shape[0] == (p if transpose else n), (x.shape, n, p, transpose)
    assert factor.shape == (3, m) and stencil.shape == (3, m) and m >= 1, (factor.shape, stencil.shape)
    assert chord.shape == (p, 2) and curvature.shape == (p, 4) and gather.shape == (p, 4), (chord.shape, gather.shape)
    assert all(a.is_contiguous() for a in arrays), "the spline's arrays must be contiguous"
    assert factor.dtype == stencil.dtype == chord.dtype == curvature.dtype == torch.float64
    assert index.dtype == gather.dtype == torch.int64
    d = x.shape[1]
    out = torch.empty((n if transpose else p, d), dtype=x.dtype, device=x.device)
    if d == 0 or out.shape[0] == 0:
        return out
    warps = 1 if INTERPRET else launch_num_warps(d, x.device)
    block_d = 32 * warps
    grid = (triton.cdiv(d, block_d),)
    refine = refinement is not None
    if refine:
        q_bands, r_bands, lam = refinement
        assert q_bands.shape == (3, m) and r_bands.shape == (2, m), (q_bands.shape, r_bands.shape)
        assert q_bands.is_contiguous() and r_bands.is_contiguous() and q_bands.dtype == r_bands.dtype == torch.float64
        lam = torch.tensor([float(lam)], dtype=torch.float64, device=x.device)  # read by the kernel in float64
    else:
        q_bands = r_bands = lam = factor  # not read: no tensor made for them on the plain solve's calls
    scratch = lambda: torch.empty((m, d), dtype=torch.float64, device=x.device)  # noqa: E731
    res = scratch() if refine else factor
    with device_guard(x):
        if transpose:
            v = torch.zeros((m, d), dtype=scratch_dtype, device=x.device)
            pg = torch.zeros((n, d), dtype=torch.float64, device=x.device)
            launch(_banded_transpose_kernel, grid, x, out, v, pg, scratch() if refine else factor, res, factor,
                   stencil, index, chord, curvature, gather, q_bands, r_bands, lam, n, p, d, x.stride(0),
                   x.stride(1), CHUNK=CHUNK, SCATTER_CHUNK=SCATTER_CHUNK, BLOCK_R=BLOCK_R, BLOCK_D=block_d,
                   REFINE=refine, num_warps=warps, num_stages=1)
        else:
            z = torch.empty((m, d), dtype=scratch_dtype, device=x.device)
            launch(_banded_forward_kernel, grid, x, out, z, res, factor, stencil, index, chord, curvature, gather,
                   q_bands, r_bands, lam, n, p, d, x.stride(0), x.stride(1), CHUNK=CHUNK, BLOCK_R=BLOCK_R,
                   BLOCK_D=block_d, REFINE=refine, num_warps=warps, num_stages=1)
    return out
