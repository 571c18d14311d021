"""A GAN on a 2-D mixture of 8 Gaussians, with DReS on the discriminator in place of an R1 penalty.

    python examples/gan.py --quick            # < 60 s on a CPU: 1,000 steps per regularizer
    python examples/gan.py                    # 10,000 steps per regularizer, 3 seeds
    python examples/gan.py --out samples.png  # also draw the samples of each regularizer

The discriminator ``D`` is regularized three ways: not at all (``none``), with the R1 penalty
``gamma/2 * E ||grad_x D(x)||^2`` on real samples (a double backward), and with DReS on real samples
(``dres_fast.dres_loss(D, x_real, y=D(x_real))``: two forward passes, ordinary backward). Scores: how many of
the 8 modes the generator covers, and the share of high-quality samples (within 3 standard deviations of a mode).
"""
import argparse
import math
import time

import torch
from torch import nn
import torch.nn.functional as F

import dres_fast

STD = 0.02
MODES = torch.tensor([[math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)] for k in range(8)])


def real_batch(n):
    return MODES[torch.randint(0, 8, (n,))] + STD * torch.randn(n, 2)


def mlp(inputs, outputs, width=128):
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, outputs))


def regularizer(name, D, x_real, d_real):
    if name == "r1":
        x = x_real.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
        return 5.0 * grad.pow(2).sum(1).mean()          # gamma = 10
    if name == "dres":
        return 1.0 * dres_fast.dres_loss(D, x_real, y=d_real)
    return torch.zeros(())


def score(samples):
    distance = torch.cdist(samples, MODES)               # (n, 8)
    nearest, mode = distance.min(1)
    good = nearest < 3 * STD
    covered = mode[good].unique().numel()
    return covered, good.float().mean().item()


def train(name, steps, seed, batch=256, latent=16):
    torch.manual_seed(seed)
    G, D = mlp(latent, 2), mlp(2, 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.9))
    for _ in range(steps):
        x_real, x_fake = real_batch(batch), G(torch.randn(batch, latent)).detach()
        d_real = D(x_real)
        loss_d = (F.softplus(-d_real).mean() + F.softplus(D(x_fake)).mean()
                  + regularizer(name, D, x_real, d_real))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = F.softplus(-D(G(torch.randn(batch, latent)))).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    with torch.no_grad():
        return G(torch.randn(2000, latent))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 steps, 1 seed")
    parser.add_argument("--out", default=None, help="write a PNG of the samples (needs matplotlib)")
    args = parser.parse_args()
    steps, seeds = (1000, [0]) if args.quick else (10000, [0, 1, 2])
    torch.set_num_threads(1)  # 2-D points and small MLPs: more threads only add overhead
    samples = {}
    for name in ("none", "r1", "dres"):
        start = time.perf_counter()
        results = []
        for seed in seeds:
            samples[name] = train(name, steps, seed)
            results.append(score(samples[name]))
        per_step_ms = (time.perf_counter() - start) / (steps * len(seeds)) * 1e3
        modes = sum(r[0] for r in results) / len(results)
        quality = sum(r[1] for r in results) / len(results)
        print(f"{name:5s} modes covered {modes:.1f}/8   high-quality samples {100 * quality:5.1f}%   "
              f"{per_step_ms:.2f} ms/step")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
        for ax, (name, points) in zip(axes, samples.items()):
            ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4)
            ax.scatter(MODES[:, 0], MODES[:, 1], marker="x", color="red")
            ax.set_title(f"D regularizer: {name}")
            ax.set_xlim(-1.6, 1.6)
            ax.set_ylim(-1.6, 1.6)
        fig.tight_layout()
        fig.savefig(args.out, dpi=80)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
