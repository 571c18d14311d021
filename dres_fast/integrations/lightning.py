r"""DReS in a LightningModule, the way Lightning computes losses: in ``training_step``, logged with
``self.log``. Works with ``lightning`` and ``pytorch_lightning`` alike (nothing here imports either: the
helper only calls the module's ``log``).

.. code-block:: python

    class Model(LightningModule):
        def __init__(self):
            super().__init__()
            self.body, self.head = ..., ...
            self.dres = LightningDReS(self, "body", weight=0.1)    # SubmoduleDReS options as keywords

        def training_step(self, batch, batch_idx):
            x, y = batch
            with self.dres:                                       # the forward whose DReS is recorded
                out = self(x)
            return self.dres.add(F.cross_entropy(out, y))         # task + 0.1 * DReS; logs "dres_loss"

        def validation_step(self, batch, batch_idx):               # no `with`: no hooks, no coded branch
            ...

**Math.** ``add(task)`` returns :math:`L = L_\text{task} + w R`, with :math:`R` = ``SubmoduleDReS.loss``
of the forwards inside the latest ``with`` block (their sum when the submodule runs more than once) and
:math:`w` = ``weight``, and logs :math:`R` (unweighted, detached) as ``name`` with ``self.log`` (Lightning's
defaults in ``training_step``: on each step; ``log_options`` are passed on, e.g. ``{"on_epoch": True,
"prog_bar": True}``, ``{"sync_dist": True}`` to average over processes). Lightning's gradient
accumulation (``accumulate_grad_batches=G``) divides the returned loss by :math:`G` as it does any loss,
so an optimizer step gets :math:`w \cdot \operatorname{mean}_j R_j` over its micro-batches.

**No coded branch outside training.** The hooks live only inside ``with self.dres:`` (or between
:meth:`LightningDReS.attach` and ``detach``); and even there a forward with gradients off or the submodule in eval mode (Lightning's validation, test and predict
loops) runs no coded branch (:class:`dres_fast.SubmoduleDReS`): :math:`R = 0`.

**Copies.** ``copy.deepcopy`` of the LightningModule (``StochasticWeightAveraging``, EMA / weight
averaging callbacks) gives the copy its own, fresh helper bound to the copied module; pickling the whole
module (``torch.save(module)``) keeps the options and drops the recorded losses.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional

import torch

from ..module import SubmoduleDReS

__all__ = ["LightningDReS"]


class LightningDReS:
    """``SubmoduleDReS(module, submodule, mode=mode, **options)`` plus the weighted sum and the
    ``self.log`` call of a LightningModule's ``training_step`` (module docstring).

    Args:
        module: the LightningModule (anything with ``nn.Module``'s ``get_submodule`` and Lightning's ``log``).
        submodule: dotted name of the submodule to regularize (``""``: the module itself).
        weight: :math:`w \\ge 0`.
        mode: ``"separate"`` or ``"concat"`` (:class:`dres_fast.SubmoduleDReS`).
        name: the logged key.
        log_options: keyword arguments of ``module.log`` (default none: Lightning's defaults).
        **options: the other options of :class:`dres_fast.SubmoduleDReS` (``num_coded``, ``dof_enc``,
            ``extra_args``, ``batch_dim``, ``every``, ...).
    """

    def __init__(self, module: torch.nn.Module, submodule: str, weight: float = 1.0, *, mode: str = "separate",
                 name: str = "dres_loss", log_options: Optional[Dict[str, Any]] = None, **options):
        self._configure(module, submodule, weight, mode, name, log_options, options)
        self._reg: Optional[SubmoduleDReS] = SubmoduleDReS(module, submodule, mode=mode, **options)  # checks the options

    def _configure(self, module, submodule, weight, mode, name, log_options, options) -> None:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be a finite real number >= 0, got {weight!r}")
        if not callable(getattr(type(module), "log", None)):
            raise TypeError(f"module must be a LightningModule (it has no log method): got {type(module).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        self.module, self.submodule, self.weight, self.mode, self.name = module, submodule, float(weight), mode, name
        self.log_options = dict(log_options or {})
        self.options = dict(options)
        self._reg = None

    @property
    def reg(self) -> SubmoduleDReS:
        """The :class:`dres_fast.SubmoduleDReS` (built on first use in a copy: see "Copies")."""
        if self._reg is None:
            self._reg = SubmoduleDReS(self.module, self.submodule, mode=self.mode, **self.options)
        return self._reg

    @property
    def loss(self) -> torch.Tensor:
        """:math:`R`: the DReS loss recorded in the latest ``with`` block."""
        return self.reg.loss

    def attach(self) -> "LightningDReS":
        """Hooks until :meth:`detach` instead of ``with`` blocks (e.g. from ``on_fit_start`` to ``on_fit_end``):
        each forward of the module starts a fresh record. Needed under activation checkpointing, which reruns
        a checkpointed layer's forward in backward, after a ``with`` block would have removed the hooks."""
        self.reg.attach()
        return self

    def detach(self) -> None:
        self.reg.detach()

    def __enter__(self) -> "LightningDReS":
        self.reg.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.reg.__exit__(*exc)

    def add(self, task_loss: torch.Tensor) -> torch.Tensor:
        """``task_loss + weight * R``; logs ``R`` as ``name`` through the module's ``log``."""
        dres = self.reg.loss
        self.module.log(self.name, dres.detach(), **self.log_options)
        return task_loss + self.weight * dres.to(task_loss.dtype)

    # -- copies -----------------------------------------------------------------------------------
    # Copies (deepcopy, pickle) carry the options, not the recorded losses (non-leaf tensors, which can be
    # neither deep-copied nor pickled). A copy is made while its module is still being copied (the module's
    # attributes are filled after their own copies are made), so it builds its SubmoduleDReS on first use.
    def _state(self) -> dict:
        return dict(module=self.module, submodule=self.submodule, weight=self.weight, mode=self.mode, name=self.name,
                    log_options=self.log_options, options=self.options)

    def __getstate__(self) -> dict:
        return self._state()

    def __setstate__(self, state: dict) -> None:
        self._configure(**state)

    def __repr__(self) -> str:
        return f"LightningDReS({self.submodule!r}, weight={self.weight}, mode={self.mode!r}, name={self.name!r})"
