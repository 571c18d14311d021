"""Helpers shared by the Triton kernels: launch plumbing, autotuning, dot precision.

Dot precision (``DOT_MODE``)
----------------------------
``tl.dot`` defaults to TF32 on NVIDIA tensor cores (10-bit mantissa); DReS residuals are small
differences of large numbers, so TF32 is not allowed (docs/ARCHITECTURE.md, accuracy). Modes:

- ``"ieee"``   fp32 inputs: IEEE fp32 products, fp32 accumulation (``input_precision="ieee"``: FMA units).
- ``"tf32x3"`` fp32 inputs, opt-in: Triton's split-precision tensor-core dot (3 TF32 products).
- ``"split"``  fp16/bf16 inputs: ``x`` is exact in its own dtype, so only ``W`` needs care. ``W`` is split
  into parts of ``x``'s dtype, ``W = W1 + ... + WP``, and ``P`` half-precision tensor-core dots accumulate in
  fp32: every product is exact, as with fp32 FMAs. ``P`` is what the output needs (``split_parts``): 3 (24+
  significant bits, all of fp32 ``W``) for an fp32 result such as the loss's residual, 2 (16+ bits, whose
  error ``2^-16 sum |W||x|`` is 1/256 of a bf16 rounding, 1/32 of an fp16 one) for an fp16/bf16 result.
  fp16 parts are made from ``W`` times a power of two (undone on the fp32 accumulator, exactly), so that
  small entries do not fall into fp16's subnormals.
  The coding weights' parts are made once (``split_weights`` keeps them on the cached matrix) and read from
  memory by the kernels (``parts_dot``), so no inner loop converts anything.
- ``"fp64"``   float64 inputs: float64 dot.

Both ``input_precision`` values used here are accepted by Triton 3.0 through 3.9 (``allow_tf32`` is the
deprecated spelling). The interpreter ignores ``input_precision`` (it multiplies with numpy).

Two-level summation (``mix_dot_two_level``)
-------------------------------------------
A long reduction (over ``N`` in ``D @ y_coded``, over ``K`` in ``D^T (c r)`` and ``W @ x``) written as
``acc = tl.dot(w, x, acc)`` chunk after chunk is one fp32 FMA chain over the whole depth ``n``: its
rounding error grows like ``n u`` (``u = 2^-24``; ~``sqrt(n) u`` for random signs). At ``n = 1024`` that
is 5-10x cuBLAS's error (which sums in blocks), against the rule of at most 2x torch's. With fp32
accumulators each chunk (the launcher's fixed reduction chunk: 32 products on the loss's rows path, 16 or
32 in ``spline_mix``) is therefore summed into a fresh zero tile and then added to the running total: the
error bound becomes ``(b + n / b) u`` for chunks of ``b``, 64 u (b = 32) or 80 u (b = 16) instead of
1024 u at ``n = 1024``, where ``b = sqrt(n) = 32`` is the optimum. Every chunk is flushed: grouping 2 or 4
chunks of 32 needs no more registers but gives 80 u or 136 u at ``n = 1024`` and helps only beyond
``n ~ 4096``; its only gain would be fewer adds. Cost: one add per ``b`` FMAs and one more accumulator
tile. float64 keeps the single chain.

The flush is ``tl.fma(chunk, 1.0, total)``, not ``total + chunk``: Triton's combine pass rewrites
``addf(dot(a, b, 0), total)`` into ``dot(a, b, total)``, which would silently restore the single chain.
``fma(chunk, 1, total)`` rounds exactly like the add (the product is exact) and LLVM emits it as one.
The Triton interpreter multiplies with numpy (not an FMA chain), so the gain shows only on a GPU; the
CUDA twin of this scheme (csrc/tile_gemm.cuh) is checked on the CPU through the emulation harness.

Determinism across autotune choices
-----------------------------------
Two processes (two DDP ranks) may pick different configs. Configs therefore never change the order of a
floating-point sum: the reduction chunk (``BLOCK_K`` of ``spline_mix``, ``BLOCK_N`` of the loss, which
are also the two-level sum's blocks) and the column tile that fixes the loss partials' layout are chosen
by the launchers from the shape and dtype; configs only change the other tile sizes, warps and stages.
An IEEE FMA dot adds the products of each output element in k order whatever the tile; tensor-core dots
add k16 (k8) slices in k order. The one tree reduction whose order follows the register layout (which
the compiler picks per variant and warp count), the per-row sum of ``r^2``, is done in float64: see
``reconstruction_loss``'s Determinism section.
"""

import contextlib
import inspect
import os

import torch
import triton
import triton.language as tl


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

# Stand-in for the multiprocessor count under the interpreter, so that the small-d paths are taken
# (and tested) at small d there too.
INTERPRETER_MULTIPROCESSORS = 2


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


def multiprocessors(device):
    """Streaming multiprocessors of ``device`` (the interpreter's stand-in on CPU)."""
    if INTERPRET or device.type != "cuda":
        return INTERPRETER_MULTIPROCESSORS
    return torch.cuda.get_device_properties(device).multi_processor_count


_PYTHON_KEY = torch._C.DispatchKey.Python


def traced(args) -> bool:
    """Whether a launch with these arguments is being traced (``torch.compile``, ``torch.export``,
    ``make_fx``, fake or functional tensors) rather than run. Tensor subclasses without
    ``__torch_dispatch__`` (``nn.Parameter``) run: only the Python dispatch key marks a traced tensor."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(isinstance(a, torch.Tensor) and torch._C._dispatch_keys(a).has(_PYTHON_KEY) for a in args)


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel``. While traced, through ``torch.library.wrap_triton``, so that ``torch.compile``
    sees the launch inside the ``triton_op``; otherwise directly: wrap_triton's eager path dispatches a
    higher-order op per launch, which torch's own ``triton_op`` skips in eager mode because it costs about
    a millisecond, and the eager ``autograd.Function`` s (``dres_fast.ops.registry.eager_functions``) call
    the launchers outside any ``triton_op``. Interpreted kernels are always launched directly (older
    torch's wrap_triton rejects them)."""
    if _wrap_triton is not None and not INTERPRET and traced(args):
        kernel = _wrap_triton(kernel)
    kernel[grid](*args, **kwargs)


def autotuning():
    """Autotune on the GPU unless ``DRES_TRITON_AUTOTUNE=0`` (then one fixed config: quick GPU tests).
    Never under the interpreter, where a fixed small config keeps CI fast."""
    return not INTERPRET and os.environ.get("DRES_TRITON_AUTOTUNE", "1") != "0"


def autotune(kernel, configs, key):
    """``triton.autotune`` with the timings cached on disk where Triton supports it (``cache_results``:
    Triton >= 3.3), so a new process does not benchmark the configs again. None under the interpreter."""
    if INTERPRET:
        return None
    extra = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        extra["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **extra)(kernel)


def config_dict(config):
    """A ``triton.Config`` as the keyword arguments of a direct launch."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def bucket(n, low=16, high=1 << 20):
    """Autotuning key of a size: the next power of two, clamped to [low, high], so nearby batch sizes
    and widths share one tuning run."""
    return min(max(triton.next_power_of_2(max(int(n), 1)), low), high)


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


DOT_MODES = ("ieee", "tf32x3", "split", "fp64")  # what dot_mode may return


def dot_mode(dtype):
    """How the data dot runs for inputs of ``dtype`` (see the module docstring).

    ``DRES_TRITON_FP32_DOT=tf32x3`` opts fp32 inputs into split-precision tensor cores (for measurement)."""
    if dtype == torch.float64:
        return "fp64"
    if dtype in (torch.float16, torch.bfloat16):
        return "split"
    mode = os.environ.get("DRES_TRITON_FP32_DOT", "ieee")
    if mode not in ("ieee", "tf32x3"):
        raise ValueError(f"DRES_TRITON_FP32_DOT must be 'ieee' or 'tf32x3', got {mode!r}")
    return mode


def split_parts(out_dtype):
    """Parts of ``W`` a "split" dot needs for a result of ``out_dtype`` (module docstring)."""
    return 2 if out_dtype in (torch.float16, torch.bfloat16) else 3


# fp16 parts are made from W scaled by a power of two that puts max |W| in [2^14, 2^15): the small parts
# then stay above fp16's subnormals (spacing 2^-24), which would otherwise bound every entry's error at
# 2^-25 (1e-7 of an O(1) entry: far from exact for the loss's fp32 residual)
_FP16_TOP = 2.0 ** 15


def _split(weights, dtype, parts):
    w = weights.float()
    if dtype == torch.float16:  # no sync: the scale stays on the device
        scale = torch.exp2(torch.floor(torch.log2(_FP16_TOP / w.abs().amax().clamp_min(2.0 ** -100))))
        w, unscale = w * scale, (1.0 / scale).reshape(1)
    else:  # bf16 has fp32's exponent range
        unscale = torch.ones(1, dtype=torch.float32, device=w.device)
    stacked = torch.empty((parts, *w.shape), dtype=dtype, device=w.device)
    for i in range(parts):
        stacked[i] = w.to(dtype)
        w = w - stacked[i].float()  # exact in fp32: the part holds the rest's leading bits
    return stacked, unscale


#: set by dres_fast's weight cache (dres_fast/cache.py, FROZEN_ATTR there too) on the coding weights it hands
#: out, which nothing changes in place: their split parts can then be kept on them
FROZEN_ATTR = "_dres_fast_frozen"
_PARTS_ATTR = "_dres_fast_split_parts"


def _capturing(tensor):
    return tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def split_weights(weights, dtype, parts):
    """``weights`` (fp32, any strides) as ``(stacked, unscale)``: ``parts`` tensors of ``dtype`` stacked
    ``(parts, M, K)`` with ``W ~= unscale * (W1 + ... + WP)``, ``W1`` the rounding of ``W / unscale``, each
    next part the rounding of what the earlier ones leave; ``unscale`` is a power of two in a 1-element fp32
    tensor (1 for bf16; for fp16 it keeps the parts above the subnormals), exact to multiply by.

    The coding weights (marked ``FROZEN_ATTR`` by dres_fast's weight cache) keep their parts on the tensor:
    each cached matrix is split once, and its transpose (backward's ``W^T``) reads the same parts through
    strides. Any other matrix is split per call (O(M K) against the dot's O(M K d)): a user's ``W`` may change
    through ``.data``, numpy or another writer that no version counter sees. So is a traced call
    (``torch.compile``: the split joins the graph) and, for parts not yet made, a CUDA graph capture (parts
    made there hold data only once the graph has been replayed)."""
    base = weights if weights._base is None else weights._base
    if not getattr(base, FROZEN_ATTR, False) or base.dim() != 2 or traced((weights,)):
        return _split(weights, dtype, parts)
    same = weights.storage_offset() == base.storage_offset()
    if same and weights.shape == base.shape and weights.stride() == base.stride():
        transposed = False
    elif same and weights.shape == base.shape[::-1] and weights.stride() == base.stride()[::-1]:
        transposed = True
    else:
        return _split(weights, dtype, parts)
    kept = base.__dict__.setdefault(_PARTS_ATTR, {})
    if (dtype, parts) not in kept:
        if _capturing(base):
            return _split(weights, dtype, parts)
        kept[(dtype, parts)] = _split(base, dtype, parts)
    stacked, unscale = kept[(dtype, parts)]
    return (stacked.transpose(1, 2) if transposed else stacked), unscale


@triton.jit
def acc_zeros(ROWS: tl.constexpr, COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """A zero accumulator tile in the compute dtype: float64 for float64 inputs, else float32."""
    if DOT_MODE == "fp64":
        return tl.zeros((ROWS, COLS), dtype=tl.float64)
    else:
        return tl.zeros((ROWS, COLS), dtype=tl.float32)


@triton.jit
def mix_dot(w, x, acc, DOT_MODE: tl.constexpr):
    """``acc + w @ x`` with ``w`` in the compute dtype (fp32/fp64) and ``x`` in the data dtype; the "split"
    mode's dots are ``parts_dot`` (its ``w`` comes pre-split from memory)."""
    if DOT_MODE == "ieee":
        acc = tl.dot(w, x.to(tl.float32), acc=acc, input_precision="ieee")
    elif DOT_MODE == "tf32x3":
        acc = tl.dot(w, x.to(tl.float32), acc=acc, input_precision="tf32x3")
    else:  # "fp64"
        # out_dtype must be named: Triton 3.6 defaults it to fp32 and rejects the fp64 accumulator
        acc = tl.dot(w, x.to(tl.float64), acc=acc, out_dtype=tl.float64)
    return acc


@triton.jit
def mix_dot_two_level(w, x, total, DOT_MODE: tl.constexpr):
    """``total + w @ x`` with the chunk ``w @ x`` summed on its own first (module docstring: two-level
    summation) when the accumulator is fp32; float64 accumulates into ``total`` directly."""
    if DOT_MODE == "fp64":
        return mix_dot(w, x, total, DOT_MODE)
    else:
        chunk = mix_dot(w, x, tl.zeros(total.shape, dtype=tl.float32), DOT_MODE)
        # fma, not +: Triton would fold "dot(a, b, 0) + total" back into dot(a, b, total)
        return tl.fma(chunk, 1.0, total)


@triton.jit
def parts_dot(a_ptrs, a_mask, stride_ap, b, acc, A_PARTS: tl.constexpr):
    """``acc + A @ b`` with ``A`` pre-split into ``A_PARTS`` parts of b's dtype ``stride_ap`` apart
    (``split_weights``; "split" mode): exact half-precision products in fp32, smallest part first so the
    large terms are added to an accumulator that already holds the small ones."""
    for i in tl.static_range(A_PARTS):
        # int64: three parts of a K x N decoder pass 2^31 elements at K N >= 2^30
        a = tl.load(a_ptrs + tl.full([], A_PARTS - 1 - i, tl.int64) * stride_ap, mask=a_mask, other=0.0)
        acc = tl.dot(a, b, acc=acc)
    return acc


@triton.jit
def program_tile(pid, num_rows, num_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Program ``pid``'s tile of a ``(num_rows, num_cols)`` output, row tiles fastest: the programs sharing
    a column tile run back to back, so that column tile of the input comes from HBM once and from L2 for
    the others. Returns the tile's rows, columns (int64: column offsets may pass 2^31), their in-bounds
    masks and the column tile's index."""
    num_row_tiles = tl.cdiv(num_rows, BLOCK_ROWS)
    pid_row = pid % num_row_tiles
    pid_col = pid // num_row_tiles
    rows = pid_row * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = pid_col.to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return rows, cols, rows < num_rows, cols < num_cols, pid_col


@triton.jit
def tile_product(a_ptr, b_ptr, rows, cols, row_ok, col_ok, depth, stride_ar, stride_ak, stride_ap, stride_bk,
                 stride_bc, BLOCK_ROWS: tl.constexpr, BLOCK_DEPTH: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 DOT_MODE: tl.constexpr, TWO_LEVEL: tl.constexpr, A_PARTS: tl.constexpr):
    """``A[rows, :] @ B[:, cols]`` in the compute dtype, over the whole ``depth`` in ``BLOCK_DEPTH`` chunks
    taken in order (``BLOCK_DEPTH``, fixed by the launchers, alone decides the summation order); entries
    outside ``rows``, ``cols`` or ``depth`` count as 0. ``B`` is in the data dtype; ``A`` in the compute
    dtype, or with ``A_PARTS`` > 0 ("split") pre-split into that many parts of B's dtype ``stride_ap``
    apart (``split_weights``). ``TWO_LEVEL``: each chunk summed on its own first (fp32 accumulators)."""
    acc = acc_zeros(BLOCK_ROWS, BLOCK_COLS, DOT_MODE)
    for k0 in range(0, depth, BLOCK_DEPTH):
        ks = k0 + tl.arange(0, BLOCK_DEPTH)
        k_ok = ks < depth
        a_ptrs = a_ptr + rows[:, None] * stride_ar + ks[None, :] * stride_ak
        a_mask = row_ok[:, None] & k_ok[None, :]
        b = tl.load(b_ptr + ks[:, None].to(tl.int64) * stride_bk + cols[None, :] * stride_bc,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if A_PARTS > 0:
            if TWO_LEVEL:
                chunk = parts_dot(a_ptrs, a_mask, stride_ap, b, tl.zeros((BLOCK_ROWS, BLOCK_COLS), tl.float32), A_PARTS)
                acc = tl.fma(chunk, 1.0, acc)  # not +: see mix_dot_two_level
            else:
                acc = parts_dot(a_ptrs, a_mask, stride_ap, b, acc, A_PARTS)
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            if TWO_LEVEL:
                acc = mix_dot_two_level(a, b, acc, DOT_MODE)
            else:
                acc = mix_dot(a, b, acc, DOT_MODE)
    return acc
