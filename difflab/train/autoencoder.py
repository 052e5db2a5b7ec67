"""Training the first stage of latent diffusion: the KL autoencoder (Rombach et al. 2022).

ae, info = train_autoencoder(images, AutoencoderConfig(in_channels=3, factor=4), steps=3000)
space = LatentSpace(ae, scale_factor(ae, images))      # difflab.nn.autoencoder
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from difflab.core.validation import MAX_LR, check_budget, check_number, check_training_state
from difflab.data import batch_indices
from difflab.data._hash import seed_from
from difflab.nn.autoencoder import AutoencoderConfig, AutoencoderKL

__all__ = ["train_autoencoder"]


def train_autoencoder(
    images: Tensor,
    config: AutoencoderConfig,
    *,
    steps: int | None = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    minutes: float | None = None,
    device: str | torch.device | None = None,
) -> tuple[AutoencoderKL, dict]:
    """Train the KL autoencoder (L1 + kl_weight KL) with AdamW; randomness from (seed, step).
    `device`: where to train (default: CUDA when available); the model comes back on the CPU.

    The budget is `steps`, `minutes` of wall time, or whichever ends first; the learning rate
    warms up over 100 steps, then decays by a half cosine to 10% over the budget."""
    if images.ndim != 4 or images.shape[1] != config.in_channels or images.shape[-1] != config.image_size:
        raise ValueError(
            f"images of shape {tuple(images.shape)} do not fit the autoencoder config "
            f"({config.in_channels} channels, {config.image_size} px)"
        )
    check_budget(steps, minutes)
    check_number("lr", lr, lo=0, lo_open=True, hi=MAX_LR)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    ae = AutoencoderKL(config).to(device)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr)
    t0, parts, step = time.perf_counter(), {}, 0
    bar = _bar(steps, progress, "train-autoencoder")
    while True:
        done = _fraction_done(step, steps, time.perf_counter() - t0, minutes)
        if done >= 1:
            break
        g = torch.Generator().manual_seed(seed_from(seed, step, 5))
        x = images[batch_indices(len(images), batch_size, seed, step)].to(device)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.55 + 0.45 * math.cos(math.pi * done))
        loss, parts = ae.loss(x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        check_training_state(step, loss.item(), ae.parameters(), f"lower lr (now {lr})")
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
        "device": device.type,
        **{f"final_{k}": v for k, v in parts.items()},
    }
    return ae.cpu().eval(), info


def _fraction_done(step: int, steps: int | None, seconds: float, minutes: float | None) -> float:
    """How much of the budget (steps, minutes or both: the first to end) is spent, in [0, 1]."""
    done = 0.0 if steps is None else step / max(1, steps)
    return done if minutes is None else max(done, seconds / (60 * minutes))


def _bar(steps: int | None, progress: bool, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=desc, leave=False)
