r"""The two ops on the banded path: the spline maps applied from O(K + N) coefficients
(:class:`dres_fast.banded.BandedSpline`) instead of dense matrices.

Dense path: ``spline_mix`` is a ``(N x K) @ (K x d)`` GEMM, ``2 N K d`` flops. Banded path: a stencil, two
triangular sweeps along the batch and a 6-point evaluation per output row, about ``30 (K + N) d`` flops
in float64, and no ``(N, K)`` matrix to build (O(K + N) set-up). Which backend kernel applies the map:

* ``"torch"``: on the CPU the compiled C kernel (:mod:`dres_fast.backends.banded_cpu`, built on first use),
  else the spline's own blocked torch ops (any device);
* ``"triton"`` / ``"cuda"``: their ``banded_apply`` kernels.

Each runs the recurrences in float64. :class:`_BandedMap` makes any of them differentiable: its backward
is the transposed map, itself a ``_BandedMap``, so derivatives of every order are exact.

:func:`choose` is ``"auto"``'s choice between the paths (``DRES_SPLINE_PATH`` overrides it).
"""

from __future__ import annotations

import functools
import inspect
import os
from types import SimpleNamespace

import torch

from ..backends import reference
from ..banded import BandedSpline
from ..contract import compute_dtype, gradient_scale, loss_dtype
from .dispatch import load_backend, resolve_backend

__all__ = ["PATHS", "ENV_VAR", "choose", "spline_mix", "reconstruction_loss", "kernel_for", "functions"]

PATHS = ("auto", "dense", "banded")
ENV_VAR = "DRES_SPLINE_PATH"
#: ``"auto"`` takes the banded path on the CPU (compiled kernel) when both batches have at least ``samples``
#: samples and the data is at least ``width`` wide, for one of these ``(samples, width)`` pairs. From
#: ``python -m bench.banded`` on the 2-core CPU VM, one thread (docs/bench_cpu/banded.json), where both
#: paths cost well under a millisecond and the per-call host cost decides: float32 at K = N = 256 lost at
#: d = 16 and 32 and won from d = 64; at K = N = 128 it lost at d = 64 and won at d = 1024 (d = 256 was
#: within 10% either way across runs); at K = N = 64 and at K = 32, d = 4096 it lost. bfloat16 and float16
#: data take float32's pairs (measured the same: the CPU kernel reads them as float32).
AUTO_CPU = ((256, 64), (128, 1024))
#: float64 data moves the boundary down at K = 128: a dense float64 GEMM costs about twice a float32 one,
#: while the banded sweeps are float64 for every dtype (won from d = 128 there, lost at d = 64).
AUTO_CPU_BY_DTYPE = {torch.float64: ((256, 64), (128, 128))}


def path_setting() -> str:
    value = os.environ.get(ENV_VAR, "auto") or "auto"
    if value not in PATHS:
        raise ValueError(f"the environment variable {ENV_VAR} must be one of {PATHS}, got {value!r}")
    return value


def choose(backend: str, device: torch.device, num_samples: int, num_coded: int, width: int,
           dtype: torch.dtype = torch.float32) -> str:
    """``"dense"`` or ``"banded"`` for a DReS step's coding of data of ``dtype`` (``DRES_SPLINE_PATH`` forces
    either). On CUDA ``"auto"`` stays dense until GPU measurements say otherwise (bench/RESULTS.md)."""
    if os.environ.get(ENV_VAR, "auto") != "auto":
        return path_setting()
    samples = min(num_samples, num_coded)
    for min_samples, min_width in AUTO_CPU_BY_DTYPE.get(dtype, AUTO_CPU):  # a loop, not any(): no generator frames
        if samples >= min_samples and width >= min_width:
            break
    else:
        return "dense"
    if device.type != "cpu" or resolve_backend(backend, device) != "torch":
        return "dense"
    return "banded" if _cpu_kernel_available() else "dense"


def _cpu_kernel_available() -> bool:
    from ..backends import banded_cpu

    return banded_cpu.available()


def kernel_for(backend: str, device: torch.device, dtype: torch.dtype):
    """``fn(arrays, x, transpose)`` of the backend chosen for data of ``dtype`` on ``device``, or ``None``
    where the spline's own torch ops apply the map."""
    name = resolve_backend(backend, device, dtype)
    if name == "torch":
        if device.type == "cpu" and _cpu_kernel_available():
            from ..backends import banded_cpu

            return banded_cpu.banded_apply
        return None
    return getattr(load_backend(name), "banded_apply", None)


def _apply(spline: BandedSpline, transpose: bool, kernel, x: torch.Tensor) -> torch.Tensor:
    """``W x`` or ``W^T x`` in ``x.dtype``, by ``kernel`` where it applies: the CPU, Triton and CUDA kernels
    run the plain solve and, with ``refinement=``, its refinement step; a kernel without that parameter would
    leave the configurations that need the step (most at a few thousand knots: without it, 6e-5 off at 4096
    Chebyshev knots and lam = 1e6) to the torch ops."""
    refinement = spline.refinement
    if kernel is None or spline.line is not None or (refinement is not None and not _refines(kernel)):
        exact = spline.transpose64 if transpose else spline.forward64
        return exact(x.to(torch.float64)).to(x.dtype)
    extra = {} if refinement is None else {"refinement": refinement}
    if x.device.type == "cpu" and x.dtype not in (torch.float32, torch.float64):
        return kernel(spline.arrays, x.float(), transpose, **extra).to(x.dtype)  # the C kernel reads fp32/fp64
    return kernel(spline.arrays, x, transpose, **extra)


@functools.lru_cache(maxsize=None)
def _refines(kernel) -> bool:
    """Whether ``kernel`` takes ``refinement=``."""
    return "refinement" in inspect.signature(kernel).parameters


class _BandedMap(torch.autograd.Function):
    """``W x`` (``transpose``: ``W^T x``); the backward is the other one, so every order is exact."""

    @staticmethod
    def forward(ctx, spline, transpose, kernel, x):
        ctx.spline, ctx.transpose, ctx.kernel = spline, transpose, kernel
        return _apply(spline, transpose, kernel, x)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        return None, None, None, _BandedMap.apply(ctx.spline, not ctx.transpose, ctx.kernel, grad)


def spline_mix(spline: BandedSpline, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``spline @ x`` for 2-D ``x`` (validated by the caller), differentiable, in ``x.dtype``."""
    return _BandedMap.apply(spline, False, kernel_for(backend, x.device, x.dtype), x)


def reconstruction_loss(y, y_coded, decoder: BandedSpline, reduction: str, backend: str = "auto"):
    """``reduce(|| y - decoder @ y_coded ||^2)`` for 2-D ``y`` and ``y_coded`` (validated by the caller),
    accumulated in the compute dtype; differentiable (any order) in both. With a kernel that writes
    ``y - D y_coded`` itself (``base=``, ``scale=``: the CPU kernel), one fused pass each way
    (:class:`_FusedLoss`); otherwise ``_BandedMap`` and torch ops (:func:`_composed_loss`)."""
    kernel = kernel_for(backend, y.device, y.dtype)
    if _fuses(kernel) and (decoder.refinement is None or _refines(kernel)) and decoder.line is None:
        return _FusedLoss.apply(decoder, kernel, reduction, y, y_coded)
    return _composed_loss(y, y_coded, decoder, reduction, kernel)


def _composed_loss(y, y_coded, decoder, reduction, kernel):
    return reference._reduce(_residual(y, y_coded, decoder, kernel), reduction).to(loss_dtype(y.dtype))


def _residual(y, y_coded, decoder, kernel) -> torch.Tensor:
    """``y - D y_coded`` in the compute dtype, differentiable (any order) through :class:`_BandedMap`."""
    compute = compute_dtype(y.dtype)
    return y.to(compute) - _BandedMap.apply(decoder, False, kernel, y_coded).to(compute)


def _grad_scale(residual: torch.Tensor, grad: torch.Tensor, reduction: str) -> torch.Tensor:
    """``c g`` in the residual's dtype: one per sample (row) for ``"none"``, else a scalar."""
    return grad.to(residual.dtype) * gradient_scale(reduction, residual.numel())


def _grad_residual(residual: torch.Tensor, grad: torch.Tensor, reduction: str) -> torch.Tensor:
    """``dL/dr = g c r`` for the incoming gradient ``g`` (one per sample for ``"none"``)."""
    scale = _grad_scale(residual, grad, reduction)
    return residual * (scale[:, None] if reduction == "none" else scale)


@functools.lru_cache(maxsize=None)
def _fuses(kernel) -> bool:
    """Whether ``kernel`` takes ``base=`` and ``scale=`` (returns ``base + scale W x``), ``row_sumsq=`` and
    ``row_scale=`` (the CPU kernel's extras: :func:`dres_fast.backends.banded_cpu.banded_apply`)."""
    if kernel is None:
        return False
    parameters = inspect.signature(kernel).parameters
    return all(name in parameters for name in ("base", "scale", "row_sumsq", "row_scale"))


class _FusedLoss(torch.autograd.Function):
    """The loss on two kernel passes. Forward: the kernel writes the residual ``r = y - D y_coded`` (no
    ``D y_coded`` tensor) and, in the same pass, each row's sum of squares in float64 (no ``r^2`` tensor, no
    second read of ``r``). Backward: one transposed pass reads ``r`` once and writes ``grad_y = c g r`` and
    ``grad_y_coded = -D^T grad_y``. Under ``create_graph`` the backward recomputes with
    :func:`_composed_loss`'s differentiable ops, so higher derivatives stay exact."""

    @staticmethod
    def forward(ctx, decoder, kernel, reduction, y, y_coded):
        compute = compute_dtype(y.dtype)
        data = torch.float32 if compute == torch.float32 and y.dtype != torch.float32 else y.dtype
        extra = {} if decoder.refinement is None else {"refinement": decoder.refinement}
        residual, row_sums = kernel(decoder.arrays, y_coded.to(data), False, base=y.to(data), scale=-1.0,
                                    row_sumsq=True, **extra)
        if reduction == "none":
            value = row_sums
        else:
            value = row_sums.sum() * (gradient_scale(reduction, residual.numel()) / 2.0)
        ctx.decoder, ctx.kernel, ctx.reduction, ctx.extra = decoder, kernel, reduction, extra
        ctx.save_for_backward(residual, y, y_coded)
        return value.to(loss_dtype(y.dtype))

    @staticmethod
    def backward(ctx, grad):
        residual, y, y_coded = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the same gradients with differentiable ops
            grad_r = _grad_residual(_residual(y, y_coded, ctx.decoder, ctx.kernel), grad, ctx.reduction)
            grad_y_coded = _BandedMap.apply(ctx.decoder, True, ctx.kernel, grad_r.to(y_coded.dtype)).neg()
            return None, None, None, grad_r.to(y.dtype), grad_y_coded
        # c g per row, as _grad_residual multiplies: the kernel rounds r c g to the residual's dtype
        scale = _grad_scale(residual, grad, ctx.reduction)
        row_scale = scale if ctx.reduction == "none" else scale.expand(residual.shape[0])
        grad_y_coded, grad_y = ctx.kernel(ctx.decoder.arrays, residual, True, scale=-1.0, row_scale=row_scale,
                                          **ctx.extra)
        return None, None, None, grad_y.to(y.dtype), grad_y_coded.to(y_coded.dtype)


@functools.lru_cache(maxsize=None)
def functions(backend: str) -> SimpleNamespace:
    """The banded path with :func:`dres_fast.ops.dispatch.functions`' signatures: ``spline_mix(spline, x)``
    and ``reconstruction_loss(y, y_coded, spline, reduction)``."""
    return SimpleNamespace(
        spline_mix=lambda spline, x: spline_mix(spline, x, backend),
        reconstruction_loss=lambda y, y_coded, spline, reduction: reconstruction_loss(y, y_coded, spline, reduction, backend))
