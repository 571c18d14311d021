r"""The op rules every backend follows, stated once.

For data of dtype ``t`` (float64, float32, float16 or bfloat16) and ``r = y - D y_coded`` of shape
``(K, d)``:

* **compute dtype** (weights, accumulation, the residual): float64 for float64 data, float32 for
  everything else, so half-precision inputs accumulate in float32;
* **loss dtype**: the compute dtype (float32/float64 losses keep the data's dtype, half-precision
  data reports its loss in float32);
* **gradient scale** ``c`` with ``grad_y = c r`` for a unit incoming gradient:
  :math:`\partial L/\partial r_{kj} = c\, r_{kj}` with ``c = 2 / (K d)`` for ``"mean"`` and ``c = 2``
  for ``"sum"`` and per sample (``"none"``).

The Python backends import these functions. Code that cannot import them restates them, each in one
marked place: the CUDA binding (``csrc/binding.cpp``, "Op rules") for C++, and the Triton launchers
(``compute_dtype`` in ``kernels/_common.py``, ``grad_scale`` in ``kernels/reconstruction_loss.py``).
``tests/test_layout.py`` checks the reference backend against them; ``tests/test_spline_mix.py`` and
``tests/test_reconstruction_loss.py`` check every other backend against the reference.
"""

from __future__ import annotations

import torch

__all__ = ["REDUCTIONS", "FLOAT_DTYPES", "MIN_SAMPLES", "compute_dtype", "loss_dtype", "gradient_scale", "traced"]

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
#: A cubic smoothing spline needs at least 3 knots: batches and coded batches have at least 3 samples.
MIN_SAMPLES = 3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for data of ``dtype``: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the reported loss: the compute dtype (float32 for float16/bfloat16 data)."""
    return compute_dtype(dtype)


def gradient_scale(reduction: str, numel: int) -> float:
    """``c`` in ``grad_y = c r`` for a unit incoming gradient: ``2 / numel`` for "mean"
    (``numel = K d``), 2 for "sum" and "none"."""
    return 2.0 / numel if reduction == "mean" else 2.0


def traced() -> bool:
    """Whether something traces this call rather than runs it: ``torch.compile`` (also compiled autograd),
    ``torch.export``, or any ``TorchDispatchMode`` (fake tensors, ``make_fx``). Such calls take the
    registered ops and the weight-lookup op, whose fake kernels know the shapes."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
