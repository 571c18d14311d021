r"""``dres_loss``: the DReS discrepancy of any callable on one batch.

For a batch :math:`x_1..x_K` at points :math:`\alpha` and coded points :math:`\beta_1..\beta_N`:

.. math::

    \tilde x = E x,\quad \tilde y = f(\tilde x),\quad \hat y = D \tilde y,\qquad
    L = \operatorname{reduce}_k \lVert f(x_k) - \hat y_k \rVert^2 ,

with :math:`E = W(\alpha\to\beta, \lambda_{enc})` and :math:`D = W(\beta\to\alpha, \lambda_{dec})`
(:func:`dres_fast.spline_weights`). If :math:`f` is affine and the batch lies on a line through
:math:`\alpha`, :math:`L = 0`; curvature of :math:`f` along the batch's spline curve makes it grow.

Two options go beyond the paper (README "Options beyond the paper"):

* ``order="principal"`` places the batch along the points in the order of its projections on its
  leading principal direction (:func:`principal_order`), so :math:`L` no longer depends on the
  order in which the samples arrive.
* ``anchor="reconstructed"`` replaces :math:`f(x_k)` by :math:`f((DEx)_k)`:
  :math:`L = \operatorname{reduce}_k \lVert f(DEx)_k - \hat y_k \rVert^2`, which is exactly zero for
  every affine :math:`f = Ax + b` (:math:`D f(Ex) = ADEx + b` because :math:`D1 = 1`), for any batch.
"""

from __future__ import annotations

import torch

from . import ops
from ._hooks import batch_axis, check_batch_dim
from .cache import weights_for
from .contract import compute_dtype
from .smoothing import SmoothingSpec, check_anchor, check_num_coded, check_order

__all__ = ["dres_loss", "dres_loss_with_spec", "check_num_coded", "principal_order"]

#: Power iterations of :func:`principal_order`: the order only needs a good direction, not a converged
#: one, and every iterate is a function of the batch's covariance, so any count keeps the invariance.
POWER_ITERATIONS = 8


def principal_order(batch: torch.Tensor, iterations: int = POWER_ITERATIONS) -> torch.Tensor:
    r"""The permutation (int64, on the batch's device) that sorts the samples of ``batch`` (samples
    along dim 0) by their projection on the batch's leading principal direction.

    With :math:`X` the centred, flattened batch (:math:`K \times d`): start from the centred sample
    of largest norm, apply :math:`v \leftarrow X^\top X v / \lVert\cdot\rVert` ``iterations`` times
    (:math:`O(K d)` each), orient :math:`v` so that its largest-magnitude entry is positive, and
    ``argsort`` :math:`X v` (stable). Every step is a function of the set of samples, so permuting the
    batch permutes the result the same way, up to ties (two samples of equal norm for the start, or of
    equal projection, keep their input order; floating-point sums in another order can also break a
    near-tie differently); nothing leaves the device (no host sync). No gradient.
    """
    with torch.no_grad():
        flat = batch.detach().reshape(batch.shape[0], -1).to(compute_dtype(batch.dtype))
        centred = flat - flat.mean(dim=0, keepdim=True)
        largest = centred.square().sum(dim=1).argmax().reshape(1)
        direction = centred.index_select(0, largest).reshape(-1)
        tiny = torch.finfo(centred.dtype).tiny
        for _ in range(iterations):
            direction = centred.t() @ (centred @ direction)
            direction = direction / direction.norm().clamp_min(tiny)
        sign = direction.index_select(0, direction.abs().argmax().reshape(1)).sign()
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)  # an all-equal batch keeps its order
        return torch.argsort(centred @ (direction * sign), stable=True)


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
    order: str = "given",
    anchor: str = "observed",
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
        order: ``"given"`` (the paper: sample ``k`` sits at ``alpha_k``) or ``"principal"``: sort the
            batch along its leading principal direction first (:func:`principal_order`, a few
            ``O(K d)`` matrix-vector products, no host sync), so the loss does not depend on the order
            of the batch. ``reduction="none"`` and ``y_hat`` stay in the caller's order.
        anchor: ``"observed"`` (the paper: compare ``y_hat`` with ``fn(x)``) or ``"reconstructed"``:
            compare it with ``fn(D E x)``, exactly zero for every affine ``fn``. Costs one more forward
            of ``fn`` on ``K`` samples; ``y`` is not used (``fn(x)`` is not what is compared).

    Returns:
        ``loss``, or ``(loss, y_hat)`` when ``return_decoded``.
    """
    spec = SmoothingSpec(num_coded, lam_enc, lam_dec, dof_enc, dof_dec, alpha, beta)
    return dres_loss_with_spec(fn, x, spec, reduction=reduction, y=y, return_decoded=return_decoded,
                               backend=backend, batch_dim=batch_dim, order=order, anchor=anchor)


def dres_loss_with_spec(fn, x, spec: SmoothingSpec, *, reduction="mean", y=None, return_decoded=False,
                        backend="auto", batch_dim=0, order="given", anchor="observed"):
    """:func:`dres_loss` with the smoothing options already validated as a :class:`SmoothingSpec`: what
    ``DReSLoss`` and ``SubmoduleDReS`` call with the spec they hold, so a training step does not rebuild
    and revalidate it (explicit points given as CUDA tensors would cost a host sync each time)."""
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
    order, anchor = check_order(order), check_anchor(anchor)
    num_samples, num_coded = spec.sizes(x.shape[x_axis])

    # The ops mix along dim 0; movedim is a view (no copy), skipped for batch_dim=0 (small-d steps are
    # bound by per-call Python, and every skipped call counts there).
    x_first = _moved(x, x_axis, 0)
    sort = principal_order(x_first) if order == "principal" else None
    if sort is not None:
        x_first = x_first.index_select(0, sort)
    encoder = weights_for(spec, num_samples, x.device, x.dtype, "encoder")
    x_coded = ops.spline_mix(encoder, x_first, backend=backend)
    if anchor == "observed" and y is None:
        y = fn(x)
    y_coded = fn(_moved(x_coded, 0, x_axis))
    if anchor == "reconstructed":  # f(D E x): what the coded samples decode to, one more forward
        decode_x = weights_for(spec, num_samples, x.device, x.dtype, "decoder")
        y = fn(_moved(ops.spline_mix(decode_x, x_coded, backend=backend), 0, x_axis))
    samples_first, axes = [], []
    y_name = "y" if anchor == "observed" else "fn(D E x)"
    for name, value, count in ((y_name, y, num_samples), ("fn(x_coded)", y_coded, num_coded)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor (fn must return one tensor), got {type(value).__name__}")
        axis = batch_axis(batch_dim, value)
        if axis is None or value.shape[axis] != count:
            raise ValueError(f"{name} must have {count} samples along batch_dim={batch_dim}, got shape {tuple(value.shape)}")
        samples_first.append(_moved(value, axis, 0))
        axes.append(axis)
    y, y_coded = samples_first
    if sort is not None and anchor == "observed":  # fn(D E x) is already in the sorted order
        y = y.index_select(0, sort)
    dtype = torch.promote_types(y.dtype, y_coded.dtype)
    if y.dtype != dtype or y_coded.dtype != dtype:
        y, y_coded = y.to(dtype), y_coded.to(dtype)
    decoder = weights_for(spec, num_samples, y.device, dtype, "decoder")
    loss = ops.reconstruction_loss(y, y_coded, decoder, reduction=reduction, backend=backend)
    unsort = torch.argsort(sort) if sort is not None else None
    if unsort is not None and reduction == "none":
        loss = loss.index_select(0, unsort)  # per-sample losses in the caller's order
    if return_decoded:
        decoded = ops.spline_mix(decoder, y_coded, backend=backend)
        if unsort is not None:
            decoded = decoded.index_select(0, unsort)
        return loss, _moved(decoded, 0, axes[0])
    return loss


def _moved(t: torch.Tensor, source: int, destination: int) -> torch.Tensor:
    return t if source == destination else t.movedim(source, destination)
