"""Backend ``"triton"`` of dres_fast (shipped as ``dres_fast.kernels``).

The adapter ``dres_fast/backends/triton.py`` imports it lazily (the first time the backend is used) and
registers its two backend functions of docs/ARCHITECTURE.md as torch.library ops:

- ``spline_mix(weights, x)``: ``weights @ x`` along the batch axis (``kernels/spline_mix.py``)
- ``reconstruction_loss(y, y_coded, decoder, reduction, compute_grads)``: the DReS discrepancy and both
  gradients in one pass (``kernels/reconstruction_loss.py``)

and ``banded_apply(arrays, x, transpose, refinement=None)``: a smoothing spline map ``W`` or ``W^T`` applied from
the O(n + p) coefficients of :class:`dres_fast.banded.BandedSpline`, with its step of iterative refinement where
the spline asks for one (``kernels/banded.py``, the recurrences in ``kernels/banded_solve.py``; not yet
registered as an op).

``OP_FACTORY`` is ``torch.library.triton_op`` where torch has it (torch >= 2.6) and the kernels are
compiled for a GPU: the launchers use only fake-tensor-safe torch ops plus ``wrap_triton`` launches, so
``torch.compile`` traces into the kernels. Under the Triton interpreter (CPU tests) and on older torch it
is ``torch.library.custom_op``: an opaque op with the registry's fake implementation.
"""

import sys

if __name__ == "dres_fast.kernels":
    from ._api import (CPU_WITHOUT_INTERPRETER, INTERPRET, OP_FACTORY, banded_apply, is_available, reconstruction_loss,
                       spline_mix)

    __all__ = ["spline_mix", "reconstruction_loss", "banded_apply", "OP_FACTORY", "is_available", "INTERPRET",
               "CPU_WITHOUT_INTERPRETER"]
else:  # pragma: no cover - exercised in a subprocess by tests/test_layout.py
    # Found as a bare ``kernels``: the clone's root is on sys.path (scripts and pytest run from there). That
    # name belongs to another package (Hugging Face's ``kernels``, which ``transformers`` imports), so step
    # aside: load the package that owns the name from the rest of sys.path, or fail as if this folder were
    # not here. The import statement returns whatever sys.modules holds for the name afterwards.
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _rest = [entry for entry in sys.path if os.path.abspath(entry or os.getcwd()) != _root]
    _owner = importlib.machinery.PathFinder.find_spec(__name__, _rest)
    if _owner is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} ({os.path.dirname(__file__)} is dres_fast.kernels)",
                                  name=__name__)
    _module = importlib.util.module_from_spec(_owner)
    sys.modules[__name__] = _module
    _owner.loader.exec_module(_module)
