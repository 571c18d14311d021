"""gan_mixture: a small GAN (MLP generator and discriminator, non-saturating loss) on the standard 2-D
mixtures: 8 Gaussians on a ring of radius 2 (std 0.02) and 25 on a 5x5 grid of spacing 2 (std 0.05).
Discriminator regularizers: none (``gan``), R1 on real samples (``gan_r1``, gamma/2 E||grad D||^2,
Mescheder et al. 2018), DReS on the discriminator's real batch (``gan_dres``).

Scores on 2,500 generated samples: the share of high-quality samples (within 3 standard deviations of
the nearest mode) and the number of modes covered (a mode counts when it holds at least a fifth of
its fair share of high-quality samples). The strength is chosen per seed on the same scores of an
independent validation draw of latents (modes covered, then high-quality share). Cost: CPU ms per
training step (process time, robust to a shared machine)."""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.generalization.data import dres_loss
from bench.generalization.entries import dres_pairs, log, study_entry

METHODS = ["gan", "gan_r1", "gan_dres"]
LATENT = 16


def mixture(name: str):
    """(modes (M, 2), std)."""
    if name == "ring8":
        angles = torch.arange(8) * 2 * math.pi / 8
        return 2.0 * torch.stack([angles.cos(), angles.sin()], 1), 0.02
    if name == "grid25":
        g = torch.arange(-2, 3, dtype=torch.float32) * 2.0
        return torch.cartesian_prod(g, g), 0.05
    raise ValueError(f"unknown mixture {name!r}")


def sample_mixture(modes, std, n, gen):
    return modes[torch.randint(0, len(modes), (n,), generator=gen)] + std * torch.randn(n, 2, generator=gen)


def mlp(inputs, outputs, width=128):
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, outputs))


def score(samples, modes, std) -> dict:
    nearest, mode = torch.cdist(samples, modes).min(1)
    good = nearest < 3 * std
    counts = torch.bincount(mode[good], minlength=len(modes))
    fair = len(samples) / len(modes)
    return {"modes_covered": int((counts >= 0.2 * fair).sum()), "hq_share": float(good.float().mean())}


def train_gan(method, strength, mix, *, steps, batch, seed, lr=5e-4):
    """Returns (generator, cpu seconds per step)."""
    torch.manual_seed(seed)
    modes, std = mixture(mix)
    gen = torch.Generator().manual_seed(seed)
    G, D = mlp(LATENT, 2), mlp(2, 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.9))
    cpu0 = time.process_time()
    for _ in range(steps):
        x_real = sample_mixture(modes, std, batch, gen)
        x_fake = G(torch.randn(batch, LATENT)).detach()
        if method == "gan_r1":
            x_real.requires_grad_(True)
        d_real = D(x_real)
        loss_d = F.softplus(-d_real).mean() + F.softplus(D(x_fake)).mean()
        if method == "gan_r1":
            (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)
            loss_d = loss_d + 0.5 * strength * grad.pow(2).sum(1).mean()
        elif method == "gan_dres":
            loss_d = loss_d + strength * dres_loss(D, x_real, y=d_real)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = F.softplus(-D(G(torch.randn(batch, LATENT)))).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    return G, (time.process_time() - cpu0) / max(steps, 1)


@torch.no_grad()
def generate(G, n, seed):
    return G(torch.randn(n, LATENT, generator=torch.Generator().manual_seed(seed)))


def run_gan(mc) -> dict:
    rows, entries, samples = [], [], {}
    grids = {"gan": [0.0], "gan_r1": mc.gan_r1_gammas, "gan_dres": mc.gan_dres_weights}
    for mix in mc.gan_mixtures:
        modes, std = mixture(mix)
        chosen = []
        for seed in mc.seeds:
            for method, grid in grids.items():
                best = None
                for strength in grid:
                    G, cpu = train_gan(method, strength, mix, steps=mc.gan_steps, batch=mc.gan_batch, seed=seed)
                    val = score(generate(G, 2500, 10_000 + seed), modes, std)
                    key = (val["modes_covered"], val["hq_share"])
                    if best is None or key > best[0]:
                        best = (key, strength, G, cpu)
                _, strength, G, cpu = best
                test_samples = generate(G, 2500, 20_000 + seed)
                chosen.append({"method": method, "seed": seed, "strength": strength,
                               "cpu_ms_per_step": 1e3 * cpu, **score(test_samples, modes, std)})
                if seed == mc.seeds[0]:
                    samples[mix, method] = test_samples
        rows += [{**r, "mixture": mix} for r in chosen]
        for metric, higher in (("modes_covered", True), ("hq_share", True), ("cpu_ms_per_step", False)):
            entries.append(study_entry("gan_mixture", f"2-D mixture {mix} ({len(modes)} Gaussians, std {std})",
                                       metric, higher, chosen, METHODS, dres_pairs("gan_dres", METHODS),
                                       setting=mix, grids=grids,
                                       extra={"dres_method": "gan_dres", "steps": mc.gan_steps,
                                              "modes": len(modes)}))
        log(f"gan_mixture {mix} done")
    return {"rows": rows, "entries": entries, "samples": samples}


def plot_gan_samples(samples, path) -> None:
    """Test samples of the first seed, one panel per (mixture, method); red crosses: the modes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mixes = list(dict.fromkeys(m for m, _ in samples))
    fig, axes = plt.subplots(len(mixes), len(METHODS), figsize=(3.6 * len(METHODS), 3.4 * len(mixes)), squeeze=False)
    for i, mix in enumerate(mixes):
        modes, std = mixture(mix)
        for j, method in enumerate(METHODS):
            ax, pts = axes[i, j], samples[mix, method]
            ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.35)
            ax.scatter(modes[:, 0], modes[:, 1], marker="x", color="red", s=15)
            s = score(pts, modes, std)
            ax.set_title(f"{mix} {method}: {s['modes_covered']}/{len(modes)} modes, "
                         f"{100 * s['hq_share']:.0f}% HQ", fontsize=8)
            lim = 5.5 if mix == "grid25" else 2.8
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
