"""The two differentiable ops of DReS, dispatched to a backend (``"torch"``, ``"triton"``, ``"cuda"``).

* :func:`spline_mix` — ``weights @ x`` along the batch axis (encoding, and decoding for ``y_hat``).
* :func:`reconstruction_loss` — ``reduce(|| y - decoder @ y_coded ||^2)`` in one fused pass.

Either takes its map as a dense matrix or as a :class:`dres_fast.banded.BandedSpline` (the banded path:
:mod:`dres_fast.ops.banded`).

Both validate their inputs (errors name the argument: this is the edge; nothing below re-validates),
flatten trailing dimensions to ``(batch, d)``, cast the weights to the compute dtype
(:mod:`dres_fast.contract`: float64 for float64 inputs, else float32) and call the differentiable
functions of the chosen backend (:func:`dispatch.functions`).
"""

from __future__ import annotations

import torch

from ..contract import FLOAT_DTYPES, REDUCTIONS, compute_dtype
from ..banded import BandedSpline
from . import banded
from .dispatch import BACKENDS, BackendUnavailableError, available_backends, functions, resolve_backend

__all__ = [
    "spline_mix",
    "reconstruction_loss",
    "available_backends",
    "resolve_backend",
    "BackendUnavailableError",
    "BACKENDS",
    "REDUCTIONS",
    "compute_dtype",
]


def _check_tensor(value, name: str, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s) (batch first), got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value


def _check_weights(weights, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"{name} is on {weights.device} but the data is on {device}: move it with .to(device)")
    if not weights.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {weights.dtype}")
    # nothing to do for weights from the cache, which are stored contiguous in the compute dtype: the
    # checks below cost a fraction of the calls they skip (at small d, per-call Python is the cost)
    target = compute_dtype(dtype)
    if weights.dtype != target:
        weights = weights.to(target)
    if not weights.is_contiguous():
        weights = weights.contiguous()
    return weights.detach() if weights.requires_grad else weights


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def _check_banded(spline: BandedSpline, name: str, device: torch.device) -> BandedSpline:
    if spline.device != device:
        raise ValueError(f"{name} is on {spline.device} but the data is on {device}: build it on the data's device")
    return spline


def spline_mix(weights, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    r"""``out[m] = sum_k weights[m, k] * x[k]`` over the batch axis, for ``x`` of shape ``(K, *rest)``.

    Returns shape ``(M, *rest)`` in ``x.dtype``. Differentiable in ``x`` (``grad_x = weights^T grad``);
    ``weights`` (``(M, K)``: a tensor, or a :class:`~dres_fast.banded.BandedSpline`) are constants.
    """
    x = _check_tensor(x, "x")
    if isinstance(weights, BandedSpline):
        weights = _check_banded(weights, "weights", x.device)
    else:
        weights = _check_weights(weights, "weights", x.device, x.dtype)
    if weights.shape[1] != x.shape[0]:
        raise ValueError(
            f"weights has {weights.shape[1]} columns but x has {x.shape[0]} samples (x.shape[0]); "
            f"weights must be (M, {x.shape[0]})"
        )
    if isinstance(weights, BandedSpline):
        out = banded.spline_mix(weights, _as_rows(x), backend)
    else:
        out = functions(backend, x.device, x.dtype).spline_mix(weights, _as_rows(x))
    return out if x.dim() == 2 else out.reshape((weights.shape[0],) + tuple(x.shape[1:]))


def reconstruction_loss(
    y: torch.Tensor, y_coded: torch.Tensor, decoder: torch.Tensor, reduction: str = "mean", backend: str = "auto"
) -> torch.Tensor:
    r"""``reduce_k( sum_j (y - decoder @ y_coded)[k, j]^2 )`` in one fused pass.

    ``y``: ``(K, *rest)``; ``y_coded``: ``(N, *rest)`` with the same dtype and device; ``decoder``:
    ``(K, N)`` (or a :class:`~dres_fast.banded.BandedSpline`). ``reduction``: ``"mean"`` (over all ``K * prod(rest)`` elements, like
    ``F.mse_loss``), ``"sum"``, or ``"none"`` (per sample, shape ``(K,)``). The loss is float32 for
    half-precision inputs, else the inputs' dtype. Differentiable in ``y`` and ``y_coded``.
    """
    y = _check_tensor(y, "y")
    y_coded = _check_tensor(y_coded, "y_coded")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if y_coded.dtype != y.dtype:
        raise TypeError(f"y_coded has dtype {y_coded.dtype} but y has {y.dtype}; they must match")
    if y_coded.device != y.device:
        raise ValueError(f"y_coded is on {y_coded.device} but y is on {y.device}; they must match")
    if y_coded.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"y_coded's sample shape {tuple(y_coded.shape[1:])} differs from y's {tuple(y.shape[1:])}"
        )
    if isinstance(decoder, BandedSpline):
        decoder = _check_banded(decoder, "decoder", y.device)
    else:
        decoder = _check_weights(decoder, "decoder", y.device, y.dtype)
    if tuple(decoder.shape) != (y.shape[0], y_coded.shape[0]):
        raise ValueError(
            f"decoder must have shape (len(y), len(y_coded)) = {(y.shape[0], y_coded.shape[0])}, "
            f"got {tuple(decoder.shape)}"
        )
    if isinstance(decoder, BandedSpline):
        return banded.reconstruction_loss(_as_rows(y), _as_rows(y_coded), decoder, reduction, backend)
    return functions(backend, y.device, y.dtype).reconstruction_loss(_as_rows(y), _as_rows(y_coded), decoder, reduction)
