"""Backend ``"torch"``: the reference implementation of both ops in plain PyTorch (any device).

Contract (docs/ARCHITECTURE.md): inputs are 2-D, validated and on one device; ``weights`` and
``decoder`` are already in the compute dtype (float64 for float64 inputs, float32 otherwise).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["spline_mix", "reconstruction_loss", "loss_dtype", "reduction_scale"]


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32/float64 losses keep their dtype; half types report their loss in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def reduction_scale(reduction: str, numel: int) -> float:
    """d loss / d (sum of squares) for one sample's row: 2/(K d) for "mean", 2 otherwise."""
    return 2.0 / numel if reduction == "mean" else 2.0


@contextlib.contextmanager
def _ieee_fp32(device: torch.device):
    # TF32 products break the accuracy contract (DESIGN.md 4): force IEEE fp32 on CUDA.
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _mix(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with _ieee_fp32(x.device):
        return weights @ x.to(weights.dtype)


def spline_mix(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""``out[m, j] = sum_k weights[m, k] x[k, j]``, accumulated in ``weights.dtype``, returned in ``x.dtype``."""
    return _mix(weights, x).to(x.dtype).contiguous()


def reconstruction_loss(y, y_coded, decoder, reduction: str, compute_grads: bool):
    r"""``r = y - decoder @ y_coded``; ``loss = reduce(sum_j r_kj^2)``; optionally the gradients
    ``grad_y = c r`` and ``grad_y_coded = -decoder^T grad_y`` for a unit incoming gradient
    (``c = 2/(K d)`` for "mean", 2 for "sum"; for "none" only ``grad_y = 2 r``)."""
    with _ieee_fp32(y.device):
        # one GEMM with the subtraction folded in: r = y - D y_coded
        residual = torch.addmm(y.to(decoder.dtype), decoder, y_coded.to(decoder.dtype), alpha=-1)
    per_sample = (residual * residual).sum(dim=1)
    if reduction == "none":
        loss = per_sample
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample.sum() / residual.numel()
    loss = loss.to(loss_dtype(y.dtype))
    if not compute_grads:
        return loss, y.new_empty(0), y.new_empty(0)  # two tensors: op outputs may not alias
    grad_y = residual * reduction_scale(reduction, residual.numel())
    if reduction == "none":
        return loss, grad_y.to(y.dtype), y.new_empty(0)
    grad_y_coded = _mix(decoder.t(), grad_y).neg_()  # a fresh tensor: negate in place
    return loss, grad_y.to(y.dtype), grad_y_coded.to(y_coded.dtype)
