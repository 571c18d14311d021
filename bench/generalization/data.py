"""Shared pieces of the generalization study: data splits, label noise, statistics, DReS access."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from sklearn.datasets import load_digits

import dres_fast

dres_loss = dres_fast.dres_loss
points = dres_fast.points
spline_weights = dres_fast.spline_weights

NUM_CLASSES = 10
TEST_SIZE = 597  # fixed held-out digits, never used for any choice
VAL_SIZE = 300


def set_seed(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def digits_splits(seed: int):
    """Fixed test split (independent of seed) + a seed-dependent val set and train pool.

    Pixels are scaled to [0, 1] (the raw data are counts 0..16)."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.RandomState(12345).permutation(len(x))
    test_idx, pool_idx = order[:TEST_SIZE], order[TEST_SIZE:]
    pool_idx = np.random.RandomState(seed).permutation(pool_idx)
    val_idx, train_pool_idx = pool_idx[:VAL_SIZE], pool_idx[VAL_SIZE:]
    as_t = lambda idx: (torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))
    return as_t(train_pool_idx), as_t(val_idx), as_t(test_idx)


def corrupt_labels(y: torch.Tensor, rate: float, seed: int, classes: int = NUM_CLASSES) -> torch.Tensor:
    """Symmetric label noise over ``classes`` classes: with probability `rate` a label is replaced by a
    different class, uniformly."""
    if rate <= 0:
        return y.clone()
    gen = torch.Generator().manual_seed(10_000 + seed)
    flip = torch.rand(len(y), generator=gen) < rate
    offset = torch.randint(1, classes, (len(y),), generator=gen)
    return torch.where(flip, (y + offset) % classes, y)


def mean_ci95(values) -> dict:
    """Mean and two-sided 95% Student-t interval over seeds."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return {"mean": m, "ci95": [m, m], "std": 0.0, "n": int(len(v))}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": m, "ci95": [m - half, m + half], "std": float(v.std(ddof=1)), "n": int(len(v))}


def dof_kwargs(dof_frac: float, batch: int, num_coded: int) -> dict:
    """DReS smoothing as a fraction of the maximal degrees of freedom (1.0 = interpolation)."""
    if dof_frac >= 1.0:
        return {"lam_enc": 0.0, "lam_dec": 0.0}
    return {"dof_enc": max(2.0, dof_frac * batch), "dof_dec": max(2.0, dof_frac * num_coded)}


def lam_for_dof(src: torch.Tensor, dof: float) -> float:
    """Smoothing-spline lambda whose hat matrix W(src -> src, lam) has trace `dof`."""
    return float(dres_fast.lam_for_dof(src, dof))
