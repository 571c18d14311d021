"""Triton ``reconstruction_loss``: the DReS discrepancy and both its gradients in one pass.

Math
----
``y`` is ``(K, d)`` (the main branch ``f(x)``), ``y_coded`` is ``(N, d)`` (``f(E x)``), ``D`` is the
``(K, N)`` decoder::

    r = y - D @ y_coded                          (compute dtype: fp32, or fp64 for float64 inputs)
    per_sample[k] = sum_j r[k, j]^2
    loss = sum_k per_sample[k] / (K d)  ("mean"),  sum_k per_sample[k]  ("sum"),  per_sample  ("none")

    dloss/dy       = c r                 c = 2/(K d) ("mean"), 2 ("sum"; and per sample for "none")
    dloss/dy_coded = -D^T (c r)          ("none": left to backward, it needs the per-sample gradient)

Kernel layouts
--------------
Fused ("resident": ``N <= resident_n_max(mode)``, enough column tiles to fill the GPU, and a dot mode other
than "ieee"; ``choose_path``): one program owns a column tile ``cols`` (``BLOCK_D`` columns) and loops over
the rows of ``y`` in ``BLOCK_K`` tiles. The column tile of ``y_coded`` (``BLOCK_N x BLOCK_D``) is loaded
once and stays on-chip, and so does the ``grad_y_coded`` accumulator: every ``r`` tile is local, so
``D^T r`` for the column tile needs no atomics and no second pass. ``y`` and ``y_coded`` are read once,
``grad_y`` and ``grad_y_coded`` written once. Every program reads the whole decoder from L2 (``4 K N`` bytes;
"split": its three 2-byte parts, plus the fp32 ``D`` for ``grad_y_coded``) per ``BLOCK_D`` columns, so
``BLOCK_D`` is as wide as the registers allow (``resident_block_d``): 32 at N = 256.

Row-split ("rows": fp32 "ieee" dots at every d, small ``d``, ``N`` above the fused limit, or fp16/bf16 at
N > 128): a 2-D grid of ``BLOCK_K x BLOCK_D`` tiles of ``r`` (the row tiles of one column tile run back to
back, so ``y_coded``'s column tile comes from HBM once and from L2 for the other row tiles); each program
sums ``D[rows, :] @ y_coded[:, cols]`` over ``N`` in ``BLOCK_N`` chunks and writes ``c r``. Then
``grad_y_coded = -D^T (c r)`` is one ``spline_mix`` launch, which splits the ``N`` rows over programs too
(for fp16/bf16 ``c r`` is also written in fp32, so that the gradient dot does not sum values already
rounded to 8-11 bits). At d = 7 this is ``K / BLOCK_K`` programs instead of one. fp16/bf16 ("split"): both
paths read ``D`` pre-split in three parts of the data dtype (``_common.split_weights``).

Floor (per call with gradients, K = N, s = bytes per element of y; what bench/kernels.py divides by):
bytes = 2 K d s (read y, y_coded) + 2 K d s (write grad_y, grad_y_coded) + 4 K N (decoder),
flops = 4 K N d (``D y_coded``, ``D^T c r``). At K = N = 256, d = 2^16: fp32 256 MiB (89 us at 3.0 TB/s),
17.2 GFLOP (286 us of fp32 FMA): compute-bound with "ieee" dots. bf16: 128 MiB (45 us); "split" (3 bf16
passes) plus the tf32x3 gradient dot (3 TF32 passes) is ~100 us of tensor cores. The rows path reads fp32
``c r`` back in the gradient launch (fp32: 24 bytes per column element, not 16; fp16/bf16: 16, not 8).
Without gradients: bytes 2 K d s + 4 K N, flops 2 K N d.

Determinism
-----------
Each program writes its per-row partial sums of ``r^2`` to ``partials[column tile, k]``; the launcher sums
that small buffer over its first axis with ``torch.sum`` in float64 (a fixed layout and a fixed order).
No atomics anywhere, so the same inputs give bit-identical results run after run.

The per-row partial itself is ``tl.sum`` over the ``BLOCK_D`` columns of a tile: a tree whose order follows
the register layout, which the compiler picks per kernel variant (``WRITE_GRAD_*``) and ``num_warps``; in fp32
the loss with and without gradients differed in its last bits on an H200. So the squares are summed in
float64: squares of fp32 values are exact there, and a sum of at most 128 differs between orders by ~1e-14
relative, which reaches the fp32 loss only near an fp32 rounding boundary (about one value in 10^7). Float64
data's squares are rounded, so its loss's last bits may follow the config.

``BLOCK_D`` (the partials' layout) and the rows path's ``BLOCK_N`` (its reduction chunk) are not
autotuned; the row tile ``BLOCK_K``, warps and stages are. The path depends on the shapes, the dtype and the
device's multiprocessor count only, so two processes on the same GPU model take the same path.

Precision: the data dot ``D @ y_coded`` is IEEE fp32 or exact-product split dots (fp16/bf16); on the rows
path its sum over ``N`` is two-level with fp32 accumulators (``_common``: each ``BLOCK_N`` = 32 chunk summed
on its own, then added to the total), as is the gradient's sum over ``K`` in ``spline_mix``. The fused
path's sums over ``N <= 256`` and ``K`` are single chains (a second accumulator tile would spill). The
gradient dot ``D^T (c r)`` is IEEE fp32 for fp32 inputs, Triton's 3-pass TF32 for fp16/bf16.
"""

import os

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import (DOT_MODES, INTERPRET, acc_zeros, autotune, autotuning, bucket, check_device, compute_dtype,
                      config_dict, device_guard, dot_mode, launch, mix_dot, multiprocessors, parts_dot,
                      program_tile, split_parts, split_weights, tile_product)
from .spline_mix import TENSOR_CORE_MODES, spline_mix_into

# rows of N up to which y_coded's column tile and the grad_y_coded accumulator live in registers (resident_n_max)
N_RESIDENT_MAX = 256


@triton.jit
def scaled(r, scale_hi, scale_lo, DOT_MODE: tl.constexpr):
    """``c r``. Triton passes Python floats as fp32 scalars, so ``c = 2 / (K d)`` arrives rounded to 24 bits;
    for float64 data it is passed as hi + lo (48 bits), for the others hi alone is exact enough."""
    if DOT_MODE == "fp64":
        # one fp64 scalar (hi + lo is exact in fp64): no more registers than the fp32 scalar it replaces
        return r * (tl.cast(scale_hi, tl.float64) + tl.cast(scale_lo, tl.float64))
    else:
        return r * scale_hi


@triton.jit
def residual_tile(y_ptr, grad_y_ptr, partial_ptr, decoded, ks, cols, k_ok, tile_mask, pid_d, K, D,
                  stride_yk, stride_yd, grad_scale, grad_scale_lo,
                  WRITE_GRAD_Y: tl.constexpr, DOT_MODE: tl.constexpr):
    """One (row tile, column tile) of ``r = y - decoded`` (compute dtype): each row's ``sum_j r^2`` (times
    ``1 / (K d)`` for "mean", but for float64 data) into row k of column tile ``pid_d`` of the float64
    partials and, with ``WRITE_GRAD_Y``, ``grad_y = c r`` in y's dtype. Returns ``c r`` (or ``r``)."""
    y_tile = tl.load(y_ptr + ks[:, None].to(tl.int64) * stride_yk + cols[None, :] * stride_yd,
                     mask=tile_mask, other=0.0).to(decoded.dtype)
    # masked rows / columns / n are loaded as 0, so r is exactly 0 there
    r = y_tile - decoded
    r64 = r.to(tl.float64)  # squares of fp32 values are exact in float64
    row_sums = tl.sum(r64 * r64, axis=1)
    if DOT_MODE != "fp64":  # times c / 2 = 1 / (K d) for "mean" (exactly 1 else): the launcher's sum is the loss
        row_sums = row_sums * ((tl.cast(grad_scale, tl.float64) + tl.cast(grad_scale_lo, tl.float64)) * 0.5)
    tl.store(partial_ptr + pid_d.to(tl.int64) * K + ks, row_sums, mask=k_ok)
    if WRITE_GRAD_Y:
        r = scaled(r, grad_scale, grad_scale_lo, DOT_MODE)
        tl.store(grad_y_ptr + ks[:, None].to(tl.int64) * D + cols[None, :],
                 r.to(grad_y_ptr.dtype.element_ty), mask=tile_mask)
    return r


@triton.jit
def _reconstruction_loss_kernel(
    y_ptr, yc_ptr, dec_ptr, dec_parts_ptr, dec_unscale_ptr, grad_y_ptr, grad_yc_ptr, partial_ptr,
    K, N, D,
    stride_yk, stride_yd, stride_ck, stride_cd, stride_dk, stride_dn, stride_dp,
    grad_scale, grad_scale_lo,  # c = grad_scale + grad_scale_lo (two fp32 scalars: see scaled())
    K_BUCKET, N_BUCKET, D_BUCKET,  # only autotuning keys
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_GRAD_Y: tl.constexpr, WRITE_GRAD_YC: tl.constexpr,
    DOT_MODE: tl.constexpr, GRAD_DOT_MODE: tl.constexpr, DEC_PARTS: tl.constexpr,
):
    """Fused path: one program per column tile, all K rows, y_coded's tile resident (N <= BLOCK_N)."""
    pid_d = tl.program_id(0)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ns = tl.arange(0, BLOCK_N)
    n_ok = ns < N

    acc_zero = acc_zeros(BLOCK_K, BLOCK_D, DOT_MODE)
    # y_coded's column tile: read from HBM once, reused by every row tile
    yc_tile = tl.load(yc_ptr + ns[:, None].to(tl.int64) * stride_ck + cols[None, :] * stride_cd,
                      mask=n_ok[:, None] & col_ok[None, :], other=0.0)
    if WRITE_GRAD_YC:
        grad_yc_acc = acc_zeros(BLOCK_N, BLOCK_D, DOT_MODE)

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        tile_mask = k_ok[:, None] & col_ok[None, :]
        dec_mask = k_ok[:, None] & n_ok[None, :]
        if DEC_PARTS > 0:  # "split": the decoder's parts (contiguous) for the data dot
            decoded = parts_dot(dec_parts_ptr + ks[:, None] * N + ns[None, :], dec_mask, stride_dp, yc_tile,
                                acc_zero, DEC_PARTS) * tl.load(dec_unscale_ptr)
        if DEC_PARTS == 0 or WRITE_GRAD_YC:  # fp32/fp64 decoder: the data dot, or the gradient's
            dec_tile = tl.load(dec_ptr + ks[:, None] * stride_dk + ns[None, :] * stride_dn, mask=dec_mask, other=0.0)
        if DEC_PARTS == 0:
            decoded = mix_dot(dec_tile, yc_tile, acc_zero, DOT_MODE)
        grad_r = residual_tile(y_ptr, grad_y_ptr, partial_ptr, decoded, ks, cols, k_ok, tile_mask, pid_d, K, D,
                               stride_yk, stride_yd, grad_scale, grad_scale_lo, WRITE_GRAD_Y, DOT_MODE)
        if WRITE_GRAD_Y:
            if WRITE_GRAD_YC:
                # this row tile's share of D^T (c r) for the column tile: local, no atomics
                grad_yc_acc = mix_dot(tl.trans(dec_tile), grad_r, grad_yc_acc, GRAD_DOT_MODE)

    if WRITE_GRAD_YC:
        tl.store(grad_yc_ptr + ns[:, None].to(tl.int64) * D + cols[None, :],
                 (-grad_yc_acc).to(grad_yc_ptr.dtype.element_ty), mask=n_ok[:, None] & col_ok[None, :])


@triton.jit
def _reconstruction_rows_kernel(
    y_ptr, yc_ptr, dec_ptr, dec_unscale_ptr, grad_y_ptr, grad_r_ptr, partial_ptr,
    K, N, D,
    stride_yk, stride_yd, stride_ck, stride_cd, stride_dk, stride_dn, stride_dp,
    grad_scale, grad_scale_lo,  # c = grad_scale + grad_scale_lo (two fp32 scalars: see scaled())
    K_BUCKET, N_BUCKET, D_BUCKET,  # only autotuning keys
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_GRAD_Y: tl.constexpr, WRITE_GRAD_R: tl.constexpr, DOT_MODE: tl.constexpr, DEC_PARTS: tl.constexpr,
):
    """Row-split path: one program per (row tile, column tile) of r; grad_y = c r in y's dtype and, for
    fp16/bf16 inputs whose grad_y_coded is computed from it afterwards, c r in fp32 (grad_r)."""
    # the row tiles of one column tile run back to back: y_coded's column tile is read from L2 by all
    # but the first
    ks, cols, k_ok, col_ok, pid_d = program_tile(tl.program_id(0), K, D, BLOCK_K, BLOCK_D)
    tile_mask = k_ok[:, None] & col_ok[None, :]

    # D[ks, :] @ y_coded[:, cols] in BLOCK_N chunks, each summed on its own first (fp32)
    decoded = tile_product(dec_ptr, yc_ptr, ks, cols, k_ok, col_ok, N, stride_dk, stride_dn, stride_dp, stride_ck,
                           stride_cd, BLOCK_K, BLOCK_N, BLOCK_D, DOT_MODE, TWO_LEVEL=True, A_PARTS=DEC_PARTS)
    if DEC_PARTS > 0:  # the parts' power-of-two scale (split_weights): exact
        decoded = decoded * tl.load(dec_unscale_ptr)

    grad = residual_tile(y_ptr, grad_y_ptr, partial_ptr, decoded, ks, cols, k_ok, tile_mask, pid_d, K, D,
                         stride_yk, stride_yd, grad_scale, grad_scale_lo, WRITE_GRAD_Y, DOT_MODE)
    if WRITE_GRAD_Y and WRITE_GRAD_R:
        tl.store(grad_r_ptr + ks[:, None].to(tl.int64) * D + cols[None, :], grad, mask=tile_mask)


# At most four configs per path. BLOCK_D (the partials' layout) and BLOCK_N (the rows path's reduction chunk)
# are the launcher's; configs change only the row tile, warps and stages, so never the summation order. The
# fused path holds two BLOCK_N x BLOCK_D tiles in registers: 16-row tiles, 8 warps and one stage spill in no
# dot mode on sm_90 (4 warps, 32-row tiles or two stages spill 16-700 bytes per thread): the only config.
_RECON_CONFIGS = [triton.Config({"BLOCK_K": 16}, num_warps=8, num_stages=1)]
# Rows path: 16-row tiles for small d, 64-row tiles for wide d (fewer L2 re-reads of y_coded's column tile);
# 16 rows spill fp64 under Triton 3.6 unless on 2 warps. Tensor-core modes keep the 64-row tiles, which on
# sm_90 compile to wgmma, not mma.sync (one MMA family per launch: spline_mix's TENSOR_CORE_MODES).
_RECON_ROWS_CONFIGS = [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
                       for (bk, w, s) in [(32, 4, 3), (16, 2, 3), (64, 4, 3), (64, 8, 2)]]
_RECON_ROWS_TENSOR_CORE_CONFIGS = _RECON_ROWS_CONFIGS[2:]
AUTOTUNE_KEY_ARGS = ("K_BUCKET", "N_BUCKET", "D_BUCKET")
# the rows path's reduction chunk over N: 64 spills 400-3500 bytes per thread on sm_80 with FMA dots
ROWS_BLOCK_N = 32
# the rows path's column tile (the partials' layout) per dot mode: 64; "split" (pre-split D, no conversions)
# fits 128 without spills under Triton 3.6 and 3.9 (256 spills), half the L2 reads of D's parts per column
ROWS_BLOCK_D = {"ieee": 64, "tf32x3": 64, "fp64": 64, "split": 128}
INTERPRETER_RECON_TILE = {"BLOCK_K": 32, "BLOCK_D": 32, "BLOCK_N_CHUNK": 32}
# tests: the config DRES_TRITON_AUTOTUNE=0 launches instead of the path's first (None: the first)
FORCED_RESIDENT_CONFIG = FORCED_ROWS_CONFIG = None

# the constexpr variants are part of the key: a config tuned for the forward-only kernel (or for one dot
# mode) is not reused for the kernel that also writes both gradients
_reconstruction_loss_tuned = autotune(_reconstruction_loss_kernel, _RECON_CONFIGS,
                                      key=[*AUTOTUNE_KEY_ARGS, "DOT_MODE", "WRITE_GRAD_Y", "WRITE_GRAD_YC"])


def rows_configs(mode):
    """The rows path's autotune configs for dot mode ``mode``: one MMA family each."""
    return _RECON_ROWS_TENSOR_CORE_CONFIGS if mode in TENSOR_CORE_MODES else _RECON_ROWS_CONFIGS


_rows_tuned = {mode: autotune(_reconstruction_rows_kernel, rows_configs(mode),
                              key=[*AUTOTUNE_KEY_ARGS, "WRITE_GRAD_Y", "WRITE_GRAD_R"]) for mode in DOT_MODES}


def resident_block_n(N):
    """y_coded's rows on-chip: N rounded up to a power of two, at least 64 (fewer kernel variants; the
    masked rows cost no memory traffic, and at N <= 64 the fused kernel is memory-bound anyway)."""
    return max(64, triton.next_power_of_2(N))


def resident_block_d(block_n, mode="ieee"):
    """Columns per program of the fused path (not autotuned: the partials' layout). The widest that spills
    in no dot mode under Triton 3.6 and 3.9 (sm_90, sm_80): 64 at BLOCK_N = 64 (32 for fp64), 32 at 128 and
    256; "tf32x3" half that (its split fp32 operands spilled 16-24 bytes on sm_80 at the full width)."""
    if INTERPRET:
        return INTERPRETER_RECON_TILE["BLOCK_D"]
    width = 64 if block_n <= 64 and mode != "fp64" else 32
    return width // 2 if mode == "tf32x3" else width


def resident_n_max(mode):
    """Largest N of the fused path: 256, except 128 for "tf32x3", whose operand parts spill at N = 256
    (88-280 bytes per thread on sm_90). "split" spilled there too while it split D in registers; with D
    pre-split, N = 256 compiles without spills (sm_90 164 registers, sm_80 255), but ``choose_path`` takes
    it there only when forced until a GPU has timed it against the rows path."""
    return N_RESIDENT_MAX // 2 if mode == "tf32x3" else N_RESIDENT_MAX


#: ``DRES_TRITON_RECON_PATH=rows|resident`` overrides ``choose_path``, for measurements only (the GPU check
#: times both; the fused kernel's fp32 sum over N is one chain, not two-level). "resident" still falls back
#: to "rows" where N does not fit on-chip.
RECON_PATH_ENV = "DRES_TRITON_RECON_PATH"


def choose_path(N, d, device, mode="ieee"):
    """``"resident"`` when N fits on-chip, the fused path has at least two column tiles per multiprocessor
    and the dot mode is not "ieee"; ``"rows"`` otherwise. A function of the shapes, dtype, device and
    ``RECON_PATH_ENV`` only, so every process picks the same path.

    Why not fused for "ieee": on the H200 (bench/RESULTS.md, run 3) it took 1.11-1.25 ms at K = N = 256,
    d = 2^16 (3.5x the FMA floor) against 0.22 ms for one ``spline_mix`` GEMM of the same size: its 16-row
    tiles are too small to keep the FMA units busy, and saving bytes does not help a compute-bound kernel."""
    forced = os.environ.get(RECON_PATH_ENV, "auto")
    if forced not in ("auto", "rows", "resident"):
        raise ValueError(f"{RECON_PATH_ENV} must be 'auto', 'rows' or 'resident', got {forced!r}")
    if N > resident_n_max(mode) or forced == "rows":
        return "rows"
    if forced == "resident":
        return "resident"
    if mode == "ieee" or (mode == "split" and N > N_RESIDENT_MAX // 2):  # the latter: unmeasured
        return "rows"
    columns = triton.cdiv(d, resident_block_d(resident_block_n(N), mode))
    return "resident" if columns >= 2 * multiprocessors(device) else "rows"


def launch_plans(mode):
    """Every (kernel, configs, constexprs, fp32 gradient buffer) combination the launcher below can produce
    for dot mode ``mode`` (.ci/triton_compile.py compiles them all)."""
    grad_mode = grad_dot_mode(mode)
    plans = []
    for block_n in (64, 128, 256)[:3 if resident_n_max(mode) >= 256 else 2]:
        for grad_y, grad_yc in ((False, False), (True, False), (True, True)):
            plans.append((f"resident N<={block_n} grads={int(grad_y)}{int(grad_yc)}", _reconstruction_loss_kernel,
                          _RECON_CONFIGS, dict(BLOCK_N=block_n, BLOCK_D=resident_block_d(block_n, mode),
                                               WRITE_GRAD_Y=grad_y, WRITE_GRAD_YC=grad_yc, DOT_MODE=mode,
                                               GRAD_DOT_MODE=grad_mode, DEC_PARTS=decoder_parts(mode)), False))
    for grad_y, grad_r in ((False, False), (True, False), (True, True)):
        if grad_r and mode != "split":
            continue
        plans.append((f"rows grads={int(grad_y)}{int(grad_r)}", _reconstruction_rows_kernel, rows_configs(mode),
                      dict(BLOCK_N=ROWS_BLOCK_N, BLOCK_D=ROWS_BLOCK_D[mode], WRITE_GRAD_Y=grad_y, WRITE_GRAD_R=grad_r,
                           DOT_MODE=mode, DEC_PARTS=decoder_parts(mode)), grad_r))
    return plans


def decoder_parts(mode):
    """Both paths read the decoder pre-split in "split" mode: 3 parts, as the fp32 residual needs."""
    return split_parts(torch.float32) if mode == "split" else 0


def grad_dot_mode(mode):
    """The gradient dot multiplies two fp32 operands: the half-precision parts of "split" do not apply."""
    return {"split": "tf32x3"}.get(mode, mode)


def reconstruction_loss(y, y_coded, decoder, reduction, compute_grads):
    """Backend entry point (docs/ARCHITECTURE.md). Returns ``(loss, grad_y, grad_y_coded)``."""
    check_device(y, y_coded, decoder)
    # validated by dres_fast.ops (the edge): asserted here, not checked again
    assert reduction in ("mean", "sum", "none"), reduction
    K, d = y.shape
    N = y_coded.shape[0]
    assert y_coded.shape[1] == d and tuple(decoder.shape) == (K, N), (y.shape, y_coded.shape, decoder.shape)
    acc_dtype = compute_dtype(y.dtype)
    decoder = decoder.to(acc_dtype)
    write_grad_y = bool(compute_grads)
    grad_scale = 2.0 / (K * d) if reduction == "mean" else 2.0
    grad_scale_hi = float(np.float32(grad_scale))
    grad_scale_lo = grad_scale - grad_scale_hi  # what fp32 rounding drops; fp32 again when passed
    want_grad_yc = write_grad_y and reduction != "none"

    mode = dot_mode(y.dtype)
    path = choose_path(N, d, y.device, mode)
    if path == "resident":
        block_n = resident_block_n(N)
        block_d = resident_block_d(block_n, mode)
    else:
        block_n = INTERPRETER_RECON_TILE["BLOCK_N_CHUNK"] if INTERPRET else ROWS_BLOCK_N
        block_d = INTERPRETER_RECON_TILE["BLOCK_D"] if INTERPRET else ROWS_BLOCK_D[mode]
    num_col_tiles = triton.cdiv(d, block_d)

    # float64 for every dtype: the kernels sum the squares in float64 (Determinism)
    partials = torch.empty((num_col_tiles, K), dtype=torch.float64, device=y.device)
    # distinct empty tensors: op outputs must not alias each other
    grad_y = torch.empty((K, d) if write_grad_y else (0,), dtype=y.dtype, device=y.device)
    # rows path for fp16/bf16: grad_y_coded is computed from an fp32 c*r, not from grad_y rounded to
    # 8-11 bits (whose rounding errors D^T would sum into a result that is much smaller than its terms)
    fp32_grad = want_grad_yc and path == "rows" and acc_dtype != y.dtype
    grad_r = torch.empty((K, d), dtype=acc_dtype, device=y.device) if fp32_grad else None
    grad_yc = torch.empty((N, d) if want_grad_yc else (0,), dtype=y_coded.dtype, device=y.device)

    if d > 0:
        keys = (bucket(K), bucket(N), bucket(d))
        strides = (y.stride(0), y.stride(1), y_coded.stride(0), y_coded.stride(1),
                   decoder.stride(0), decoder.stride(1))
        parts = decoder_parts(mode)
        # the unscale tensor is read only with parts; the fused kernel reads the parts as contiguous (K, N)
        dec_parts, unscale = split_weights(decoder, y.dtype, parts) if parts else (decoder, decoder)
        dec_parts = dec_parts.contiguous() if parts and path == "resident" else dec_parts
        stride_dp = dec_parts.stride(0) if parts else 0
        with device_guard(y):
            if path == "resident":
                args = (y, y_coded, decoder, dec_parts, unscale, grad_y, grad_yc, partials, K, N, d, *strides,
                        stride_dp, grad_scale_hi, grad_scale_lo, *keys)
                meta = dict(BLOCK_N=block_n, BLOCK_D=block_d, WRITE_GRAD_Y=write_grad_y, WRITE_GRAD_YC=want_grad_yc,
                            DOT_MODE=mode, GRAD_DOT_MODE=grad_dot_mode(mode), DEC_PARTS=parts)
                _launch_tuned(_reconstruction_loss_tuned, _reconstruction_loss_kernel,
                              FORCED_RESIDENT_CONFIG or config_dict(_RECON_CONFIGS[0]),
                              (num_col_tiles,), lambda meta_: (num_col_tiles,), args, meta)
            else:
                args = (y, y_coded, dec_parts, unscale, grad_y, grad_y if grad_r is None else grad_r, partials, K, N, d,
                        *strides[:4], *dec_parts.stride()[-2:], stride_dp, grad_scale_hi, grad_scale_lo, *keys)
                meta = dict(BLOCK_N=block_n, BLOCK_D=block_d, WRITE_GRAD_Y=write_grad_y,
                            WRITE_GRAD_R=grad_r is not None, DOT_MODE=mode, DEC_PARTS=parts)
                fixed = ((INTERPRET and {"BLOCK_K": INTERPRETER_RECON_TILE["BLOCK_K"]}) or FORCED_ROWS_CONFIG
                         or config_dict(rows_configs(mode)[0]))

                def grid(meta_):
                    return (triton.cdiv(K, meta_["BLOCK_K"]) * num_col_tiles,)
                _launch_tuned(_rows_tuned[mode], _reconstruction_rows_kernel, fixed, grid(fixed), grid, args, meta)
                if want_grad_yc:
                    # grad_y_coded = -D^T (c r): W^T by strides; spline_mix splits the N rows too. Two fp32
                    # operands: the gradient dot mode (tf32x3 for fp16/bf16 inputs, as in the fused path)
                    spline_mix_into(decoder.t(), grad_y if grad_r is None else grad_r, grad_yc, scale=-1.0,
                                    mode=grad_dot_mode(mode))

    # fixed-order reduction of the fixed-layout partials: deterministic. In float64: the buffer is only
    # (d / BLOCK_D) x K, and the fp32 loss then carries no more than its final rounding.
    # "sum" and "mean" sum the whole buffer in one reduction; the kernels divided "mean"'s partials by K d,
    # except for float64 data, where c's 48 bits (two fp32 scalars) would cost the loss its last bits
    loss = partials.sum(dim=0) if reduction == "none" else partials.sum()
    if reduction == "mean" and mode == "fp64":
        loss = loss / (K * d)
    return loss.to(acc_dtype), grad_y, grad_yc


def _launch_tuned(tuned, kernel, fixed_config, fixed_grid, grid, args, meta):
    """The autotuned kernel on the GPU, else one fixed config (interpreter: its small tile)."""
    if autotuning():
        launch(tuned, grid, *args, **meta)
    elif INTERPRET:
        launch(kernel, fixed_grid, *args, BLOCK_K=INTERPRETER_RECON_TILE["BLOCK_K"], **meta)
    else:
        launch(kernel, fixed_grid, *args, **fixed_config, **meta)
