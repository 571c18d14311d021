"""Real time series for the evidence studies: UCR classification sets that ship inside the ``sktime``
wheel (read by sktime's own loaders from files in the package; nothing is downloaded), fixed splits,
label noise for any number of classes, and the small 1-D CNN and MLP.

Splits: each set's train and test files are pooled; a fixed test split (40%, one permutation with seed
12345) is never used for a choice; per seed, the rest is shuffled into a validation split (a third of it)
and a training pool, from which the first ``n_train`` series train."""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn

# name -> sktime loader (sktime.datasets); every one reads a .ts file inside the installed package
LOADERS = {"gunpoint": "load_gunpoint", "italy_power": "load_italy_power_demand", "arrowhead": "load_arrow_head",
           "osuleaf": "load_osuleaf"}
TEST_FRACTION = 0.4


@lru_cache(maxsize=None)
def ucr_arrays(name: str):
    """(x, y) of the pooled train+test files: x float32 (n, 1, length), y int64 classes 0..C-1."""
    import sktime.datasets as sd
    x, labels = getattr(sd, LOADERS[name])(return_X_y=True, return_type="numpy3D")
    classes = sorted(set(labels.tolist()))
    y = np.array([classes.index(v) for v in labels.tolist()], dtype=np.int64)
    return torch.tensor(np.asarray(x, dtype=np.float32)), torch.from_numpy(y)


def num_classes(name: str) -> int:
    return int(ucr_arrays(name)[1].max()) + 1


def ucr_splits(name: str, seed: int, n_train: int):
    """((x_train, y_train), (x_val, y_val), (x_test, y_test)); the test split does not depend on seed."""
    x, y = ucr_arrays(name)
    order = torch.from_numpy(np.random.RandomState(12345).permutation(len(x)))
    n_test = int(round(TEST_FRACTION * len(x)))
    test_idx, rest = order[:n_test], order[n_test:]
    rest = rest[torch.from_numpy(np.random.RandomState(seed).permutation(len(rest)))]
    n_val = len(rest) // 3
    val_idx, pool_idx = rest[:n_val], rest[n_val:][:n_train]
    return (x[pool_idx], y[pool_idx]), (x[val_idx], y[val_idx]), (x[test_idx], y[test_idx])


def make_ts_cnn(classes: int, length: int, channels: int = 1, width: int = 16) -> nn.Sequential:
    """conv7(width)-pool-conv5(2 width)-pool-linear, pooling by 4 (by 2 for series shorter than 64): the
    MNIST CNN's shape in 1-D, with "features" and "head" as the other models. (A global-average-pooled
    variant stayed near chance on GunPoint and ArrowHead at these step counts.)"""
    pool = 2 if length < 64 else 4
    features = nn.Sequential(nn.Conv1d(channels, width, 7, padding=3), nn.ReLU(), nn.MaxPool1d(pool),
                             nn.Conv1d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool1d(pool),
                             nn.Flatten())
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(2 * width * (length // pool // pool), classes)))


def make_ts_mlp(classes: int, length: int, channels: int = 1, hidden: int = 128) -> nn.Sequential:
    features = nn.Sequential(nn.Flatten(), nn.Linear(channels * length, hidden), nn.ReLU(),
                             nn.Linear(hidden, hidden), nn.ReLU())
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(hidden, classes)))
