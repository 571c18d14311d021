"""The methods of evidence v3 and their one training loop.

Besides the main study's objectives (bench/generalization/supervised.py: ERM, DReS with its options,
the input-gradient penalty, mixup, label smoothing), three baselines:

- ``sam``: sharpness-aware minimization (Foret et al. 2021), the standard two-step form: gradient g at w,
  ascend to w + rho g / ||g|| (the norm over all parameters), take the gradient there, restore w exactly
  and let the base optimizer (Adam, as every method) step with that gradient. Two forward-backward passes
  per step. Strength: rho.
- ``ema``: an exponential moving average of the weights (Polyak averaging), trained as ERM and evaluated
  with the averaged weights, debiased as Adam's moments (the initialization carries no weight; class EMA).
  Strength: decay.
- ``manifold_mixup`` (Verma et al. 2019): mixup at a layer drawn uniformly per step among the input, the
  output of each pooling layer of ``model.features`` (each ReLU where there is none) and the features'
  output. Strength: Beta(alpha, alpha)'s alpha.

``dres_cheap`` is DReS at N = K/2 with the coded branch on one step in four (``every=4``, loss x 4)."""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.generalization.supervised import MethodConfig, make_loss_fn

#: method -> MethodConfig keyword arguments (besides the strength) for the objectives of supervised.py
OBJECTIVES = {"erm": dict(method="erm"), "dres": dict(method="dres"),
              "dres_cheap": dict(method="dres", coded_ratio=0.5, every=4),
              "grad_penalty": dict(method="grad_penalty"), "mixup": dict(method="mixup"),
              "label_smoothing": dict(method="label_smoothing")}
# the DReS options judged on CNNs (study v3_options): one factor at a time around default DReS
OPTION_VARIANTS = {"dres_every4": dict(every=4), "dres_principal": dict(order="principal"),
                   "dres_reconstructed": dict(anchor="reconstructed"), "dres_nk0.5": dict(coded_ratio=0.5),
                   "dres_nk2": dict(coded_ratio=2.0), "dres_dof0.5": dict(dof_frac=0.5),
                   "dres_dof1": dict(dof_frac=1.0), "dres_features": dict(submodule="features"),
                   "dres_head": dict(submodule="head")}
OBJECTIVES.update({name: dict(method="dres", **kw) for name, kw in OPTION_VARIANTS.items()})
SPECIAL = ("sam", "ema", "manifold_mixup")


def mixing_points(features: nn.Sequential) -> list:
    """Where manifold mixup may mix: 0 (the input), after each pooling layer (after each ReLU where the
    features have no pooling) and after the last layer."""
    layers = list(features)
    pools = [i + 1 for i, m in enumerate(layers) if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d))]
    if not pools:
        pools = [i + 1 for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
    return sorted({0, *pools, len(layers)})


def make_manifold_mixup(alpha: float):
    def loss_fn(model, x, y, step):
        layers = list(model.features)
        points = mixing_points(model.features)
        k = points[int(torch.randint(len(points), (1,)))]
        lam = float(np.random.beta(alpha, alpha))
        perm = torch.randperm(len(x))
        h = x
        for layer in layers[:k]:
            h = layer(h)
        h = lam * h + (1 - lam) * h[perm]
        for layer in layers[k:]:
            h = layer(h)
        logits = model.head(h)
        return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    return loss_fn


def loss_for(method: str, strength: float):
    if method in ("sam", "ema"):
        return make_loss_fn(MethodConfig("erm"))
    if method == "manifold_mixup":
        return make_manifold_mixup(strength)
    return make_loss_fn(MethodConfig(strength=strength, **OBJECTIVES[method]))


def sam_step(model, loss_fn, x, y, step, opt, rho: float, after_backward=None):
    """One SAM step: the gradient at w + rho g / ||g||, applied at w (restored exactly) by ``opt``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    loss_fn(model, x, y, step).backward()
    if after_backward is not None:
        after_backward()
    with torch.no_grad():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = rho / (norm + 1e-12)
        saved = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.add_(g * scale)
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, x, y, step)
    loss.backward()
    if after_backward is not None:
        after_backward()
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
    opt.step()
    return loss


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers, debiased as Adam's
    moments: e_t = decay e_{t-1} + (1 - decay) w_t from e_0 = 0, and the average is e_t / (1 - decay^t),
    a weighted mean of the iterates w_1..w_t alone (the initialization carries no weight)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.state[k].copy_(v)

    @torch.no_grad()
    def averaged(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` holding the averaged weights."""
        out = copy.deepcopy(model)
        debias = 1 - self.decay ** max(self.updates, 1)
        out.load_state_dict({k: (v / debias if v.dtype.is_floating_point else v) for k, v in self.state.items()})
        return out


def train(method: str, strength: float, make_model, x, y, *, steps: int, batch: int, seed: int, lr: float = 1e-3,
          clock=time.process_time, after_backward=None):
    """Adam on random minibatches (drawn without replacement within a batch from a generator seeded with
    ``seed``), the same loop for every method. Returns (the model to evaluate, seconds per step on
    ``clock``); ``after_backward()`` is called after each backward pass (the memory probe)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = make_model()
    loss_fn = loss_for(method, strength)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ema = EMA(model, strength) if method == "ema" else None
    gen = torch.Generator().manual_seed(seed)
    batch = min(batch, len(x))
    t0 = clock()
    for step in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:batch]
        if method == "sam":
            sam_step(model, loss_fn, x[idx], y[idx], step, opt, strength, after_backward)
        else:
            loss = loss_fn(model, x[idx], y[idx], step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
        if ema is not None:
            ema.update(model)
    seconds = clock() - t0
    return (ema.averaged(model) if ema is not None else model), seconds / max(steps, 1)


def step_memory_bytes(method: str, strength: float, make_model, x, y, *, batch: int, steps: int = 4) -> int:
    """Peak bytes held for one step beyond the model and its optimizer state: the largest total of the
    tensors autograd saves for one backward pass (distinct storages, parameters excluded), plus the parameter copies the method
    keeps (SAM: w during the ascent step; EMA: the averaged weights). Maximum over ``steps`` steps (with
    every=4 the first step is the coded one). The CPU has no allocator peak counter; on a GPU,
    torch.cuda.max_memory_allocated would be the measure."""
    held, peak, skip = {}, [0], set()

    def made():
        model = make_model()
        skip.update(p.untyped_storage().data_ptr() for p in model.parameters())
        return model

    def pack(t):
        try:
            ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            ptr, size = id(t), t.numel() * t.element_size()
        if ptr not in skip:
            held[ptr] = size
            peak[0] = max(peak[0], sum(held.values()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model, _ = train(method, strength, made, x, y, steps=steps, batch=batch, seed=0, after_backward=held.clear)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return peak[0] + (params if method in ("sam", "ema") else 0)


