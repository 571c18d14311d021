r"""The DReS step, written once: every public form (``dres_loss``, ``DReSLoss``, both ``SubmoduleDReS``
modes) runs it, and differs only in how it calls the submodule ``f``.

For a batch :math:`x_1..x_K` at points :math:`\alpha` and coded points :math:`\beta_1..\beta_N`:

.. math::

    \tilde x = E x,\quad \tilde y = f(\tilde x),\quad \hat y = D \tilde y,\qquad
    L = \operatorname{reduce}_k \lVert a_k - \hat y_k \rVert^2 ,

with :math:`E = W(\alpha\to\beta, \lambda_{enc})`, :math:`D = W(\beta\to\alpha, \lambda_{dec})`
(:func:`dres_fast.spline_weights`) and the anchor :math:`a = f(x)` (the paper, ``anchor="observed"``) or
:math:`a = f(D E x)` (``anchor="reconstructed"``: zero for every affine :math:`f`, because
:math:`D 1 = 1`). With ``order="principal"`` the batch is first sorted along its leading principal
direction (:func:`principal_order`), so :math:`L` does not depend on the order in which the samples
arrive; per-sample losses and :math:`\hat y` are returned in the caller's order. With ``every=k`` the
coded branch runs on one step in ``k`` and its loss is multiplied by ``k``.

A step has two halves around the calls of :math:`f`: :meth:`DReSStep.encode` (order, ``E x``, and
``D E x`` for the reconstructed anchor) and :meth:`DReSStep.loss` (decode and compare, one fused op).
:meth:`DReSStep.run` is the functional form that calls :math:`f` itself. The configuration
(:class:`DReSConfig`) is validated once, when the step is built; the calls validate only the tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import warnings
from typing import List, Optional

import torch

from ._hooks import batch_axis, check_batch_dim
from ._masks import positions_valid, zero_padded
from .banded import BandedSpline
from .cache import coding_weights, default_cache
from .contract import MIN_SAMPLES, REDUCTIONS, compute_dtype, loss_dtype, traced
from .ops import banded as banded_path
from .ops.dispatch import BACKENDS, functions
from .smoothing import SmoothingSpec, check_anchor, check_every, check_order

__all__ = ["DReSConfig", "DReSStep", "Coding", "HoldsStep", "step_for", "principal_order"]

#: Power iterations of :func:`principal_order`: the order only needs a good direction, not a converged
#: one, and every iterate is a function of the batch's covariance, so any count keeps the invariance.
POWER_ITERATIONS = 8


def principal_order(batch: torch.Tensor, iterations: int = POWER_ITERATIONS) -> torch.Tensor:
    r"""The permutation (int64, on the batch's device) that sorts the samples of ``batch`` (samples
    along dim 0) by their projection on the batch's leading principal direction.

    With :math:`X` the centred, flattened batch (:math:`K \times d`): start from the centred sample
    of largest norm, apply :math:`v \leftarrow X^\top X v / \lVert\cdot\rVert` ``iterations`` times
    (:math:`O(K d)` each), orient :math:`v` so that its largest-magnitude entry is positive, and
    ``argsort`` :math:`X v` (stable). Every step is a function of the set of samples, so permuting the
    batch permutes the result the same way, up to ties (two samples of equal norm for the start, or of
    equal projection, keep their input order; floating-point sums in another order can also break a
    near-tie differently); nothing leaves the device (no host sync). No gradient.
    """
    with torch.no_grad():
        flat = batch.detach().reshape(batch.shape[0], -1).to(compute_dtype(batch.dtype))
        centred = flat - flat.mean(dim=0, keepdim=True)
        largest = centred.square().sum(dim=1).argmax().reshape(1)
        direction = centred.index_select(0, largest).reshape(-1)
        tiny = torch.finfo(centred.dtype).tiny
        for _ in range(iterations):
            direction = centred.t() @ (centred @ direction)
            direction = direction / direction.norm().clamp_min(tiny)
        sign = direction.index_select(0, direction.abs().argmax().reshape(1)).sign()
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)  # an all-equal batch keeps its order
        return torch.argsort(centred @ (direction * sign), stable=True)


@dataclasses.dataclass(frozen=True)
class DReSConfig:
    """Every option of a DReS step, validated on construction. ``clip_dof``: a fixed ``dof_*`` above a
    batch's knots is clipped to them with one warning (``SubmoduleDReS``, whose last batch may be
    small) instead of raising (``dres_loss``)."""

    spec: SmoothingSpec = SmoothingSpec()
    reduction: str = "mean"
    backend: str = "auto"
    batch_dim: int = 0
    order: str = "given"
    anchor: str = "observed"
    every: int = 1
    clip_dof: bool = False

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not isinstance(self.backend, str) or self.backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {self.backend!r}")
        object.__setattr__(self, "batch_dim", check_batch_dim(self.batch_dim))
        check_order(self.order), check_anchor(self.anchor)
        object.__setattr__(self, "every", check_every(self.every))


def _moved(t: torch.Tensor, source: int, destination: int) -> torch.Tensor:
    return t if source == destination else t.movedim(source, destination)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def _unrows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``rows`` (M, d) back to the sample shape of ``like``."""
    return rows if like.dim() == 2 else rows.reshape((rows.shape[0],) + like.shape[1:])


def _masked_loss(mix, anchor, y_coded, decoder, valid, reduction: str) -> torch.Tensor:
    """The loss over each sample's valid positions only: ``anchor`` and ``y_coded`` with the samples on
    axis 0 and the positions on axis 1, ``valid`` ``(K, T)`` bool (:mod:`dres_fast._masks`). Plain torch
    around one ``spline_mix`` (the fused op has no mask); ``"mean"`` divides by the valid elements. The
    padded positions are selected out, not multiplied by zero: a NaN there (a fully masked query row)
    reaches nothing."""
    dtype = compute_dtype(y_coded.dtype)  # the dense decoder's dtype; a banded one computes in float64
    decoded = _unrows(mix(decoder, _rows(y_coded.to(dtype))), y_coded)
    keep = valid.view(valid.shape + (1,) * (anchor.dim() - 2))
    residual = torch.where(keep, anchor.to(dtype) - decoded, torch.zeros((), dtype=dtype, device=decoded.device))
    per_sample = residual.square().flatten(1).sum(1)
    if reduction == "none":
        loss = per_sample
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample.sum() / (valid.sum() * anchor[0, 0].numel()).clamp_min(1)
    return loss.to(loss_dtype(anchor.dtype))


def _has_positions(output: torch.Tensor, valid: torch.Tensor, input_dim: int, mask_label: str) -> bool:
    """Whether the submodule's ``output`` (samples first) keeps the batch's ``T`` positions on axis 1, where
    the mask applies; False for a pooled output (fewer axes than the input, and not ``T`` entries on axis 1:
    every entry counts). Raises when it keeps the input's axes but not its positions."""
    positions = valid.shape[1]
    if output.dim() >= 2 and output.shape[1] == positions:
        return True
    if output.dim() < input_dim:
        return False
    raise ValueError(f"{mask_label} marks {positions} positions, but the submodule's output {tuple(output.shape)} "
                     f"(samples first) keeps the input's {input_dim} axes and not its positions (a strided or pooling "
                     "layer): the mask cannot say which outputs hold data. Hook a submodule that keeps the positions, "
                     "or one whose output is pooled")


def _functions(backend: str, value: torch.Tensor, weights):
    """The ops for ``weights``: the chosen backend's for dense matrices, the banded path's for banded maps."""
    if isinstance(weights, BandedSpline):
        return banded_path.functions(backend)
    return functions(backend, value.device, value.dtype)


class Coding:
    """One call's coding: sizes, spec, the sort (or None), the dense encoder and decoder (compute dtype of the
    batch; fetched on first use, so the banded path never builds them), ``inputs``: ``[E x]`` or ``[E x,
    D E x]`` to run ``f`` on, samples on the batch's axis; for a submodule called with masks, ``masks``
    and ``valid`` (``(K, T)`` bool, the positions the loss counts; :mod:`dres_fast._masks`)."""

    __slots__ = ("step", "num_samples", "num_coded", "spec", "sort", "encoder", "decoder", "inputs", "masks", "valid",
                 "input_dim", "names")

    def __init__(self, step: "DReSStep", num_samples: int, num_coded: int, spec: SmoothingSpec, sort, encoder, decoder):
        self.step, self.num_samples, self.num_coded, self.spec, self.sort = step, num_samples, num_coded, spec, sort
        self.encoder, self.decoder = encoder, decoder
        self.inputs: List[torch.Tensor] = []
        self.masks, self.valid, self.input_dim = [], None, 0
        self.names: dict = {}  # SubmoduleDReS: the submodule's argument names by place (position or keyword)

    def mix(self, value: torch.Tensor, axis: int) -> List[torch.Tensor]:
        """``[E v]`` (and ``D E v`` for the reconstructed anchor) of ``v``, a tensor with this batch's
        samples along ``axis`` (the batch, or a per-sample argument of ``f``), sorted like the batch."""
        first = _moved(value, axis, 0)
        if self.sort is not None:
            first = first.index_select(0, self.sort)
        encoder, decoder = self.weights_for(value)
        mix = _functions(self.step.config.backend, value, encoder).spline_mix
        coded = _unrows(mix(encoder, _rows(first)), first)
        out = [coded]
        if self.step.config.anchor == "reconstructed":
            out.append(_unrows(mix(decoder, _rows(coded)), first))
        return [_moved(branch, 0, axis) for branch in out]

    def weights_for(self, value: torch.Tensor):
        """``(E, D)`` for ``value`` (samples first): dense matrices in its compute dtype on its device, or
        banded maps (:mod:`dres_fast.ops.banded`) where ``choose`` picks them for its width."""
        # choose() first: for narrow data it answers "dense" at once (the host cost of small steps)
        if banded_path.choose(self.step.config.backend, value.device, self.num_samples, self.num_coded,
                              value[0].numel(), value.dtype) == "banded" and not traced():
            return default_cache.banded(self.spec, self.num_samples, value.device)
        if self.encoder is None:  # the dense pair is fetched (and, the first time, built: O(K N)) only if used
            self.encoder, self.decoder = coding_weights(self.spec, self.num_samples, value.device, value.dtype)
        if compute_dtype(value.dtype) == self.encoder.dtype and value.device == self.encoder.device:
            return self.encoder, self.decoder
        return coding_weights(self.spec, self.num_samples, value.device, value.dtype)


class DReSStep:
    """The DReS step of one :class:`DReSConfig` (module docstring). ``step_count``: the place of the next
    step begun with :meth:`begin` in the cycle of ``every`` steps (``every > 1``; 0: it runs the coded branch)."""

    def __init__(self, config: DReSConfig):
        self.config = config
        self.step_count = 0
        self._warned: set = set()
        self._clipped: dict = {}  # batch size -> the spec with dof clipped to its knots (clip_dof)

    # -- every ------------------------------------------------------------------------------------
    def begin(self) -> bool:
        """Count one step; whether it runs the coded branch (steps 0, every, ...). The counter cycles through
        ``0 .. every - 1``: torch.compile specializes on its value, so a growing one recompiled every step."""
        if self.config.every == 1:  # no counter at all: nothing to specialize on
            return True
        place, self.step_count = self.step_count, (self.step_count + 1) % self.config.every
        return place == 0

    def zero(self, like: torch.Tensor, num_samples: Optional[int] = None) -> torch.Tensor:
        """The loss of a step without coded branch: zeros of the loss's shape and dtype, which
        ``.backward()`` accepts (a leaf that requires grad, when grad mode is on)."""
        shape = (num_samples,) if self.config.reduction == "none" and num_samples is not None else ()
        zero = torch.zeros(shape, dtype=loss_dtype(like.dtype), device=like.device)
        return zero.requires_grad_() if torch.is_grad_enabled() and not torch.compiler.is_compiling() else zero

    # -- weights ----------------------------------------------------------------------------------
    def spec_for(self, num_samples: int) -> SmoothingSpec:
        """The spec for a batch of ``num_samples``: a fixed ``dof_*`` above its knots clipped (``clip_dof``)."""
        spec = self.config.spec
        if not self.config.clip_dof:
            return spec
        if torch.compiler.is_compiling():  # a symbolic batch size is no dict key
            return self._clip(spec, num_samples)
        clipped = self._clipped.get(num_samples)
        if clipped is not None:
            return clipped
        clipped = self._clipped[num_samples] = self._clip(spec, num_samples)
        return clipped

    def _clip(self, spec: SmoothingSpec, num_samples: int) -> SmoothingSpec:
        num_samples, num_coded = spec.sizes(num_samples)
        for key, knots in (("dof_enc", num_samples), ("dof_dec", num_coded)):
            dof = getattr(spec, key)
            if isinstance(dof, numbers.Real) and dof > knots:
                spec = dataclasses.replace(spec, **{key: float(knots)})
                self.warn_once(key, f"{key}={dof:g} exceeds the {knots} knots of a batch of {num_samples} samples; it "
                               f"is clipped to {knots} (interpolation) for such batches.")
        return spec

    def warn_once(self, key: str, message: str) -> None:
        """``message`` as a warning, the first time ``key`` is seen by this step."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message + " This warning is shown once.", stacklevel=5)

    # -- the two halves ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, axis: int, masks=()) -> Coding:
        """Order and encode the batch ``x`` (samples along ``axis``, at least 3 of them). ``masks``: the
        submodule's padding masks (:func:`dres_fast._masks.find_masks`): padded positions of ``x`` (its
        first non-batch axis of the first two) are zero in what is mixed, and the loss skips them."""
        spec = self.spec_for(x.shape[axis])
        num_samples, num_coded = spec.sizes(x.shape[axis])
        valid = positions_valid(masks) if masks else None
        if valid is not None:  # before the sort too: what padded positions hold must not move anything
            x = zero_padded(x, axis, valid, next(mask.label for mask in masks if not mask.cross))
        sort = principal_order(_moved(x, axis, 0)) if self.config.order == "principal" else None
        coding = Coding(self, num_samples, num_coded, spec, sort, None, None)  # weights_for fetches the maps
        coding.masks, coding.valid, coding.input_dim = list(masks), valid, x.dim()
        coding.inputs = coding.mix(x, axis)
        return coding

    def loss(self, coding: Coding, anchor: torch.Tensor, y_coded: torch.Tensor, return_decoded: bool = False):
        """Decode ``y_coded`` (``f`` of ``coding.inputs[0]``) and compare with ``anchor`` (``f(x)`` in the
        caller's order, or ``f`` of ``coding.inputs[1]``); both tensors of ``f``'s output with the samples
        along ``batch_dim``. Returns the loss (times ``every``), and ``y_hat`` when ``return_decoded``."""
        config = self.config
        axes = []
        for name, value, count in (("y" if config.anchor == "observed" else "fn(D E x)", anchor, coding.num_samples),
                                   ("fn(x_coded)", y_coded, coding.num_coded)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a tensor (fn must return one tensor), got {type(value).__name__}")
            axis = batch_axis(config.batch_dim, value)
            if axis is None or value.shape[axis] != count:
                raise ValueError(f"{name} must have {count} samples along batch_dim={config.batch_dim}, "
                                 f"got shape {tuple(value.shape)}")
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
            axes.append(axis)
        anchor, y_coded = _moved(anchor, axes[0], 0), _moved(y_coded, axes[1], 0)
        if anchor.shape[1:] != y_coded.shape[1:]:
            raise ValueError(f"y_coded's sample shape {tuple(y_coded.shape[1:])} (y_coded = fn(x_coded)) differs from "
                             f"y's {tuple(anchor.shape[1:])}")
        if coding.sort is not None and config.anchor == "observed":  # f(D E x) is already in the sorted order
            anchor = anchor.index_select(0, coding.sort)
        if anchor.dtype != y_coded.dtype:
            dtype = torch.promote_types(anchor.dtype, y_coded.dtype)
            anchor, y_coded = anchor.to(dtype), y_coded.to(dtype)
        decoder = coding.weights_for(y_coded)[1]
        ops = _functions(config.backend, y_coded, decoder)
        masked = coding.valid is not None and self._masks_output(coding, anchor)
        if not masked:
            loss = ops.reconstruction_loss(_rows(anchor), _rows(y_coded), decoder, config.reduction)
        else:
            valid = coding.valid if coding.sort is None else coding.valid.index_select(0, coding.sort)
            loss = _masked_loss(ops.spline_mix, anchor, y_coded, decoder, valid, config.reduction)
        unsort = torch.argsort(coding.sort) if coding.sort is not None else None
        if unsort is not None and config.reduction == "none":
            loss = loss.index_select(0, unsort)  # per-sample losses in the caller's order
        if config.every > 1:
            loss = loss * config.every
        if not return_decoded:
            return loss
        decoded = _unrows(ops.spline_mix(decoder, _rows(y_coded)), y_coded)
        if unsort is not None:
            decoded = decoded.index_select(0, unsort)
        return loss, _moved(decoded, 0, axes[1])

    def _masks_output(self, coding: Coding, anchor: torch.Tensor) -> bool:
        """Whether the loss is masked by position (:func:`_has_positions`); one warning for a lower-rank
        output read per position (a pooled width equal to ``T`` would be misread)."""
        label = next(m.label for m in coding.masks if not m.cross)
        positional = _has_positions(anchor, coding.valid, coding.input_dim, label)
        if positional and anchor.dim() < coding.input_dim:
            self.warn_once("lower_rank", f"{label}: the submodule's output {tuple(anchor.shape)} (samples first) has "
                           f"fewer axes than its input and {coding.valid.shape[1]} entries on axis 1, as many as the "
                           "mask's positions: it is read as one value per position. If those are pooled features, "
                           "hook the submodule before the pooling.")
        return positional

    # -- the functional form ----------------------------------------------------------------------
    def run(self, fn, x: torch.Tensor, y: Optional[torch.Tensor] = None, return_decoded: bool = False):
        """``L`` of ``fn`` on the batch ``x`` (``y``: ``fn(x)`` if already computed), and ``y_hat`` when
        ``return_decoded``."""
        if not callable(fn):
            raise TypeError(f"fn must be callable (a module or function), got {type(fn).__name__}")
        axis = self.batch_axis_of(x)
        coding = self.encode(x, axis)
        observed = self.config.anchor == "observed"
        if observed and y is None:
            y = fn(x)
        y_coded = fn(coding.inputs[0])
        return self.loss(coding, y if observed else fn(coding.inputs[1]), y_coded, return_decoded)

    def batch_axis_of(self, x) -> int:
        """The batch axis of ``x``, checked: a floating-point tensor with at least 3 samples there."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        batch_dim = self.config.batch_dim
        axis = batch_axis(batch_dim, x)
        if axis is None or x.shape[axis] < MIN_SAMPLES:
            raise ValueError(f"x must hold a batch of at least {MIN_SAMPLES} samples along batch_dim={batch_dim}, "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        return axis


class HoldsStep:
    """``spec`` and ``step_count`` of the :class:`DReSStep` held as ``self.step`` (``DReSLoss``, ``SubmoduleDReS``)."""

    @property
    def spec(self) -> SmoothingSpec:
        return self.step.config.spec

    @property
    def step_count(self) -> int:
        """With ``every > 1``: the place of the next step (a call of ``DReSLoss``, a step of ``SubmoduleDReS``)
        in the cycle of ``every`` steps, ``0 .. every - 1``; the step runs the coded branch when it is 0.
        Setting it to a step number ``s`` sets ``s % every`` (resuming a run)."""
        return self.step.step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.step.step_count = int(value) % self.step.config.every


@functools.lru_cache(maxsize=256, typed=True)
def _cached_step(*options) -> DReSStep:
    return _new_step(*options)


def _new_step(num_coded, lam_enc, lam_dec, dof_enc, dof_dec, alpha, beta, reduction, backend, batch_dim, order, anchor):
    spec = SmoothingSpec(num_coded, lam_enc, lam_dec, dof_enc, dof_dec, alpha, beta)
    return DReSStep(DReSConfig(spec, reduction, backend, batch_dim, order, anchor))


def step_for(*options) -> DReSStep:
    """The step of ``dres_loss``'s options (positional, in its signature's order), built and validated
    once per distinct set of options (with explicit point tensors: built per call)."""
    alpha, beta = options[5:7]  # the only options that may be tensors (order of _new_step's parameters)
    if torch.compiler.is_compiling() or isinstance(alpha, torch.Tensor) or isinstance(beta, torch.Tensor):
        return _new_step(*options)  # a tensor hashes by identity: an in-place edit would hit a stale step
    try:
        return _cached_step(*options)
    except TypeError as err:
        if "unhashable" not in str(err):
            raise
        return _new_step(*options)

