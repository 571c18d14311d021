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
``CHUNK`` at a time, one 2-D load per chunk (all its loads in flight together, issued a chunk ahead so they
overlap the previous chunk's recurrence); the recurrence steps through the chunk in registers (``_pick``: a
thread holds its column's ``CHUNK`` rows, so picking a row is a register choice) and the chunk's results go
out in one 2-D store. The evaluation ``out_r`` (forward) and the final stencil (transpose) are parallel over
rows: ``BLOCK_R``-row tiles. Narrow data (d below ~32 x the multiprocessors) leaves most of the GPU idle.

The transpose's scatter steps through the rows of ``g`` in order and keeps the six target rows of the current
row (4 of ``v``, 2 of ``P^T g``) in registers while the next rows have the same targets (sorted points: every
point of one knot interval), so memory is read-modified-written once per run of equal targets: once per
interval for sorted points (p >> n: few), once per row otherwise (p <= n or unsorted points: one dependent
memory round trip per row). Duplicate targets within a row (clipped ``gather`` entries) are merged first.

``BLOCK_D = 32 num_warps``: one column per thread in every phase (the columns are declared non-contiguous,
``_columns``, so no tile spreads a column's rows over threads), so a thread only ever reads what it wrote
itself (in-place sweeps, read-modify-write scatter, the gathers of ``gamma``); the barriers between phases are
belt and braces. ``BLOCK_D`` changes neither the arithmetic nor its order: results do not depend on it.

Precision
---------
Every recurrence, product and sum runs in float64 whatever the data dtype; data is read and written in its
own dtype. The scratch is float64: a float32 scratch for ``z`` / ``gamma`` (``scratch_dtype``, kept only for
that measurement) gave fp32-data relative errors of 4.5e-4 (W) and 1.1e-3 (W^T) at 1024 Chebyshev knots and
dof 2.5, 1.4e-2 at 4096 and 7.7e-2 at 8192, against 2.6e-8 with the float64 scratch (vs float64 math).
No refinement step: where ``BandedSpline.refine`` is set, the torch path refines, and it matters for every
dtype (8192 Chebyshev knots, dof 2.5: the unrefined float64 solve, here or in torch, is 9.4e-5 from the
refined one), so such splines must take the torch path.
"""

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_device, device_guard, launch, multiprocessors

CHUNK = 8  # rows per step of a sweep
SCATTER_CHUNK = 4  # rows of g per step of the transpose's scatter (12 coefficient tiles: registers)
BLOCK_R = 8  # rows per tile of the parallel phases


@triton.jit
def _columns(BLOCK_D: tl.constexpr):
    """The program's columns (int64), declared non-contiguous: memory ops then get no per-thread vectors, so a
    ``(CHUNK, BLOCK_D)`` tile puts a column's rows in one thread (threads along the columns) and ``_pick`` is a
    register choice. With vectors of 4 fp32 the tile would spread its rows over 4 threads and every pick would
    be a cross-thread reduction (registers, shared memory, conversions)."""
    return tl.max_contiguous(tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D), 1)


@triton.jit
def _pick(tile, rowid, j):
    """Row ``j`` of a ``(CHUNK, BLOCK_D)`` tile as a ``(BLOCK_D,)`` vector."""
    return tl.sum(tl.where(rowid[:, None] == j, tile, 0), axis=0)


@triton.jit
def _chunk(ptr, c0, stride_r, cols_s, col_ok, m, rowid, shift: tl.constexpr):
    """Rows ``c0 + shift .. c0 + shift + CHUNK - 1`` of a ``(rows, BLOCK_D)`` operand in its own dtype, rows whose
    ``c0 + j`` is outside ``0 .. m-1`` as 0."""
    rows = (c0 + rowid).to(tl.int64)
    ok = ((rows >= 0) & (rows < m))[:, None] & col_ok[None, :]
    return tl.load(ptr + (rows + shift)[:, None] * stride_r + cols_s[None, :], mask=ok, other=0.0)


@triton.jit
def _lower_sweep(src_ptr, stride_sr, stride_sd, z_ptr, stride_z, factor_ptr, stencil_ptr, m, cols, col_ok,
                 FROM_STENCIL: tl.constexpr, SHIFT: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """``z = U^{-T} rhs`` into ``z_ptr`` (rows 0..m-1). ``FROM_STENCIL``: ``rhs = s Q^T x`` from ``x`` at
    ``src_ptr`` (``n`` rows, data dtype); else ``rhs`` is the scratch at ``src_ptr`` (may be ``z_ptr``: the
    chunk loaded ahead is never one being written). Each step loads the next chunk before working through its
    own, so the load's latency overlaps the recurrence. ``SHIFT``: 2 with ``FROM_STENCIL`` (the chunk's rows of
    ``x`` are ``x_{i+2}``), else 0."""
    rowid = tl.arange(0, CHUNK)
    cols_s = cols * stride_sd
    z1 = tl.zeros((BLOCK_D,), dtype=tl.float64)  # z_{i-1}
    z2 = tl.zeros((BLOCK_D,), dtype=tl.float64)  # z_{i-2}
    xa = z1  # x_i, x_{i+1} (FROM_STENCIL)
    xb = z1
    if FROM_STENCIL:
        xa = tl.load(src_ptr + cols_s, mask=col_ok, other=0.0).to(tl.float64)
        xb = tl.load(src_ptr + stride_sr + cols_s, mask=col_ok, other=0.0).to(tl.float64)
    tile = _chunk(src_ptr, 0, stride_sr, cols_s, col_ok, m, rowid, SHIFT)
    for c0 in range(0, m, CHUNK):
        ahead = _chunk(src_ptr, c0 + CHUNK, stride_sr, cols_s, col_ok, m, rowid, SHIFT)
        z_tile = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float64)
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
                xc = _pick(tile, rowid, j).to(tl.float64)
                rhs = s0 * xa + s1 * xb + s2 * xc
                xa = xb
                xb = xc
            else:
                rhs = _pick(tile, rowid, j).to(tl.float64)
            z = (rhs - f1 * z1 - f2 * z2) * f0
            z_tile = tl.where(rowid[:, None] == j, z[None, :], z_tile)
            z2 = z1
            z1 = z
        rows = (c0 + rowid).to(tl.int64)
        ok = (rows < m)[:, None] & col_ok[None, :]
        tl.store(z_ptr + rows[:, None] * stride_z + cols[None, :], z_tile.to(z_ptr.dtype.element_ty), mask=ok)
        tile = ahead


@triton.jit
def _upper_sweep(z_ptr, stride_z, factor_ptr, m, cols, col_ok, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """``gamma = U^{-1} z`` in place (rows m-1 .. 0), chunks from the last, the next one loaded ahead."""
    rowid = tl.arange(0, CHUNK)
    g1 = tl.zeros((BLOCK_D,), dtype=tl.float64)  # gamma_{i+1}
    g2 = tl.zeros((BLOCK_D,), dtype=tl.float64)  # gamma_{i+2}
    num_chunks = tl.cdiv(m, CHUNK)
    tile = _chunk(z_ptr, (num_chunks - 1) * CHUNK, stride_z, cols, col_ok, m, rowid, 0)
    for c in range(0, num_chunks):
        c0 = (num_chunks - 1 - c) * CHUNK
        ahead = _chunk(z_ptr, c0 - CHUNK, stride_z, cols, col_ok, m, rowid, 0)
        g_tile = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float64)
        for jj in tl.static_range(CHUNK):
            j = CHUNK - 1 - jj
            i = c0 + j
            f0 = tl.load(factor_ptr + i, mask=i < m, other=0.0)  # 0 past the end: gamma = 0 there
            f1 = tl.load(factor_ptr + m + i + 1, mask=i + 1 < m, other=0.0)
            f2 = tl.load(factor_ptr + 2 * m + i + 2, mask=i + 2 < m, other=0.0)
            g = (_pick(tile, rowid, j).to(tl.float64) - f1 * g1 - f2 * g2) * f0
            g_tile = tl.where(rowid[:, None] == j, g[None, :], g_tile)
            g2 = g1
            g1 = g
        rows = (c0 + rowid).to(tl.int64)
        ok = (rows < m)[:, None] & col_ok[None, :]
        tl.store(z_ptr + rows[:, None] * stride_z + cols[None, :], g_tile.to(z_ptr.dtype.element_ty), mask=ok)
        tile = ahead


@triton.jit
def _banded_forward_kernel(
    x_ptr, out_ptr, z_ptr,
    factor_ptr, stencil_ptr, index_ptr, chord_ptr, curv_ptr, gather_ptr,
    n, p, d, stride_xr, stride_xd,
    CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
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
    cols_x = cols * stride_xd
    for r0 in range(0, p, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < p
        ok = row_ok[:, None] & col_ok[None, :]
        idx = tl.load(index_ptr + rows, mask=row_ok, other=0)
        x_at = x_ptr + idx[:, None] * stride_xr + cols_x[None, :]
        acc = tl.load(chord_ptr + 2 * rows, mask=row_ok, other=0.0)[:, None] * \
            tl.load(x_at, mask=ok, other=0.0).to(tl.float64)
        acc += tl.load(chord_ptr + 2 * rows + 1, mask=row_ok, other=0.0)[:, None] * \
            tl.load(x_at + stride_xr, mask=ok, other=0.0).to(tl.float64)
        for k in tl.static_range(4):
            col = tl.load(gather_ptr + 4 * rows + k, mask=row_ok, other=0)
            weight = tl.load(curv_ptr + 4 * rows + k, mask=row_ok, other=0.0)
            gamma = tl.load(z_ptr + col[:, None] * stride_z + cols[None, :], mask=ok, other=0.0)
            acc += weight[:, None] * gamma.to(tl.float64)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


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
def _banded_transpose_kernel(
    g_ptr, out_ptr, v_ptr, pg_ptr,
    factor_ptr, stencil_ptr, index_ptr, chord_ptr, curv_ptr, gather_ptr,
    n, p, d, stride_gr, stride_gd,
    CHUNK: tl.constexpr, SCATTER_CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = _columns(BLOCK_D)
    col_ok = cols < d
    m = n - 2
    stride = d  # of both scratches (zeroed by the launcher); row offsets are int64
    cols_g = cols * stride_gd

    # 1. v = V^T g, pg = P^T g: the targets of the current interval stay in registers
    rowid = tl.max_contiguous(tl.arange(0, SCATTER_CHUNK), 1)  # no row vectors either (see _columns)
    lane0 = (cols * 0)[None, :]  # broadcast the rows' coefficients over the program's columns
    cur = tl.full((BLOCK_D,), -1, tl.int64)  # the current targets (-1: none yet)
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
        rows = (r0 + rowid).to(tl.int64)
        row_ok = rows < p
        tile_ok = row_ok[:, None] & (lane0 == 0)
        g_tile = tl.load(g_ptr + rows[:, None] * stride_gr + cols_g[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float64)
        at = rows[:, None] + lane0
        idx_t = tl.load(index_ptr + at, mask=tile_ok, other=-1)  # past p: targets -1, flushed below
        ch0_t = tl.load(chord_ptr + 2 * at, mask=tile_ok, other=0.0)
        ch1_t = tl.load(chord_ptr + 2 * at + 1, mask=tile_ok, other=0.0)
        k0_t = tl.load(gather_ptr + 4 * at, mask=tile_ok, other=-1)
        k1_t = tl.load(gather_ptr + 4 * at + 1, mask=tile_ok, other=-1)
        k2_t = tl.load(gather_ptr + 4 * at + 2, mask=tile_ok, other=-1)
        k3_t = tl.load(gather_ptr + 4 * at + 3, mask=tile_ok, other=-1)
        c0_t = tl.load(curv_ptr + 4 * at, mask=tile_ok, other=0.0)
        c1_t = tl.load(curv_ptr + 4 * at + 1, mask=tile_ok, other=0.0)
        c2_t = tl.load(curv_ptr + 4 * at + 2, mask=tile_ok, other=0.0)
        c3_t = tl.load(curv_ptr + 4 * at + 3, mask=tile_ok, other=0.0)
        for j in tl.static_range(SCATTER_CHUNK):
            gr = _pick(g_tile, rowid, j)
            idx = _pick(idx_t, rowid, j)
            k0 = _pick(k0_t, rowid, j)
            k1 = _pick(k1_t, rowid, j)
            k2 = _pick(k2_t, rowid, j)
            k3 = _pick(k3_t, rowid, j)
            new = (idx != cur) | (k0 != ck0) | (k1 != ck1) | (k2 != ck2) | (k3 != ck3)
            _flush(v_ptr, pg_ptr, stride, cols, col_ok & new & (cur >= 0), cur, ck0, ck1, ck2, ck3,
                   a0, a1, a2, a3, q0, q1)
            q0 = tl.where(new, 0.0, q0) + _pick(ch0_t, rowid, j) * gr
            q1 = tl.where(new, 0.0, q1) + _pick(ch1_t, rowid, j) * gr
            a0 = tl.where(new, 0.0, a0) + _pick(c0_t, rowid, j) * gr
            a1 = tl.where(new, 0.0, a1) + _pick(c1_t, rowid, j) * gr
            a2 = tl.where(new, 0.0, a2) + _pick(c2_t, rowid, j) * gr
            a3 = tl.where(new, 0.0, a3) + _pick(c3_t, rowid, j) * gr
            cur = idx
            ck0 = k0
            ck1 = k1
            ck2 = k2
            ck3 = k3
    _flush(v_ptr, pg_ptr, stride, cols, col_ok & (cur >= 0), cur, ck0, ck1, ck2, ck3, a0, a1, a2, a3, q0, q1)
    tl.debug_barrier()

    # 2. u = M^{-1} v, in place
    _lower_sweep(v_ptr, stride, 1, v_ptr, stride, factor_ptr, stencil_ptr, m, cols, col_ok, False, 0, CHUNK, BLOCK_D)
    tl.debug_barrier()
    _upper_sweep(v_ptr, stride, factor_ptr, m, cols, col_ok, CHUNK, BLOCK_D)
    tl.debug_barrier()

    # 3. out_j = pg_j + stencil[0,j] u_j + stencil[1,j-1] u_{j-1} + stencil[2,j-2] u_{j-2}
    for j0 in range(0, n, BLOCK_R):
        rows = (j0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = rows < n
        ok = row_ok[:, None] & col_ok[None, :]
        acc = tl.load(pg_ptr + rows[:, None] * stride + cols[None, :], mask=ok, other=0.0)
        for k in tl.static_range(3):
            i = rows - k
            i_ok = row_ok & (i >= 0) & (i < m)
            weight = tl.load(stencil_ptr + k * m + i, mask=i_ok, other=0.0)
            u = tl.load(v_ptr + i[:, None] * stride + cols[None, :], mask=i_ok[:, None] & col_ok[None, :], other=0.0)
            acc += weight[:, None] * u.to(tl.float64)
        tl.store(out_ptr + rows[:, None] * d + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


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


def banded_apply(arrays, x, transpose: bool, scratch_dtype=torch.float64):
    """``W @ x`` (``x`` ``(n, d)`` -> ``(p, d)``) or, with ``transpose``, ``W^T @ x`` (``(p, d)`` -> ``(n, d)``),
    in ``x``'s dtype, computed in float64. ``arrays = (factor, stencil, index, chord, curvature, gather)`` of a
    ``BandedSpline`` with finite ``lam`` (contiguous, on ``x``'s device). ``x`` may have any strides.
    ``scratch_dtype``: of the intermediate rows (float64; float32 only for measurements)."""
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
    with device_guard(x):
        if transpose:
            v = torch.zeros((m, d), dtype=scratch_dtype, device=x.device)
            pg = torch.zeros((n, d), dtype=torch.float64, device=x.device)
            launch(_banded_transpose_kernel, grid, x, out, v, pg, factor, stencil, index, chord, curvature,
                   gather, n, p, d, x.stride(0), x.stride(1), CHUNK=CHUNK, SCATTER_CHUNK=SCATTER_CHUNK,
                   BLOCK_R=BLOCK_R, BLOCK_D=block_d, num_warps=warps, num_stages=1)
        else:
            z = torch.empty((m, d), dtype=scratch_dtype, device=x.device)
            launch(_banded_forward_kernel, grid, x, out, z, factor, stencil, index, chord, curvature, gather,
                   n, p, d, x.stride(0), x.stride(1), CHUNK=CHUNK, BLOCK_R=BLOCK_R, BLOCK_D=block_d,
                   num_warps=warps, num_stages=1)
    return out
