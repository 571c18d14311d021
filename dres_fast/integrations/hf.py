r"""DReS in a Hugging Face ``transformers.Trainer``: ``DReSTrainer`` (or ``DReSTrainerMixin`` in front of
your own Trainer subclass) adds ``weight * DReS`` of one submodule to the loss of ``compute_loss``.

.. code-block:: python

    from dres_fast.integrations.hf import DReSTrainer, DReSTrainerConfig

    dres = DReSTrainerConfig("bert.encoder.layer.0.output", weight=0.1, options={"extra_args": "mix"})
    trainer = DReSTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, dres=dres)
    trainer.train()        # trainer.state.log_history: {"loss": ..., "dres_loss": ..., "step": ...}

**What is added.** In training (``model.training`` and gradients enabled), ``compute_loss`` returns

.. math:: L = L_\text{task} + w\, s\, R,\qquad s = 1/G \text{ if the Trainer takes } L \text{ as already
          scaled for gradient accumulation, else } s = 1,

where :math:`L_\text{task}` is what the Trainer's own ``compute_loss`` returns (unchanged), :math:`R` is
``SubmoduleDReS.loss`` of this micro-batch's forward (a per-micro-batch mean, see
:class:`dres_fast.SubmoduleDReS`), :math:`w` = ``DReSTrainerConfig.weight`` and :math:`G` the number of
micro-batches of this optimizer step (``current_gradient_accumulation_steps``). The Trainer divides
:math:`L` by :math:`G` itself unless it takes it as already scaled (``trainer.loss_is_scaled_for_ga``
when set, else: the model accepts loss kwargs and ``num_items_in_batch`` is given, or a
``compute_loss_func`` is set: ``Trainer.training_step`` of transformers >= 4.50), so either way each
optimizer step gets :math:`w \cdot \operatorname{mean}_j R_j` over its micro-batches, whatever :math:`G`.
Caveat, upstream: a model whose ``forward`` takes ``**kwargs`` but whose loss ignores
``num_items_in_batch`` (``BertForSequenceClassification`` in transformers 5.x) is taken as scaled, so the
Trainer *sums* its per-micro-batch mean task losses over the :math:`G` micro-batches (the logged ``loss``
is :math:`G` times the mean); DReS still contributes the mean. Set ``model.accepts_loss_kwargs = False``
to have the Trainer average both.

**Logging.** ``dres_loss`` (``DReSTrainerConfig.log_name``) is written next to each training ``loss`` in
``trainer.state.log_history`` (and every callback's ``on_log``): the unweighted :math:`R`, averaged like
the Trainer averages ``loss``: summed over the window's micro-batches divided by :math:`G`, then divided by
the optimizer steps since the last log (accumulated on the device: no host sync per step; averaged over
processes in distributed training). The logged ``loss`` includes :math:`w s R`.

**Evaluation and prediction** (``model.eval()`` or gradients off: ``evaluate``, ``predict``) run the
Trainer's own ``compute_loss``: no coded branch, nothing added, ``eval_loss`` is the task loss.

**Hooks.** During ``train()`` the regularizer is attached to the (unwrapped) model and detached when
``train()`` returns or raises, so activation (gradient) checkpointing, which reruns a layer's forward in
backward, finds the hooks there and reruns the coded branch too; a ``compute_loss`` call outside
``train()`` in training mode wraps just its forward in ``with reg:``. A model replaced by ``model_init`` gets a new regularizer. With ``every=k``
each micro-batch is a step. ``nn.DataParallel`` (``args.n_gpu > 1`` in one process) is refused: its
threads would share one record; use ``torchrun`` (DDP), where each rank has its own.

**Which submodule (BERT).** A whole ``bert.encoder.layer.<i>`` works: its attention mask is recognised
and given a coded meaning (README "Masks"). ``bert.encoder.layer.<i>.output`` (``BertOutput``:
``LayerNorm(dropout(dense(h)) + input_tensor)``, applied per token) takes no mask at all. Its second argument, the residual ``input_tensor``
(``(B, T, hidden)``, floating point), is per-sample, so give ``options={"extra_args": "mix"}``: it is
encoded with the same encoder as the batch, and a coded sample is the coded pair. The features compared are
all ``T`` positions, padded ones included (the submodule computes them anyway; attention ignores them
later). ``bert.pooler`` (dense + tanh of the ``[CLS]`` vector, one argument) is another mask-free choice;
``classifier`` is affine, so with ``anchor="observed"`` DReS there measures only the spline's
reconstruction error of an affine map.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Any, Dict, Optional

import torch
from transformers import Trainer

from ..module import SubmoduleDReS

__all__ = ["DReSTrainerConfig", "DReSTrainerMixin", "DReSTrainer"]

#: SubmoduleDReS options that ``DReSTrainerConfig.options`` may hold (its own fields and the model excluded).
OPTIONS = tuple(
    name for name, parameter in inspect.signature(SubmoduleDReS.__init__).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "mode"
)


@dataclasses.dataclass
class DReSTrainerConfig:
    """What ``DReSTrainer`` regularizes: ``SubmoduleDReS(model, submodule, mode=mode, **options)``,
    added to the loss with ``weight`` and logged as ``log_name`` (module docstring)."""

    submodule: str
    weight: float = 1.0
    mode: str = "separate"
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    log_name: str = "dres_loss"

    def __post_init__(self):
        if not isinstance(self.submodule, str):
            raise TypeError(f"submodule must be the dotted name of a submodule (str), got {type(self.submodule).__name__}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real) or not math.isfinite(self.weight) \
                or self.weight < 0:
            raise ValueError(f"weight must be a finite real number >= 0, got {self.weight!r}")
        if self.mode not in SubmoduleDReS.MODES:
            raise ValueError(f"mode must be one of {SubmoduleDReS.MODES}, got {self.mode!r}")
        if not isinstance(self.options, dict):
            raise TypeError(f"options must be a dict of SubmoduleDReS options, got {type(self.options).__name__}")
        unknown = sorted(set(self.options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"options {unknown} are not SubmoduleDReS options; it takes {list(OPTIONS)}")
        if not isinstance(self.log_name, str) or not self.log_name or self.log_name == "loss":
            raise ValueError(f"log_name must be a non-empty str other than 'loss', got {self.log_name!r}")
        self.weight = float(self.weight)
        self.options = dict(self.options)


class DReSTrainerMixin:
    """Put it before ``transformers.Trainer`` (or your Trainer subclass) in the bases; the constructor takes
    ``dres=DReSTrainerConfig(...)`` besides the Trainer's own arguments (module docstring)."""

    def __init__(self, *args, dres: DReSTrainerConfig, **kwargs):
        if not isinstance(dres, DReSTrainerConfig):
            raise TypeError(f"dres must be a DReSTrainerConfig, got {type(dres).__name__}")
        self.dres_config = dres
        self._dres: Optional[SubmoduleDReS] = None
        self._dres_attached = False  # attached for the whole of train()
        self._dres_in_train = False
        self._dres_window: Optional[torch.Tensor] = None  # sum of R / G over the micro-batches since the last log
        self._dres_window_start = 0  # global step when the window opened
        super().__init__(*args, **kwargs)
        parent = super().compute_loss
        self._dres_parent_takes_num_items = "num_items_in_batch" in inspect.signature(parent).parameters
        if getattr(self, "model", None) is not None:  # a bad submodule name or option fails here, not mid-training
            self._dres_regularizer(self.model)

    @property
    def dres(self) -> Optional[SubmoduleDReS]:
        """The ``SubmoduleDReS`` of the current model (None before there is a model)."""
        return self._dres

    # -- the regularizer --------------------------------------------------------------------------
    def _dres_core(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the submodule name refers to: ``model`` without DDP / accelerate / compile wrappers."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            model = accelerator.unwrap_model(model)
        return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule

    def _dres_regularizer(self, core: torch.nn.Module) -> SubmoduleDReS:
        if self._dres is None or self._dres.model is not core:
            self._dres_detach()
            config = self.dres_config
            self._dres = SubmoduleDReS(core, config.submodule, mode=config.mode, **config.options)
        return self._dres

    def _dres_detach(self) -> None:
        if self._dres is not None and self._dres_attached:
            self._dres.detach()
        self._dres_attached = False

    def _dres_accumulation_steps(self) -> int:
        return int(getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps)

    def _dres_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether ``Trainer.training_step`` will use the loss as is (True) or divide it by G (False)."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    # -- Trainer hooks ----------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        self._dres_in_train, self._dres_window = True, None
        try:
            return super().train(*args, **kwargs)
        finally:
            self._dres_in_train = False
            self._dres_detach()

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None, **kwargs):
        if self._dres_parent_takes_num_items:
            kwargs["num_items_in_batch"] = num_items_in_batch
        if not (model.training and torch.is_grad_enabled()):  # evaluation, prediction: the Trainer's own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if getattr(self.args, "n_gpu", 1) > 1:
            raise RuntimeError("DReSTrainer does not support nn.DataParallel (args.n_gpu > 1): its threads would share "
                               "one DReS record. Run one process per GPU (torchrun, DDP) instead.")
        reg = self._dres_regularizer(self._dres_core(model))
        if self._dres_in_train:
            if not self._dres_attached:
                reg.attach()
                self._dres_attached = True
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        else:
            with reg:
                result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        dres = reg.loss
        scale = 1.0 / self._dres_accumulation_steps() if self._dres_loss_is_scaled_for_ga(num_items_in_batch) else 1.0
        loss = loss + (self.dres_config.weight * scale) * dres.to(loss.dtype)
        if self._dres_in_train:
            value = dres.detach().float() / self._dres_accumulation_steps()
            if self._dres_window is None:
                self._dres_window, self._dres_window_start = value, self.state.global_step
            else:
                self._dres_window = self._dres_window + value
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._dres_window is not None:  # a training log (evaluation logs say "eval_loss")
            steps = self.state.global_step - self._dres_window_start
            if steps > 0:
                window = self._dres_window
                if getattr(self.args, "world_size", 1) > 1:  # every rank logs here, as for the Trainer's own gather
                    window = self.accelerator.reduce(window, reduction="mean")
                logs[self.dres_config.log_name] = window.item() / steps
                self._dres_window = None
        return super().log(logs, *args, **kwargs)


class DReSTrainer(DReSTrainerMixin, Trainer):
    """``transformers.Trainer`` with DReS: ``DReSTrainer(model=..., args=..., dres=DReSTrainerConfig(...))``."""
