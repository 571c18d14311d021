r"""Autograd for the kernel backends, and their ``torch.library`` ops, each defined once.

A kernel backend (``triton``, ``cuda``, and ``torch`` on CUDA, see :mod:`dres_fast.ops.dispatch`) gives
two plain, non-differentiable functions (the contract in docs/ARCHITECTURE.md):
``spline_mix(weights, x) -> out`` and ``reconstruction_loss(y, y_coded, decoder, reduction,
compute_grads) -> (loss, grad_y, grad_y_coded)``. :func:`differentiable` turns them into the two
callables the rest of the package uses, ``spline_mix(weights, x)`` and ``reconstruction_loss(y, y_coded,
decoder, reduction) -> loss``, with one road per call:

* **traced** (``torch.compile``, ``torch.export``, ``make_fx``, fake tensors: any ``TorchDispatchMode``):
  the registered ops ``dres_fast::spline_mix_<name>`` / ``dres_fast::reconstruction_loss_<name>``
  (``torch.library.custom_op``, or ``triton_op`` so that ``torch.compile`` traces into the kernels), or the
  C++ ops of the CUDA extension (named by the backend's ``OPS``, with C++ Meta kernels);
* **torch.func transforms** (``vmap``, ``grad``, ``jacrev``): an ``autograd.Function`` in the
  ``setup_context`` form around the registered ops (``generate_vmap_rule``);
* **eager**: an ``autograd.Function`` around the plain functions (a registered op's Python costs about
  as much as a whole small-d call).

Backward, the same on every road:

* ``spline_mix``: ``grad_x = W^T grad_out``, the same differentiable callable on ``W^T`` (a view), so
  every derivative of this linear map is exact;
* ``reconstruction_loss``: the forward already computed the gradients for a unit incoming gradient;
  backward scales them by the incoming gradient ``g`` (a new tensor even for ``g = 1``);
  for ``"none"``, ``grad_y = g_k 2 r_k`` and ``grad_y_coded = -D^T grad_y`` (one ``spline_mix``). When the
  backward itself is differentiated (``create_graph=True``: grad mode is on inside it), the gradients are
  recomputed from the saved inputs with differentiable operations
  (:func:`dres_fast.backends.reference.loss_gradients`), so second derivatives are exact on every
  backend. The loss is the only differentiable output: no zero tensor is made for the others.

It also holds nothing else: the weight lookup op of ``torch.compile`` lives in :mod:`dres_fast.cache`.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Tuple

import torch
from torch import Tensor

from ..backends import reference
from ..contract import loss_dtype, traced

__all__ = ["differentiable", "traced"]

_LOCK = threading.Lock()
_DEFINED: dict = {}


def _transforms_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def differentiable(name: str, impl) -> SimpleNamespace:
    """``ns.spline_mix(weights, x)`` and ``ns.reconstruction_loss(y, y_coded, decoder, reduction)``:
    the plain functions of ``impl`` made differentiable (module docstring), defined once per ``name``;
    ``ns.ops`` are the op packets ``(spline_mix, reconstruction_loss)``."""
    with _LOCK:
        if name not in _DEFINED:
            _DEFINED[name] = _build(name, impl)
        return _DEFINED[name]


def _packet(qualname: str):
    namespace, op_name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), op_name)


def _spline_mix_fake(weights, x):
    return x.new_empty((weights.shape[0], x.shape[1]))


def _reconstruction_loss_fake(y, y_coded, decoder, reduction, compute_grads):
    loss = y.new_empty((y.shape[0],) if reduction == "none" else (), dtype=loss_dtype(y.dtype))
    grad_y = y.new_empty(y.shape) if compute_grads else y.new_empty(0)
    grad_y_coded = y_coded.new_empty(y_coded.shape) if compute_grads and reduction != "none" else y.new_empty(0)
    return loss, grad_y, grad_y_coded


def _define_ops(name: str, impl) -> Tuple[str, str]:
    """Qualified names of the backend's two ops, defined here unless the backend brings its own (``OPS``)."""
    if getattr(impl, "OPS", None):
        return impl.OPS
    op_factory = getattr(impl, "OP_FACTORY", None) or torch.library.custom_op
    mix_name, loss_name = f"dres_fast::spline_mix_{name}", f"dres_fast::reconstruction_loss_{name}"

    @op_factory(mix_name, mutates_args=())
    def spline_mix_op(weights: Tensor, x: Tensor) -> Tensor:
        return impl.spline_mix(weights, x)

    @op_factory(loss_name, mutates_args=())
    def reconstruction_loss_op(y: Tensor, y_coded: Tensor, decoder: Tensor, reduction: str,
                               compute_grads: bool) -> Tuple[Tensor, Tensor, Tensor]:
        return tuple(impl.reconstruction_loss(y, y_coded, decoder, reduction, compute_grads))

    for op, fake in ((spline_mix_op, _spline_mix_fake), (reconstruction_loss_op, _reconstruction_loss_fake)):
        try:
            op.register_fake(fake)
        except RuntimeError:
            # triton_op derives a fake kernel from the launcher; a torch that refuses a second one uses it
            if op_factory is torch.library.custom_op:
                raise
    return mix_name, loss_name


def _times(grad: Tensor, factor: Tensor) -> Tensor:
    # one multiply, with the factor kept in fp32 for half-precision gradients
    if grad.dtype in (torch.float16, torch.bfloat16):  # the product in fp32, rounded once
        return (grad.float() * factor).to(grad.dtype)
    return grad * factor


def _build(name: str, impl) -> SimpleNamespace:
    mix_name, loss_name = _define_ops(name, impl)
    mix_op, loss_op = _packet(mix_name), _packet(loss_name)

    def spline_mix(weights, x):
        if traced() or x.is_meta:  # meta tensors: the registered op's fake kernel gives the shapes
            return mix_op(weights, x)
        if _transforms_active():
            return SplineMixForTransforms.apply(weights, x)
        return SplineMix.apply(weights, x)

    def reconstruction_loss(y, y_coded, decoder, reduction):
        if traced() or y.is_meta:
            compute_grads = torch.is_grad_enabled() and (y.requires_grad or y_coded.requires_grad)
            return loss_op(y, y_coded, decoder, reduction, compute_grads)[0]
        if _transforms_active():
            return LossForTransforms.apply(y, y_coded, decoder, reduction, True)[0]
        return ReconstructionLoss.apply(y, y_coded, decoder, reduction)

    def mix_backward(ctx, grad_out, *_):
        (weights,) = ctx.saved_tensors
        return None, (spline_mix(weights.t(), grad_out) if ctx.needs_input_grad[1] and grad_out is not None else None)

    def loss_backward(ctx, grad_loss, *_):
        if grad_loss is None:  # the loss was not used (grads are not materialized)
            return (None,) * (5 if ctx.op_form else 4)
        y, y_coded, decoder, grad_y, grad_y_coded = ctx.saved_tensors
        if grad_y.numel() == 0 and y.numel() > 0:
            raise RuntimeError("dres_fast: reconstruction_loss ran with gradients off, so it cannot be differentiated")
        if torch.is_grad_enabled():  # create_graph=True: recompute differentiably (exact higher derivatives)
            grads = reference.loss_gradients(y, y_coded, decoder, ctx.reduction, grad_loss)
        elif ctx.reduction == "none":
            grad_y = _times(grad_y, grad_loss[:, None])
            grads = grad_y, spline_mix(decoder.t(), grad_y).neg()
        else:
            # always a product, never the saved tensor itself: a retained graph would hand the caller a gradient
            # that aliases what the next backward reads
            grads = _times(grad_y, grad_loss), _times(grad_y_coded, grad_loss)
        return (*grads, None, None, None)[: 5 if ctx.op_form else 4]

    def save_loss(ctx, y, y_coded, decoder, reduction, output, op_form):
        ctx.set_materialize_grads(False)
        ctx.reduction, ctx.op_form = reduction, op_form
        ctx.save_for_backward(y, y_coded, decoder, output[1], output[2])

    def loss_setup(ctx, inputs, output):
        save_loss(ctx, *inputs[:4], output, op_form=True)
        ctx.mark_non_differentiable(output[1], output[2])

    class SplineMix(torch.autograd.Function):
        @staticmethod
        def forward(ctx, weights, x):
            ctx.save_for_backward(weights)
            with torch._C._AutoDispatchBelowAutograd():
                return impl.spline_mix(weights, x)

        backward = staticmethod(mix_backward)

    class SplineMixForTransforms(torch.autograd.Function):
        generate_vmap_rule = True
        backward = staticmethod(mix_backward)

        @staticmethod
        def forward(weights, x):
            return mix_op(weights, x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

    class ReconstructionLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y, y_coded, decoder, reduction):
            compute_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            with torch._C._AutoDispatchBelowAutograd():
                output = impl.reconstruction_loss(y, y_coded, decoder, reduction, compute_grads)
            save_loss(ctx, y, y_coded, decoder, reduction, output, op_form=False)
            return output[0]

        backward = staticmethod(loss_backward)

    class LossForTransforms(torch.autograd.Function):
        generate_vmap_rule = True
        setup_context = staticmethod(loss_setup)
        backward = staticmethod(loss_backward)

        @staticmethod
        def forward(y, y_coded, decoder, reduction, compute_grads):
            return loss_op(y, y_coded, decoder, reduction, compute_grads)

    torch.library.register_autograd(mix_name, mix_backward, setup_context=lambda ctx, inputs, output:
                                    ctx.save_for_backward(inputs[0]))
    torch.library.register_autograd(loss_name, loss_backward, setup_context=loss_setup)
    return SimpleNamespace(spline_mix=spline_mix, reconstruction_loss=reconstruction_loss, ops=(mix_op, loss_op))

