r"""Backend ``"torch"``: both ops in plain PyTorch (any device), the reference for the other backends.

For ``r = y - D y_c`` (``y``: ``(K, d)``, ``y_c``: ``(N, d)``, ``D``: ``(K, N)``, all 2-D, already
validated, ``D`` in the compute dtype of :mod:`dres_fast.contract`):

.. math::

    L = \operatorname{reduce}_k \sum_j r_{kj}^2, \qquad
    \frac{\partial L}{\partial y} = g\,c\,r, \qquad \frac{\partial L}{\partial y_c} = -D^\top (g\,c\,r)

with ``c`` the gradient scale (``2 / (K d)`` for ``"mean"``, 2 otherwise) and ``g`` the incoming gradient
(one per sample for ``"none"``). Three forms of that math live here:

* :func:`spline_mix` and :func:`loss`: differentiable with ordinary autograd. Off CUDA they *are* the
  backend (nothing around them: a second derivative is plain autograd, and the host cost is that of
  the same math written by hand).
* :func:`reconstruction_loss`: the fused contract every backend implements (loss and, when asked, the
  gradients for a unit incoming gradient, computed in the forward pass).
* :func:`loss_gradients`: the gradients for an incoming gradient ``g``, written with differentiable
  operations. ``dres_fast.ops`` uses it for every backend when a backward runs with ``create_graph=True``,
  so second derivatives are exact whatever computed the first.

Matmuls run in IEEE fp32 (or fp64): no TF32 on CUDA and no autocast, which would run them in bf16/fp16
(the residual can be far smaller than ``y``; docs/DESIGN.md, "Accuracy").
"""

from __future__ import annotations

import contextlib
import sys

import torch

from ..contract import gradient_scale, loss_dtype

__all__ = ["NAME", "is_available", "load", "spline_mix", "loss", "reconstruction_loss", "loss_gradients"]

NAME = "torch"


def is_available(device_type: str = "cpu"):
    """Always ``(True, "")``: plain PyTorch runs on every device."""
    return True, ""


def load():
    """The backend's functions: this module."""
    return sys.modules[__name__]


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


@contextlib.contextmanager
def _ieee_matmuls(device: torch.device):
    with contextlib.ExitStack() as stack:
        if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = False
            stack.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", True)
        if _autocast_enabled(device.type):
            stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        yield


def _guard(device: torch.device):
    # the common case (CPU, no autocast) enters nothing: at small d these calls are the cost
    if device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        return contextlib.nullcontext()
    return _ieee_matmuls(device)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def spline_mix(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""``out[m, j] = sum_k weights[m, k] x[k, j]``, accumulated in ``weights.dtype``, returned in ``x.dtype``."""
    with _guard(x.device):
        return _cast(weights @ _cast(x, weights.dtype), x.dtype)


def _residual(y, y_coded, decoder):
    with _guard(y.device):  # one GEMM with the subtraction folded in
        return torch.addmm(_cast(y, decoder.dtype), decoder, _cast(y_coded, decoder.dtype), alpha=-1)


def _reduce(residual: torch.Tensor, reduction: str) -> torch.Tensor:
    squares = residual.square()
    return squares.sum(dim=1) if reduction == "none" else squares.sum() if reduction == "sum" else squares.mean()


def loss(y, y_coded, decoder, reduction: str) -> torch.Tensor:
    """The loss alone, differentiable (any order) with ordinary autograd."""
    return _cast(_reduce(_residual(y, y_coded, decoder), reduction), loss_dtype(y.dtype))


def reconstruction_loss(y, y_coded, decoder, reduction: str, compute_grads: bool):
    r"""The fused contract: ``(loss, grad_y, grad_y_coded)``, the gradients for a unit incoming gradient
    (``"none"``: ``grad_y = 2 r`` and an empty ``grad_y_coded``, which needs the per-sample gradient);
    two distinct empty tensors without ``compute_grads``."""
    residual = _residual(y, y_coded, decoder)
    value = _cast(_reduce(residual, reduction), loss_dtype(y.dtype))
    if not compute_grads:
        return value, y.new_empty(0), y.new_empty(0)
    grad_y = residual * gradient_scale(reduction, residual.numel())
    if reduction == "none":
        return value, _cast(grad_y, y.dtype), y.new_empty(0)
    grad_y_coded = spline_mix(decoder.t(), grad_y).neg_()
    return value, _cast(grad_y, y.dtype), _cast(grad_y_coded, y_coded.dtype)


def loss_gradients(y, y_coded, decoder, reduction: str, grad_loss: torch.Tensor):
    """``(dL/dy, dL/dy_coded)`` for the incoming gradient ``grad_loss``, with differentiable operations
    (in ``y``, ``y_coded`` and ``grad_loss``): what a backward with ``create_graph=True`` returns."""
    residual = _residual(y, y_coded, decoder)
    scale = _cast(grad_loss, residual.dtype) * gradient_scale(reduction, residual.numel())
    grad_r = residual * (scale[:, None] if reduction == "none" else scale)
    return _cast(grad_r, y.dtype), _cast(spline_mix(decoder.t(), grad_r).neg(), y_coded.dtype)
