"""dres_fast: Dual Reconstruction Smoothing (DReS, arXiv 2510.00253) as a fast drop-in regularizer.

``import dres_fast`` stays cheap (well under a second on top of ``import torch``): the spline
functions (scipy) and the backends (Triton, the CUDA extension) load on first use.
"""

from . import ops
from .cache import WeightCache, default_cache
from .functional import dres_loss
from .module import DReSLoss, SubmoduleDReS
from .smoothing import SmoothingSpec

__all__ = [
    "points",
    "spline_weights",
    "degrees_of_freedom",
    "lam_for_dof",
    "dres_loss",
    "DReSLoss",
    "SubmoduleDReS",
    "SmoothingSpec",
    "WeightCache",
    "default_cache",
    "ops",
]

__version__ = "0.1.0"

_FROM_SPLINES = ("points", "spline_weights", "degrees_of_freedom", "lam_for_dof")


def __getattr__(name):
    # loaded when one of its functions is first used: nothing of the spline code (nor scipy, which it
    # imports inside its functions) is paid for by `import dres_fast`
    if name in _FROM_SPLINES:
        from . import splines

        value = getattr(splines, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dres_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_FROM_SPLINES))
