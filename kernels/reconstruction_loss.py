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

Kernel layout
-------------
One program owns a column tile ``cols`` (``BLOCK_D`` columns) and loops over the rows of ``y`` in
``BLOCK_K`` tiles. For ``N <= N_RESIDENT_MAX`` the column tile of ``y_coded`` (``BLOCK_N x BLOCK_D``) is
loaded once and stays on-chip, and so does the ``grad_y_coded`` accumulator: every ``r`` tile is local, so
``D^T r`` for the column tile needs no atomics and no second pass. ``y`` and ``y_coded`` are read once,
``grad_y`` and ``grad_y_coded`` written once. For larger ``N`` the kernel loops over ``N`` in chunks,
writes ``grad_y``, and ``grad_y_coded = -D^T grad_y`` runs as a ``spline_mix`` launch (one more read of
``grad_y``; for fp16/bf16 inputs ``c r`` goes through an fp32 buffer so that it is not rounded first).

Determinism
-----------
Each program writes its per-row partial sums of ``r^2`` to ``partials[column tile, k]``; the launcher sums
that small buffer over its first axis with ``torch.sum`` in float64 (a fixed layout and a fixed order). No atomics anywhere,
so the same inputs give bit-identical results run after run. ``BLOCK_D`` is therefore not autotuned
(it fixes the partials' layout); ``BLOCK_K``, warps and stages are.

Precision: the data dot ``D @ y_coded`` uses ``spline_mix.mix_dot`` (IEEE fp32, or exact-product split
dots for fp16/bf16). The gradient dot ``D^T (c r)`` multiplies two fp32 operands: IEEE fp32 for fp32
inputs; for fp16/bf16 inputs (whose gradient is rounded to 8-11 bits anyway) Triton's 3-pass TF32.
"""

import torch
import triton
import triton.language as tl

from .spline_mix import (INTERPRET, acc_zeros, autotuning, check_device, compute_dtype, d_bucket, device_guard, dot_mode,
                         launch, mix_dot, spline_mix_into)

# y_coded's column tile and the grad_y_coded accumulator live in registers up to this many rows of N.
N_RESIDENT_MAX = 256


@triton.jit
def _reconstruction_loss_kernel(
    y_ptr, yc_ptr, dec_ptr, grad_y_ptr, grad_yc_ptr, partial_ptr,
    K, N, D,
    stride_yk, stride_yd, stride_ck, stride_cd, stride_dk, stride_dn,
    grad_scale,
    D_BUCKET,  # only an autotuning key
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    N_RESIDENT: tl.constexpr, WRITE_GRAD_Y: tl.constexpr, WRITE_GRAD_YC: tl.constexpr,
    DOT_MODE: tl.constexpr, GRAD_DOT_MODE: tl.constexpr,
):
    pid_d = tl.program_id(0)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ns = tl.arange(0, BLOCK_N)

    acc_zero = acc_zeros(BLOCK_K, BLOCK_D, DOT_MODE)

    if N_RESIDENT:
        # y_coded's column tile: read from HBM once, reused by every row tile
        yc_tile = tl.load(yc_ptr + ns[:, None].to(tl.int64) * stride_ck + cols[None, :] * stride_cd,
                          mask=(ns < N)[:, None] & col_ok[None, :], other=0.0)
        if WRITE_GRAD_YC:
            grad_yc_acc = acc_zeros(BLOCK_N, BLOCK_D, DOT_MODE)

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        tile_mask = k_ok[:, None] & col_ok[None, :]
        y_tile = tl.load(y_ptr + ks[:, None].to(tl.int64) * stride_yk + cols[None, :] * stride_yd,
                         mask=tile_mask, other=0.0).to(acc_zero.dtype)

        if N_RESIDENT:
            dec_tile = tl.load(dec_ptr + ks[:, None] * stride_dk + ns[None, :] * stride_dn,
                               mask=k_ok[:, None] & (ns < N)[None, :], other=0.0)
            decoded = mix_dot(dec_tile, yc_tile, acc_zero, DOT_MODE)
        else:
            decoded = acc_zero
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + ns
                n_ok = nn < N
                dec_chunk = tl.load(dec_ptr + ks[:, None] * stride_dk + nn[None, :] * stride_dn,
                                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                yc_chunk = tl.load(yc_ptr + nn[:, None].to(tl.int64) * stride_ck + cols[None, :] * stride_cd,
                                   mask=n_ok[:, None] & col_ok[None, :], other=0.0)
                decoded = mix_dot(dec_chunk, yc_chunk, decoded, DOT_MODE)

        # masked rows / columns / n are loaded as 0, so r is exactly 0 there
        r = y_tile - decoded
        tl.store(partial_ptr + pid_d.to(tl.int64) * K + ks, tl.sum(r * r, axis=1), mask=k_ok)

        if WRITE_GRAD_Y:
            grad_r = r * grad_scale
            tl.store(grad_y_ptr + ks[:, None].to(tl.int64) * D + cols[None, :],
                     grad_r.to(grad_y_ptr.dtype.element_ty), mask=tile_mask)
            if WRITE_GRAD_YC:
                # this row tile's share of D^T (c r) for the column tile: local, no atomics
                grad_yc_acc = mix_dot(tl.trans(dec_tile), grad_r, grad_yc_acc, GRAD_DOT_MODE)

    if WRITE_GRAD_YC:
        tl.store(grad_yc_ptr + ns[:, None].to(tl.int64) * D + cols[None, :],
                 (-grad_yc_acc).to(grad_yc_ptr.dtype.element_ty),
                 mask=(ns < N)[:, None] & col_ok[None, :])


# sm_90 register use (compiled here without a GPU, read back with cuobjdump): with y_coded resident and
# BLOCK_N * BLOCK_D = 4096, BLOCK_K = 16 and 8 warps is the one fp32 config that does not spill; the
# fp16/bf16 split dots spill ~200-300 bytes per thread at BLOCK_N = 256 and none at BLOCK_N <= 128.
_RECON_CONFIGS = [
    triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
    for (bk, w, s) in [(16, 8, 2), (16, 4, 2), (16, 8, 3), (32, 8, 2), (16, 16, 2), (32, 4, 2)]
]
INTERPRETER_RECON_TILE = {"BLOCK_K": 32, "BLOCK_D": 32, "BLOCK_N_CHUNK": 32}
FIXED_GPU_RECON_CONFIG = {"BLOCK_K": 16, "num_warps": 8, "num_stages": 2}

if INTERPRET:
    _reconstruction_loss_tuned = None
else:
    # the constexpr variants are part of the key: a config tuned for the forward-only kernel (or for one
    # dot mode) must not be reused for the kernel that also writes both gradients
    _reconstruction_loss_tuned = triton.autotune(
        configs=_RECON_CONFIGS,
        key=["K", "N", "D_BUCKET", "DOT_MODE", "WRITE_GRAD_Y", "WRITE_GRAD_YC"])(_reconstruction_loss_kernel)


def _column_block(n_block, resident):
    """Columns per program. Not autotuned: it fixes the layout of the deterministic partials buffer.
    With y_coded resident, two BLOCK_N x BLOCK_D fp32 tiles live in registers: keep their size near 2048
    elements (4096 at BLOCK_N = 256, where BLOCK_D cannot go below the 16 that tl.dot needs)."""
    if INTERPRET:
        return INTERPRETER_RECON_TILE["BLOCK_D"]
    if not resident:
        return 64
    return max(16, min(64, 2048 // n_block))


def reconstruction_loss(y, y_coded, decoder, reduction, compute_grads):
    """Backend entry point (docs/ARCHITECTURE.md). Returns ``(loss, grad_y, grad_y_coded)``."""
    check_device(y, y_coded, decoder)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    K, d = y.shape
    N = y_coded.shape[0]
    if y_coded.shape[1] != d or tuple(decoder.shape) != (K, N):
        raise ValueError(f"reconstruction_loss: expected y (K, d), y_coded (N, d), decoder (K, N); got "
                         f"{tuple(y.shape)}, {tuple(y_coded.shape)}, {tuple(decoder.shape)}")
    acc_dtype = compute_dtype(y.dtype)
    decoder = decoder.to(acc_dtype)
    write_grad_y = bool(compute_grads)
    grad_scale = 2.0 / (K * d) if reduction == "mean" else 2.0
    want_grad_yc = write_grad_y and reduction != "none"

    resident = N <= N_RESIDENT_MAX
    if resident:
        block_n = max(16, triton.next_power_of_2(N))
    else:
        block_n = INTERPRETER_RECON_TILE["BLOCK_N_CHUNK"] if INTERPRET else 64
    block_d = _column_block(block_n, resident)
    num_col_tiles = triton.cdiv(d, block_d)

    partials = torch.empty((num_col_tiles, K), dtype=acc_dtype, device=y.device)
    # distinct empty tensors: op outputs must not alias each other
    grad_y = torch.empty((K, d) if write_grad_y else (0,), dtype=y.dtype, device=y.device)
    # chunked path for fp16/bf16: grad_y_coded is computed from an fp32 c*r, not from grad_y rounded to
    # 8-11 bits (whose rounding errors D^T would sum into a result that is much smaller than its terms)
    chunked_half = want_grad_yc and not resident and acc_dtype != y.dtype
    grad_r = torch.empty((K, d), dtype=acc_dtype, device=y.device) if chunked_half else grad_y
    grad_yc = torch.empty((N, d) if want_grad_yc else (0,), dtype=y_coded.dtype, device=y.device)

    if d > 0:
        mode = dot_mode(y.dtype)
        grad_mode = {"split3": "tf32x3"}.get(mode, mode)
        args = (y, y_coded, decoder, grad_r, grad_yc, partials, K, N, d,
                y.stride(0), y.stride(1), y_coded.stride(0), y_coded.stride(1),
                decoder.stride(0), decoder.stride(1), grad_scale, d_bucket(d))
        meta = dict(BLOCK_N=block_n, BLOCK_D=block_d, N_RESIDENT=resident, WRITE_GRAD_Y=write_grad_y,
                    WRITE_GRAD_YC=want_grad_yc and resident, DOT_MODE=mode, GRAD_DOT_MODE=grad_mode)
        grid = (num_col_tiles,)
        with device_guard(y):
            if autotuning():
                launch(_reconstruction_loss_tuned, grid, *args, **meta)
            elif INTERPRET:
                launch(_reconstruction_loss_kernel, grid, *args, BLOCK_K=INTERPRETER_RECON_TILE["BLOCK_K"], **meta)
            else:
                launch(_reconstruction_loss_kernel, grid, *args, **FIXED_GPU_RECON_CONFIG, **meta)
            if want_grad_yc and not resident:
                # N too large to keep the accumulator on-chip: grad_y_coded = -D^T grad_y, W^T by strides
                spline_mix_into(decoder.t(), grad_r, grad_yc, scale=-1.0)
                if chunked_half:
                    grad_y = grad_r.to(y.dtype)

    # fixed-order reduction of the fixed-layout partials: deterministic. In float64: the buffer is only
    # (d / BLOCK_D) x K, and the fp32 loss then carries no more than its final rounding.
    per_sample = partials.to(torch.float64).sum(dim=0)
    if reduction == "none":
        loss = per_sample
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample.sum() / (K * d)
    return loss.to(acc_dtype), grad_y, grad_yc
