"""``dres_loss``: the DReS discrepancy of any callable on one batch (the math: :mod:`dres_fast.step`)."""

from __future__ import annotations

from .step import principal_order, step_for

__all__ = ["dres_loss", "principal_order"]


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
    step = step_for(num_coded, lam_enc, lam_dec, dof_enc, dof_dec, alpha, beta, reduction, backend, batch_dim, order, anchor)
    return step.run(fn, x, y=y, return_decoded=return_decoded)
