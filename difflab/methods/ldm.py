"""High-Resolution Image Synthesis with Latent Diffusion Models (LDM).
Rombach et al. 2022, https://arxiv.org/abs/2112.10752 (official code: CompVis/latent-diffusion).

Notation (paper -> difflab):
    E, D (first stage)          -> `AutoencoderKL.encode` / `.decode` (nn/autoencoder.py)
    z = E(x), scaled by 1/std   -> `LatentSpace.encode(x)` = scale * E(x).mode() (or .sample())
    eps_theta(z_t, t, tau(y))   -> any difflab denoiser on latents; tau = a text encoder's token
                                   states through the UNet's cross-attention (nn/text.py)
    f (downsampling factor)     -> AutoencoderConfig.factor (4 and 8 are the paper's best)

Usage::

    ae, info = train_autoencoder(images, AutoencoderConfig(in_channels=3, factor=4), steps=3000)
    space = LatentSpace(ae, scale_factor(ae, images))
    save_latent_space(space, "runs/ae")             # config.json (with scale_factor) + model.safetensors
    space = load_latent_space("runs/ae")            # `difflab train-autoencoder` writes the same folder
    latents = space.encode(images)                  # train any diffusion model on these
    images = space.decode(sample(denoiser, z_T, sigmas, cond=text_cond))
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import Tensor

from difflab.core.validation import MAX_LR, check_budget, check_number, check_training_state
from difflab.data import batch_indices
from difflab.data._hash import seed_from
from difflab.nn.autoencoder import AutoencoderConfig, AutoencoderKL, scale_factor
from difflab.runfolder import atomic_save_safetensors, read_json, read_safetensors, write_json

__all__ = ["LatentSpace", "train_autoencoder", "save_latent_space", "load_latent_space", "scale_factor"]


class LatentSpace:
    """An autoencoder plus its latent scale factor: images <-> unit-variance latents."""

    def __init__(self, autoencoder: AutoencoderKL, scale: float):
        if not scale > 0:
            raise ValueError(f"latent scale factor must be positive, got {scale}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale = float(scale)

    @torch.no_grad()
    def encode(self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
               batch_size: int = 256) -> Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            post = self.autoencoder.encode(images[i:i + batch_size])
            out.append((post.sample(generator) if sample else post.mode()) * self.scale)
        return torch.cat(out)

    def decode(self, latents: Tensor, batch_size: int = 256) -> Tensor:
        out = [self.autoencoder.decode(latents[i:i + batch_size] / self.scale)
               for i in range(0, len(latents), batch_size)]
        return torch.cat(out)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape


def train_autoencoder(images: Tensor, config: AutoencoderConfig, *, steps: int | None = 2000, batch_size: int = 64,
                      lr: float = 1e-3, seed: int = 0, progress: bool = True,
                      minutes: float | None = None, device: str | torch.device | None = None
                      ) -> tuple[AutoencoderKL, dict]:
    """Train the KL autoencoder (L1 + kl_weight KL) with AdamW; randomness from (seed, step).
    `device`: where to train (default: CUDA when available); the model comes back on the CPU.

    The budget is `steps`, `minutes` of wall time, or whichever ends first; the learning rate
    warms up over 100 steps, then decays by a half cosine to 10% over the budget."""
    if images.ndim != 4 or images.shape[1] != config.in_channels or images.shape[-1] != config.image_size:
        raise ValueError(f"images of shape {tuple(images.shape)} do not fit the autoencoder config "
                         f"({config.in_channels} channels, {config.image_size} px)")
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
    info = {"steps": step, "batch_size": batch_size, "lr": lr, "seed": seed,
            "seconds": time.perf_counter() - t0, "device": device.type,
            **{f"final_{k}": v for k, v in parts.items()}}
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


def save_latent_space(space: LatentSpace, folder: str | Path, info: dict | None = None, **meta) -> Path:
    """config.json (kind, autoencoder config, scale_factor, info, `meta`) + model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(space.autoencoder.state_dict(), folder / "model.safetensors")
    write_json(folder / "config.json", {"kind": "autoencoder", "model": space.autoencoder.config_dict(),
                                        "scale_factor": space.scale, "info": info or {}, **meta})
    return folder


def load_latent_space(folder: str | Path) -> LatentSpace:
    """The latent space of a folder written by `save_latent_space` (or `difflab train-autoencoder`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"autoencoder folder {folder} does not exist "
                                f"(train one with `difflab train-autoencoder --out {folder}`)")
    config, weights = folder / "config.json", folder / "model.safetensors"
    if not config.exists() and (folder / "autoencoder.json").exists():  # written before config.json
        config, weights = folder / "autoencoder.json", folder / "autoencoder.safetensors"
    meta = read_json(config)
    model = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(model, dict) or model.get("arch") != AutoencoderKL.arch or "scale_factor" not in meta:
        raise ValueError(f"{config} does not describe a difflab autoencoder with a scale factor")
    ae = AutoencoderKL.from_config_dict(model)
    state, _ = read_safetensors(weights)
    try:
        ae.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not fit its config: {e}") from None
    return LatentSpace(ae, meta["scale_factor"])
