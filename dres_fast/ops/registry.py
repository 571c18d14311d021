"""The ``torch.library`` side of the ops: fake kernels and autograd, each defined once.

Every backend ends up as two ops, a *spline_mix* op ``(weights, x) -> out`` and a
*reconstruction_loss* op ``(y, y_coded, decoder, reduction, compute_grads) -> (loss, grad_y,
grad_y_coded)`` (the contract in docs/ARCHITECTURE.md):

* a Python backend (``torch``, ``triton``) hands its two plain functions to :func:`define_ops`, which
  defines ``dres_fast::spline_mix_<name>`` and ``dres_fast::reconstruction_loss_<name>`` with the
  fake kernels below;
* the CUDA backend's ops ``dres_fast_C::*`` are defined in C++ with C++ Meta kernels (their fake
  kernels), so it only calls :func:`register_autograd`.

Because they are real ops (not Python calls), ``torch.compile(fullgraph=True)`` traces through them
and ``torch.library.opcheck`` can test them. Eager calls take a shorter road to the same functions: each
backend also gets two ``torch.autograd.Function`` s (:func:`eager_functions`) around its plain functions,
with the same backward formulas. A registered op costs about twice as much Python per call as an
``autograd.Function`` (custom_op's dispatch, default filling and autograd wrapper), and at small d that
Python is the whole cost of a call: forward + backward of both ops through ``dres_fast.ops`` at K = N =
16, d = 10 took 333-359 us through the ops and 201-202 us this way (plain autograd on the same math:
74-89 us; 2-core CPU, interleaved runs). Autograd, the same for every backend:

* ``spline_mix``: ``out = W x``  =>  ``grad_x = W^T grad_out`` (the same op with the transpose);
  the weights are constants (no gradient).
* ``reconstruction_loss``: the forward already returns the gradients for a unit incoming gradient,
  so backward only scales them (``"mean"``/``"sum"``); for ``"none"`` the incoming gradient ``g`` is
  per sample, ``grad_y = g_k * 2 r_k`` and ``grad_y_coded = -D^T grad_y`` (one ``spline_mix``).

It also defines ``dres_fast::coding_weights``, the weight lookup as an opaque op for ``torch.compile``.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..contract import compute_dtype, loss_dtype

__all__ = ["define_ops", "register_autograd", "eager_functions", "use_registered_ops", "coding_weights_op"]

_LOCK = threading.Lock()
_DEFINED: dict = {}


def _packet(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def define_ops(name: str, impl, op_factory: Optional[Callable] = None) -> SimpleNamespace:
    """Define the ops of Python backend ``name`` once (``impl`` has ``spline_mix`` and
    ``reconstruction_loss``) with fake kernels and autograd; returns their op packets and the eager
    functions (:func:`register_autograd`). ``op_factory`` is ``torch.library.custom_op`` (default) or
    ``torch.library.triton_op``."""
    with _LOCK:
        if name not in _DEFINED:
            _DEFINED[name] = _define(name, impl, op_factory or torch.library.custom_op)
        return _DEFINED[name]


def _spline_mix_fake(weights, x):
    return x.new_empty((weights.shape[0], x.shape[1]))


def _reconstruction_loss_fake(y, y_coded, decoder, reduction, compute_grads):
    loss_shape = (y.shape[0],) if reduction == "none" else ()
    loss = y.new_empty(loss_shape, dtype=loss_dtype(y.dtype))
    grad_y = y.new_empty(y.shape) if compute_grads else y.new_empty(0)
    grad_y_coded = y_coded.new_empty(y_coded.shape) if compute_grads and reduction != "none" else y.new_empty(0)
    return loss, grad_y, grad_y_coded


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
    spline_mix_name, loss_name = f"dres_fast::spline_mix_{name}", f"dres_fast::reconstruction_loss_{name}"

    @op_factory(spline_mix_name, mutates_args=())
    def spline_mix_op(weights: Tensor, x: Tensor) -> Tensor:
        return impl.spline_mix(weights, x)

    @op_factory(loss_name, mutates_args=())
    def reconstruction_loss_op(
        y: Tensor, y_coded: Tensor, decoder: Tensor, reduction: str, compute_grads: bool
    ) -> Tuple[Tensor, Tensor, Tensor]:
        loss, grad_y, grad_y_coded = impl.reconstruction_loss(y, y_coded, decoder, reduction, compute_grads)
        return loss, grad_y, grad_y_coded

    _register_fake(spline_mix_op, _spline_mix_fake, factory_derives_fake)
    _register_fake(reconstruction_loss_op, _reconstruction_loss_fake, factory_derives_fake)
    return register_autograd(spline_mix_name, loss_name, impl)


def use_registered_ops() -> bool:
    """Whether a call must go through the registered ``torch.library`` ops: while ``torch.compile`` (also
    compiled autograd) or ``torch.export`` traces, and under any ``TorchDispatchMode`` (fake tensors,
    ``make_fx``, functionalization), which need the ops' fake kernels. Otherwise the eager
    ``autograd.Function`` s do the same work with half the Python per call (:func:`eager_functions`)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


# The backward formulas (module docstring), written once for the registered ops and the eager functions;
# ``mix`` is the differentiable spline_mix of the caller's kind, so spline_mix has exact higher derivatives
# (it is linear). reconstruction_loss's backward only scales gradients saved by the forward, which are
# constants to autograd: a second derivative through it would silently miss its main term, so both kinds
# mark it once_differentiable (differentiating it again raises). W^T is passed as a view: every backend
# takes weights of any strides (a copy per call cost more than the small-d GEMM itself on the CPU).
def _spline_mix_grad(mix, weights, grad_out):
    return mix(weights.t(), grad_out)


def _reconstruction_loss_grads(mix, reduction, compute_grads, decoder, grad_y, grad_y_coded, grad_loss):
    if not compute_grads:
        raise RuntimeError(
            "dres_fast: reconstruction_loss was computed with compute_grads=False, so it cannot be "
            "differentiated; call it with gradients enabled"
        )
    if reduction == "none":
        grad_y = grad_y * grad_loss.to(grad_y.dtype)[:, None]
        return grad_y, mix(decoder.t(), grad_y).neg()
    scale = grad_loss.to(grad_y.dtype)  # a tensor: no host sync to test whether it is 1
    return grad_y * scale, grad_y_coded * scale


def _spline_mix_backward_using(mix):
    def spline_mix_backward(ctx, grad_out):
        (weights,) = ctx.saved_tensors
        return None, _spline_mix_grad(mix, weights, grad_out) if ctx.needs_input_grad[1] else None

    return spline_mix_backward


def _loss_setup(ctx, inputs, output):
    _, _, decoder, ctx.reduction, ctx.compute_grads = inputs
    ctx.save_for_backward(decoder, output[1], output[2])


def _loss_backward_using(mix):
    @once_differentiable
    def loss_backward(ctx, grad_loss, _grad_of_grad_y, _grad_of_grad_y_coded):
        grads = _reconstruction_loss_grads(mix, ctx.reduction, ctx.compute_grads, *ctx.saved_tensors, grad_loss)
        return *grads, None, None, None

    return loss_backward


def register_autograd(spline_mix_name: str, loss_name: str, impl) -> SimpleNamespace:
    """Register the autograd formulas (module docstring) on two already defined ops, given by
    qualified name. Returns the op packets as ``ns.spline_mix`` and ``ns.reconstruction_loss``, and
    :func:`eager_functions` of ``impl`` (the backend's plain functions behind the ops) as
    ``ns.eager_spline_mix`` and ``ns.eager_reconstruction_loss``."""
    spline_mix_op, reconstruction_loss_op = _packet(spline_mix_name), _packet(loss_name)

    def spline_mix_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    torch.library.register_autograd(spline_mix_name, _spline_mix_backward_using(spline_mix_op),
                                    setup_context=spline_mix_setup)
    torch.library.register_autograd(loss_name, _loss_backward_using(spline_mix_op), setup_context=_loss_setup)
    eager_spline_mix, eager_reconstruction_loss = eager_functions(impl, spline_mix_op, reconstruction_loss_op)
    return SimpleNamespace(spline_mix=spline_mix_op, reconstruction_loss=reconstruction_loss_op,
                           eager_spline_mix=eager_spline_mix, eager_reconstruction_loss=eager_reconstruction_loss)


def eager_functions(impl, spline_mix_op, reconstruction_loss_op) -> Tuple[Callable, Callable]:
    """``(spline_mix(weights, x) -> out, reconstruction_loss(y, y_coded, decoder, reduction, compute_grads)
    -> loss)``: ``torch.autograd.Function`` s around the plain functions of ``impl``, with the ops'
    backward formulas. Same inputs, same kernels, same bits as the registered ops ``spline_mix_op`` and
    ``reconstruction_loss_op``, which they call instead while something traces (:func:`use_registered_ops`;
    a backward traced by compiled autograd calls them too)."""

    # Two forms of each Function. Plain calls: forward(ctx, ...), running impl below autograd (as custom_op's
    # own autograd runs its kernel: the C++ ops' Python autograd wrapper would only find gradients off and
    # pass through). Under torch.func transforms: forward + setup_context, the form they accept (its apply
    # binds the arguments through inspect.signature on every call, which doubled the cost of a small call),
    # calling the registered ops, whose per-sample fallback makes generate_vmap_rule work (torch.vmap,
    # per-sample gradients, jacrev); torch.func.jvp raises (no jvp rule).
    def mix_forward(weights, x):
        with torch._C._AutoDispatchBelowAutograd():
            return impl.spline_mix(weights, x)

    # the backward's own spline_mix is the dispatching function below (the ops while traced)
    mix_backward = _spline_mix_backward_using(lambda weights, x: spline_mix(weights, x))
    loss_backward = _loss_backward_using(lambda weights, x: spline_mix(weights, x))

    def loss_forward(y, y_coded, decoder, reduction, compute_grads):
        with torch._C._AutoDispatchBelowAutograd():
            return impl.reconstruction_loss(y, y_coded, decoder, reduction, compute_grads)

    def loss_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1], output[2])
        _loss_setup(ctx, inputs, output)

    class SplineMix(torch.autograd.Function):
        @staticmethod
        def forward(ctx, weights, x):
            ctx.save_for_backward(weights)
            return mix_forward(weights, x)

        backward = staticmethod(mix_backward)

    class SplineMixForTransforms(torch.autograd.Function):
        generate_vmap_rule = True
        backward = staticmethod(mix_backward)

        @staticmethod
        def forward(weights, x):
            return spline_mix_op(weights, x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

    class ReconstructionLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = loss_forward(*inputs)
            loss_setup(ctx, inputs, output)
            return output

        backward = staticmethod(loss_backward)

    class ReconstructionLossForTransforms(torch.autograd.Function):
        generate_vmap_rule = True
        setup_context = staticmethod(loss_setup)
        backward = staticmethod(loss_backward)

        @staticmethod
        def forward(y, y_coded, decoder, reduction, compute_grads):
            return reconstruction_loss_op(y, y_coded, decoder, reduction, compute_grads)

    def spline_mix(weights, x):
        if use_registered_ops():
            return spline_mix_op(weights, x)
        if _functorch_transforms_active():
            return SplineMixForTransforms.apply(weights, x)
        return SplineMix.apply(weights, x)

    def reconstruction_loss(y, y_coded, decoder, reduction, compute_grads):
        if use_registered_ops():
            return reconstruction_loss_op(y, y_coded, decoder, reduction, compute_grads)[0]
        function = ReconstructionLossForTransforms if _functorch_transforms_active() else ReconstructionLoss
        return function.apply(y, y_coded, decoder, reduction, compute_grads)[0]

    return spline_mix, reconstruction_loss


def _functorch_transforms_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _define_coding_weights():
    """``torch.ops.dres_fast.coding_weights(spec_key, num_samples, which, device, dtype)``: the cached
    encoder (``which="encoder"``, ``(N, K)``) or decoder (``(K, N)``) of the
    :class:`~dres_fast.smoothing.SmoothingSpec` whose key is ``spec_key``. ``num_samples`` is a
    SymInt, so one compiled graph serves every batch size; the fake kernel only computes shapes.
    Defined at import (not on first use): Dynamo cannot trace the lock a lazy definition needs."""

    @torch.library.custom_op("dres_fast::coding_weights", mutates_args=())
    def coding_weights(spec_key: str, num_samples: int, which: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        from .. import cache, smoothing

        pair = cache.default_cache.weights(smoothing.from_key(spec_key), num_samples, device, dtype)
        # a fresh tensor: a compiled graph may reuse an op's output buffer for later results
        return pair[("encoder", "decoder").index(which)].clone()

    @coding_weights.register_fake
    def _(spec_key, num_samples, which, device, dtype):
        from .. import smoothing

        num_samples, num_coded = smoothing.from_key(spec_key).sizes(num_samples)
        shape = (num_coded, num_samples) if which == "encoder" else (num_samples, num_coded)
        return torch.empty(shape, device=device, dtype=compute_dtype(dtype))

    return torch.ops.dres_fast.coding_weights


coding_weights_op = _define_coding_weights()
