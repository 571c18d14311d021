"""Backend ``"triton"``: adapter over the Triton kernels in ``kernels/`` (installed as ``dres_fast.kernels``).

``load()`` imports the kernels (and with them Triton) on first use and returns them: their plain
``spline_mix`` and ``reconstruction_loss`` and ``OP_FACTORY`` (``torch.library.triton_op`` on a GPU, so
``torch.compile`` traces into the kernels; ``custom_op`` under the interpreter), from which
:mod:`dres_fast.ops` defines the ops.

Triton reads ``TRITON_INTERPRET`` once, when it is imported. ``import dres_fast`` does not import
Triton, so setting ``TRITON_INTERPRET=1`` any time before the first use of this backend (or of
``dres_fast.kernels``) works. Setting it after something imported Triton does not: Triton would
interpret the kernels but not its own library functions, so the backend then raises an error that
says so.
"""

from __future__ import annotations

import importlib
import os
import sys

from . import BackendUnavailableError

__all__ = ["NAME", "KERNELS_MODULE", "is_available", "load", "interpreter_requested"]

NAME = "triton"
KERNELS_MODULE = "dres_fast.kernels"


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter (it takes effect only before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _late_interpreter_note() -> str:
    """Non-empty when TRITON_INTERPRET=1 is set now but was not when triton was imported: Triton
    then interprets kernels defined later but not its own library functions, which fails obscurely."""
    if not interpreter_requested() or "triton" not in sys.modules:
        return ""
    try:
        import triton.language.standard as standard  # jitted at triton's import, with the setting of then
    except ImportError:
        return ""
    if type(getattr(standard, "sum", None)).__name__ == "InterpretedFunction":
        return ""
    return ("TRITON_INTERPRET=1 is set but triton was imported before it was set, so its interpreter is "
            "off: set TRITON_INTERPRET=1 before anything imports triton (before the first use of "
            "backend='triton' in this process).")


def _kernels():
    try:
        return importlib.import_module(KERNELS_MODULE)
    except ImportError as err:
        raise BackendUnavailableError(
            f"backend 'triton' is not available: {err}. Install Triton with `pip install dres_fast[triton]` "
            "(or `pip install triton`), or use backend='torch'."
        ) from err


def is_available(device_type: str = "cuda"):
    """``(usable, reason)`` for tensors on ``device_type`` (imports Triton, compiles nothing)."""
    late = _late_interpreter_note()
    if late:
        return False, f"backend 'triton' is not available: {late}"
    if device_type != "cuda" and not interpreter_requested():
        return False, (
            f"backend 'triton' runs on CUDA tensors; these are on '{device_type}'. To run the kernels on the "
            "CPU through Triton's interpreter, set TRITON_INTERPRET=1 before triton is imported."
        )
    try:
        kernels = _kernels()
    except BackendUnavailableError as err:
        return False, str(err)
    ok, reason = kernels.is_available(device_type)
    return ok, "" if ok else f"backend 'triton' is not available: {reason}"


def load():
    """The kernels module (``spline_mix``, ``reconstruction_loss``, ``OP_FACTORY``)."""
    late = _late_interpreter_note()
    if late:
        raise BackendUnavailableError(f"backend 'triton' is not available: {late}")
    kernels = _kernels()
    ok, reason = kernels.is_available()
    if not ok:
        raise BackendUnavailableError(f"backend 'triton' is not available: {reason}")
    return kernels
