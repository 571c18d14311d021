"""Self-supervised (SimCLR-style) and generative (VAE) regimes on digits, +/- DReS."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from bench.baselines import num_coded_for
from bench.generalization.data import dof_kwargs, dres_loss

# ---------------------------------------------------------------- self-supervised (SimCLR)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Digit augmentations: random shift by up to one pixel (zero fill), 10% pixel dropout,
    Gaussian noise. x: (B, 64) in [0, 1]."""
    b = len(x)
    img = x.view(b, 1, 8, 8)
    padded = F.pad(img, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None, :])             # (b, 8)
    cols = (dx[:, None] + torch.arange(8)[None, :])
    shifted = padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
    keep = (torch.rand(b, 8, 8, generator=gen) > 0.1).float()
    noise = 0.1 * torch.randn(b, 8, 8, generator=gen)
    return (shifted * keep + noise).reshape(b, 64)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalized-temperature cross entropy (Chen et al. 2020)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    n = len(z1)
    sim.fill_diagonal_(-math.inf)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, targets)


def train_simclr(x_unlabeled, *, dres_weight: float, steps: int, batch: int, seed: int,
                 coded_ratio: float = 1.0, dof_frac: float = 0.75):
    """Encoder 64 -> 256 -> 64 (the representation), projection head 64 -> 64 -> 32.
    DReS (when dres_weight > 0) regularizes the encoder on the first augmented view."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    projector = nn.Sequential(nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    opt = torch.optim.Adam([*encoder.parameters(), *projector.parameters()], lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(x_unlabeled), generator=gen)[:batch]
        v1, v2 = augment(x_unlabeled[idx], gen), augment(x_unlabeled[idx], gen)
        h1, h2 = encoder(v1), encoder(v2)
        loss = nt_xent(projector(h1), projector(h2))
        if dres_weight > 0:
            num_coded = num_coded_for(coded_ratio, batch)
            loss = loss + dres_weight * dres_loss(encoder, v1, y=h1, num_coded=num_coded,
                                                  **dof_kwargs(dof_frac, batch, num_coded))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return encoder


@torch.no_grad()
def linear_probe(encoder, x_train, y_train, x_eval_sets):
    """Logistic regression on frozen, standardized features; returns accuracy on each eval set."""
    feats = lambda x: encoder(x).numpy()
    f_train = feats(x_train)
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000, C=1.0).fit((f_train - mu) / sd, y_train.numpy())
    return [float(clf.score((feats(x) - mu) / sd, y.numpy())) for x, y in x_eval_sets]


# ---------------------------------------------------------------- generative (VAE)

LATENT = 8


class VAE(nn.Module):
    """Bernoulli VAE (Kingma & Welling 2014) on [0, 1] pixel intensities."""

    def __init__(self, hidden=128, latent=LATENT):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                     nn.ReLU(), nn.Linear(hidden, 64))  # outputs pixel logits

    def elbo_terms(self, x):
        mu, log_var = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp()
        logits = self.decoder(z)
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(1)
        return z, logits, rec, kl


def train_vae(x_train, *, method: str, strength: float, steps: int, batch: int, seed: int,
              coded_ratio: float = 1.0, dof_frac: float = 0.75):
    """method: vae | vae_dres (DReS on the decoder at the sampled latents) |
    vae_grad_penalty (||J_decoder(z)||_F^2 by a random-projection estimate, in the spirit of
    Drucker & LeCun 1992's input-gradient penalty)."""
    torch.manual_seed(seed)
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(x_train), generator=gen)[:batch]
        x = x_train[idx]
        z, logits, rec, kl = model.elbo_terms(x)
        loss = (rec + kl).mean()
        if method == "vae_dres":
            num_coded = num_coded_for(coded_ratio, batch)
            loss = loss + strength * dres_loss(model.decoder, z, y=logits, num_coded=num_coded,
                                               **dof_kwargs(dof_frac, batch, num_coded))
        elif method == "vae_grad_penalty":
            u = torch.randn_like(logits)
            (g,) = torch.autograd.grad((logits * u).sum(), z, create_graph=True)
            loss = loss + strength * g.pow(2).sum(1).mean()
        elif method != "vae":
            raise ValueError(method)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def heldout_elbo(model, x, samples: int = 10) -> float:
    """Mean ELBO per digit in nats (higher is better), averaged over posterior samples."""
    torch.manual_seed(0)
    total = 0.0
    for _ in range(samples):
        _, _, rec, kl = model.elbo_terms(x)
        total += float((-(rec + kl)).mean())
    return total / samples


@torch.no_grad()
def kernel_mmd(model, x_ref, n_samples: int = 500, seed: int = 0) -> float:
    """Unbiased squared MMD (Gaussian kernel, median-heuristic bandwidth on the reference set)
    between decoded prior samples (Bernoulli means) and held-out digits; lower is better."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_samples, LATENT, generator=gen)
    x_gen = torch.sigmoid(model.decoder(z)).double()
    x_ref = x_ref.double()
    d_ref = torch.cdist(x_ref, x_ref).pow(2)
    bandwidth = d_ref[d_ref > 0].median()
    k = lambda a, b: torch.exp(-torch.cdist(a, b).pow(2) / bandwidth)
    kxx, kyy, kxy = k(x_gen, x_gen), k(x_ref, x_ref), k(x_gen, x_ref)
    m, n = len(x_gen), len(x_ref)
    return float((kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum()) / (n * (n - 1))
                 - 2 * kxy.mean())
