r"""Padding and attention masks among a submodule's arguments, for :class:`dres_fast.SubmoduleDReS`.

A mask says, per sample ``k``, which key positions ``t`` each query position ``q`` may attend to
(``attend[k, q, t]``; a padding mask has one query row); a position holds data where some query
attends to it (``valid[k, t]``). A coded sample mixes every sample of the batch (the encoder is dense),
so its meaning is fixed as:

* **coded mask**: coded query ``q`` attends to key ``t`` where some sample it mixes does and ``t`` is
  valid in some sample, ``attend_coded[n, q, t] = OR_k attend[k, q, t] AND OR_k valid[k, t]``, the
  same for every coded sample, written back in the argument's own format (dtype, convention and
  shape). A causal mask stays causal; a padding mask becomes the union of the samples' positions;
* **coded input**: the samples are mixed with their padded positions set to zero, so what a padded
  position holds never reaches a coded sample; with ``extra_args="mix"`` the same holds for each
  mixed argument with as many positions (keys and values of self-attention);
* **loss**: only each real sample's valid positions count (:meth:`dres_fast.step.DReSStep.loss` with
  ``valid``): ``sum_{k, t valid, c} r_{ktc}^2`` over the number of such elements for ``"mean"``. An
  output with fewer axes than the input and no axis of ``T`` positions after the samples is pooled:
  every entry counts.

**Cross-attention masks** (a name with ``encoder_attention``, ``encoder_hidden`` or ``memory``: Hugging
Face's ``encoder_attention_mask``, ``nn.TransformerDecoder``'s ``memory_key_padding_mask``) cover another
sequence: they are coded the same way from their own positions, never mark the batch's positions, and
zero the padded positions of a mixed argument named like them (``encoder_hidden_states``, ``memory``).
Any other mixed argument with ``T`` entries next to its samples gets the batch's padding (a ``(K, F)``
vector with ``F == T`` too: a warning says so when it has fewer axes than the batch).

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

Shapes ``(K, 1, 1, T)`` and ``(K, 1, T, T)`` (as ``transformers`` passes them to a layer, causal or
not; ``(K, 1, Q, S)`` for a cross-attention mask), and ``(K, T)`` for names with ``padding_mask`` or
``attention_mask`` (a 2-D ``mask`` / ``src_mask`` / ``attn_mask`` is usually a shared ``(T, T)`` mask,
left to ``extra_args``). Any other per-sample mask (a bool ``attn_mask``, whose convention differs
between PyTorch modules; per-head masks) gets an error whose fix is to hook a mask-free submodule.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Optional

import torch

__all__ = ["MaskArgument", "find_masks", "positions_valid", "argument_names", "padding_of", "padded_argument",
           "position_axis", "zero_padded"]

#: additive masks: values at or below this count as masked (older Hugging Face models use -10000)
MASKED_BELOW = -1e4
#: a mask or argument whose name holds one of these is about another sequence (cross-attention: Hugging
#: Face's encoder_attention_mask / encoder_hidden_states, nn.TransformerDecoder's memory*); fairseq's
#: encoder_padding_mask is not among them: its encoder layers pass it as their own padding
CROSS_NAMES = ("encoder_attention", "encoder_hidden", "memory")


def is_cross(name: str) -> bool:
    return any(word in name.lower() for word in CROSS_NAMES)


class MaskArgument:
    """One recognised mask: where it is (``place``: position or keyword), whether it covers another
    sequence (``cross``), what each sample's queries attend to (``attend``, ``(K, Q, T)`` bool, ``Q = 1``
    for a padding mask), its per-sample validity ``valid`` (``(K, T)`` bool) and how to write a coded
    mask in its own format."""

    def __init__(self, label: str, place, tensor: torch.Tensor, axis: int, kind: str, cross: bool = False):
        self.label, self.place, self.tensor, self.axis, self.kind, self.cross = label, place, tensor, axis, kind, cross
        first = tensor.movedim(axis, 0)
        if first.dim() == 2:
            attend = self._attend(first)[:, None, :]
        elif first.dim() == 4 and first.shape[1] == 1 and (cross or first.shape[2] in (1, first.shape[3])):
            attend = _without_unmasked_rows(self._attend(first[:, 0]))
        else:
            raise ValueError(f"{label}: a mask of shape {tuple(tensor.shape)} has no stated meaning for coded "
                             "samples (supported: (K, T), (K, 1, 1, T), (K, 1, T, T); (K, 1, Q, S) for a cross-"
                             "attention mask); hook a submodule that takes no mask (e.g. the layer's feed-forward part)")
        self.attend = attend
        self.valid = attend.any(dim=1)  # a key holds data where some query attends to it

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

    def coded(self, num_coded: int, union: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This mask for ``num_coded`` coded samples: what some sample's query attends to, at the keys
        valid in ``union`` (``(T,)`` bool; default: valid in some sample for this mask)."""
        first = self.tensor.movedim(self.axis, 0)
        union = self.valid.any(dim=0) if union is None else union
        pattern = self.attend.any(dim=0) & union  # (Q, T): a causal mask stays causal
        keys = pattern.reshape(first.shape[1:]).expand((num_coded,) + first.shape[1:])
        if self.kind == "key_padding":
            values = ~keys
        elif self.kind == "additive":
            fill = first.min().detach()  # the mask's own "masked" value (finfo.min or -inf)
            values = torch.where(keys, torch.zeros((), dtype=first.dtype, device=first.device), fill)
        else:
            values = keys.to(first.dtype)
        return values.contiguous().movedim(0, self.axis)


def _without_unmasked_rows(attend: torch.Tensor) -> torch.Tensor:
    """``attend`` (``(K, Q, T)``) with the rows that some versions of ``transformers`` unmask for sdpa
    (``_unmask_unattended``: a left-padded query that attended to nothing is made to attend to every key)
    read as attending to nothing; else they would mark every key valid and make the coded mask
    bidirectional. Such a row is full, and no row that is kept (a row that is not full, or the last row)
    attends to its own position. A full row that others attend to (a global token, a bidirectional block)
    is kept. Square masks only."""
    if attend.shape[1] < 2 or attend.shape[1] != attend.shape[2]:
        return attend
    full = attend.all(dim=2)  # (K, Q)
    kept = ~full
    kept[:, -1] = True
    seen = (attend & kept[..., None]).any(dim=1)  # (K, T): keys that a kept row attends to
    return attend & ~(full & ~seen & ~kept)[..., None]


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


def argument_names(module, args: tuple, kwargs: Dict) -> Dict[object, str]:
    """Place (position or keyword) -> name of each argument besides the batch; positional ones named by the
    signature (``"argument i"`` where it does not say)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        parameters = []
    names = {i: parameters[i] if i < len(parameters) and parameters[i] not in ("args", "kwargs") else f"argument {i}"
             for i in range(1, len(args))}
    return dict(names, **{key: key for key in kwargs})


def find_masks(names: Dict, args: tuple, kwargs: Dict, num_samples: int, batch_dim: int, owner: str) -> List[MaskArgument]:
    """The masks among the submodule's arguments (``names``: :func:`argument_names`) with ``num_samples``
    samples on axis 0 or ``batch_dim`` (module docstring). Raises for a per-sample mask without a stated
    meaning, and when both axes could hold the samples (say which by hooking with the mask on the batch's axis)."""
    masks = []
    for place, name in names.items():
        value = args[place] if isinstance(place, int) else kwargs[place]
        blocks = getattr(value, "kv_num_blocks", None)  # flex_attention's BlockMask: (B, H, ...) block counts
        if type(value).__name__ == "BlockMask" and not (isinstance(blocks, torch.Tensor) and blocks.shape[0] == 1):
            raise ValueError(f"{owner}: the submodule's argument {name!r} is a flex_attention BlockMask, which has no "
                             "stated meaning for coded samples unless all samples share it (batch 1): train with "
                             "attn_implementation='sdpa' or 'eager' (masks "
                             "as tensors), or hook a submodule that takes no mask")
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
        masks.append(MaskArgument(label, place, value, axes[0], kind, cross=is_cross(str(name))))
    return masks


def positions_valid(masks: List[MaskArgument], cross: bool = False) -> Optional[torch.Tensor]:
    """``(K, T)`` bool: valid for every mask of the batch's positions (``cross``: of the other sequence's);
    None without such masks."""
    valid = None
    for mask in masks:
        if mask.cross != cross:
            continue
        if valid is not None and valid.shape != mask.valid.shape:
            raise ValueError(f"{mask.label}: its positions {tuple(mask.valid.shape)} differ from another mask's "
                             f"{tuple(valid.shape)}")
        valid = mask.valid if valid is None else valid & mask.valid
    return valid


def position_axis(axis: int) -> int:
    return 1 if axis == 0 else 0  # the axis after the samples' (batch-first), or before it (sequence-first)


def zero_padded(x: torch.Tensor, axis: int, valid: torch.Tensor, label: str = "the mask") -> torch.Tensor:
    """``x`` (samples along ``axis``) with each sample's padded positions set to zero (positions: axis 1
    for batch-first ``x``, axis 0 for sequence-first). A select, not a product: ``inf`` or NaN in a padded
    position reaches nothing. ``label``: the mask, named in the error where ``x`` has no such positions."""
    position = position_axis(axis)
    if x.dim() < 2 or position == axis or x.shape[position] != valid.shape[1]:
        raise ValueError(f"{label} marks {valid.shape[1]} positions, but the submodule's input {tuple(x.shape)} has no "
                         "such axis next to its samples: a mask over another sequence? Name it like a cross-attention "
                         "mask (encoder_attention_mask, memory_key_padding_mask), or hook a submodule without it")
    layout = valid if position > axis else valid.t()
    return torch.where(layout.view(layout.shape + (1,) * (x.dim() - 2)), x, torch.zeros((), dtype=x.dtype, device=x.device))


def padding_of(value: torch.Tensor, axis: int, name: str, masks: List[MaskArgument]) -> Optional[torch.Tensor]:
    """The ``(K, T)`` validity that applies to ``value``, a per-sample argument named ``name`` with its
    samples along ``axis``: the cross-attention masks' for a name like theirs (``CROSS_NAMES``), the batch's
    otherwise; None when ``value`` has no axis of that many positions next to its samples'."""
    position = position_axis(axis)
    valid = positions_valid(masks, cross=is_cross(name))
    if valid is None or value.dim() < 2 or position == axis or value.shape[position] != valid.shape[1]:
        return None
    return valid


def padded_argument(value: torch.Tensor, axis: int, name: str, masks: List[MaskArgument], batch_dims: int, warn,
                    owner: str) -> torch.Tensor:
    """``value``, an argument mixed with the batch (``extra_args="mix"``), with the padded positions that
    apply to it (:func:`padding_of`) set to zero; ``warn(key, message)`` once where it has fewer axes than
    the batch (``batch_dims``), so that a ``(K, F)`` vector with ``F == T`` is read per position."""
    valid = padding_of(value, axis, name, masks) if masks else None
    if valid is None:
        return value
    if value.dim() < batch_dims:
        warn(f"padded {name}", f"{owner}: the submodule's argument {name!r} {tuple(value.shape)} is read as one value "
             "per position and zeroed where the mask pads; a per-sample vector whose width equals T is misread so.")
    return zero_padded(value, axis, valid)
