"""The three backends, one module each, all of the same shape.

Each of ``reference`` (backend ``"torch"``), ``triton`` and ``cuda`` provides

* ``NAME``: the backend's name for ``backend=``;
* ``is_available(device_type) -> (bool, reason)``: cheap, never compiles or launches anything;
* ``load() -> ops``: the backend's two ops as op packets (``ops.spline_mix``,
  ``ops.reconstruction_loss``) with fake kernels and autograd registered (by
  :mod:`dres_fast.ops.registry`), raising :class:`BackendUnavailableError` saying why and what to install.

Backends never import each other; :mod:`dres_fast.ops.dispatch` imports one the first time it is asked for.
"""

__all__ = ["BackendUnavailableError"]


class BackendUnavailableError(RuntimeError):
    """Raised when a backend was asked for but cannot run here; the message says why and what to install."""
