"""Pieces of :class:`dres_fast.SubmoduleDReS` that are about the submodule's calls rather than DReS:
hook objects that survive copying the model, the ``batch_first=False`` check, and the handling of
per-sample tensor arguments besides the batch (``extra_args``)."""

from __future__ import annotations

import contextlib
import numbers
import sys
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["BoundHook", "InertHook", "ForwardMark", "EXTRA_ARGS", "batch_axis", "check_batch_dim", "compiled_code_hint",
           "sequence_first_layers", "rewrite_extra_args", "RUNNING_STATS", "frozen_running_stats", "without_caches",
           "check_fresh_caches", "recording_outputs", "unrecorded"]

#: What ``SubmoduleDReS`` does with per-sample tensor arguments of the submodule besides the batch.
EXTRA_ARGS = ("error", "mix", "pass")
#: Which calls update the running statistics of normalization layers in separate mode: the real batch only,
#: or the coded batch too.
RUNNING_STATS = ("real", "all")


class InertHook:
    """A hook that does nothing: what a copied model's DReS hooks become."""

    def __call__(self, *args, **kwargs):
        return None

    def __repr__(self) -> str:
        return "InertHook()"


class BoundHook:
    """Calls ``getattr(owner, method)`` as a module hook. Copying it (``copy.deepcopy`` of the model,
    ``AveragedModel``, an EMA copy, ``torch.save`` of the whole module) gives an :class:`InertHook`:
    the copy must not run a coded branch or write into the original's record, and the recorded
    losses (non-leaf tensors) can be neither deep-copied nor pickled."""

    def __init__(self, owner, method: str):
        self.owner = owner
        self.method = method

    def __call__(self, *args, **kwargs):
        return getattr(self.owner, self.method)(*args, **kwargs)

    def __deepcopy__(self, memo) -> InertHook:
        return InertHook()

    def __reduce__(self):
        return (InertHook, ())


class ForwardMark:
    """Sets ``forward`` in a hooked module's instance ``__dict__`` until :meth:`remove` (the same forward),
    so that torch.compile sees the hooks whenever the model was compiled.

    Dynamo does not guard on a module's hook dicts while they are empty
    (``torch._dynamo.config.skip_nnmodule_hook_guards``, on by default): code compiled before the hooks
    existed would run without them. It does guard, for each module call it traces, that ``forward`` is
    not in the instance ``__dict__`` (when it is: on its code). The mark fails that guard, so such code
    is not reused while the hooks are on; code compiled with them is not reused after (the hook dicts are
    guarded while not empty). The mark is the class's forward bound to the module: no extra frame, and
    the same code for every mark, so attaching again recompiles nothing. A forward already set on the
    instance (a user's patch) is wrapped instead. Copies (deepcopy, pickle) get a forward bound to the copy."""

    def __init__(self, module: nn.Module):
        self.module, self.had = module, "forward" in module.__dict__
        self.previous = module.forward  # what runs now: the instance's forward, or the class's, bound
        function = getattr(type(module), "forward", None)
        plain = not self.had and isinstance(function, types.FunctionType)
        self.mark = types.MethodType(function, module) if plain else self.__call__
        module.__dict__["forward"] = self.mark

    def __call__(self, *args, **kwargs):
        return self.previous(*args, **kwargs)

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self.mark:  # replaced since: not ours to undo
            return
        if self.had:
            self.module.__dict__["forward"] = self.previous
        else:
            del self.module.__dict__["forward"]


def compiled_code_hint() -> str:
    """A sentence for a missing record when torch.compile has compiled code in this process."""
    utils = sys.modules.get("torch._dynamo.utils")  # imported by torch.compile, not by dres_fast
    if utils is None or not utils.counters["stats"]["unique_graphs"]:
        return ""
    return (" torch.compile has compiled code in this process: if the model ran compiled, the compiled code "
            "did not call the hooks (guards dropped by the user: torch.compiler.set_stance(..., "
            "skip_guard_eval_unsafe=True), a guard_filter_fn that skips nn.Module guards, or an exported or "
            "AOT-compiled program): drop that option, or call torch._dynamo.reset() once the hooks are on.")


def batch_axis(batch_dim: int, tensor: torch.Tensor) -> Optional[int]:
    """``batch_dim`` as a non-negative axis of ``tensor``, or None when ``tensor`` has no such axis."""
    if -tensor.dim() <= batch_dim < tensor.dim():
        return batch_dim % tensor.dim()
    return None


def sequence_first_layers(module: nn.Module) -> List[str]:
    """Names of the modules in ``module`` (itself included) whose ``batch_first`` is False:
    ``nn.MultiheadAttention``, ``nn.Transformer``, ``nn.RNN/LSTM/GRU`` and the layers built on them."""
    return [
        (name or "the submodule itself") + f" ({type(layer).__name__})"
        for name, layer in module.named_modules()
        if getattr(layer, "batch_first", None) is False
    ]


def check_batch_dim(batch_dim) -> int:
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, numbers.Integral):
        raise TypeError(f"batch_dim must be an int, got {type(batch_dim).__name__}")
    return int(batch_dim)


def _per_sample(args: tuple, kwargs: Dict, num_samples: int, batch_dim: int, names: Dict):
    """(label, position or keyword, value) for each argument besides the batch (``args[0]``) that is a
    tensor, or a tuple or list holding one, whose size along ``batch_dim`` is ``num_samples``; labelled by
    its name (``names``: place -> name) where known."""
    found = []
    places = [(i, value) for i, value in enumerate(args) if i > 0] + list(kwargs.items())
    for place, value in places:
        tensors = [t for t in (value if isinstance(value, (tuple, list)) else (value,)) if isinstance(t, torch.Tensor)]
        for tensor in tensors:
            axis = batch_axis(batch_dim, tensor)
            if axis is not None and tensor.shape[axis] == num_samples:
                name = names.get(place)
                label = (f"argument {name!r}" if name and not name.startswith("argument ") else
                         f"positional argument {place}" if isinstance(place, int) else f"keyword argument {place!r}")
                found.append((label, place, value))
                break
    return found


def _position_hint(label: str) -> str:
    return (" Position ids that differ per sample (left padding) have no value for a coded sample: pad on the right, "
            "where they are shared by every sample." if "position" in label else "")


def rewrite_extra_args(
    args: tuple,
    kwargs: Dict,
    *,
    policy: str,
    num_samples: int,
    batch_dim: int,
    transform: Callable[[torch.Tensor, object], torch.Tensor],
    owner: str,
    skip=(),
    names: Optional[Dict] = None,
) -> Tuple[tuple, Dict]:
    """The submodule's arguments with each per-sample floating-point tensor replaced by ``transform(tensor,
    place)`` (``policy="mix"``; ``place``: its position or keyword), unchanged (``"pass"``), or an error that
    names the argument (``"error"``; and ``"mix"`` for per-sample values that are not floating-point tensors,
    such as ids or a tuple of rotary embeddings). Arguments at the places in ``skip`` (recognised masks) are
    left as they are."""
    if policy == "pass":
        return args, kwargs
    found = [item for item in _per_sample(args, kwargs, num_samples, batch_dim, names or {}) if item[1] not in skip]
    if not found:
        return args, kwargs
    if policy == "error":
        label = found[0][0]
        raise ValueError(
            f"{owner}: the submodule's {label} has {num_samples} entries along batch_dim={batch_dim}, like "
            "the batch, so it looks per-sample; the coded samples are new samples and have no value of "
            "it. Pass extra_args='mix' to mix floating-point per-sample arguments with the batch's encoder, "
            "or extra_args='pass' if it is the same for every sample (passed unchanged: it then needs as many coded "
            f"samples as real ones).{_position_hint(label)}"
        )
    for label, _, value in found:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = f"of dtype {value.dtype}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__} of tensors"
            raise ValueError(
                f"{owner}: the submodule's {label} is per-sample ({num_samples} entries along "
                f"batch_dim={batch_dim}) but {kind}: extra_args='mix' can only mix floating-point tensors (an id "
                "has no value between two samples; padding and attention masks are recognised by their name, see "
                "README \"Masks\"). Drop it, or hook a submodule that does not take it."
                f"{_position_hint(label)}"
            )
    args, kwargs = list(args), dict(kwargs)
    for _, place, value in found:
        if isinstance(place, int):
            args[place] = transform(value, place)
        else:
            kwargs[place] = transform(value, place)
    return tuple(args), kwargs


#: names of key/value caches passed as tuples (older Hugging Face layers); Cache objects are recognised by
#: their methods whatever their name
CACHE_NAMES = ("past_key_value", "past_key_values", "layer_past")


def _is_cache(name: str, value) -> bool:
    if value is None or isinstance(value, (bool, torch.Tensor)):
        return False
    duck = callable(getattr(value, "get_seq_length", None)) and callable(getattr(value, "update", None))
    return duck or name in CACHE_NAMES


def _layer_index(module: nn.Module) -> Optional[int]:
    """The ``layer_idx`` a Hugging Face layer (or its attention) indexes its cache with; None if none."""
    for layer in module.modules():
        index = getattr(layer, "layer_idx", None)
        if isinstance(index, int):
            return index
    return None


def _cache_places(args: tuple, kwargs: Dict, names: Dict) -> list:
    return [place for place, name in names.items()
            if _is_cache(name, args[place] if isinstance(place, int) else kwargs.get(place))]


def _flat(values) -> list:
    """The tensors in nested tuples and lists."""
    if isinstance(values, torch.Tensor):
        return [values]
    return [t for value in values for t in _flat(value)] if isinstance(values, (tuple, list)) else []


def _earlier_positions(cache, module: nn.Module, positions_added: int, positions: int) -> int:
    """Positions ``cache`` held before this call: a ``past_key_value`` tuple holds only earlier ones; a
    ``Cache`` is asked for this layer's length (its ``layer_idx``; without one, layer 0, which may already
    hold this forward's ``positions``) less what the real call appended (``positions_added``). 0 when it
    cannot tell without a host sync (a ``StaticCache`` reports a tensor)."""
    if isinstance(cache, (tuple, list)):  # (keys, values), or one such pair per layer
        tensors = [t for t in _flat(cache) if t.numel() > 0]
        return int(tensors[0].shape[-2]) if tensors and tensors[0].dim() >= 2 else len(tensors)
    if not callable(getattr(cache, "get_seq_length", None)):
        return 0
    index = _layer_index(module)
    length = cache.get_seq_length(0 if index is None else index)
    if isinstance(length, torch.Tensor):
        return 0
    return int(length) - (positions_added if index is not None else max(positions_added, positions))


def check_fresh_caches(module: nn.Module, args: tuple, kwargs: Dict, names: Dict, positions_added: int, positions: int,
                       owner: str):
    """Raises when a key/value cache among the submodule's arguments (a Hugging Face ``Cache``, a
    ``past_key_value`` tuple) held positions before this call (``positions_added``: what the real call
    appended already; ``positions``: the batch's): generation or prefix tuning, where coded samples have
    no past of their own."""
    for place in _cache_places(args, kwargs, names):
        cache = args[place] if isinstance(place, int) else kwargs[place]
        earlier = _earlier_positions(cache, module, positions_added, positions)
        if earlier > 0:
            raise ValueError(
                f"{owner}: the submodule's {names[place]!r} holds {earlier} positions from before this call "
                "(generation, prefix tuning): the coded samples are new samples with no cached past of their own, "
                "so DReS has no meaning here. Call the model with use_cache=False and no past key values while "
                "training with DReS, or hook a submodule that takes no cache.")


def without_caches(args: tuple, kwargs: Dict, names: Dict):
    """The submodule's arguments with each key/value cache replaced by None: the coded samples are not the
    batch's samples, so they must neither attend to the batch's cached keys nor append theirs to its cache
    (in training the cache starts empty, and the real call alone fills it; :func:`check_fresh_caches`). In
    concat mode the one call carries both, so the hooked layer's cache stays empty."""
    places = _cache_places(args, kwargs, names)
    if not places:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for place in places:
        if isinstance(place, int):
            args[place] = None
        else:
            kwargs[place] = None
    return tuple(args), kwargs


def _output_collector():
    """transformers' ``_active_collector`` (transformers 5): the variable through which its forward hooks
    on every layer record ``output_hidden_states``, ``output_attentions`` and router logits (a context
    variable, or under torch.compile the ``global_var`` it switches to with ``compiling``); None where
    there is none."""
    capturing = sys.modules.get("transformers.utils.output_capturing")  # never imported here
    collector = getattr(capturing, "_active_collector", None)
    parts = ("compiling", "global_var", "context_var")
    return collector if all(hasattr(collector, part) for part in parts) else None


def _recorded_key(hook):
    """The output a transformers capturing hook records (its closure's ``key``); "" for other hooks, None
    where that cannot be read."""
    if getattr(hook, "__name__", "") != "output_capturing_hook":
        return ""
    names = getattr(getattr(hook, "__code__", None), "co_freevars", ())
    return hook.__closure__[names.index("key")].cell_contents if "key" in names and hook.__closure__ else None


def recording_outputs(module: nn.Module) -> bool:
    """Whether transformers records an output of ``module`` or of a module inside it right now. Under
    torch.compile it can only tell when the compiled code started the recording (transformers' context
    variable cannot be read there): False otherwise."""
    collector = _output_collector()
    if collector is None:
        return False
    if collector.compiling:
        recorded = collector.global_var
    elif torch.compiler.is_compiling():
        return False
    else:
        recorded = collector.context_var.get()
    if not recorded:
        return False
    keys = {_recorded_key(hook) for layer in module.modules() for hook in layer._forward_hooks.values()}
    return None in keys or bool(keys & set(recorded))


@contextlib.contextmanager
def unrecorded():
    """Inside the block, transformers' output-recording hooks record nothing: a coded call is not one of
    the model's layers' outputs (it would add hidden states, shift their indices and enter an MoE's router
    auxiliary loss). A transformers model called inside the block still records its own outputs."""
    collector = _output_collector()
    if collector is None:
        yield
    elif collector.compiling:  # the recording was started by compiled code: transformers reads its global
        saved, collector.global_var = collector.global_var, None
        try:
            yield
        finally:
            collector.global_var = saved
    elif not torch.compiler.is_compiling():  # eager: its context variable (per thread, nests)
        token = collector.context_var.set(None)
        try:
            yield
        finally:
            collector.context_var.reset(token)
    else:  # a layer compiled alone, the recording outside it: Dynamo cannot set a context variable, so switch
        collector.compiling, collector.global_var = True, None  # transformers to its (empty) global meanwhile
        try:
            yield
        finally:
            collector.compiling, collector.global_var = False, None


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module, freeze: bool = True):
    """Inside the block, the normalization layers of ``module`` that would update running statistics
    (training mode, ``track_running_stats``) normalize with the batch's statistics and update nothing
    (``track_running_stats`` is off for the block: neither the means, the variances nor the batch counter
    move)."""
    layers = [layer for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._NormBase)
              and layer.training and layer.track_running_stats] if freeze else []
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True
