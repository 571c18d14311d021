"""Encoder/decoder weights, built once per configuration and kept on the device.

``E = W(alpha -> beta, lam_enc)`` (N x K) and ``D = W(beta -> alpha, lam_dec)`` (K x N) are computed
in float64 on the CPU (:func:`dres_fast.splines.float64_weights`), cast once to the compute dtype
(float64 for float64 data, float32 otherwise), moved once to the device, and kept in a bounded,
thread-safe LRU cache keyed by (spec, K, device, compute dtype).

:func:`coding_weights` is what the rest of the package calls. While traced it becomes the
opaque op ``dres_fast::coding_weights`` (defined below; also under fake tensors and ``make_fx``) whose
fake implementation only knows the shapes, so the batch size may be symbolic (``dynamic=True``) and no numpy/scipy code is traced.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Tuple

import torch

from .contract import compute_dtype, traced
from .smoothing import SmoothingSpec, from_key

__all__ = ["WeightCache", "default_cache", "coding_weights", "coding_weights_op"]


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

    def get(self, num_samples: int, num_coded=None, *, device=None, dtype=torch.float32, **smoothing):
        """``(encoder (N, K), decoder (K, N))`` for the smoothing options given by keyword
        (``lam_enc=``, ``dof_dec=``, ``alpha=``, ...; see :class:`SmoothingSpec`): copies of the cached pair,
        so changing them in place changes no later DReS step."""
        pair = self.weights(SmoothingSpec(num_coded=num_coded, **smoothing), num_samples, device, dtype)
        return tuple(weights.clone() for weights in pair)

    def weights(self, spec: SmoothingSpec, num_samples: int, device=None, dtype=torch.float32):
        """``(encoder (N, K), decoder (K, N))`` of ``spec`` in the compute dtype for ``dtype``, on ``device``:
        the cached tensors themselves, shared by every DReS step of that configuration (and marked with
        :data:`FROZEN_ATTR`): read them, never change them in place (:meth:`get` hands out copies)."""
        device = torch.device(device if device is not None else "cpu")
        weight_dtype = compute_dtype(dtype)

        def build():
            from .splines import float64_weights  # scipy loads on first use, not at import

            encoder, decoder = float64_weights(spec, int(num_samples))
            return _cast_weights(encoder, device, weight_dtype), _cast_weights(decoder, device, weight_dtype)

        return self._cached((spec, int(num_samples), str(device), weight_dtype), build)

    def banded(self, spec: SmoothingSpec, num_samples: int, device=None):
        """``(encoder, decoder)`` of ``spec`` as :class:`dres_fast.banded.BandedSpline` s on ``device``
        (float64 coefficients, O(K + N) set-up and memory), cached beside the dense pairs."""
        device = torch.device(device if device is not None else "cpu")

        def build():
            from .banded import banded_coding

            return banded_coding(spec, int(num_samples), device)

        return self._cached((spec, int(num_samples), str(device), "banded"), build)

    def _cached(self, key, build):
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        # Built outside the lock: it can take a while (large K with a dof target) and is deterministic,
        # so two threads racing on the same key just produce equal results.
        pair = build()
        with self._lock:
            self._entries[key] = pair
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return pair


#: set on every matrix the cache hands out, which nothing changes in place: a backend may keep data derived
#: from it on the tensor (the Triton backend's split parts for fp16/bf16 dots; kernels/_common.py)
FROZEN_ATTR = "_dres_fast_frozen"


def _cast_weights(weights: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Cast once and flush negligible entries to zero. Spline weights decay geometrically away from
    the diagonal, so far entries land in (or near) the subnormal range, where CPU arithmetic is
    10-35x slower; entries below tiny/eps change no result by more than ~tiny/eps * |x|."""
    weights = weights.to(dtype)
    info = torch.finfo(dtype)
    weights = torch.where(weights.abs() < info.tiny / info.eps, torch.zeros_like(weights), weights)
    weights = weights.to(device).contiguous()
    setattr(weights, FROZEN_ATTR, True)
    return weights


default_cache = WeightCache()

WHICH = ("encoder", "decoder")


def _define_coding_weights():
    """``torch.ops.dres_fast.coding_weights(spec_key, num_samples, which, device, dtype)``: the cached
    encoder (``which="encoder"``, ``(N, K)``) or decoder (``(K, N)``) of the spec whose key is
    ``spec_key``. ``num_samples`` is a SymInt, so one compiled graph serves every batch size; the fake
    kernel only computes shapes. Defined at import: Dynamo cannot trace the lock a lazy definition needs."""

    @torch.library.custom_op("dres_fast::coding_weights", mutates_args=())
    def coding_weights(spec_key: str, num_samples: int, which: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        pair = default_cache.weights(from_key(spec_key), num_samples, device, dtype)
        # a fresh tensor: a compiled graph may reuse an op's output buffer for later results
        return pair[WHICH.index(which)].clone()

    @coding_weights.register_fake
    def _(spec_key, num_samples, which, device, dtype):
        num_samples, num_coded = from_key(spec_key).sizes(num_samples)
        shape = (num_coded, num_samples) if which == "encoder" else (num_samples, num_coded)
        return torch.empty(shape, device=device, dtype=compute_dtype(dtype))

    return torch.ops.dres_fast.coding_weights


coding_weights_op = _define_coding_weights()


def coding_weights(spec: SmoothingSpec, num_samples, device: torch.device, dtype: torch.dtype):
    """``(encoder (N, K), decoder (K, N))`` of ``spec`` for a batch of ``num_samples``, in the compute dtype
    for ``dtype``, on ``device``: from :data:`default_cache`, or from the op while traced."""
    if traced():
        return (coding_weights_op(spec.key, num_samples, "encoder", device, dtype),
                coding_weights_op(spec.key, num_samples, "decoder", device, dtype))
    return default_cache.weights(spec, num_samples, device, dtype)
