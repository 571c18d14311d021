"""Triton ``spline_mix``: ``out = scale * W @ x`` along the batch axis.

Math
----
``W`` is ``(M, K)`` (an encoder ``E``: ``N x K``, a decoder ``D``: ``K x N``, or the transpose of either in
backward), ``x`` is the batch viewed as ``(K, d)``::

    out[m, j] = scale * sum_k W[m, k] * x[k, j]          (m < M, j < d)

Backward is the same kernel with ``W^T``: ``grad_x = W^T @ grad_out`` (strides swapped, nothing copied).

Kernel layout
-------------
One program owns a ``(BLOCK_M, BLOCK_D)`` tile of ``out`` and loops over ``K`` in ``BLOCK_K`` chunks, so
``K`` and ``M`` up to 1024 (and beyond) work with bounded registers. The ``M`` tiles of one column tile are
launched back to back (program id = column tile * num_m_tiles + m tile), so the column tile of ``x`` comes
from HBM once and from L2 for the other ``M`` tiles; ``W`` (at most a few MiB) stays in L2/L1. ``out`` is
written once. Tiles are masked, so any ``d`` (1, primes, ...) and any strides of ``x`` and ``W`` work.

Dot precision (``DOT_MODE``)
----------------------------
``tl.dot`` defaults to TF32 on NVIDIA tensor cores (10-bit mantissa); DReS residuals are small
differences of large numbers, so TF32 is not allowed (docs/DESIGN.md section 4). Modes:

- ``"ieee"``   fp32 inputs: IEEE fp32 products, fp32 accumulation (``input_precision="ieee"``: FMA units).
- ``"tf32x3"`` fp32 inputs, opt-in: Triton's split-precision tensor-core dot (3 TF32 products).
- ``"split3"`` fp16/bf16 inputs: ``x`` is exact in its own dtype, so only ``W`` needs care. ``W`` is split
  into three parts of ``x``'s dtype, ``W = W1 + W2 + W3`` (24+ significant bits together), and three
  half-precision tensor-core dots accumulate in fp32: every product is exact, as with fp32 FMAs.
- ``"fp64"``   float64 inputs: float64 dot.

Both ``input_precision`` values used here are accepted by Triton 3.0 through 3.9 (``allow_tf32`` is the
deprecated spelling). The interpreter ignores ``input_precision`` (it multiplies with numpy).
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------
# Shared launch helpers (also used by reconstruction_loss.py)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _probe_kernel(ptr):
    pass


# ``triton.jit`` returns an InterpretedFunction when TRITON_INTERPRET=1 was set before triton was
# imported: the only reliable sign (across Triton versions) that kernels run on the host.
INTERPRET = type(_probe_kernel).__name__ == "InterpretedFunction"

_wrap_triton = getattr(torch.library, "wrap_triton", None)

CPU_WITHOUT_INTERPRETER = (
    "the Triton backend got CPU tensors, but Triton runs on CPU tensors only through its interpreter, "
    "which is off: set the environment variable TRITON_INTERPRET=1 before anything imports triton "
    "(slow; meant for tests), move the tensors to a CUDA device, or use backend='torch'"
)


def check_device(*tensors):
    """Raise a clear error for CPU tensors when the interpreter is off (compiled Triton needs a GPU)."""
    for t in tensors:
        if t.device.type == "cpu" and not INTERPRET:
            raise RuntimeError(CPU_WITHOUT_INTERPRETER)


def device_guard(tensor):
    """Make ``tensor``'s GPU the current device while launching: Triton launches on the *current* device
    and stream, so tensors on ``cuda:1`` with ``cuda:0`` current would be read from the wrong device."""
    if INTERPRET or tensor.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def launch(kernel, grid, *args, **kwargs):
    """Launch through ``torch.library.wrap_triton`` so a ``triton_op`` caller is traceable by
    ``torch.compile``; interpreted kernels are launched directly (older torch's wrap_triton rejects them)."""
    if _wrap_triton is not None and not INTERPRET:
        kernel = _wrap_triton(kernel)
    kernel[grid](*args, **kwargs)


def autotuning():
    """Autotune on the GPU unless ``DRES_TRITON_AUTOTUNE=0`` (then one fixed config: quick GPU tests).
    Never under the interpreter, where a fixed small config keeps CI fast."""
    return not INTERPRET and os.environ.get("DRES_TRITON_AUTOTUNE", "1") != "0"


def d_bucket(d):
    """Autotuning key for the column count: the next power of two, clamped to [2^8, 2^20]."""
    return min(max(triton.next_power_of_2(d), 256), 1 << 20)


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_mode(dtype):
    """How the data dot runs for inputs of ``dtype`` (see the module docstring).

    ``DRES_TRITON_FP32_DOT=tf32x3`` opts fp32 inputs into split-precision tensor cores (for measurement)."""
    if dtype == torch.float64:
        return "fp64"
    if dtype in (torch.float16, torch.bfloat16):
        return "split3"
    mode = os.environ.get("DRES_TRITON_FP32_DOT", "ieee")
    if mode not in ("ieee", "tf32x3"):
        raise ValueError(f"DRES_TRITON_FP32_DOT must be 'ieee' or 'tf32x3', got {mode!r}")
    return mode


@triton.jit
def acc_zeros(ROWS: tl.constexpr, COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """A zero accumulator tile in the compute dtype: float64 for float64 inputs, else float32."""
    if DOT_MODE == "fp64":
        return tl.zeros((ROWS, COLS), dtype=tl.float64)
    else:
        return tl.zeros((ROWS, COLS), dtype=tl.float32)


@triton.jit
def mix_dot(w, x, acc, DOT_MODE: tl.constexpr):
    """``acc + w @ x`` with ``w`` in the compute dtype (fp32/fp64) and ``x`` in the data dtype."""
    if DOT_MODE == "ieee":
        acc = tl.dot(w, x.to(tl.float32), acc=acc, input_precision="ieee")
    elif DOT_MODE == "tf32x3":
        acc = tl.dot(w, x.to(tl.float32), acc=acc, input_precision="tf32x3")
    elif DOT_MODE == "split3":
        # W = W1 + W2 + W3 in x's dtype; x is exact in its dtype, so each half-precision product is exact
        # in fp32. Smallest part first so the large terms are added to an accumulator that already holds
        # the small ones.
        w1 = w.to(x.dtype)
        rest = w - w1.to(tl.float32)
        w2 = rest.to(x.dtype)
        w3 = (rest - w2.to(tl.float32)).to(x.dtype)
        acc = tl.dot(w3, x, acc=acc)
        acc = tl.dot(w2, x, acc=acc)
        acc = tl.dot(w1, x, acc=acc)
    else:  # "fp64"
        # out_dtype must be named: Triton 3.6 defaults it to fp32 and rejects the fp64 accumulator
        acc = tl.dot(w, x.to(tl.float64), acc=acc, out_dtype=tl.float64)
    return acc


# ----------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _spline_mix_kernel(
    w_ptr, x_ptr, out_ptr,
    M, K, D,
    stride_wm, stride_wk, stride_xk, stride_xd, stride_om,
    scale,
    D_BUCKET,  # only an autotuning key
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(M, BLOCK_M)
    # consecutive programs share one column tile of x, so it is read from HBM once and then from L2
    pid_m = pid % num_m_tiles
    pid_d = pid // num_m_tiles

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D

    acc = acc_zeros(BLOCK_M, BLOCK_D, DOT_MODE)

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_ptr + rows[:, None] * stride_wm + ks[None, :] * stride_wk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + ks[:, None].to(tl.int64) * stride_xk + cols[None, :] * stride_xd,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mix_dot(w, x, acc, DOT_MODE)

    out = acc * scale
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Small set of tiles for the GPU; all are correct for every shape (masks), the autotuner picks per
# (M, K, d bucket, dtypes). Under the interpreter one fixed small tile keeps CI fast.
_SPLINE_MIX_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for (bm, bk, bd, w, s) in [
        (32, 32, 64, 4, 3),
        (64, 32, 64, 4, 3),
        (64, 32, 128, 8, 3),
        (128, 32, 64, 8, 3),
        (128, 32, 128, 8, 3),
        (64, 64, 128, 8, 2),
        (128, 64, 128, 8, 2),
        (16, 32, 128, 4, 4),
    ]
]
INTERPRETER_SPLINE_MIX_TILE = {"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_D": 32}
FIXED_GPU_SPLINE_MIX_CONFIG = {"BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 3}

if INTERPRET:
    _spline_mix_tuned = None
else:
    # DOT_MODE is part of the key: "ieee" and "tf32x3" fp32 dots have different best tiles
    _spline_mix_tuned = triton.autotune(configs=_SPLINE_MIX_CONFIGS, key=["M", "K", "D_BUCKET", "DOT_MODE"])(
        _spline_mix_kernel)


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------


def spline_mix_into(weights, x, out, scale=1.0):
    """``out = scale * weights @ x``; ``out`` contiguous ``(M, d)``; strides of ``weights`` and ``x`` are
    passed to the kernel, so transposed views (backward's ``W^T``) cost nothing."""
    M, K = weights.shape
    d = x.shape[1]
    if d == 0 or M == 0:
        return out
    mode = dot_mode(x.dtype)
    args = (weights, x, out, M, K, d,
            weights.stride(0), weights.stride(1), x.stride(0), x.stride(1), out.stride(0),
            float(scale), d_bucket(d))
    if autotuning():
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_D"]),)
        launch(_spline_mix_tuned, grid, *args, DOT_MODE=mode)
    else:
        config = INTERPRETER_SPLINE_MIX_TILE if INTERPRET else FIXED_GPU_SPLINE_MIX_CONFIG
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(d, config["BLOCK_D"]),)
        launch(_spline_mix_kernel, grid, *args, DOT_MODE=mode, **config)
    return out


def spline_mix(weights, x):
    """Backend entry point (docs/ARCHITECTURE.md): ``weights (M, K) @ x (K, d)`` -> ``(M, d)``, contiguous,
    dtype of ``x``; fp32 accumulation with exact products (fp64 for float64 inputs), never TF32."""
    check_device(weights, x)
    if weights.dim() != 2 or x.dim() != 2 or weights.shape[1] != x.shape[0]:
        raise ValueError(f"spline_mix: expected weights (M, K) and x (K, d), got {tuple(weights.shape)} "
                         f"and {tuple(x.shape)}")
    weights = weights.to(compute_dtype(x.dtype))
    out = torch.empty((weights.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    with device_guard(x):
        return spline_mix_into(weights, x, out)
