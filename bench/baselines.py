"""Training objectives DReS is compared with: smoothness regularizers and mixup, for both the step
benchmark (bench/steps.py) and the generalization study (bench/generalization/).

Every method maps (model, x, target, step_index) to the scalar loss of one training step; the step
runner then calls ``loss.backward()`` and ``optimizer.step()``. All models output class logits and the
task loss is cross-entropy, so each baseline is applied exactly as its paper applies it to a
classifier. The step benchmark uses the papers' (or reference implementations') default strengths,
listed per method; the study builds the same objectives at the strengths it tunes (``make_*``).

Baselines live here, not in the library: they are reference points, not part of DReS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dres_fast.contract import MIN_SAMPLES

# Default strengths (see each method's docstring for the source).
R1_GAMMA = 10.0            # Mescheder et al. 2018, R1 gamma; penalty weight gamma / 2
JACOBIAN_LAMBDA = 0.01     # Hoffman, Roberts & Yaida 2019, lambda_JR
HESSIAN_WEIGHT = 0.1       # Peebles et al. 2020, Hessian Penalty loss weight
HESSIAN_K = 2              # Peebles et al. 2020 reference code: k = 2 Rademacher directions
HESSIAN_EPSILON = 0.1      # Peebles et al. 2020 reference code: finite-difference step
MIXUP_ALPHA = 1.0          # Zhang et al. 2018: Beta(alpha, alpha), alpha = 1 (uniform)
LAZY_INTERVAL = 16         # Karras et al. 2020 (StyleGAN2): R1 every 16 minibatches
FD_LAMBDA = 0.1            # Finlay & Oberman 2019: penalty weight (reference code default is 0 = off)
FD_STEP = 1e-2             # Finlay & Oberman 2019 reference code (cfinlay/tulip): h = 1e-2, O1 differences
DRES_WEIGHT = 1.0          # DReS discrepancy weight; smoothing left at dres_fast's defaults
MIN_NUM_CODED = MIN_SAMPLES  # dres_fast rejects num_coded < 3: a cubic spline needs three knots


def num_coded_for(ratio: float, batch: int) -> int:
    """The number of coded samples N for N/K = ``ratio`` at batch size K: round(ratio K), at least
    MIN_NUM_CODED. The step benchmark and the study both size DReS with it."""
    return max(MIN_NUM_CODED, int(round(ratio * batch)))


def _cross_entropy(logits, target, reduction="mean"):
    return F.cross_entropy(logits.float(), target, reduction=reduction)


def _input_grad_sq_norm(model, x, target):
    """Per-batch mean of ||d loss_b / d x_b||^2 with a graph for double backprop, plus the task loss."""
    x = x.detach().requires_grad_(True)
    per_sample = _cross_entropy(model(x), target, reduction="none")
    (grad_x,) = torch.autograd.grad(per_sample.sum(), x, create_graph=True)
    return per_sample.mean(), grad_x.flatten(1).square().sum(dim=1).mean()


def erm(model, x, target, step):
    """Empirical risk minimisation: the plain task loss."""
    return _cross_entropy(model(x), target)


def make_dres(num_coded_ratio: float, every: int = 1, order: str = "given", anchor: str = "observed"):
    """DReS (arXiv 2510.00253): task loss + weight * DReS discrepancy of the whole model, reusing the
    main branch's logits (``y=``) so only the N coded samples cost an extra forward/backward.

    The library's options beyond the paper (README "Options beyond the paper"): ``every=k`` uses a
    ``DReSLoss(every=k)`` whose step counter is set to the harness's ``step`` (so step 0 is the coded
    one and the amortized timing of bench/steps.py applies); ``order`` and ``anchor`` are passed on
    (``anchor="reconstructed"`` costs one more forward of K samples)."""
    lazy = {}  # one DReSLoss(every=k) per num_coded

    def dres(model, x, target, step):
        import dres_fast  # lazy: the other baselines do not need the library

        logits = model(x)
        num_coded = num_coded_for(num_coded_ratio, x.shape[0])
        if every == 1:
            reg = dres_fast.dres_loss(model, x, num_coded=num_coded, y=logits, order=order, anchor=anchor)
        else:
            if num_coded not in lazy:
                lazy[num_coded] = dres_fast.DReSLoss(num_coded=num_coded, every=every, order=order, anchor=anchor)
            lazy[num_coded].step_count = step
            reg = lazy[num_coded](model, x, y=logits)
        return _cross_entropy(logits, target) + DRES_WEIGHT * reg

    return dres


def make_grad_penalty(weight: float):
    """Input-gradient penalty by double backpropagation (Drucker & LeCun 1992, "Improving
    generalization performance using double backpropagation"): task loss + ``weight`` * the batch
    mean of ||d loss_b / d x_b||^2."""

    def grad_penalty(model, x, target, step):
        task, penalty = _input_grad_sq_norm(model, x, target)
        return task + weight * penalty

    return grad_penalty


# The step benchmark's strength follows R1 (Mescheder et al. 2018, "Which training methods for GANs
# do actually converge?"): gamma / 2 * E ||grad||^2 with gamma = 10.
grad_penalty = make_grad_penalty(0.5 * R1_GAMMA)


def lazy_grad_penalty(model, x, target, step):
    """Lazy regularization (Karras et al. 2020, StyleGAN2, "Analyzing and improving the image quality
    of StyleGAN", sec. 3.1): the grad_penalty term only every 16th step, scaled by 16 so its average
    strength is unchanged. ``step`` decides; the timing code measures both kinds of step."""
    if step % LAZY_INTERVAL != 0:
        return erm(model, x, target, step)
    task, penalty = _input_grad_sq_norm(model, x, target)
    return task + 0.5 * R1_GAMMA * LAZY_INTERVAL * penalty


def jacobian(model, x, target, step):
    """Jacobian regularization (Hoffman, Roberts & Yaida 2019, "Robust learning with Jacobian
    regularization"): ||J||_F^2 estimated from one random projection v uniform on the output sphere,
    ||J||_F^2 ~= C * ||v^T J||^2 (C = output size), averaged over the batch; loss + lambda_JR/2 * that,
    lambda_JR = 0.01 (facebookresearch/jacobian_regularizer, n_proj = 1)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    v = torch.randn_like(logits)
    v = v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))
    (vjp,) = torch.autograd.grad(logits, x, grad_outputs=v, create_graph=True)
    num_out = logits[0].numel()
    frob_sq = num_out * vjp.square().sum() / x.shape[0]
    return _cross_entropy(logits, target) + 0.5 * JACOBIAN_LAMBDA * frob_sq


def hessian(model, x, target, step):
    """Hessian Penalty (Peebles et al. 2020, "The Hessian Penalty: a weak prior for unsupervised
    disentanglement"): the variance over k = 2 Rademacher directions v of the finite-difference
    second directional derivative (f(x + eps v) - 2 f(x) + f(x - eps v)) / eps^2, eps = 0.1,
    reduced by max over outputs (the reference implementation's defaults); weight 0.1."""
    logits = model(x)
    second = []
    for _ in range(HESSIAN_K):
        v = HESSIAN_EPSILON * (torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1)
        second.append((model(x + v) - 2 * logits + model(x - v)) / HESSIAN_EPSILON**2)
    penalty = torch.stack(second).var(dim=0, unbiased=True).max()
    return _cross_entropy(logits, target) + HESSIAN_WEIGHT * penalty


def make_mixup(alpha: float):
    """mixup (Zhang et al. 2018, "mixup: Beyond empirical risk minimization"): one
    lambda ~ Beta(alpha, alpha) per batch, inputs and (through the loss) labels mixed with a
    permutation of the batch."""

    def mixup(model, x, target, step):
        # lambda from NumPy's global generator, the permutation from torch's: callers that want
        # repeatable runs seed both (the study does, per run)
        lam = float(np.random.beta(alpha, alpha))
        perm = torch.randperm(x.shape[0], device=x.device)
        logits = model(lam * x + (1 - lam) * x[perm])
        return lam * _cross_entropy(logits, target) + (1 - lam) * _cross_entropy(logits, target[perm])

    return mixup


mixup = make_mixup(MIXUP_ALPHA)  # alpha = 1: lambda uniform on [0, 1]


def make_label_smoothing(eps: float):
    """Label smoothing (Szegedy et al. 2016, "Rethinking the Inception architecture"): cross-entropy
    against (1 - eps) one-hot + eps uniform over the classes. The plain control for confidence."""

    def label_smoothing(model, x, target, step):
        return F.cross_entropy(model(x).float(), target, label_smoothing=eps)

    return label_smoothing


def fd_grad_penalty(model, x, target, step):
    """Finite-difference input-gradient penalty (Finlay & Oberman 2019, "Scaleable input gradient
    regularization for adversarial robustness"; reference code cfinlay/tulip): the gradient direction
    d = grad/||grad|| from a plain backward (no graph), then (loss(x + h d) - loss(x)) / h approximates
    ||grad loss|| per sample; loss + lambda * mean(dl^2) / 2, h = 1e-2. No double backprop."""
    x = x.detach().requires_grad_(True)
    per_sample = _cross_entropy(model(x), target, reduction="none")
    task = per_sample.mean()
    (grad_x,) = torch.autograd.grad(task, x, retain_graph=True)
    direction = grad_x.flatten(1)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    shifted = x.detach() + FD_STEP * direction.view_as(x)
    per_sample_shifted = _cross_entropy(model(shifted), target, reduction="none")
    slope = (per_sample_shifted - per_sample) / FD_STEP
    return task + FD_LAMBDA * slope.square().mean() / 2


def apply_spectral_norm(model: nn.Module) -> nn.Module:
    """Spectral normalization (Miyato et al. 2018, "Spectral normalization for generative adversarial
    networks"): torch's parametrization on every Linear and Conv layer, one power iteration."""
    from torch.nn.utils.parametrizations import spectral_norm

    for module in list(model.modules()):
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            spectral_norm(module)
    return model


@dataclass
class Method:
    """One row of the step benchmark: a name, its loss, an optional model transform, extra fields."""

    name: str
    loss: Callable
    prepare: Callable[[nn.Module], nn.Module] = lambda model: model
    extra: dict = field(default_factory=dict)
    # Applies its penalty only on some steps: timing reports the amortized cost over the interval.
    interval: int = 1

    @property
    def key(self) -> str:
        ratio = self.extra.get("num_coded_ratio")
        return self.name if ratio in (None, 1.0) else f"{self.name}(N={ratio:g}K)"


def all_methods() -> list[Method]:
    """Every method the benchmark times, in table order."""
    return [
        Method("erm", erm),
        Method("dres", make_dres(1.0), extra={"num_coded_ratio": 1.0}),
        Method("dres", make_dres(0.5), extra={"num_coded_ratio": 0.5}),
        Method("dres", make_dres(2.0), extra={"num_coded_ratio": 2.0}),
        # options beyond the paper, at N = K (README "Options beyond the paper")
        Method("dres(every=4)", make_dres(1.0, every=4), extra={"num_coded_ratio": 1.0, "every": 4}, interval=4),
        Method("dres(every=16)", make_dres(1.0, every=16), extra={"num_coded_ratio": 1.0, "every": 16}, interval=16),
        Method("dres(order=principal)", make_dres(1.0, order="principal"),
               extra={"num_coded_ratio": 1.0, "order": "principal"}),
        Method("dres(anchor=reconstructed)", make_dres(1.0, anchor="reconstructed"),
               extra={"num_coded_ratio": 1.0, "anchor": "reconstructed"}),
        Method("grad_penalty", grad_penalty),
        Method("jacobian", jacobian),
        Method("hessian", hessian),
        Method("spectral_norm", erm, prepare=apply_spectral_norm),
        Method("mixup", mixup),
        Method("lazy_grad_penalty", lazy_grad_penalty, interval=LAZY_INTERVAL),
        Method("fd_grad_penalty", fd_grad_penalty),
    ]


def method_by_key(key: str) -> Method:
    for method in all_methods():
        if method.key == key:
            return method
    raise KeyError(f"unknown method {key!r}; known: {[m.key for m in all_methods()]}")


def amortized_ms(penalty_ms: float, plain_ms: float, interval: int) -> float:
    """Average step time of a method that pays ``penalty_ms`` once every ``interval`` steps."""
    return (penalty_ms + (interval - 1) * plain_ms) / interval


__all__ = ["Method", "all_methods", "method_by_key", "amortized_ms", "make_grad_penalty", "make_mixup",
           "make_label_smoothing",
           "num_coded_for", "MIN_NUM_CODED"]
