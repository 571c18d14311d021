"""Backend selection: ``backend=`` argument, the ``DRES_BACKEND`` environment variable, ``"auto"``.

Backends load lazily, the first time they are asked for, so ``import dres_fast`` needs neither
Triton nor a compiler nor a GPU.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from typing import List

import torch

from . import registry

__all__ = ["BACKENDS", "BackendUnavailableError", "resolve_backend", "backend_ops", "available_backends"]

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "DRES_BACKEND"
_LOAD_LOCK = threading.Lock()


class BackendUnavailableError(RuntimeError):
    """Raised when a backend was asked for but cannot run here; the message says why and what to install."""


def _triton_module():
    try:
        kernels = importlib.import_module("dres_fast.kernels")
    except ImportError as err:
        raise BackendUnavailableError(
            f"backend 'triton' is not available: {err}. Install Triton with `pip install dres_fast[triton]` "
            "(or `pip install triton`), or use backend='torch'."
        ) from err
    ok, reason = kernels.is_available()
    if not ok:
        raise BackendUnavailableError(f"backend 'triton' is not available: {reason}")
    return kernels


def _cuda_module():
    try:
        from .. import _cuda_ext  # imports nothing heavy; building happens in load()
    except ImportError as err:
        raise BackendUnavailableError(f"backend 'cuda' is not available: {err}") from err
    try:
        return _cuda_ext.load()
    except RuntimeError as err:
        raise BackendUnavailableError(f"backend 'cuda' is not available: {err}") from err


@functools.lru_cache(maxsize=None)
def _load(name: str):
    with _LOAD_LOCK:
        if name == "torch":
            from .. import torch_backend

            return registry.register_backend("torch", torch_backend)
        if name == "triton":
            kernels = _triton_module()
            return registry.register_backend("triton", kernels, op_factory=getattr(kernels, "OP_FACTORY", None))
        if name == "cuda":
            return registry.register_backend("cuda", _cuda_module())
    raise AssertionError(name)


def _check_name(backend, source: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"{source} must be a string, one of {('auto',) + BACKENDS}; got {type(backend).__name__}")
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


def _triton_usable() -> bool:
    try:
        _load("triton")
        return True
    except BackendUnavailableError:
        return False


def _cuda_built() -> bool:
    try:
        from .. import _cuda_ext

        return bool(_cuda_ext.is_built())
    except Exception:  # an absent or broken extension simply is not a candidate for "auto"
        return False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=64)
def _resolve(backend: str, env_value: str, device_type: str) -> str:
    if backend == "auto" and env_value:
        backend = _check_name(env_value, f"the environment variable {ENV_VAR}")
    if backend == "auto":
        if device_type == "cuda":
            if _triton_usable():
                return "triton"
            if _cuda_built():
                return "cuda"
        return "torch"
    if backend == "triton" and device_type != "cuda" and not _interpreting():
        raise BackendUnavailableError(
            f"backend 'triton' runs on CUDA tensors; these are on '{device_type}'. To run the kernels on the "
            "CPU through Triton's interpreter, set TRITON_INTERPRET=1 before triton is imported."
        )
    if backend == "cuda" and device_type != "cuda":
        raise BackendUnavailableError(f"backend 'cuda' needs CUDA tensors; these are on '{device_type}'")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend name to use for tensors on ``device`` (see module docstring)."""
    _check_name(backend, "backend")
    return _resolve(backend, os.environ.get(ENV_VAR, ""), torch.device(device).type)


def _loaded_backend(backend: str, device_type: str) -> str:
    _check_name(backend, "backend")
    name = _resolve(backend, os.environ.get(ENV_VAR, ""), device_type)
    _load(name)
    return name


if hasattr(torch.compiler, "assume_constant_result"):
    # Under torch.compile the choice is made (and the backend registered) once, at trace time.
    _loaded_backend = torch.compiler.assume_constant_result(_loaded_backend)


def backend_ops(backend: str, device: torch.device):
    """The ops ``(spline_mix, reconstruction_loss)`` of the backend chosen for ``device``, as
    ``torch.ops.dres_fast`` op packets (registered on first use)."""
    name = _loaded_backend(backend, device.type)
    return getattr(torch.ops.dres_fast, "spline_mix_" + name), getattr(torch.ops.dres_fast, "reconstruction_loss_" + name)


def available_backends(device: str = None) -> List[str]:
    """Backends that can run on ``device`` here (default: CUDA when present, else CPU)."""
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    names = []
    for name in BACKENDS:
        try:
            _resolve(name, "", device_type)
            if name == "cuda":
                # reporting must never compile: the first-use build takes a minute or more
                from .. import _cuda_ext

                if not _cuda_ext.is_available()[0]:
                    continue
            else:
                _load(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names
