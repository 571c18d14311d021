r"""Padding and attention masks among a submodule's arguments, for :class:`dres_fast.SubmoduleDReS`.

A mask says, per sample ``k`` and position ``t``, whether ``t`` holds data (``valid[k, t]``). A coded
sample mixes every sample of the batch (the encoder is dense), so its meaning is fixed as:

* **coded mask**: a coded position is valid where any sample it mixes is valid,
  ``valid_coded[n, t] = OR_k valid[k, t]``, the same for every coded sample, written back in the
  argument's own format (dtype, convention and shape);
* **coded input**: the samples are mixed with their padded positions set to zero, so what a padded
  position holds never reaches a coded sample;
* **loss**: only each real sample's valid positions count (:meth:`dres_fast.step.DReSStep.loss` with
  ``valid``): ``sum_{k, t valid, c} r_{ktc}^2`` over the number of such elements for ``"mean"``.

Recognised masks (an argument with the batch's ``K`` samples on axis 0, or on ``batch_dim``; ``T`` the
positions). The argument's name (keyword, or the parameter a positional argument binds to) decides the
convention where the dtype does not:

==========================  ==========================  ========================================
name contains               dtype                       meaning
==========================  ==========================  ========================================
``key_padding_mask``        bool                        True = padded (``nn.MultiheadAttention``)
``mask``                    float (additive)            0 = attend; ``-inf`` or ``<= -1e4`` = masked
``attention_mask``          bool, integer               True / 1 = attend (Hugging Face, sdpa)
==========================  ==========================  ========================================

Shapes ``(K, 1, 1, T)`` and ``(K, 1, T, T)`` (a key mask broadcast over queries, as ``transformers``
passes it to a layer: a key is valid where any query may attend to it), and ``(K, T)`` for names with
``padding_mask`` or ``attention_mask`` (a 2-D ``mask`` / ``src_mask`` / ``attn_mask`` is usually a shared
``(T, T)`` mask, left to ``extra_args``). Any other
per-sample mask (a bool ``attn_mask``, whose convention differs between PyTorch modules; per-head or
causal-only masks) gets an error whose fix is to hook a mask-free submodule.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["MaskArgument", "find_masks", "positions_valid"]

#: additive masks: values at or below this count as masked (older Hugging Face models use -10000)
MASKED_BELOW = -1e4


class MaskArgument:
    """One recognised mask: where it is (``place``: position or keyword), its per-sample validity
    ``valid`` (``(K, T)`` bool) and how to write a coded mask in its own format."""

    def __init__(self, label: str, place, tensor: torch.Tensor, axis: int, kind: str):
        self.label, self.place, self.tensor, self.axis, self.kind = label, place, tensor, axis, kind
        first = tensor.movedim(axis, 0)
        if first.dim() == 2:
            attend = self._attend(first)
        elif first.dim() == 4 and first.shape[1] == 1 and first.shape[2] in (1, first.shape[3]):
            attend = self._attend(first[:, 0]).any(dim=1)  # a key is valid where some query attends to it
        else:
            raise ValueError(f"{label}: a mask of shape {tuple(tensor.shape)} has no stated meaning for coded "
                             "samples (supported: (K, T), (K, 1, 1, T), (K, 1, T, T)); hook a submodule that "
                             "takes no mask (e.g. the layer's feed-forward part)")
        self.valid = attend

    def _attend(self, values: torch.Tensor) -> torch.Tensor:
        if self.kind == "key_padding":
            return ~values
        if self.kind == "additive":
            masked = values <= MASKED_BELOW
            ok = ((values == 0) | masked).all()
            message = (f"{self.label}: an additive mask must hold 0 (attend) or -inf / values <= {MASKED_BELOW:g} "
                       "(masked); other values (biases, NaN) have no meaning for coded samples. Hook a submodule "
                       "that takes no mask")
            if values.device.type == "cpu" and not torch.compiler.is_compiling():
                if not bool(ok):
                    raise ValueError(message)
            else:  # no host sync per call on a GPU, and traceable: the check fails on the device instead
                torch._assert_async(ok, message)
            return ~masked
        return values.bool()  # attention_mask: True / 1 = attend

    def coded(self, union: torch.Tensor, num_coded: int) -> torch.Tensor:
        """This mask for ``num_coded`` coded samples, each valid at ``union`` (``(T,)`` bool)."""
        first = self.tensor.movedim(self.axis, 0)
        keys = union.view((1,) * (first.dim() - 1) + (-1,)).expand((num_coded,) + first.shape[1:])
        if self.kind == "key_padding":
            values = ~keys
        elif self.kind == "additive":
            fill = first.min().detach()  # the mask's own "masked" value (finfo.min or -inf)
            values = torch.where(keys, torch.zeros((), dtype=first.dtype, device=first.device), fill)
        else:
            values = keys.to(first.dtype)
        return values.contiguous().movedim(0, self.axis)


def _kind(name: str, tensor: torch.Tensor) -> Optional[str]:
    name = name.lower()
    if "mask" not in name:
        return None
    if tensor.dim() == 2 and "padding_mask" not in name and "attention_mask" not in name:
        return None  # a 2-D `mask` / `src_mask` / `attn_mask` is usually shared (T, T), not per sample
    if tensor.is_floating_point():
        return "additive"
    if "key_padding_mask" in name and tensor.dtype == torch.bool:
        return "key_padding"
    if "attention_mask" in name:
        return "attention"
    return "unknown"


def _names(module, args: tuple, kwargs: Dict) -> List[Tuple[str, object, object]]:
    """(name, place, value) of the arguments besides the batch; positional ones named by the signature."""
    try:
        parameters = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        parameters = []
    found = []
    for i, value in enumerate(args[1:], start=1):
        name = parameters[i] if i < len(parameters) and parameters[i] not in ("args", "kwargs") else f"argument {i}"
        found.append((name, i, value))
    found += [(key, key, value) for key, value in kwargs.items()]
    return found


def find_masks(module, args: tuple, kwargs: Dict, num_samples: int, batch_dim: int, owner: str) -> List[MaskArgument]:
    """The masks among the submodule's arguments with ``num_samples`` samples on axis 0 or ``batch_dim``
    (module docstring). Raises for a per-sample mask without a stated meaning, and when both axes could
    hold the samples (say which by hooking with the mask on the batch's axis)."""
    masks = []
    for name, place, value in _names(module, args, kwargs):
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        kind = _kind(str(name), value)
        if kind is None:
            continue
        axes = sorted({axis % value.dim() for axis in (0, batch_dim) if -value.dim() <= axis < value.dim()
                       and value.shape[axis] == num_samples})
        if not axes:
            continue
        label = f"{owner}: the submodule's argument {name!r}"
        if len(axes) > 1:
            raise ValueError(f"{label} has {num_samples} entries on axes {axes}: it is not clear which holds the "
                             "samples. Make the batch size differ from the sequence length, or hook a submodule "
                             "that takes no mask")
        if kind == "unknown":
            raise ValueError(f"{label} looks like a per-sample mask of dtype {value.dtype}, whose convention (True = "
                             "attend, or True = masked) differs between modules; pass it as a float additive mask "
                             "(0 = attend, -inf = masked) or as key_padding_mask=, or hook a submodule that takes "
                             "no mask")
        masks.append(MaskArgument(label, place, value, axes[0], kind))
    return masks


def positions_valid(masks: List[MaskArgument]) -> Optional[torch.Tensor]:
    """``(K, T)`` bool: valid for every mask (None without masks)."""
    valid = None
    for mask in masks:
        if valid is not None and valid.shape != mask.valid.shape:
            raise ValueError(f"{mask.label}: its positions {tuple(mask.valid.shape)} differ from another mask's "
                             f"{tuple(valid.shape)}")
        valid = mask.valid if valid is None else valid & mask.valid
    return valid
