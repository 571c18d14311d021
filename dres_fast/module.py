"""``DReSLoss`` (the functional form as a module) and ``SubmoduleDReS`` (regularize one submodule
of a larger model inside an ordinary training loop, without rewriting the model)."""

from __future__ import annotations

import functools
import itertools
import operator
from typing import List, Optional

import torch
from torch import nn

from ._hooks import (EXTRA_ARGS, RUNNING_STATS, BoundHook, ForwardMark, batch_axis, compiled_code_hint,
                     check_fresh_caches, frozen_running_stats, recording_outputs, rewrite_extra_args,
                     sequence_first_layers, unrecorded, without_caches)
from ._masks import argument_names, find_masks, padded_argument, position_axis
from .smoothing import SmoothingSpec
from .step import DReSConfig, DReSStep, HoldsStep

__all__ = ["DReSLoss", "SubmoduleDReS"]

#: ``running_stats`` of a SubmoduleDReS in separate mode when not given (README "BatchNorm statistics")
DEFAULT_RUNNING_STATS = "all"


class DReSLoss(HoldsStep, nn.Module):
    """Module form of :func:`dres_fast.dres_loss`: the options are constructor arguments.

    ``loss = DReSLoss(num_coded=64)(model.encoder, x, y=features)``

    ``every=k`` (lazy DReS, as lazy R1 in StyleGAN2): each call is a step; the coded branch runs on
    steps 0, k, 2k, ... (:attr:`step_count` cycles through 0 .. k - 1; a compiled step compiles one
    variant per place) with its loss multiplied by ``k``; the other calls return a zero tensor without
    calling ``fn``. ``order``, ``anchor``: :func:`dres_fast.dres_loss`.
    """

    def __init__(
        self,
        num_coded=None,
        lam_enc=None,
        lam_dec=None,
        dof_enc=None,
        dof_dec=None,
        alpha="chebyshev",
        beta="lobatto",
        reduction: str = "mean",
        return_decoded: bool = False,
        backend: str = "auto",
        batch_dim: int = 0,
        every: int = 1,
        order: str = "given",
        anchor: str = "observed",
    ):
        super().__init__()
        spec = SmoothingSpec(num_coded, lam_enc, lam_dec, dof_enc, dof_dec, alpha, beta)
        self.step = DReSStep(DReSConfig(spec, reduction, backend, batch_dim, order, anchor, every))
        if self.step.config.every > 1 and return_decoded:
            raise ValueError("every > 1 cannot be combined with return_decoded=True: skipped steps have no reconstruction")
        self.return_decoded = return_decoded

    def forward(self, fn, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        if not self.step.begin():
            axis = self.step.batch_axis_of(x)
            return self.step.zero(x, x.shape[axis])
        return self.step.run(fn, x, y=y, return_decoded=self.return_decoded)

    def extra_repr(self) -> str:
        config = self.step.config
        options = dict(config.spec.options(), reduction=config.reduction, return_decoded=self.return_decoded,
                       backend=config.backend, batch_dim=config.batch_dim, every=config.every, order=config.order,
                       anchor=config.anchor)
        return ", ".join(f"{k}={v!r}" for k, v in options.items() if not isinstance(v, torch.Tensor))


class SubmoduleDReS(HoldsStep):
    r"""Record the DReS discrepancy of one named submodule during a model's ordinary forward.

    .. code-block:: python

        reg = SubmoduleDReS(model, "features.block3", mode="concat")
        for x, target in loader:
            with reg:                       # hooks live only inside the block
                out = model(x)
            loss = criterion(out, target) + 0.1 * reg.loss

    or ``reg.attach()`` once before the loop (``reg.detach()`` after it): each forward of ``model``
    then starts a fresh record, so ``reg.loss`` is the loss of the latest forward.

    The submodule's first positional argument is the batch and it must return one tensor; both hold
    the samples along ``batch_dim`` (default 0). If the submodule is, or contains, a layer with
    ``batch_first=False`` (``nn.MultiheadAttention``, ``nn.Transformer*``, ``nn.RNN/LSTM/GRU``),
    ``batch_dim`` must be given: the default would mix time steps instead of samples.

    ``extra_args``: tensor arguments of the submodule besides the batch with ``K`` entries along
    ``batch_dim`` look per-sample (a padding mask, a condition) and have no value for a coded sample.
    ``"error"`` (default) raises, naming the argument; ``"mix"`` mixes floating-point ones with the
    batch's encoder (``E c``, concatenated to ``c`` in concat mode; padded positions zeroed first) and
    raises for others (ids); ``"pass"`` passes them unchanged. Masks are recognised by name and coded
    (:mod:`dres_fast._masks`); key/value caches are not passed to coded calls (``_hooks.without_caches``).

    ``mode``:

    * ``"concat"``: the coded batch ``E x`` is appended to the real batch and the submodule runs
      **once** on ``K + N`` samples; only the first ``K`` outputs continue through the model.
      BatchNorm normalizes real and coded samples together and updates its running statistics once
      from that mixed batch (``running_stats="all"`` only). One call: the fastest on a GPU.
    * ``"separate"``: the submodule runs on the real batch as usual (exactly the model's own forward),
      then a second time on the coded batch. BatchNorm normalizes each batch with its own statistics and
      updates its running statistics from the real batch only (``running_stats="real"``) or from both
      (``"all"``, the default; docs/EVIDENCE.md has the measurement behind it).

    ``loss`` sums over the submodule's calls: inside a ``with`` block, all calls in the block; after
    :meth:`attach`, the calls in the model's latest forward (zero, with one warning, for a forward that
    skips the submodule: LayerDrop). A call with gradients disabled or with the submodule in eval mode
    runs no coded branch and contributes zero (validation costs nothing); so does a batch of fewer than 3
    samples (one warning). A fixed ``dof_enc`` / ``dof_dec`` above the knots of a batch (a smaller last
    batch) is clipped to that batch's knot count (one warning); :func:`dres_fast.dres_loss` raises instead.

    Copies of the model made while the hooks are attached (``copy.deepcopy``, ``AveragedModel``, an
    EMA copy, ``torch.save`` of the whole module) carry inert hooks: no coded branch, no record.

    ``torch.compile``: compile the model before or after the hooks go on. While hooked, each hooked module has its
    forward set on the instance (``_hooks.ForwardMark``), which Dynamo guards on: one more compile, no more.

    Options beyond the paper (README "Options beyond the paper"):

    * ``every=k``: lazy DReS. A step is a ``with`` block, or (after :meth:`attach`) a forward of the
      model with gradients enabled in training mode; the coded branch runs on steps 0, k, 2k, ...
      (:attr:`step_count`, the place in the cycle) with its loss multiplied by ``k``; on the others
      ``reg.loss`` is zero. After :meth:`attach` the count is a graph break in a compiled model.
    * ``order="principal"``: the coded samples come from the batch sorted along its leading principal
      direction, so the loss does not depend on the batch's order (the real batch keeps its order).
    * ``anchor="reconstructed"``: compare ``D f(E x)`` with ``f(D E x)``, not ``f(x)``: zero for an
      affine submodule; the submodule also runs on ``D E x`` (concat: one call on ``K + N + K``).
    """

    MODES = ("concat", "separate")

    def __init__(
        self,
        model: nn.Module,
        submodule: str,
        *,
        mode: str = "separate",
        num_coded=None,
        lam_enc=None,
        lam_dec=None,
        dof_enc=None,
        dof_dec=None,
        alpha="chebyshev",
        beta="lobatto",
        reduction: str = "mean",
        batch_dim: Optional[int] = None,
        extra_args: str = "error",
        backend: str = "auto",
        every: int = 1,
        order: str = "given",
        anchor: str = "observed",
        running_stats: Optional[str] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(submodule, str):
            raise TypeError(f"submodule must be the dotted name of a submodule (str), got {type(submodule).__name__}")
        try:
            self.module = model.get_submodule(submodule) if submodule else model
        except AttributeError as err:
            raise ValueError(f"submodule {submodule!r} is not a submodule of the model: {err}") from err
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if reduction == "none":
            raise ValueError("reduction must be 'mean' or 'sum' here (reg.loss is added to a scalar loss)")
        if extra_args not in EXTRA_ARGS:
            raise ValueError(f"extra_args must be one of {EXTRA_ARGS}, got {extra_args!r}")
        if batch_dim is None:
            sequence_first = sequence_first_layers(self.module)
            if sequence_first:
                raise ValueError(f"SubmoduleDReS({submodule!r}): batch_first=False in {', '.join(sequence_first)}, so "
                                 "the submodule's input may be (seq, batch, ...) and mixing along dim 0 would mix time "
                                 "steps, not samples. Pass batch_dim=1 for sequence-first input, or batch_dim=0 if the "
                                 "submodule's input has the batch first.")
            batch_dim = 0
        spec = SmoothingSpec(num_coded, lam_enc, lam_dec, dof_enc, dof_dec, alpha, beta)
        self.step = DReSStep(DReSConfig(spec, reduction, backend, batch_dim, order, anchor, every, clip_dof=True))
        if running_stats not in (None,) + RUNNING_STATS:
            raise ValueError(f"running_stats must be one of {RUNNING_STATS} or None, got {running_stats!r}")
        if mode == "concat" and running_stats == "real":
            raise ValueError("running_stats='real' needs mode='separate': in concat mode the submodule runs once on "
                             "the real and coded samples together, so BatchNorm's statistics see both")
        self.running_stats = running_stats or (DEFAULT_RUNNING_STATS if mode == "separate" else "all")
        self.model, self.name, self.mode, self.extra_args = model, submodule, mode, extra_args
        self._handles: list = []
        self._losses: List[torch.Tensor] = []
        self._pending: list = []  # concat mode: the coding of each call in flight (None: skipped)
        self._inside = False  # separate mode: set while the coded branch runs
        self._coded_step = True  # whether the current step runs the coded branch
        self._forwarded = False  # whether the model has run a forward since attach() (never in a `with` block)

    @property
    def batch_dim(self) -> int:
        return self.step.config.batch_dim

    # -- context / attach --------------------------------------------------------------------------
    def attach(self) -> "SubmoduleDReS":
        """Install the hooks until :meth:`detach`; each forward of the model starts a fresh record."""
        return self._install(record_per_forward=True)

    def _install(self, record_per_forward: bool) -> "SubmoduleDReS":
        if self._handles:
            raise RuntimeError("SubmoduleDReS is already attached")
        self.reset()
        self._forwarded = False
        if record_per_forward and self.step.config.every > 1:  # imports torch._dynamo: only when needed
            self._count_step = torch.compiler.disable(self._begin_forward_step)
        # Hooks are BoundHook objects, not bound methods: a copy of the model gets inert hooks.
        if record_per_forward:  # registered first: it runs before the others when submodule == model
            self._handles.append(self.model.register_forward_pre_hook(BoundHook(self, "_start_record")))
        if self.mode == "concat":
            pre_hook = self.module.register_forward_pre_hook(BoundHook(self, "_concat_pre_hook"), with_kwargs=True)
            self._handles += [pre_hook, self.module.register_forward_hook(BoundHook(self, "_concat_hook"))]
        else:
            self._handles.append(self.module.register_forward_hook(BoundHook(self, "_separate_hook"), with_kwargs=True))
        for target in dict.fromkeys((self.model, self.module) if record_per_forward else (self.module,)):
            self._handles.append(ForwardMark(target))  # torch.compile then sees the hooks (ForwardMark)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def __enter__(self) -> "SubmoduleDReS":
        self._coded_step = self.step.begin()
        return self._install(record_per_forward=False)

    def _begin_forward_step(self) -> None:
        # wrapped in torch.compiler.disable by attach(): a compiled model then breaks its graph here and
        # compiles two variants (a coded step or not), where a traced counter would compile one per place in
        # the cycle, times eval, times batch sizes, and reach the recompile limit
        if torch.is_grad_enabled() and self.model.training:  # validation forwards are not steps
            self._coded_step = self.step.begin()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def loss(self) -> torch.Tensor:
        """The recorded DReS discrepancy (sum over the submodule's calls; see the class docstring)."""
        if not self._losses and getattr(self, "_forwarded", False):  # attached, and a forward skipped the submodule
            self.step.warn_once("skipped", f"SubmoduleDReS({self.name!r}): the submodule did not run in the model's "
                                "latest forward, so reg.loss is zero for it: a layer skipped by LayerDrop or an unused "
                                f"expert, or a submodule that is not on the model's path.{compiled_code_hint()}")
            like = next(itertools.chain(self.module.parameters(), self.module.buffers()), torch.empty(0))
            return self.step.zero(like)
        if not self._losses:
            raise RuntimeError(f"submodule {self.name!r} did not run inside the `with` block: no DReS loss "
                               f"recorded.{compiled_code_hint()}")
        return functools.reduce(operator.add, self._losses)  # in call order: the same sum on every run

    @property
    def attached(self) -> bool:
        """Whether the hooks are installed (inside ``with``, or between :meth:`attach` and :meth:`detach`)."""
        return bool(self._handles)

    def __getstate__(self) -> dict:
        # A copy (deepcopy or pickle of a model that holds this object, as SWA/EMA callbacks make) gets the
        # options without the record (non-leaf tensors cannot be copied) and without hooks.
        state = dict(self.__dict__, _losses=[], _pending=[], _handles=[], _inside=False)
        state.pop("_count_step", None)  # a compiler-disabled bound method: set again by attach()
        return state

    def reset(self) -> None:
        """Forget the recorded losses."""
        self._losses = []
        self._pending.clear()

    # -- helpers ------------------------------------------------------------------------------------
    def _coding(self, module: nn.Module, args, kwargs, after_call: bool):
        """The coding of this call (:meth:`DReSStep.encode`), or None (and a zero recorded) when it gets no
        coded branch: a skipped ``every`` step, gradients off, the submodule in eval mode, < 3 samples.
        ``after_call``: the real call has run (separate mode), so a cache already holds its positions."""
        owner = f"SubmoduleDReS({self.name!r})"
        batch = args[0] if args else None
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"{owner}: the submodule's first positional argument must be the batch tensor")
        axis = batch_axis(self.batch_dim, batch)
        if axis is None:
            raise ValueError(f"{owner}: batch_dim={self.batch_dim} is not an axis of the submodule's input of shape "
                             f"{tuple(batch.shape)}")
        if not (torch.is_grad_enabled() and module.training and self._coded_step):  # eval reads no step flag
            self._losses.append(self.step.zero(batch))
            return None
        if batch.shape[axis] < 3:
            self.step.warn_once("small", f"{owner}: a batch of {batch.shape[axis]} samples is too small for DReS "
                                "(needs 3); it contributes zero.")
            self._losses.append(self.step.zero(batch))
            return None
        if not batch.is_floating_point():
            raise TypeError(f"{owner}: the submodule's batch (its first positional argument) is of dtype {batch.dtype}; "
                            "DReS mixes samples, and ids have no value between two samples. Hook the submodule that "
                            "takes their embeddings.")
        if len(args) == 1 and not kwargs:
            return self.step.encode(batch, axis)
        names = argument_names(module, args, kwargs)
        positions = batch.shape[position_axis(axis)] if batch.dim() >= 2 else 0
        check_fresh_caches(module, args, kwargs, names, positions if after_call else 0, positions, owner)
        coding = self.step.encode(batch, axis, find_masks(names, args, kwargs, batch.shape[axis], self.batch_dim, owner))
        coding.names = names
        return coding

    def _arguments(self, coding, args, kwargs, pick):
        """The submodule's arguments, each per-sample extra one ``v`` replaced by ``pick(v, coding.mix(v'), axis)``
        (``v'``: ``v`` with its padded positions zero), each mask ``m`` by ``pick(m, [its coded mask for each coded
        input], axis)`` (:mod:`dres_fast._masks`), each key/value cache by None (``_hooks.without_caches``);
        ``axis``: where the value holds the samples."""
        if len(args) == 1 and not kwargs:  # the batch alone: nothing to rewrite
            return args, kwargs
        owner, names = f"SubmoduleDReS({self.name!r})", coding.names

        def transform(value, place):  # mixed with padded positions zeroed (:func:`_masks.padded_argument`)
            axis, name = batch_axis(self.batch_dim, value), names.get(place, str(place))
            return pick(value, coding.mix(padded_argument(value, axis, name, coding.masks, coding.input_dim,
                                                          self.step.warn_once, owner), axis), axis)

        args, kwargs = list(args), dict(kwargs)
        union = coding.valid.any(dim=0) if coding.valid is not None else None  # valid in some sample: valid when coded
        counts = [coding.num_coded] + [coding.num_samples] * (len(coding.inputs) - 1)  # E x, then D E x
        for mask in coding.masks:
            coded = pick(mask.tensor, [mask.coded(count, None if mask.cross else union) for count in counts], mask.axis)
            if isinstance(mask.place, int):
                args[mask.place] = coded
            else:
                kwargs[mask.place] = coded
        args, kwargs = without_caches(tuple(args), kwargs, names)
        return rewrite_extra_args(args, kwargs, policy=self.extra_args, num_samples=coding.num_samples,
                                  batch_dim=self.batch_dim, transform=transform, owner=owner,
                                  skip={mask.place for mask in coding.masks}, names=names)

    # -- hooks --------------------------------------------------------------------------------------
    def _start_record(self, module, args):
        if not self._inside:  # the coded branch re-enters the model when the submodule is the model
            self.reset()
            self._forwarded = True  # a constant stored: torch.compile guards on no counter
            if self.step.config.every > 1:
                self._count_step()

    def _separate_hook(self, module, args, kwargs, output):
        if self._inside:
            return None
        coding = self._coding(module, args, kwargs, after_call=True)
        if coding is None:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"SubmoduleDReS({self.name!r}): the submodule must return one tensor, got "
                            f"{type(output).__name__}; hook the part of it that returns the tensor to regularize")
        self._inside = True
        try:  # the coded call(s): f(E x), and f(D E x) for the reconstructed anchor, each with its arguments
            outputs = []
            with frozen_running_stats(module, self.running_stats == "real"), unrecorded():
                for i, coded in enumerate(coding.inputs):
                    coded_args, coded_kwargs = self._arguments(coding, args, kwargs, lambda value, mixed, axis: mixed[i])
                    outputs.append(module(coded, *coded_args[1:], **coded_kwargs))
        finally:
            self._inside = False
        anchor = output if self.step.config.anchor == "observed" else outputs[1]
        self._losses.append(self.step.loss(coding, anchor, outputs[0]))
        return None

    def _concat_pre_hook(self, module, args, kwargs):
        coding = self._coding(module, args, kwargs, after_call=False)
        if coding is not None and recording_outputs(module):  # transformers' hooks would record K + N samples
            raise RuntimeError(f"SubmoduleDReS({self.name!r}, mode='concat'): the model records its layers' outputs "
                               "(hidden states, attentions, router logits): use mode='separate' (not recorded)")
        self._pending.append(coding)
        if coding is None:
            return None
        axis = batch_axis(self.batch_dim, args[0])
        args, kwargs = self._arguments(coding, args, kwargs,
                                       lambda value, mixed, axis: torch.cat([value, *mixed], dim=axis))
        return (torch.cat([args[0], *coding.inputs], dim=axis),) + tuple(args[1:]), kwargs

    def _concat_hook(self, module, args, output):
        coding = self._pending.pop() if self._pending else None
        if coding is None:
            return None
        num_samples, num_coded = coding.num_samples, coding.num_coded
        total = num_samples + num_coded + (num_samples if self.step.config.anchor == "reconstructed" else 0)
        axis = batch_axis(self.batch_dim, output) if isinstance(output, torch.Tensor) else None
        if axis is None or output.shape[axis] != total:
            raise TypeError(
                f"SubmoduleDReS({self.name!r}, mode='concat'): the submodule must return one tensor with the "
                f"samples along batch_dim={self.batch_dim} ({total} of them here), got "
                f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}"
            )
        y = output.narrow(axis, 0, num_samples)
        anchor = y if self.step.config.anchor == "observed" else output.narrow(axis, num_samples + num_coded, num_samples)
        self._losses.append(self.step.loss(coding, anchor, output.narrow(axis, num_samples, num_coded)))
        return y
