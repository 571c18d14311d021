"""Backend ``"torch"``: the reference implementation of both ops in plain PyTorch (any device).

Contract (docs/ARCHITECTURE.md): inputs are 2-D, validated and on one device; ``weights`` and
``decoder`` are already in the compute dtype (:mod:`dres_fast.contract`).
"""

from __future__ import annotations

import contextlib
import sys

import torch

from ..contract import gradient_scale, loss_dtype

__all__ = ["NAME", "is_available", "load", "spline_mix", "reconstruction_loss", "loss_dtype", "reduction_scale"]

NAME = "torch"
reduction_scale = gradient_scale  # the first version's name


def is_available(device_type: str = "cpu"):
    """Always ``(True, "")``: plain PyTorch runs on every device."""
    return True, ""


def load():
    """The ops ``dres_fast::spline_mix_torch`` and ``dres_fast::reconstruction_loss_torch``."""
    from ..ops import registry

    return registry.define_ops(NAME, sys.modules[__name__])


@contextlib.contextmanager
def _no_tf32():
    # TF32 products break the accuracy contract (docs/DESIGN.md, section 4): IEEE fp32 on CUDA.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


@contextlib.contextmanager
def _ieee_fp32(device: torch.device):
    """IEEE fp32 (or fp64) products for the matmuls inside: no TF32 on CUDA, and no autocast, which would
    otherwise run them in bf16/fp16 under AMP (the weights and the accumulation must stay fp32)."""
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(_no_tf32())
        if _autocast_enabled(device.type):
            stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        yield


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # skips Tensor.to's dispatch when there is nothing to do: at small d these calls are the cost
    return t if t.dtype == dtype else t.to(dtype)


def _mix(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with _ieee_fp32(x.device):
        return weights @ _cast(x, weights.dtype)


def spline_mix(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""``out[m, j] = sum_k weights[m, k] x[k, j]``, accumulated in ``weights.dtype``, returned in ``x.dtype``."""
    return _cast(_mix(weights, x), x.dtype).contiguous()


def reconstruction_loss(y, y_coded, decoder, reduction: str, compute_grads: bool):
    r"""``r = y - decoder @ y_coded``; ``loss = reduce(sum_j r_kj^2)``; optionally the gradients
    ``grad_y = c r`` and ``grad_y_coded = -decoder^T grad_y`` for a unit incoming gradient
    (``c = 2/(K d)`` for "mean", 2 for "sum"; for "none" only ``grad_y = 2 r``)."""
    with _ieee_fp32(y.device):
        # one GEMM with the subtraction folded in: r = y - D y_coded
        residual = torch.addmm(_cast(y, decoder.dtype), decoder, _cast(y_coded, decoder.dtype), alpha=-1)
    per_sample = (residual * residual).sum(dim=1)
    if reduction == "none":
        loss = per_sample
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample.sum() / residual.numel()
    loss = _cast(loss, loss_dtype(y.dtype))
    if not compute_grads:
        return loss, y.new_empty(0), y.new_empty(0)  # two tensors: op outputs may not alias
    grad_y = residual * gradient_scale(reduction, residual.numel())
    if reduction == "none":
        return loss, _cast(grad_y, y.dtype), y.new_empty(0)
    grad_y_coded = _mix(decoder.t(), grad_y).neg_()  # a fresh tensor: negate in place
    return loss, _cast(grad_y, y.dtype), _cast(grad_y_coded, y_coded.dtype)

