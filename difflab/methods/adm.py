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

    clf, info = train_classifier(data, denoiser, steps=2000)            # on noised images
    save_classifier(clf, "runs/clf", info)      # config.json + model.safetensors (`difflab train-classifier`)
    log_p = classifier_log_prob(clf, denoiser)
    guided = classifier_guidance(log_p, scale=2.0)(denoiser)            # eps (DDIM) form
    x0 = sample(guided, x, sigmas, cond={"class_labels": y})
    x0 = sample_ancestral_guided(denoiser, x, sigmas, log_p, 2.0, cond={"class_labels": y})
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.core.denoiser import Preconditioned
from difflab.core.guidance import classifier_guidance
from difflab.core.losses import lognormal
from difflab.core.sampling import check_grid, noise_source, StepRunner, progress_range, ancestral_step, euler_step
from difflab.core.validation import MAX_LR, check_budget, check_number, check_training_state
from difflab.data import ImageData, batch_indices
from difflab.data._hash import seed_from
from difflab.nn.classifier import ClassifierConfig, NoisyClassifier
from difflab.runfolder import atomic_save_safetensors, read_json, read_safetensors, write_json

__all__ = ["classifier_log_prob", "classifier_guidance", "sample_ancestral_guided", "train_classifier",
           "save_classifier", "load_classifier", "classifier_files", "preconditioning_of"]


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


def sample_ancestral_guided(denoiser, x, sigmas, log_prob_fn, scale: float, *, cond=None, callback=None,
                            noise=None, progress=False):
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


def train_classifier(data: ImageData, denoiser: Preconditioned, *, steps: int | None = 2000, batch_size: int = 128,
                     lr: float = 1e-3, seed: int = 0, config: ClassifierConfig | None = None,
                     p_mean: float = -1.2, p_std: float = 1.2, progress: bool = True,
                     minutes: float | None = None) -> tuple[NoisyClassifier, dict]:
    """Train a noise-aware classifier on x0 + sigma n, sigma ~ the diffusion training distribution.

    Half of each batch is drawn at low noise (sigma ~ lognormal) and half log-uniformly over the
    schedule's range, so the classifier is useful at every step of sampling. The budget is
    `steps`, `minutes` of wall time, or whichever ends first. `info` records the denoiser's
    preconditioning: guidance must feed the classifier the same (c_in x, c_noise).
    """
    if data.labels is None:
        raise ValueError(f"dataset {data.name!r} has no labels to classify")
    check_budget(steps, minutes)
    check_number("lr", lr, lo=0, lo_open=True, hi=MAX_LR)
    C, H = data.images.shape[1], data.images.shape[-1]
    k = len(data.class_names) or int(data.labels.max()) + 1
    config = config or ClassifierConfig(image_size=H, in_channels=C, num_classes=k)
    torch.manual_seed(seed)
    clf = NoisyClassifier(config)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.05)
    smin, smax = denoiser.schedule.sigma_min, denoiser.schedule.sigma_max
    low = lognormal(p_mean, p_std)
    t0, n, losses, step = time.perf_counter(), len(data.images), [], 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train-classifier", leave=False)
    while (steps is None or step < steps) and (minutes is None or time.perf_counter() - t0 < 60 * minutes):
        g = torch.Generator().manual_seed(seed_from(seed, step, 7))
        idx = batch_indices(n, batch_size, seed, step)
        x0, y = data.images[idx], data.labels[idx]
        half = batch_size // 2
        u = torch.rand(batch_size - half, generator=g, dtype=torch.float64)
        sigma = torch.cat([low(half, g).clamp(smin, smax),
                           (math.log(smin) + u * (math.log(smax) - math.log(smin))).exp()])
        x = x0 + sigma.float().reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
        _, _, c_in, c_noise = denoiser.coeffs_for(x, sigma)
        loss = F.cross_entropy(clf(c_in * x, c_noise), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        check_training_state(step, losses[-1], clf.parameters(), f"lower lr (now {lr})")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    info = {"steps": step, "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": time.perf_counter() - t0,
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
            "preconditioning": preconditioning_of(denoiser)}
    return clf.eval().requires_grad_(False), info


def preconditioning_of(denoiser: Preconditioned) -> dict:
    """What fixes the classifier's inputs (c_in x, c_noise): prediction, schedule, sigma_data."""
    return {"prediction": denoiser.prediction, "schedule": denoiser.schedule.to_config(),
            "sigma_data": denoiser.sigma_data}


def save_classifier(clf: NoisyClassifier, folder: str | Path, info: dict | None = None, **meta) -> Path:
    """config.json (kind, classifier config, info, `meta`) + model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(clf.state_dict(), folder / "model.safetensors")
    write_json(folder / "config.json", {"kind": "classifier", "model": clf.config_dict(), "info": info or {}, **meta})
    return folder


def classifier_files(folder: str | Path) -> tuple[Path, Path]:
    """(config, weights) of a classifier folder; folders written before config.json keep classifier.*."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"classifier folder {folder} does not exist "
                                f"(train one with `difflab train-classifier --out {folder}`)")
    if not (folder / "config.json").exists() and (folder / "classifier.json").exists():
        return folder / "classifier.json", folder / "classifier.safetensors"
    return folder / "config.json", folder / "model.safetensors"


def load_classifier(folder: str | Path) -> NoisyClassifier:
    config, weights = classifier_files(folder)
    meta = read_json(config)
    model = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(model, dict) or model.get("arch") != "classifier":
        raise ValueError(f"{config} does not describe a difflab noisy classifier")
    clf = NoisyClassifier.from_config_dict(model)
    state, _ = read_safetensors(weights)
    try:
        clf.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not fit its config: {e}") from None
    return clf.eval().requires_grad_(False)
