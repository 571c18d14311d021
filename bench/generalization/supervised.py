"""Supervised small-data digits: ERM, DReS, DReS-decoded, gradient penalty, mixup, label smoothing,
weight decay (AdamW).

Each method is one ``loss_fn(model, x, y, step) -> loss`` (the signature of bench/baselines.py, whose
ERM, gradient penalty and mixup the study uses); the training loop is shared so that the methods
differ only in their regularizer."""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dres_fast import DReSLoss
from dres_fast.smoothing import check_anchor, check_every, check_order

from bench import baselines
from bench.generalization.data import NUM_CLASSES, dof_kwargs, dres_loss


def make_mlp(in_dim=64, hidden=128, out_dim=NUM_CLASSES) -> nn.Sequential:
    """Sequential(features, head): the named submodules DReS can regularize are
    "model" (the whole map), "features" (input -> last hidden layer) and "head" (last linear layer)."""
    features = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(hidden, out_dim)))


@dataclass
class MethodConfig:
    method: str                     # erm | dres | dres_decoded | grad_penalty | mixup | label_smoothing | weight_decay
    strength: float = 0.0           # weight (dres, grad_penalty), blend (dres_decoded), Beta alpha (mixup)
    coded_ratio: float = 1.0        # N / K
    dof_frac: float = 0.75          # dof as a fraction of K (encoder) and N (decoder); 1 = interpolate
    submodule: str = "model"        # model | features | head
    # options beyond the paper (README "Options beyond the paper"); dres and dres_decoded
    every: int = 1                  # lazy DReS: coded branch on one step in `every`, loss x every (dres only)
    order: str = "given"            # given | principal (sort the batch along its leading principal direction)
    anchor: str = "observed"        # observed | reconstructed (compare with f(D E x); one more K-sample forward)


def _dres_kwargs(cfg: MethodConfig, batch: int) -> dict:
    num_coded = baselines.num_coded_for(cfg.coded_ratio, batch)
    return dict(num_coded=num_coded, order=cfg.order, anchor=cfg.anchor, **dof_kwargs(cfg.dof_frac, batch, num_coded))


def _dres_fn(cfg: MethodConfig):
    """``dres_loss``, or with ``every > 1`` a ``DReSLoss(every=...)`` per batch size (one per training
    run: make_loss_fn is called per run), whose call counter is the step count."""
    check_every(cfg.every), check_order(cfg.order), check_anchor(cfg.anchor)  # fail before training starts
    if cfg.every == 1:
        return lambda fn, x, y: dres_loss(fn, x, y=y, **_dres_kwargs(cfg, len(x)))
    if cfg.method != "dres":
        raise ValueError(f"every={cfg.every} is only supported for method 'dres', not {cfg.method!r}")
    lazy = {}

    def lazy_dres(fn, x, y):
        if len(x) not in lazy:
            lazy[len(x)] = DReSLoss(every=cfg.every, **_dres_kwargs(cfg, len(x)))
        return lazy[len(x)](fn, x, y=y)

    return lazy_dres


def make_loss_fn(cfg: MethodConfig):
    if cfg.method == "erm":
        return baselines.erm

    if cfg.method == "dres":
        dres = _dres_fn(cfg)

        def loss_fn(model, x, y, step):
            h = model.features(x)
            logits = model.head(h)
            if cfg.submodule == "model":
                reg = dres(model, x, logits)
            elif cfg.submodule == "features":
                reg = dres(model.features, x, h)
            elif cfg.submodule == "head":
                reg = dres(model.head, h, logits)
            else:
                raise ValueError(cfg.submodule)
            return F.cross_entropy(logits, y) + cfg.strength * reg
        return loss_fn

    if cfg.method == "dres_decoded":
        _dres_fn(cfg)  # checks the options
        # task loss on the DReS reconstruction of the logits, blended with the main task loss
        def loss_fn(model, x, y, step):
            logits = model(x)
            _, decoded = dres_loss(model, x, y=logits, return_decoded=True, **_dres_kwargs(cfg, len(x)))
            return (1 - cfg.strength) * F.cross_entropy(logits, y) + cfg.strength * F.cross_entropy(decoded, y)
        return loss_fn

    if cfg.method == "grad_penalty":
        return baselines.make_grad_penalty(cfg.strength)

    if cfg.method == "mixup":
        return baselines.make_mixup(cfg.strength)

    if cfg.method == "label_smoothing":
        return baselines.make_label_smoothing(cfg.strength)

    if cfg.method == "weight_decay":  # AdamW applies it (train_classifier); the loss is plain
        return baselines.erm

    raise ValueError(cfg.method)


def train_classifier(cfg: MethodConfig, x_train, y_train, *, steps: int, batch: int, seed: int,
                     lr: float = 1e-3, hidden: int = 128, in_dim: int = 64, out_dim: int = NUM_CLASSES):
    """Adam (AdamW for "weight_decay") on random minibatches (without replacement within a batch). Returns (model, seconds)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = make_mlp(in_dim, hidden, out_dim)
    seconds = run_minibatches(model, make_loss_fn(cfg), x_train, y_train, steps=steps, batch=min(batch, len(x_train)),
                              seed=seed, lr=lr, weight_decay=cfg.strength if cfg.method == "weight_decay" else 0.0)
    return model, seconds


def run_minibatches(model, loss_fn, x, y, *, steps, batch, seed, lr, weight_decay, clock=time.perf_counter):
    """``steps`` AdamW steps (Adam at ``weight_decay`` 0, so every method but "weight_decay" trains as with
    Adam) on random minibatches, drawn without replacement within a batch from a generator seeded with
    ``seed``. Returns the seconds spent on ``clock``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    t0 = clock()
    for step in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:batch]
        loss = loss_fn(model, x[idx], y[idx], step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clock() - t0


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def seconds_per_step(cfg: MethodConfig, x, y, *, batch: int, repeats: int = 5, steps: int = 20) -> float:
    """Median wall time of one training step over short repeats (robust to a shared CPU's load)."""
    times = []
    for r in range(repeats):
        _, sec = train_classifier(cfg, x, y, steps=steps, batch=batch, seed=r)
        times.append(sec / steps)
    return float(np.median(times))
