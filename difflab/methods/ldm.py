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
    save_latent_space(space, "runs/ae")
    latents = space.encode(images)                  # train any diffusion model on these
    images = space.decode(sample(denoiser, z_T, sigmas, cond=text_cond))
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from difflab.core.sampling import progress_range
from difflab.data import batch_indices
from difflab.data._hash import seed_from
from difflab.nn.autoencoder import AutoencoderConfig, AutoencoderKL, scale_factor
from difflab.train.checkpoint import atomic_save_safetensors, read_json, read_safetensors, write_json

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


def train_autoencoder(images: Tensor, config: AutoencoderConfig, *, steps: int = 2000, batch_size: int = 64,
                      lr: float = 1e-3, seed: int = 0, progress: bool = True) -> tuple[AutoencoderKL, dict]:
    """Train the KL autoencoder (L1 + kl_weight KL) with AdamW; randomness from (seed, step)."""
    if images.ndim != 4 or images.shape[1] != config.in_channels or images.shape[-1] != config.image_size:
        raise ValueError(f"images of shape {tuple(images.shape)} do not fit the autoencoder config "
                         f"({config.in_channels} channels, {config.image_size} px)")
    torch.manual_seed(seed)
    ae = AutoencoderKL(config)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr)
    t0, parts = time.perf_counter(), {}
    for step in progress_range(steps, progress, "train-autoencoder"):
        g = torch.Generator().manual_seed(seed_from(seed, step, 5))
        x = images[batch_indices(len(images), batch_size, seed, step)]
        for group in opt.param_groups:  # short warm-up, then cosine decay to 10%
            warm = min(1.0, (step + 1) / 100)
            group["lr"] = lr * warm * (0.55 + 0.45 * torch.cos(torch.tensor(step / steps * 3.14159)).item())
        loss, parts = ae.loss(x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "seconds": time.perf_counter() - t0, **{f"final_{k}": v for k, v in parts.items()}}
    return ae.eval(), info


def save_latent_space(space: LatentSpace, folder: str | Path, info: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(space.autoencoder.state_dict(), folder / "autoencoder.safetensors")
    write_json(folder / "autoencoder.json", {"model": space.autoencoder.config_dict(), "scale_factor": space.scale,
                                             "info": info or {}})
    return folder


def load_latent_space(folder: str | Path) -> LatentSpace:
    folder = Path(folder)
    meta = read_json(folder / "autoencoder.json")
    if meta.get("model", {}).get("arch") != AutoencoderKL.arch or "scale_factor" not in meta:
        raise ValueError(f"{folder / 'autoencoder.json'} does not describe a difflab autoencoder with a scale factor")
    ae = AutoencoderKL.from_config_dict(meta["model"])
    state, _ = read_safetensors(folder / "autoencoder.safetensors")
    try:
        ae.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{folder / 'autoencoder.safetensors'} does not fit its config: {e}") from None
    return LatentSpace(ae, meta["scale_factor"])
