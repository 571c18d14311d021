r"""``SmoothingSpec``: every option that determines the encoder and decoder weights, validated once.

A spec holds ``num_coded`` (``N``; ``None`` means ``N = K``), the smoothing of each spline as
``lam_*`` (scipy's :math:`\lambda`) or ``dof_*`` (effective degrees of freedom, the trace of the
smoother), and the points ``alpha`` and ``beta`` (a kind name or explicit values). It is frozen and
hashable, and together with the batch size ``K``, the device and the compute dtype it is the key of
the weight cache (:mod:`dres_fast.cache`).

Adding an option that changes the weights: add a field here (and its check in ``__post_init__``),
use it in :func:`dres_fast.splines.float64_weights`, and expose it in the signatures that take smoothing
options (``dres_loss``, ``DReSLoss``, ``SubmoduleDReS``), which pass it on by name. The key, the
cache and the weight lookup op under ``torch.compile`` follow from the fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Optional, Tuple, Union

from .contract import MIN_SAMPLES

__all__ = ["SmoothingSpec", "DEFAULT_DOF_FRACTION", "POINT_KINDS", "ORDERS", "ANCHORS", "check_lam", "check_dof",
           "check_num_coded", "check_order", "check_anchor", "check_every"]

#: With neither ``lam_*`` nor ``dof_*`` given, each spline keeps this fraction of its knots' degrees
#: of freedom (never below 2). See README "Smoothing" for why.
DEFAULT_DOF_FRACTION = 0.75
POINT_KINDS = ("chebyshev", "lobatto", "uniform")

Points = Union[str, Tuple[float, ...]]

# Call options that do not change the weights (so they are not fields of the spec): checked here,
# once, by every signature that exposes them.
#: ``order``: the batch as given (the paper), or sorted along its leading principal direction.
ORDERS = ("given", "principal")
#: ``anchor``: compare ``D f(E x)`` with ``f(x)`` (the paper) or with ``f(D E x)``.
ANCHORS = ("observed", "reconstructed")


def check_order(value) -> str:
    if not isinstance(value, str) or value not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {value!r}")
    return value


def check_anchor(value) -> str:
    if not isinstance(value, str) or value not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {value!r}")
    return value


def check_every(value) -> int:
    """``every``: run the coded branch on one step in ``every`` (an int >= 1; 1 = every step)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"every must be an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"every must be an int >= 1 (1 runs the coded branch on every step), got {value}")
    return int(value)


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_lam(value, name: str) -> float:
    """A smoothing lambda: a real number >= 0 (``math.inf`` fits the least-squares line)."""
    lam = _real(value, name)
    if math.isnan(lam) or lam < 0:
        raise ValueError(f"{name} must be >= 0 (math.inf fits the least-squares line), got {value}")
    return lam


def check_dof(value, name: str, knots: Optional[int] = None) -> float:
    """Degrees of freedom: between 2 (a line) and the number of the spline's knots (interpolation)."""
    dof = _real(value, name)
    upper = math.inf if knots is None else knots
    if not 2.0 <= dof <= upper:
        bound = "the number of its knots" + ("" if knots is None else f" ({knots})")
        raise ValueError(f"{name} must be between 2 and {bound}, got {value}")
    return dof


def check_num_coded(value, num_samples: Optional[int] = None) -> Optional[int]:
    """``num_coded``: ``None`` (``N = K``; returns ``num_samples``) or an int >= 3."""
    if value is None:
        return num_samples
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"num_coded must be an int or None, got {type(value).__name__}")
    if value < MIN_SAMPLES:
        raise ValueError(f"num_coded must be at least {MIN_SAMPLES} (a cubic spline needs 3 knots), got {value}")
    return int(value)


def _points(value, name: str) -> Points:
    """A point kind name, or explicit points as a tuple of floats (checked for shape and order)."""
    if isinstance(value, str):
        if value not in POINT_KINDS:
            raise ValueError(f"{name} must be one of {POINT_KINDS} or a 1-D tensor, got {value!r}")
        return value
    if hasattr(value, "detach"):  # a tensor: no torch import needed to recognise it
        value = value.detach().cpu().double().reshape(-1).tolist() if value.dim() == 1 else value.tolist()
    try:
        values = tuple(float(v) for v in value)
    except TypeError as err:
        raise TypeError(f"{name} must be a point kind or a 1-D sequence of numbers, got {type(value).__name__}") from err
    if len(values) < MIN_SAMPLES:
        raise ValueError(f"{name} needs at least {MIN_SAMPLES} points for a cubic smoothing spline, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite")
    if not all(a < b for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly ascending")
    return values


@dataclasses.dataclass(frozen=True)
class SmoothingSpec:
    """The options that determine the weights (module docstring). Build it with keywords; explicit
    points become tuples of floats, so two specs with equal values are equal and hash alike."""

    num_coded: Optional[int] = None
    lam_enc: Optional[float] = None
    lam_dec: Optional[float] = None
    dof_enc: Optional[float] = None
    dof_dec: Optional[float] = None
    alpha: Points = "chebyshev"
    beta: Points = "lobatto"
    #: the spec as a string (the weight lookup op takes it; :func:`from_key` reads it back). Built
    #: with f-strings only, so ``torch.compile`` can trace the construction of a spec.
    key: str = dataclasses.field(default="", init=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("num_coded", check_num_coded(self.num_coded))
        for spline in ("enc", "dec"):
            lam, dof = getattr(self, "lam_" + spline), getattr(self, "dof_" + spline)
            if lam is not None and dof is not None:
                raise ValueError(f"give lam_{spline} or dof_{spline}, not both (got lam_{spline}={lam}, dof_{spline}={dof})")
            if lam is not None:
                set_("lam_" + spline, check_lam(lam, "lam_" + spline))
            if dof is not None:
                set_("dof_" + spline, check_dof(dof, "dof_" + spline))
        set_("alpha", _points(self.alpha, "alpha"))
        set_("beta", _points(self.beta, "beta"))
        set_("key", ";".join(f"{name}={_encode(getattr(self, name))}" for name in OPTION_NAMES))

    def options(self) -> dict:
        """The fields as keyword arguments (``dres_loss(**spec.options())``)."""
        return {name: getattr(self, name) for name in OPTION_NAMES}

    def sizes(self, num_samples: int) -> Tuple[int, int]:
        """``(K, N)`` for a batch of ``num_samples``; explicit points must match in number."""
        num_coded = self.num_coded if self.num_coded is not None else num_samples
        for name, points, count, what in (("alpha", self.alpha, num_samples, "sample"), ("beta", self.beta, num_coded, "coded sample")):
            if not isinstance(points, str) and len(points) != count:
                raise ValueError(f"{name} must have {count} points (one per {what}), got {len(points)}")
        return num_samples, num_coded


#: the fields of a spec, in signature order (the keyword names of dres_loss and friends)
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(SmoothingSpec) if field.init)


def _encode(value) -> str:
    # repr() of a float round-trips exactly (inf included); points tuples are written in parentheses
    if isinstance(value, tuple):
        return "(" + ",".join(f"{v!r}" for v in value) + ")"
    return f"{value!r}" if isinstance(value, float) else f"{value}"


def _decode(text: str):
    # ints are written without a point, floats always with one (or as inf/nan/an exponent)
    if text == "None" or text in POINT_KINDS:
        return None if text == "None" else text
    if text.startswith("("):
        return tuple(float(v) for v in text[1:-1].split(","))
    return int(text) if text.lstrip("-").isdigit() else float(text)


@functools.lru_cache(maxsize=256)
def from_key(key: str) -> SmoothingSpec:
    """The spec whose :attr:`SmoothingSpec.key` is ``key``."""
    fields = dict(item.split("=", 1) for item in key.split(";"))
    return SmoothingSpec(**{name: _decode(fields[name]) for name in OPTION_NAMES})
