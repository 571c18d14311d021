"""Backend selection: ``backend=`` argument, the ``DRES_BACKEND`` environment variable, ``"auto"``.

Backends load lazily, the first time they are asked for, so ``import dres_fast`` needs neither
Triton nor a compiler nor a GPU. Adding a backend: a module in :mod:`dres_fast.backends` with the
shape described there, and one line in :data:`BACKEND_MODULES`.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
from typing import List

import torch

from ..backends import BackendUnavailableError
from .registry import use_registered_ops

__all__ = ["BACKENDS", "BACKEND_MODULES", "BackendUnavailableError", "resolve_backend", "backend_ops",
           "backend_functions", "use_registered_ops", "available_backends", "load_backend"]

#: backend name -> the module that adapts it; ``"auto"`` tries them in this order on CUDA tensors
BACKEND_MODULES = {
    "torch": "dres_fast.backends.reference",
    "triton": "dres_fast.backends.triton",
    "cuda": "dres_fast.backends.cuda",
}
BACKENDS = tuple(BACKEND_MODULES)
#: on CUDA tensors "auto" takes the first usable of these for the data's precision, else "torch". Measured on
#: an H200 (bench/RESULTS.md): for float16/bfloat16 the Triton kernels are 2-4x faster than eager torch at
#: large widths; for float32 neither fused backend beats cuBLAS by enough to pay for what they still lack
#: (Triton is slower than eager; both exceed twice torch's fp32 error on long reductions), so float32 and
#: float64 stay on the reference backend unless a backend is named.
AUTO_ORDER_CUDA = {"half": ("triton", "cuda"), "full": ()}
ENV_VAR = "DRES_BACKEND"
_LOAD_LOCK = threading.RLock()
_LOADED: dict = {}  # backend name -> its ops, filled by load_backend
_EAGER: dict = {}  # (backend, device type, dtype, DRES_BACKEND) -> the ops of the backend chosen for it


def _module(name: str):
    return importlib.import_module(BACKEND_MODULES[name])


def load_backend(name: str):
    """The ops of backend ``name`` (``.spline_mix``, ``.reconstruction_loss``), loaded once."""
    with _LOAD_LOCK:
        if name not in _LOADED:
            _LOADED[name] = _module(name).load()
        return _LOADED[name]


_cuda_module = functools.partial(load_backend, "cuda")  # the first version's name (tests use it)


def _check_name(backend, source: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"{source} must be a string, one of {('auto',) + BACKENDS}; got {type(backend).__name__}")
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


def _auto_candidate(name: str) -> bool:
    """Whether "auto" may pick ``name`` on CUDA tensors: Triton when it loads, CUDA only when the
    extension is already built ("auto" never starts a minutes-long first-use build)."""
    try:
        if name == "cuda":
            return bool(_module(name).is_built())
        load_backend(name)
        return True
    except (BackendUnavailableError, ImportError, OSError):
        return False


def _precision(dtype) -> str:
    return "half" if dtype in (torch.float16, torch.bfloat16) else "full"


@functools.lru_cache(maxsize=64)
def _resolve(backend: str, env_value: str, device_type: str, precision: str = "full") -> str:
    if backend == "auto" and env_value:
        backend = _check_name(env_value, f"the environment variable {ENV_VAR}")
    if backend == "auto":
        if device_type == "cuda":
            for name in AUTO_ORDER_CUDA[precision]:
                if _auto_candidate(name):
                    return name
        return "torch"
    if backend != "torch":
        ok, reason = _module(backend).is_available(device_type)
        # only the device check is final here; a missing package or build surfaces on load
        if not ok and device_type != "cuda":
            raise BackendUnavailableError(reason)
    return backend


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend name to use for data of ``dtype`` on ``device`` (see :data:`AUTO_ORDER_CUDA`)."""
    _check_name(backend, "backend")
    return _resolve(backend, os.environ.get(ENV_VAR, ""), torch.device(device).type, _precision(dtype))


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (about a second)
    at ``import dres_fast``: that decorator only sets this attribute, which Dynamo reads when tracing."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _loaded_backend(backend: str, device_type: str, precision: str) -> str:
    # Under torch.compile this runs once, at trace time: the choice is a constant of the graph.
    _check_name(backend, "backend")
    name = _resolve(backend, os.environ.get(ENV_VAR, ""), device_type, precision)
    load_backend(name)
    return name


def backend_ops(backend: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The ops ``(spline_mix, reconstruction_loss)`` of the backend chosen for data of ``dtype`` on
    ``device``, as op packets (defined on first use)."""
    ops = _LOADED[_loaded_backend(backend, device.type, _precision(dtype))]
    return ops.spline_mix, ops.reconstruction_loss


def backend_functions(backend: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """``(spline_mix(weights, x) -> out, reconstruction_loss(y, y_coded, decoder, reduction,
    compute_grads) -> loss)``, differentiable, of the backend chosen for data of ``dtype`` on ``device``:
    the backend's eager functions, which call its registered ops themselves when :func:`use_registered_ops`."""
    if use_registered_ops():  # traced: the choice is a constant of the graph (_loaded_backend)
        ops = _LOADED[_loaded_backend(backend, device.type, _precision(dtype))]
    else:  # one dict lookup per call once a choice is made (the choice itself is cached by _resolve anyway)
        key = (backend, device.type, dtype, os.environ.get(ENV_VAR, ""))
        ops = _EAGER.get(key)
        if ops is None:
            ops = _EAGER.setdefault(key, _LOADED[_loaded_backend(backend, device.type, _precision(dtype))])
    return ops.eager_spline_mix, ops.eager_reconstruction_loss


def available_backends(device: str = None) -> List[str]:
    """Backends that can run on ``device`` here (default: CUDA when present, else CPU). Never
    compiles anything (the CUDA first-use build takes a minute or more)."""
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    names = []
    for name in BACKENDS:
        try:
            ok, _ = _module(name).is_available(device_type)
            if ok and name != "cuda":
                load_backend(name)
        except (BackendUnavailableError, ImportError):
            ok = False
        if ok:
            names.append(name)
    return names
