"""Diffusion Models Beat GANs on Image Synthesis (ADM): classifier guidance.
Dhariwal & Nichol 2021, https://arxiv.org/abs/2105.05233 (official code: openai/guided-diffusion).

Notation (paper -> difflab, VE coordinates x = x0 + sigma n):
    p_phi(y | x_t, t)                 -> `NoisyClassifier` fed (c_in x, c_noise), like the diffusion net
    s (guidance scale)                -> `scale`
    Alg. 2 (DDIM): eps_hat = eps - sqrt(1 - abar) s grad log p  -> core.guidance.classifier_guidance:
                                         D + s sigma^2 grad_x log p(y | x, sigma)
    Alg. 1 (ancestral): x_{t-1} ~ N(mu + s Sigma grad log p, Sigma)
                                      -> `sample_ancestral_guided`: in VE coordinates the shift is
                                         s sigma_up^2 grad_x log p (x) sqrt(1 + sigma_t^2)/sqrt(1 + sigma_{t-1}^2)

Usage::

    clf, info = train_classifier(data, denoiser, steps=2000)    # difflab.train.classifier, on noised images
    save_classifier(clf, "runs/clf", info)      # difflab.nn.classifier (`difflab train-classifier` writes it)
    log_p = classifier_log_prob(clf, denoiser)
    guided = classifier_guidance(log_p, scale=2.0)(denoiser)            # eps (DDIM) form
    x0 = sample(guided, x, sigmas, cond={"class_labels": y})
    x0 = sample_ancestral_guided(denoiser, x, sigmas, log_p, 2.0, cond={"class_labels": y})
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.core.denoiser import Preconditioned
from difflab.core.guidance import classifier_guidance
from difflab.core.sampling import check_grid, noise_source, StepRunner, progress_range, ancestral_step, euler_step
from difflab.nn.classifier import NoisyClassifier

__all__ = ["classifier_log_prob", "classifier_guidance", "sample_ancestral_guided"]


def classifier_log_prob(classifier: NoisyClassifier, denoiser: Preconditioned, label_key: str = "class_labels"):
    """log p(y | x, sigma) with the classifier fed the diffusion network's inputs (c_in x, c_noise)."""

    def log_prob(x: Tensor, sigma, **cond) -> Tensor:
        if label_key not in cond:
            raise ValueError(f"classifier guidance needs the wanted labels as cond[{label_key!r}]")
        y = cond[label_key]
        _, _, c_in, c_noise = denoiser.coeffs_for(x, sigma)
        logits = classifier(c_in * x, c_noise)
        return logits.float().log_softmax(-1).gather(1, y.long().reshape(-1, 1))[:, 0]

    return log_prob


def sample_ancestral_guided(
    denoiser, x, sigmas, log_prob_fn, scale: float, *, cond=None, callback=None, noise=None, progress=False
):
    """ADM Algorithm 1 (classifier-guided ancestral sampling), eta = 1, in VE coordinates."""
    sigmas = check_grid(x, sigmas)
    run, draw = StepRunner(denoiser, x, cond, callback), noise_source(noise)
    cond = cond or {}
    for i in progress_range(len(sigmas) - 1, progress, "adm"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0_hat = run(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, 1.0)
        x_next = euler_step(x, x0_hat, sigma, sigma_down)
        if sigma_up > 0:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(log_prob_fn(xg, run.ones * sigma, **cond).sum(), xg)
            shift = scale * sigma_up**2 * math.sqrt((1 + sigma**2) / (1 + sigma_next**2))
            x_next = x_next + shift * grad + sigma_up * draw(i, x)
        x = run.after(i, x_next, sigma, sigma_next, x0_hat)
    return x
