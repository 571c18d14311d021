r"""``dres_loss``: the DReS discrepancy of any callable on one batch.

For a batch :math:`x_1..x_K` at points :math:`\alpha` and coded points :math:`\beta_1..\beta_N`:

.. math::

    \tilde x = E x,\quad \tilde y = f(\tilde x),\quad \hat y = D \tilde y,\qquad
    L = \operatorname{reduce}_k \lVert f(x_k) - \hat y_k \rVert^2 ,

with :math:`E = W(\alpha\to\beta, \lambda_{enc})` and :math:`D = W(\beta\to\alpha, \lambda_{dec})`
(:func:`dres_fast.spline_weights`). If :math:`f` is affine and the batch lies on a line through
:math:`\alpha`, :math:`L = 0`; curvature of :math:`f` along the batch's spline curve makes it grow.
"""

from __future__ import annotations

import torch

from . import ops
from ._hooks import batch_axis, check_batch_dim
from .cache import weights_for
from .smoothing import SmoothingSpec, check_num_coded

__all__ = ["dres_loss", "check_num_coded", "coding_weights"]


def coding_weights(num_samples, num_coded, device, dtype, smoothing):
    """``(encoder, decoder)`` for options given as a dict (``lam_*``/``dof_*``/``alpha``/``beta``):
    the first version's helper, kept for its callers; new code passes a :class:`SmoothingSpec` to
    :func:`dres_fast.cache.weights_for`."""
    spec = SmoothingSpec(num_coded=num_coded, **smoothing)
    return (weights_for(spec, num_samples, device, dtype, "encoder"),
            weights_for(spec, num_samples, device, dtype, "decoder"))


def dres_loss(
    fn,
    x: torch.Tensor,
    *,
    num_coded=None,
    lam_enc=None,
    lam_dec=None,
    dof_enc=None,
    dof_dec=None,
    alpha="chebyshev",
    beta="lobatto",
    reduction: str = "mean",
    y=None,
    return_decoded: bool = False,
    backend: str = "auto",
    batch_dim: int = 0,
):
    r"""DReS discrepancy of ``fn`` on the batch ``x`` (module docstring).

    Args:
        fn: callable (e.g. an ``nn.Module``) mapping ``(B, *in)`` to ``(B, *out)``; run on the coded
            batch with its own parameters (nothing new to train).
        x: the batch, ``(K, *in)`` with ``K >= 3`` (``K`` along ``batch_dim``).
        num_coded: ``N``, the number of coded samples (default ``K``).
        lam_enc, lam_dec: smoothing of the encoder / decoder spline in scipy's convention
            (``0`` interpolates, ``math.inf`` fits a line). Sensitive to ``K``, ``N`` and the points.
        dof_enc, dof_dec: the same smoothing given as effective degrees of freedom (trace of the
            smoother at that spline's knots): between 2 and ``K`` (encoder) or ``N`` (decoder). Give
            ``lam_*`` or ``dof_*``, not both; with neither, ``0.75 * knots`` degrees of freedom.
        alpha, beta: the ``K`` sample points and ``N`` coded points: ``"chebyshev"``, ``"lobatto"``,
            ``"uniform"`` or an explicit ascending 1-D tensor.
        reduction: ``"mean"`` (over all elements), ``"sum"`` or ``"none"`` (per sample, ``(K,)``).
        y: ``fn(x)`` if already computed (the main branch), so it is not run twice.
        return_decoded: also return ``y_hat = D fn(E x)``, the DReS reconstruction of ``fn(x)``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        batch_dim: the axis of ``x`` and of ``fn``'s output that holds the samples; the encoder and
            decoder mix along it and nowhere else (``1`` for ``(T, B, C)`` sequence-first data).

    Returns:
        ``loss``, or ``(loss, y_hat)`` when ``return_decoded``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (a module or function), got {type(fn).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    batch_dim = check_batch_dim(batch_dim)
    x_axis = batch_axis(batch_dim, x)
    if x_axis is None or x.shape[x_axis] < 3:
        raise ValueError(
            f"x must hold a batch of at least 3 samples along batch_dim={batch_dim}, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if reduction not in ops.REDUCTIONS:
        raise ValueError(f"reduction must be one of {ops.REDUCTIONS}, got {reduction!r}")
    spec = SmoothingSpec(num_coded, lam_enc, lam_dec, dof_enc, dof_dec, alpha, beta)
    num_samples, num_coded = spec.sizes(x.shape[x_axis])

    # The ops mix along dim 0; movedim is a view (no copy) and a no-op for batch_dim=0.
    encoder = weights_for(spec, num_samples, x.device, x.dtype, "encoder")
    x_coded = ops.spline_mix(encoder, x.movedim(x_axis, 0), backend=backend).movedim(0, x_axis)
    if y is None:
        y = fn(x)
    y_coded = fn(x_coded)
    samples_first, axes = [], []
    for name, value, count in (("y", y, num_samples), ("fn(x_coded)", y_coded, num_coded)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor (fn must return one tensor), got {type(value).__name__}")
        axis = batch_axis(batch_dim, value)
        if axis is None or value.shape[axis] != count:
            raise ValueError(f"{name} must have {count} samples along batch_dim={batch_dim}, got shape {tuple(value.shape)}")
        samples_first.append(value.movedim(axis, 0))
        axes.append(axis)
    y, y_coded = samples_first
    dtype = torch.promote_types(y.dtype, y_coded.dtype)
    y, y_coded = y.to(dtype), y_coded.to(dtype)
    decoder = weights_for(spec, num_samples, y.device, dtype, "decoder")
    loss = ops.reconstruction_loss(y, y_coded, decoder, reduction=reduction, backend=backend)
    if return_decoded:
        return loss, ops.spline_mix(decoder, y_coded, backend=backend).movedim(0, axes[0])
    return loss
