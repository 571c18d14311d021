"""Triton ``spline_mix``: ``out = scale * W @ x`` along the batch axis.

Math
----
``W`` is ``(M, K)`` (an encoder ``E``: ``N x K``, a decoder ``D``: ``K x N``, or the transpose of either in
backward), ``x`` is the batch viewed as ``(K, d)``::

    out[m, j] = scale * sum_k W[m, k] * x[k, j]          (m < M, j < d)

Backward is the same kernel with ``W^T``: ``grad_x = W^T @ grad_out`` (strides swapped, nothing copied; in
the "split" mode ``W^T`` of a cached coding matrix reads ``W``'s parts through strides: ``_common.split_weights``).

Kernel layout
-------------
One program owns a ``(BLOCK_M, BLOCK_D)`` tile of ``out`` and loops over ``K`` in ``BLOCK_K`` chunks, so
``K`` and ``M`` up to 1024 (and beyond) work with bounded registers. The ``M`` tiles of one column tile are
launched back to back (program id = column tile * num_m_tiles + m tile), so the column tile of ``x`` comes
from HBM once and from L2 for the other ``M`` tiles; ``W`` (at most a few MiB) stays in L2/L1. ``out`` is
written once. Tiles are masked, so any ``d`` (1, primes, ...) and any strides of ``x`` and ``W`` work.

Small ``d`` (logits: d = 10 .. 1000): the grid is ``cdiv(M, BLOCK_M) * cdiv(d, BLOCK_D)``, so the batch rows
``M`` are split as well as the columns; a 16 x 32 tile config gives ``M / 16`` programs even at d = 7 (64 x 32,
``M / 64``, in the tensor-core modes, whose configs must all compile to one MMA family: see the configs). No
program sums another's output, so there is no cross-program reduction at any ``d``.

Floor (per call, K = M = N): bytes = (K + M) d s + 4 M K (s = bytes per element of x; W in fp32, read
once from HBM), flops = 2 M K d. At K = M = 256, d = 2^16: fp32 128 MiB + 256 KiB and 8.6 GFLOP, so
~45 us on an H100 at 3.0 TB/s against ~143 us of fp32 FMA at 60 TFLOP/s: with "ieee" dots the kernel is
compute-bound (floor = flops / FMA rate). bf16: 64 MiB (~22 us) against one tensor-core pass of 11 us at
790 TFLOP/s, so the floor is memory; "split" runs two passes (W pre-split in two bf16 parts: ~22 us).
The benchmark's multiple of floor divides by max(bytes / bandwidth, flops / rate).

Precision: see ``_common`` (``DOT_MODE``): IEEE fp32, split-precision, or fp64 dots, never plain TF32.
For fp32 outputs the sum over ``K`` is two-level (``_common``): each ``BLOCK_K`` chunk (16 for "ieee", 32 for
"tf32x3") is summed on its own, then added to the running total, so the rounding error grows like
``(16 + K / 16) u`` rather than ``K u`` (at K = 1024 the single chain was 5-10x less accurate than cuBLAS).
fp16/bf16 outputs ("split") keep the single chain: their final rounding dwarfs its error.
"""

import torch
import triton
import triton.language as tl

from ._common import (CPU_WITHOUT_INTERPRETER, DOT_MODES, INTERPRET, autotune, autotuning, bucket,  # noqa: F401
                      check_device, compute_dtype, config_dict, device_guard, dot_mode, launch, program_tile,
                      split_parts, split_weights, tile_product)

# ----------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _spline_mix_kernel(
    w_ptr, x_ptr, out_ptr, w_unscale_ptr,
    M, K, D,
    stride_wm, stride_wk, stride_wp, stride_xk, stride_xd, stride_om,
    scale,
    M_BUCKET, K_BUCKET, D_BUCKET,  # only autotuning keys
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_MODE: tl.constexpr, W_PARTS: tl.constexpr,
):
    # consecutive programs share one column tile of x, so it is read from HBM once and then from L2
    rows, cols, row_ok, col_ok, _ = program_tile(tl.program_id(0), M, D, BLOCK_M, BLOCK_D)

    # fp16/bf16 outputs ("split") keep one chain: their final rounding (2^-11, 2^-8) dwarfs its error, and
    # the partial-sum tile would spill (sm_80)
    acc = tile_product(w_ptr, x_ptr, rows, cols, row_ok, col_ok, K, stride_wm, stride_wk, stride_wp, stride_xk,
                       stride_xd, BLOCK_M, BLOCK_K, BLOCK_D, DOT_MODE, TWO_LEVEL=DOT_MODE != "split", A_PARTS=W_PARTS)

    if W_PARTS > 0:  # the parts' power-of-two scale (split_weights): exact
        acc = acc * tl.load(w_unscale_ptr)
    out = acc * scale
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def mix_block_k(mode):
    """The reduction chunk: fixed per dot mode, never autotuned, so every config adds the products of an
    output element in the same order (bit-identical results whichever config a process picked). It is
    also the block of the two-level sum: 16 for "ieee", whose FMA dot holds both operands of a chunk in
    registers (at 32, plus the partial-sum tile, the 64 x 64 and 128 x 64 tiles spill 8-80 bytes per
    thread under Triton 3.9); 16 for fp64, 32 for the tensor-core modes."""
    return 16 if mode in ("fp64", "ieee") else 32


# At most four tiles; all are correct for every shape (masks). The autotuner picks per (M, K, d) bucket,
# dot mode and dtypes; the 16 x 32 tile is the small-d one (logits), the others cover wide batches.
_SPLINE_MIX_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for (bm, bd, w, s) in [
        (64, 64, 4, 3),
        (128, 64, 8, 3),
        (64, 128, 8, 3),
        (16, 32, 4, 2),
    ]
]
# Tensor-core modes ("split", "tf32x3"): the 16 x 32 tile compiles to mma.sync on sm_90 and the others to
# wgmma, and the two may round a k-slice's sum differently, so two processes picking different configs
# could differ in the last bits. Their small-d tile is therefore one that compiles to wgmma as well (64 rows,
# 4 warps: one warpgroup); .ci/triton_compile.py fails when a launch's configs mix MMA families. With no
# conversions in the loop a 128 x 128 tile fits (no spills, sm_90 and sm_80, Triton 3.6 and 3.9) in place of
# 128 x 64: W is re-read from L2 once per column tile (M K x 4 bytes per 128 columns, not per 64; at
# M = K = 256, d = 2^16 that is 128 MiB against 64 MiB of bf16 data) and x once per row tile.
_SPLINE_MIX_TENSOR_CORE_CONFIGS = [
    _SPLINE_MIX_CONFIGS[0], triton.Config({"BLOCK_M": 128, "BLOCK_D": 128}, num_warps=8, num_stages=3),
    _SPLINE_MIX_CONFIGS[2], triton.Config({"BLOCK_M": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2)]
# fp64 operands take twice the registers: the same tiles with two stages (three spill 8-40 bytes per
# thread under Triton 3.6 on sm_90), the 128 x 64 tile with one (two spill 8 bytes under 3.6 on sm_80).
_SPLINE_MIX_FP64_CONFIGS = [
    triton.Config(config.kwargs, num_warps=config.num_warps, num_stages=1 if config.kwargs["BLOCK_M"] == 128 else 2)
    for config in _SPLINE_MIX_CONFIGS
]
AUTOTUNE_KEY_ARGS = ("M_BUCKET", "K_BUCKET", "D_BUCKET")
INTERPRETER_SPLINE_MIX_TILE = {"BLOCK_M": 32, "BLOCK_D": 32}
# DRES_TRITON_AUTOTUNE=0: the mode's first tile, its small-d tile (the last) below SMALL_D columns
SMALL_D = 256
TENSOR_CORE_MODES = ("split", "tf32x3")


def configs_for(mode):
    """The autotune configs of dot mode ``mode`` (.ci/triton_compile.py compiles each)."""
    if mode == "fp64":
        return _SPLINE_MIX_FP64_CONFIGS
    return _SPLINE_MIX_TENSOR_CORE_CONFIGS if mode in TENSOR_CORE_MODES else _SPLINE_MIX_CONFIGS


# one autotuner per dot mode, over that mode's configs (W_PARTS follows the output dtype)
_spline_mix_tuned = {mode: autotune(_spline_mix_kernel, configs_for(mode), key=[*AUTOTUNE_KEY_ARGS, "W_PARTS"])
                     for mode in DOT_MODES}


# tests: the config DRES_TRITON_AUTOTUNE=0 launches instead of the mode's fixed one (None: that one)
FORCED_CONFIG = None


def _fixed_config(d, mode):
    if INTERPRET:
        return INTERPRETER_SPLINE_MIX_TILE
    if FORCED_CONFIG is not None:
        return FORCED_CONFIG
    configs = configs_for(mode)
    return config_dict(configs[-1] if d < SMALL_D else configs[0])


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------


def spline_mix_into(weights, x, out, scale=1.0, mode=None):
    """``out = scale * weights @ x``; ``out`` contiguous ``(M, d)``; strides of ``weights`` and ``x`` are
    passed to the kernel, so transposed views (backward's ``W^T``) cost nothing. ``mode``: the dot mode,
    by default the one of ``x``'s dtype; "split" reads ``weights`` pre-split (``split_weights``) into the
    parts ``out``'s dtype needs."""
    M, K = weights.shape
    d = x.shape[1]
    if d == 0 or M == 0:
        return out
    mode = mode or dot_mode(x.dtype)
    parts = split_parts(out.dtype) if mode == "split" else 0
    unscale = weights  # read only with parts
    if parts:
        weights, unscale = split_weights(weights, x.dtype, parts)
    w_strides = weights.stride()[-2:] + (weights.stride(0) if parts else 0,)
    args = (weights, x, out, unscale, M, K, d, *w_strides, x.stride(0), x.stride(1), out.stride(0),
            float(scale), bucket(M), bucket(K), bucket(d))
    meta = dict(BLOCK_K=mix_block_k(mode), DOT_MODE=mode, W_PARTS=parts)
    if autotuning():
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_D"]),)
        launch(_spline_mix_tuned[mode], grid, *args, **meta)
    else:
        config = _fixed_config(d, mode)
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(d, config["BLOCK_D"]),)
        launch(_spline_mix_kernel, grid, *args, **meta, **config)
    return out


def spline_mix(weights, x):
    """Backend entry point (docs/ARCHITECTURE.md): ``weights (M, K) @ x (K, d)`` -> ``(M, d)``, contiguous,
    dtype of ``x``; fp32 accumulation with exact products (fp64 for float64 inputs), never TF32."""
    check_device(weights, x)
    # validated by dres_fast.ops (the edge): asserted here, not checked again
    assert weights.dim() == 2 and x.dim() == 2 and weights.shape[1] == x.shape[0], (weights.shape, x.shape)
    weights = weights.to(compute_dtype(x.dtype))
    out = torch.empty((weights.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    with device_guard(x):
        return spline_mix_into(weights, x, out)
