"""Pictures: make_moons decision boundaries (ERM, DReS, gradient penalty) and a network's output
along the spline curve through one batch, with the DReS reconstruction, before/after training."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import make_moons  # noqa: E402

from bench.generalization.data import dof_kwargs, lam_for_dof, points, spline_weights  # noqa: E402
from bench.generalization.supervised import MethodConfig, accuracy, train_classifier  # noqa: E402

MOONS_TRAIN, MOONS_VAL, MOONS_TEST = 60, 200, 1000
MOONS_GRIDS = {"erm": [0.0], "dres": [0.3, 1.0, 3.0, 10.0], "grad_penalty": [0.01, 0.1, 1.0]}


def moons_data(seed: int):
    x, y = make_moons(MOONS_TRAIN + MOONS_VAL + MOONS_TEST, noise=0.3, random_state=seed)
    x = torch.tensor((x - np.array([0.5, 0.25])) / np.array([1.0, 0.5]), dtype=torch.float32)
    y = torch.tensor(y)
    cut1, cut2 = MOONS_TRAIN, MOONS_TRAIN + MOONS_VAL
    return (x[:cut1], y[:cut1]), (x[cut1:cut2], y[cut1:cut2]), (x[cut2:], y[cut2:])


def train_moons(cfg, train, steps, seed):
    model, _ = train_classifier(cfg, *train, steps=steps, batch=30, seed=seed, in_dim=2, hidden=64, out_dim=2)
    return model


def moons_boundaries(out_dir, steps: int, seed: int = 0) -> dict:
    """Tunes each method's strength on the moons validation split, plots the chosen models."""
    train, val, test = moons_data(seed)
    chosen = {}
    for method, grid in MOONS_GRIDS.items():
        best = None
        for strength in grid:
            model = train_moons(MethodConfig(method, strength), train, steps, seed)
            val_acc = accuracy(model, *val)
            if best is None or val_acc > best[0]:
                best = (val_acc, strength, model)
        chosen[method] = {"strength": best[1], "val_acc": best[0], "test_acc": accuracy(best[2], *test),
                          "model": best[2]}
    xx, yy = np.meshgrid(np.linspace(-2.5, 2.5, 200), np.linspace(-2.5, 2.5, 200))
    grid_pts = torch.tensor(np.c_[xx.ravel(), yy.ravel()], dtype=torch.float32)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, (method, info) in zip(axes, chosen.items()):
        with torch.no_grad():
            prob = torch.softmax(info["model"](grid_pts), 1)[:, 1].reshape(xx.shape).numpy()
        ax.contourf(xx, yy, prob, levels=20, cmap="RdBu_r", alpha=0.6, vmin=0, vmax=1)
        ax.contour(xx, yy, prob, levels=[0.5], colors="k", linewidths=1.5)
        ax.scatter(*train[0].T, c=train[1], cmap="RdBu_r", edgecolors="k", s=25)
        ax.set_title(f"{method} (strength {info['strength']:g})\nval {info['val_acc']:.3f}, "
                     f"test {info['test_acc']:.3f}")
    fig.suptitle(f"make_moons, {MOONS_TRAIN} noisy training points; strength tuned on validation")
    fig.tight_layout()
    fig.savefig(out_dir / "moons_boundaries.png", dpi=110)
    plt.close(fig)
    return {m: {k: v for k, v in info.items() if k != "model"} for m, info in chosen.items()}


def spline_curve_plot(out_dir, steps: int, seed: int = 0, batch: int = 12, dres_weight: float = 3.0,
                      dof_frac: float = 0.75) -> dict:
    """Output (logit difference) of a moons network along the encoder's smoothing-spline curve
    through one batch, with f at the coded points and the decoder's reconstruction at the batch
    points; at initialization, after ERM, and after training with DReS."""
    train, _, _ = moons_data(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x_batch = train[0][torch.randperm(len(train[0]), generator=gen)[:batch]]
    num_coded = batch
    kw = dof_kwargs(dof_frac, batch, num_coded)
    alpha, beta = points(batch, "chebyshev"), points(num_coded, "lobatto")
    lam_enc = kw.get("lam_enc", None)
    lam_enc = lam_for_dof(alpha, kw["dof_enc"]) if lam_enc is None else lam_enc
    lam_dec = kw.get("lam_dec", None)
    lam_dec = lam_for_dof(beta, kw["dof_dec"]) if lam_dec is None else lam_dec
    t_grid = torch.linspace(-1, 1, 300, dtype=torch.float64)
    enc_curve = spline_weights(alpha, t_grid, lam_enc).float()        # curve t -> x(t) in input space
    encoder = spline_weights(alpha, beta, lam_enc).float()
    decoder = spline_weights(beta, alpha, lam_dec).float()
    dec_curve = spline_weights(beta, t_grid, lam_dec).float()

    models = {"initialization": train_moons(MethodConfig("erm"), train, 0, seed),
              "after ERM": train_moons(MethodConfig("erm"), train, steps, seed),
              f"after DReS (weight {dres_weight:g})": train_moons(MethodConfig("dres", dres_weight), train, steps, seed)}
    out = {}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (name, model) in zip(axes, models.items()):
        with torch.no_grad():
            logit_diff = lambda x: (lambda o: o[:, 1] - o[:, 0])(model(x))
            f_curve = logit_diff(enc_curve @ x_batch)
            f_batch = logit_diff(x_batch)
            f_coded = logit_diff(encoder @ x_batch)
            recon = decoder @ f_coded
            recon_curve = dec_curve @ f_coded
        ax.plot(t_grid, f_curve, color="0.3", label="f along encoder spline x(t)")
        ax.plot(t_grid, recon_curve, color="tab:orange", ls="--", label="decoder spline of f(coded)")
        ax.scatter(beta, f_coded, marker="x", color="tab:orange", label="f(x_coded) at Lobatto pts")
        ax.scatter(alpha, f_batch, color="tab:blue", zorder=3, label="f(x_k) (batch)")
        ax.scatter(alpha, recon, marker="^", color="tab:red", zorder=3, label="DReS reconstruction")
        disc = float(((f_batch - recon) ** 2).mean())
        out[name] = disc
        ax.set_title(f"{name}\nDReS discrepancy (this output) {disc:.3g}")
        ax.set_xlabel("spline parameter t")
    axes[0].set_ylabel("logit(class 1) - logit(class 0)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "spline_curve.png", dpi=110)
    plt.close(fig)
    return out
