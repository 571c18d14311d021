"""Wrap a backend's two plain functions as ``torch.library`` ops with fake kernels and autograd.

For a backend ``name`` this defines ``dres_fast::spline_mix_<name>`` and
``dres_fast::reconstruction_loss_<name>``. Because they are real ops (not Python calls),
``torch.compile(fullgraph=True)`` traces through them and ``torch.library.opcheck`` can test them.

Autograd:

* ``spline_mix``: ``out = W x``  =>  ``grad_x = W^T grad_out`` (the same op with the transpose);
  the weights are constants (no gradient).
* ``reconstruction_loss``: the forward already returns the gradients for a unit incoming gradient,
  so backward only scales them (``"mean"``/``"sum"``); for ``"none"`` the incoming gradient ``g`` is
  per sample, ``grad_y = g_k * 2 r_k`` and ``grad_y_coded = -D^T grad_y`` (one ``spline_mix``).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["register_backend"]

_LOCK = threading.Lock()
_REGISTERED: dict = {}


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def register_backend(name: str, impl, op_factory: Optional[Callable] = None) -> SimpleNamespace:
    """Register backend ``impl`` (a module with ``spline_mix`` and ``reconstruction_loss``) once;
    returns a namespace with the two ops. ``op_factory`` is ``torch.library.custom_op`` (default) or
    ``torch.library.triton_op``: called as ``op_factory(qualname, mutates_args=())``."""
    with _LOCK:
        if name in _REGISTERED:
            return _REGISTERED[name]
        ops = _define(name, impl, op_factory or torch.library.custom_op)
        _REGISTERED[name] = ops
        return ops


def _register_fake(op, fake, factory_derives_fake: bool) -> None:
    try:
        op.register_fake(fake)
    except RuntimeError:
        # torch.library.triton_op derives a fake kernel from the launcher; should a torch version
        # refuse a second one, that derived kernel is the one in use.
        if not factory_derives_fake:
            raise


def _define(name: str, impl, op_factory: Callable) -> SimpleNamespace:
    factory_derives_fake = op_factory is getattr(torch.library, "triton_op", None)

    @op_factory(f"dres_fast::spline_mix_{name}", mutates_args=())
    def spline_mix_op(weights: Tensor, x: Tensor) -> Tensor:
        return impl.spline_mix(weights, x)

    def _spline_mix_fake(weights, x):
        return x.new_empty((weights.shape[0], x.shape[1]))

    _register_fake(spline_mix_op, _spline_mix_fake, factory_derives_fake)

    def _spline_mix_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _spline_mix_backward(ctx, grad_out):
        (weights,) = ctx.saved_tensors
        grad_x = spline_mix_op(weights.t().contiguous(), grad_out) if ctx.needs_input_grad[1] else None
        return None, grad_x

    spline_mix_op.register_autograd(_spline_mix_backward, setup_context=_spline_mix_setup)

    @op_factory(f"dres_fast::reconstruction_loss_{name}", mutates_args=())
    def reconstruction_loss_op(
        y: Tensor, y_coded: Tensor, decoder: Tensor, reduction: str, compute_grads: bool
    ) -> Tuple[Tensor, Tensor, Tensor]:
        loss, grad_y, grad_y_coded = impl.reconstruction_loss(y, y_coded, decoder, reduction, compute_grads)
        return loss, grad_y, grad_y_coded

    def _reconstruction_loss_fake(y, y_coded, decoder, reduction, compute_grads):
        loss_shape = (y.shape[0],) if reduction == "none" else ()
        loss = y.new_empty(loss_shape, dtype=_loss_dtype(y.dtype))
        grad_y = y.new_empty(y.shape) if compute_grads else y.new_empty(0)
        grad_y_coded = y_coded.new_empty(y_coded.shape) if compute_grads and reduction != "none" else y.new_empty(0)
        return loss, grad_y, grad_y_coded

    _register_fake(reconstruction_loss_op, _reconstruction_loss_fake, factory_derives_fake)

    def _reconstruction_loss_setup(ctx, inputs, output):
        _, _, decoder, reduction, compute_grads = inputs
        ctx.reduction = reduction
        ctx.compute_grads = compute_grads
        ctx.save_for_backward(decoder, output[1], output[2])

    def _reconstruction_loss_backward(ctx, grad_loss, _grad_of_grad_y, _grad_of_grad_y_coded):
        if not ctx.compute_grads:
            raise RuntimeError(
                "dres_fast: reconstruction_loss was computed with compute_grads=False, so it cannot be "
                "differentiated; call it with gradients enabled"
            )
        decoder, grad_y, grad_y_coded = ctx.saved_tensors
        if ctx.reduction == "none":
            grad_y = grad_y * grad_loss.to(grad_y.dtype)[:, None]
            grad_y_coded = spline_mix_op(decoder.t().contiguous(), grad_y).neg()
        else:
            scale = grad_loss.to(grad_y.dtype)
            grad_y = grad_y * scale
            grad_y_coded = grad_y_coded * scale
        return grad_y, grad_y_coded, None, None, None

    reconstruction_loss_op.register_autograd(_reconstruction_loss_backward, setup_context=_reconstruction_loss_setup)
    return SimpleNamespace(name=name, spline_mix=spline_mix_op, reconstruction_loss=reconstruction_loss_op)
