"""dres_fast: Dual Reconstruction Smoothing (DReS, arXiv 2510.00253) as a fast drop-in regularizer."""

from . import ops
from .cache import WeightCache, default_cache
from .functional import dres_loss
from .module import DReSLoss, SubmoduleDReS
from .splines import degrees_of_freedom, lam_for_dof, points, spline_weights

__all__ = [
    "points",
    "spline_weights",
    "degrees_of_freedom",
    "lam_for_dof",
    "dres_loss",
    "DReSLoss",
    "SubmoduleDReS",
    "WeightCache",
    "default_cache",
    "ops",
]

__version__ = "0.1.0"
