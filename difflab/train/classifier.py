"""Training ADM's noise-aware classifier (Dhariwal & Nichol 2021) on noised images.

clf, info = train_classifier(data, denoiser, steps=2000)
save_classifier(clf, "runs/clf", info, preconditioning=preconditioning_of(denoiser))   # nn/classifier.py
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from difflab.core.denoiser import Preconditioned
from difflab.core.losses import lognormal
from difflab.core.validation import MAX_LR, check_budget, check_number, check_training_state
from difflab.data import ImageData, batch_indices
from difflab.data._hash import seed_from
from difflab.nn.classifier import ClassifierConfig, NoisyClassifier, preconditioning_of

__all__ = ["train_classifier"]


def train_classifier(
    data: ImageData,
    denoiser: Preconditioned,
    *,
    steps: int | None = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    config: ClassifierConfig | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    progress: bool = True,
    minutes: float | None = None,
) -> tuple[NoisyClassifier, dict]:
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
        sigma = torch.cat(
            [low(half, g).clamp(smin, smax), (math.log(smin) + u * (math.log(smax) - math.log(smin))).exp()]
        )
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
    info = {
        "steps": step,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "preconditioning": preconditioning_of(denoiser),
    }
    return clf.eval().requires_grad_(False), info
