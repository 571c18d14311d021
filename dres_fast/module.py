"""``DReSLoss`` (the functional form as a module) and ``SubmoduleDReS`` (regularize one submodule
of a larger model inside an ordinary training loop, without rewriting the model)."""

from __future__ import annotations

import warnings
from typing import List, Optional

import torch
from torch import nn

from . import ops
from .cache import weights_for
from .functional import dres_loss
from .smoothing import SmoothingSpec

__all__ = ["DReSLoss", "SubmoduleDReS"]


def _check_options(reduction: str, backend: str) -> None:
    if reduction not in ops.REDUCTIONS:
        raise ValueError(f"reduction must be one of {ops.REDUCTIONS}, got {reduction!r}")
    if not isinstance(backend, str) or backend not in ("auto",) + ops.BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + ops.BACKENDS}, got {backend!r}")


class DReSLoss(nn.Module):
    """Module form of :func:`dres_fast.dres_loss`: the options are constructor arguments.

    ``loss = DReSLoss(num_coded=64)(model.encoder, x, y=features)``
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
    ):
        super().__init__()
        _check_options(reduction, backend)
        self.spec = SmoothingSpec(num_coded, lam_enc, lam_dec, dof_enc, dof_dec, alpha, beta)
        self.options = dict(**self.spec.options(), reduction=reduction, return_decoded=return_decoded, backend=backend)

    def forward(self, fn, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        return dres_loss(fn, x, y=y, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, torch.Tensor))


class SubmoduleDReS:
    r"""Record the DReS discrepancy of one named submodule during a model's ordinary forward.

    .. code-block:: python

        reg = SubmoduleDReS(model, "features.block3", mode="concat")
        for x, target in loader:
            with reg:                       # hooks live only inside the block
                out = model(x)
            loss = criterion(out, target) + 0.1 * reg.loss

    The submodule's first positional argument is the batch (other arguments are passed through
    unchanged) and it must return one tensor with the batch first.

    ``mode``:

    * ``"concat"``: the coded batch ``E x`` is appended to the real batch and the submodule runs
      **once** on ``K + N`` samples; only the first ``K`` outputs continue through the model.
      BatchNorm inside the submodule then normalizes real and coded samples together, and its running
      statistics see that mixed batch (once per step). One call: the fastest on a GPU.
    * ``"separate"``: the submodule runs on the real batch as usual, then a second time on the coded
      batch. BatchNorm normalizes each batch with its own statistics, and in training mode updates its
      running statistics twice per step (once with the coded batch, which has smaller variance when the
      encoder smooths). The real branch is exactly what the model computes without DReS.

    If the submodule runs several times inside one ``with`` block, ``loss`` is the sum. A batch with
    fewer than 3 samples (an epoch's last, say) contributes zero, with one warning.
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
        backend: str = "auto",
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
        _check_options(reduction, backend)
        self.spec = SmoothingSpec(num_coded, lam_enc, lam_dec, dof_enc, dof_dec, alpha, beta)
        self.name = submodule
        self.mode = mode
        self.reduction = reduction
        self.backend = backend
        self._handles: list = []
        self._losses: List[torch.Tensor] = []
        self._pending: list = []  # concat mode: batch sizes of calls in flight
        self._inside = False  # separate mode: set while the coded branch runs
        self._warned_small = False

    # -- context / attach --------------------------------------------------------------------------
    def attach(self) -> "SubmoduleDReS":
        """Install the hooks (until :meth:`detach`) and start a fresh record."""
        if self._handles:
            raise RuntimeError("SubmoduleDReS is already attached")
        self._losses = []
        if self.mode == "concat":
            self._handles.append(self.module.register_forward_pre_hook(self._concat_pre_hook, with_kwargs=True))
            self._handles.append(self.module.register_forward_hook(self._concat_hook))
        else:
            self._handles.append(self.module.register_forward_hook(self._separate_hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def __enter__(self) -> "SubmoduleDReS":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def loss(self) -> torch.Tensor:
        """The DReS discrepancy recorded in the last ``with`` block (sum over the submodule's calls)."""
        if not self._losses:
            raise RuntimeError(f"submodule {self.name!r} did not run inside the `with` block: no DReS loss recorded")
        total = self._losses[0]
        for extra in self._losses[1:]:
            total = total + extra
        return total

    def reset(self) -> None:
        """Forget the recorded losses (for use with :meth:`attach` across steps)."""
        self._losses = []

    # -- hooks --------------------------------------------------------------------------------------
    def _too_small(self, batch: torch.Tensor) -> bool:
        if batch.shape[0] >= 3:
            return False
        if not self._warned_small:
            warnings.warn(
                f"SubmoduleDReS({self.name!r}): a batch of {batch.shape[0]} samples is too small for DReS "
                "(needs 3); it contributes zero. This warning is shown once.",
                stacklevel=4,
            )
            self._warned_small = True
        self._losses.append(batch.new_zeros((), dtype=torch.float32 if batch.dtype != torch.float64 else batch.dtype))
        return True

    @staticmethod
    def _batch_of(args, name: str) -> torch.Tensor:
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"SubmoduleDReS({name!r}): the submodule's first positional argument must be the batch tensor")
        return args[0]

    def _weights(self, batch: torch.Tensor, which: str, num_samples: int):
        return weights_for(self.spec, num_samples, batch.device, batch.dtype, which)

    def _separate_hook(self, module, args, kwargs, output):
        if self._inside:
            return None
        batch = self._batch_of(args, self.name)
        if self._too_small(batch):
            return None
        self._inside = True
        try:
            loss = dres_loss(
                lambda coded: module(coded, *args[1:], **kwargs),
                batch,
                y=output,
                reduction=self.reduction,
                backend=self.backend,
                **self.spec.options(),
            )
        finally:
            self._inside = False
        self._losses.append(loss)
        return None

    def _concat_pre_hook(self, module, args, kwargs):
        batch = self._batch_of(args, self.name)
        if self._too_small(batch):
            self._pending.append(None)
            return None
        num_samples, num_coded = self.spec.sizes(batch.shape[0])
        encoder = self._weights(batch, "encoder", num_samples)
        coded = ops.spline_mix(encoder, batch, backend=self.backend)
        self._pending.append((batch.shape[0], num_coded))
        return (torch.cat([batch, coded], dim=0),) + tuple(args[1:]), kwargs

    def _concat_hook(self, module, args, output):
        sizes = self._pending.pop() if self._pending else None
        if sizes is None:
            return None
        num_samples, num_coded = sizes
        if not isinstance(output, torch.Tensor) or output.shape[0] != num_samples + num_coded:
            raise TypeError(
                f"SubmoduleDReS({self.name!r}, mode='concat'): the submodule must return one tensor with the "
                f"batch first ({num_samples + num_coded} rows here), got "
                f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}"
            )
        y, y_coded = output[:num_samples], output[num_samples:]
        decoder = self._weights(y, "decoder", num_samples)
        self._losses.append(ops.reconstruction_loss(y, y_coded, decoder, reduction=self.reduction, backend=self.backend))
        return y
