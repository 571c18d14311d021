"""Encoder/decoder weights, built once per configuration and kept on the device.

``E = W(alpha -> beta, lam_enc)`` (N x K) and ``D = W(beta -> alpha, lam_dec)`` (K x N) are computed
in float64 on the CPU (:mod:`dres_fast.splines`), cast once to the compute dtype (float64 for float64
data, float32 otherwise), moved once to the device, and kept in a bounded, thread-safe LRU cache keyed
by (K, N, smoothing, points, device, dtype).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Optional, Tuple

import numpy as np
import torch

from . import splines

__all__ = ["WeightCache", "default_cache", "resolve_lam", "DEFAULT_DOF_FRACTION"]

#: With neither ``lam_*`` nor ``dof_*`` given, each spline keeps this fraction of its knots' degrees
#: of freedom (never below 2). See README "Smoothing" for why.
DEFAULT_DOF_FRACTION = 0.75


def resolve_lam(lam: Optional[float], dof: Optional[float], knots: np.ndarray, lam_name: str, dof_name: str) -> float:
    """The smoothing lambda for one spline, from ``lam`` or ``dof`` (at most one given) or the default."""
    if lam is not None and dof is not None:
        raise ValueError(f"give {lam_name} or {dof_name}, not both (got {lam_name}={lam}, {dof_name}={dof})")
    n = knots.shape[0]
    if lam is not None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating, np.integer)):
            raise TypeError(f"{lam_name} must be a real number, got {type(lam).__name__}")
        if math.isnan(lam) or lam < 0:
            raise ValueError(f"{lam_name} must be >= 0 (math.inf fits a straight line), got {lam}")
        return float(lam)
    if dof is None:
        dof = max(2.0, DEFAULT_DOF_FRACTION * n)
    elif isinstance(dof, bool) or not isinstance(dof, (int, float, np.floating, np.integer)):
        raise TypeError(f"{dof_name} must be a real number, got {type(dof).__name__}")
    elif not (2.0 <= float(dof) <= n):
        raise ValueError(f"{dof_name} must be between 2 and the number of its knots ({n}), got {dof}")
    return splines.lam_for_dof(knots, float(dof))


def _points_key(value):
    if isinstance(value, str):
        return value
    if isinstance(value, torch.Tensor):
        return tuple(value.detach().to("cpu", torch.float64).reshape(-1).tolist())
    return tuple(np.asarray(value, dtype=np.float64).reshape(-1).tolist())


class WeightCache:
    """Bounded LRU cache of (encoder, decoder) pairs; safe to use from several threads."""

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._entries: "OrderedDict[tuple, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(
        self,
        num_samples: int,
        num_coded: int,
        *,
        lam_enc=None,
        lam_dec=None,
        dof_enc=None,
        dof_dec=None,
        alpha="chebyshev",
        beta="lobatto",
        device=None,
        dtype=torch.float32,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(encoder (N, K), decoder (K, N))`` in the compute dtype for ``dtype``, on ``device``."""
        device = torch.device(device if device is not None else "cpu")
        weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (
            num_samples, num_coded, lam_enc, lam_dec, dof_enc, dof_dec,
            _points_key(alpha), _points_key(beta), str(device), weight_dtype,
        )
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        # Built outside the lock: it can take a while (large K with a dof target) and is deterministic,
        # so two threads racing on the same key just produce equal tensors.
        encoder, decoder = build_weights(num_samples, num_coded, lam_enc, lam_dec, dof_enc, dof_dec, alpha, beta)
        pair = (_cast_weights(encoder, device, weight_dtype), _cast_weights(decoder, device, weight_dtype))
        with self._lock:
            self._entries[key] = pair
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return pair


def _cast_weights(weights: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Cast once and flush negligible entries to zero. Spline weights decay geometrically away from
    the diagonal, so far entries land in (or near) the subnormal range, where CPU arithmetic is
    10-35x slower; entries below tiny/eps change no result by more than ~tiny/eps * |x|."""
    weights = weights.to(dtype)
    info = torch.finfo(dtype)
    weights = torch.where(weights.abs() < info.tiny / info.eps, torch.zeros_like(weights), weights)
    return weights.to(device).contiguous()


def build_weights(num_samples, num_coded, lam_enc, lam_dec, dof_enc, dof_dec, alpha, beta):
    """Float64 ``(E, D)`` for one configuration (uncached; see :class:`WeightCache`)."""
    alpha_knots = splines.as_knots(alpha, num_samples, "alpha")
    beta_knots = splines.as_knots(beta, num_coded, "beta")
    lam_e = resolve_lam(lam_enc, dof_enc, alpha_knots, "lam_enc", "dof_enc")
    lam_d = resolve_lam(lam_dec, dof_dec, beta_knots, "lam_dec", "dof_dec")
    encoder = splines.spline_weights(alpha_knots, beta_knots, lam_e)
    decoder = splines.spline_weights(beta_knots, alpha_knots, lam_d)
    return encoder, decoder


default_cache = WeightCache()
