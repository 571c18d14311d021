"""What ``dres_fast.kernels`` exports (its ``__init__`` imports it unless the folder was found as a bare ``kernels``)."""

import torch

try:
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = exc

if _IMPORT_ERROR is None:
    from .banded import banded_apply
    from .reconstruction_loss import reconstruction_loss
    from .spline_mix import CPU_WITHOUT_INTERPRETER, INTERPRET, spline_mix
else:  # pragma: no cover
    INTERPRET = False
    CPU_WITHOUT_INTERPRETER = ""

    def _missing(*args, **kwargs):
        raise RuntimeError(f"the Triton backend needs the package 'triton' (pip install triton): "
                           f"{_IMPORT_ERROR!r}")

    spline_mix = reconstruction_loss = banded_apply = _missing


def _pick_op_factory():
    if (_IMPORT_ERROR is None and not INTERPRET
            and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")):
        return torch.library.triton_op
    return torch.library.custom_op


OP_FACTORY = _pick_op_factory()


def is_available(device=None):
    """``(True, "")`` when the kernels can run (on ``device`` if given), else ``(False, reason)``.

    Compiled Triton needs a CUDA device; with ``TRITON_INTERPRET=1`` set before triton was imported, the
    interpreter runs the same kernels on CPU tensors (slowly: tests only)."""
    if _IMPORT_ERROR is not None:
        return False, f"Triton is not installed or failed to import ({_IMPORT_ERROR!r}); pip install triton"
    device_type = torch.device(device).type if device is not None else None
    if INTERPRET:
        return True, ""
    if device_type == "cpu":
        return False, CPU_WITHOUT_INTERPRETER
    if not torch.cuda.is_available():
        return False, ("Triton kernels need a CUDA GPU and torch.cuda.is_available() is False (or set "
                       "TRITON_INTERPRET=1 before importing triton to run them on CPU tensors, slowly)")
    return True, ""


__all__ = ["spline_mix", "reconstruction_loss", "banded_apply", "OP_FACTORY", "is_available", "INTERPRET"]
