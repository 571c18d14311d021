r"""Error bounds for fp16/bf16 outputs, derived from ``torch.finfo(dtype)`` (re-exported by reference.py).

Model: the backend computes the exact value :math:`x` (here: float64 of the same rounded inputs) in fp32,
getting :math:`\hat x`, and rounds that once to the output dtype. With

* :math:`u = \epsilon / 2` (unit roundoff: :math:`2^{-11}` fp16, :math:`2^{-8}` bf16) and
* :math:`s = \mathrm{tiny}\cdot\epsilon`, the subnormal spacing (:math:`2^{-24}` fp16, :math:`2^{-133}` bf16),

one rounding errs by at most :math:`u|\hat x|` in the normal range and :math:`s/2` below it, so
:math:`|\mathrm{fl}(\hat x) - \hat x| \le u|\hat x| + s/2` and, with :math:`|\hat x - x| \le e`,

.. math::  |\mathrm{got} - x| \le u|x| + s/2 + (1 + u)\,e \quad\text{(element-wise)},\qquad
           \|\mathrm{got} - x\|_2 \le u\|x\|_2 + (s/2)\sqrt{n} + (1 + u)\|e\|_2 \quad\text{(norm-wise)}.

The second is the first summed by the triangle inequality: a result made of subnormals (fp16 "mean"
gradients at large ``K d``, where ``c r`` is a few ``s``) meets it, while a relative error below ``2u``
cannot (rounding alone leaves ``s / sqrt(12) ~ 0.29 s`` rms per element there).

The fp32 slack ``e``: :math:`e = 32\,u_{32}\,M` with :math:`u_{32} = 2^{-24}` and :math:`M` the float64
magnitude of the computation (``|W| |x|`` for ``W x``: the sum of the terms' absolute values). For terms
of random sign (all the data these tests feed) an fp32 sum errs by about :math:`u_{32} M / 2` rms whatever
its order (the partial sums grow like :math:`\sqrt j`). Measured on torch's CPU fp32 ``W x`` (256 x 256,
d = 5000 and 20000): ``|x_hat - x| / (u32 M)`` has std 0.47 and a heavy tail, at most 5.8. The GPU's split
dots add at most :math:`3 \cdot 2^{-22}` per product (tf32x3), also of random sign; 32 covers these with a
margin. Triton's 2-part "split" weights for fp16/bf16 outputs (kernels/_common.py) leave up to
:math:`u^2 |W|` per weight: :math:`2^{-22}` fp16 (within ``e``), :math:`2^{-16}` bf16, more than ``e`` but
within the room ``u|x|`` leaves above the half ulp of a rounding (``u|x| >= ulp/2``, equal only at the
bottom of a binade); that arithmetic, simulated in float64 at every shape of the bf16 ``spline_mix`` tests
(GPU ones included), puts no element beyond the bound. The deterministic worst case :math:`n u_{32} M`
(adversarial data) is not used: at ``n`` in the hundreds it is looser than the fp16
rounding itself. Where :math:`M \gg |x|` (cancellation) the slack dominates: one ulp of such an output lies
within the fp32 computation's own error.
"""

from __future__ import annotations

import torch

FP32_UNIT = 2.0 ** -24
FP32_SLACK = 32  # e = FP32_SLACK * FP32_UNIT * magnitude (module docstring)


def half_units(dtype: torch.dtype):
    """``(u, s)``: the unit roundoff ``eps / 2`` and the subnormal spacing ``tiny * eps`` of ``dtype``."""
    info = torch.finfo(dtype)
    return info.eps / 2, info.tiny * info.eps


def fp32_slack(magnitude) -> torch.Tensor:
    """``e``, the bound on the fp32 computation's error, from its float64 magnitude ``M``."""
    return FP32_SLACK * FP32_UNIT * torch.as_tensor(magnitude, dtype=torch.float64)


def half_bound(exact: torch.Tensor, dtype: torch.dtype, magnitude=0.0) -> torch.Tensor:
    """Per element: ``u |x| + s/2 + (1 + u) e`` for ``x = exact`` rounded once to ``dtype``."""
    u, s = half_units(dtype)
    return u * exact.double().abs() + s / 2 + (1 + u) * fp32_slack(magnitude)


def half_norm_bound(exact: torch.Tensor, dtype: torch.dtype, magnitude=0.0) -> float:
    """``u ||x|| + (s/2) sqrt(n) + (1 + u) ||e||`` (2-norms over all ``n`` elements)."""
    u, s = half_units(dtype)
    e = torch.broadcast_to(fp32_slack(magnitude), exact.shape)
    return (u * exact.double().norm() + s / 2 * exact.numel() ** 0.5 + (1 + u) * e.norm()).item()


def assert_half_elementwise(got: torch.Tensor, exact: torch.Tensor, magnitude=0.0, what: str = "") -> None:
    """Every element of ``got`` (fp16/bf16) within :func:`half_bound` of ``exact``."""
    got = got.reshape(exact.shape)
    err = (got.double() - exact.double()).abs()
    bound = half_bound(exact, got.dtype, magnitude)
    bad = err > bound
    if bad.any():
        i = int(torch.argmax(err / bound))
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} {got.dtype} elements beyond "
                             f"u|x| + s/2 + e; worst: got {got.flatten()[i].item():.6g}, exact "
                             f"{exact.flatten()[i].item():.6g}, err {err.flatten()[i].item():.3e} > "
                             f"{bound.flatten()[i].item():.3e}")


def assert_half_normwise(got: torch.Tensor, exact: torch.Tensor, magnitude=0.0, what: str = "") -> None:
    """``||got - exact||`` within :func:`half_norm_bound` (for ``got`` in fp16/bf16)."""
    err = (got.reshape(exact.shape).double() - exact.double()).norm().item()
    bound = half_norm_bound(exact, got.dtype, magnitude)
    assert err <= bound, (f"{what}: ||err|| {err:.3e} > u||x|| + (s/2) sqrt(n) + ||e|| = {bound:.3e} "
                          f"({got.dtype}, ||x|| {exact.double().norm().item():.3e}, n {exact.numel()})")


def mix_magnitude(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``M`` of ``weights @ x`` (x viewed as rows): ``|weights| |x|`` in float64."""
    return weights.double().abs() @ x.reshape(x.shape[0], -1).double().abs()


def reconstruction_magnitudes(y, y_coded, decoder, reduction: str):
    """``M`` of the unit-gradient ``grad_y = c r`` and of ``grad_y_coded = -D^T c r``, with
    ``r = y - D y_c``: ``c (|y| + |D| |y_c|)`` and ``|D|^T`` of that (``c = 2 / (K d)`` for "mean", else 2)."""
    y2 = y.reshape(y.shape[0], -1).double()
    c = 2.0 / y2.numel() if reduction == "mean" else 2.0
    m_gy = c * (y2.abs() + mix_magnitude(decoder, y_coded))
    return m_gy, decoder.double().abs().t() @ m_gy
