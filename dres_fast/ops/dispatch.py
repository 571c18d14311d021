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
from types import SimpleNamespace
from typing import List

import torch

from ..backends import BackendUnavailableError, reference
from . import registry

__all__ = ["BACKENDS", "BACKEND_MODULES", "BackendUnavailableError", "resolve_backend", "functions",
           "registered_ops", "available_backends", "load_backend"]

#: backend name -> the module that adapts it; ``"auto"`` tries them in this order on CUDA tensors
BACKEND_MODULES = {
    "torch": "dres_fast.backends.reference",
    "triton": "dres_fast.backends.triton",
    "cuda": "dres_fast.backends.cuda",
}
BACKENDS = tuple(BACKEND_MODULES)
#: on CUDA tensors "auto" takes the first usable of these for the data's precision, else "torch". From the
#: H200 figures in bench/RESULTS.md: for float16/bfloat16 the Triton kernels beat eager torch at large
#: widths; for float32 neither fused backend beat cuBLAS by enough, so float32 and float64 stay on "torch".
AUTO_ORDER_CUDA = {"half": ("triton", "cuda"), "full": ()}
ENV_VAR = "DRES_BACKEND"
_LOAD_LOCK = threading.RLock()
_LOADED: dict = {}  # backend name -> its plain functions (the backend module's load())
_FUNCTIONS: dict = {}  # (backend name, on CUDA) -> its differentiable functions
_CHOSEN: dict = {}  # (backend, device type, dtype, DRES_BACKEND) -> the functions chosen for it
#: backend "torch" off CUDA: plain autograd over the reference math (no TF32 to keep out of a backward there)
_PLAIN_TORCH = SimpleNamespace(spline_mix=reference.spline_mix, reconstruction_loss=reference.loss)


def _module(name: str):
    return importlib.import_module(BACKEND_MODULES[name])


def load_backend(name: str):
    """The plain functions of backend ``name`` (``.spline_mix``, ``.reconstruction_loss``), loaded once;
    raises :class:`BackendUnavailableError` saying why and what to install."""
    with _LOAD_LOCK:
        if name not in _LOADED:
            _LOADED[name] = _module(name).load()
        return _LOADED[name]


def _differentiable(name: str, device_type: str) -> SimpleNamespace:
    on_cuda = device_type == "cuda"
    found = _FUNCTIONS.get((name, on_cuda))
    if found is None:
        impl = load_backend(name)
        found = _PLAIN_TORCH if name == "torch" and not on_cuda else registry.differentiable(name, impl)
        _FUNCTIONS[(name, on_cuda)] = found
    return found


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
    _differentiable(name, device_type)
    return name


def functions(backend: str, device: torch.device, dtype: torch.dtype) -> SimpleNamespace:
    """``ns.spline_mix(weights, x)`` and ``ns.reconstruction_loss(y, y_coded, decoder, reduction) -> loss``,
    differentiable, of the backend chosen for data of ``dtype`` on ``device`` (inputs already validated).
    Backend "torch" off CUDA: plain autograd; every other choice: :func:`registry.differentiable`."""
    if registry.traced():  # the choice is a constant of the graph; the dict is filled by _loaded_backend
        return _FUNCTIONS[(_loaded_backend(backend, device.type, _precision(dtype)), device.type == "cuda")]
    key = (backend, device.type, dtype, os.environ.get(ENV_VAR, ""))
    found = _CHOSEN.get(key)
    if found is None:
        name = _loaded_backend(backend, device.type, _precision(dtype))
        found = _CHOSEN.setdefault(key, _differentiable(name, device.type))
    return found


def registered_ops(backend: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The ``torch.library`` op packets ``(spline_mix, reconstruction_loss)`` of the backend chosen for
    data of ``dtype`` on ``device`` (what a traced call runs; backend "torch" has them on CUDA only)."""
    name = _loaded_backend(backend, device.type, _precision(dtype))
    return registry.differentiable(name, load_backend(name)).ops


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
