"""KL-regularised convolutional autoencoder (the first stage of latent diffusion, Rombach et al. 2022).

    ae = AutoencoderKL(AutoencoderConfig(in_channels=3, factor=4, z_channels=4))
    posterior = ae.encode(x)            # DiagonalGaussian over latents (B, z, H/f, W/f)
    z = posterior.sample(generator)     # or posterior.mode()
    x_rec = ae.decode(z)
    loss, parts = ae.loss(x, generator)  # L1 reconstruction + kl_weight * KL

`factor` f is the spatial downsampling (a power of 2: 4 and 8 are LDM's best). The latent scale
factor 1/std(z) for the diffusion stage is computed from data by `scale_factor(ae, images)` and
stored beside the weights (0.18215 is Stable Diffusion's for its own VAE).

The latent space of LDM (Rombach et al. 2022, arXiv 2112.10752; official code CompVis/latent-diffusion)
is `LatentSpace`: the autoencoder plus that scale, images <-> unit-variance latents, saved and read
back as a folder (config.json with scale_factor + model.safetensors)::

    space = LatentSpace(ae, scale_factor(ae, images))
    save_latent_space(space, "runs/ae")     # `difflab train-autoencoder` writes the same folder
    latents = load_latent_space("runs/ae").encode(images)

Its trainer is `difflab.train.autoencoder.train_autoencoder`; latent diffusion itself is the
training loop on these latents (`TrainConfig(autoencoder=...)`) and `Pipeline`'s decode.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nn.base import Backbone, load_weights
from difflab.nn.layers import group_norm
from difflab.runfolder import atomic_save_safetensors, read_json, read_safetensors, write_json

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "DiagonalGaussian",
    "scale_factor",
    "LatentSpace",
    "save_latent_space",
    "load_latent_space",
]


@dataclass
class AutoencoderConfig:
    """Hyper-parameters of the KL autoencoder."""

    in_channels: int = 3
    image_size: int = 32
    factor: int = 4  # spatial downsampling, a power of 2
    z_channels: int = 4
    channels: int = 32
    channel_mult: tuple[int, ...] | None = None  # one entry per level; default (1, 2, 2, ...)
    num_res_blocks: int = 1
    kl_weight: float = 1e-6

    def __post_init__(self):
        if self.factor < 1 or self.factor & (self.factor - 1):
            raise ValueError(f"factor must be a power of 2, got {self.factor}")
        levels = int(math.log2(self.factor)) + 1
        if self.channel_mult is None:
            self.channel_mult = tuple([1] + [2] * (levels - 1))
        self.channel_mult = tuple(self.channel_mult)
        if len(self.channel_mult) != levels:
            raise ValueError(f"factor {self.factor} needs {levels} levels in channel_mult, got {self.channel_mult}")
        if self.image_size % self.factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by factor {self.factor}")


class DiagonalGaussian:
    """N(mean, exp(logvar)) over latents, with the KL to N(0, I)."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over latent dims, (B,)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class _Res(nn.Module):
    """Residual block without time conditioning."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AutoencoderKL(Backbone):
    """Encoder -> diagonal Gaussian latent -> decoder (LDM's first stage, without the GAN term)."""

    arch = "autoencoder_kl"
    config_cls = AutoencoderConfig

    def __init__(self, config: AutoencoderConfig | None = None, **overrides):
        super().__init__()
        self.config = cfg = config if config is not None else AutoencoderConfig(**overrides)
        chans = [cfg.channels * m for m in cfg.channel_mult]
        # ---- encoder -----------------------------------------------------------------------
        enc: list[nn.Module] = [nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)]
        cur = chans[0]
        for level, c in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                enc.append(_Res(cur, c))
                cur = c
            if level != len(chans) - 1:
                enc.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
        enc += [_Res(cur, cur), group_norm(cur), nn.SiLU(), nn.Conv2d(cur, 2 * cfg.z_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        with torch.no_grad():  # start with small posterior noise (std e^-2): short runs learn to reconstruct first
            enc[-1].bias[cfg.z_channels :].fill_(-4.0)
        # ---- decoder -----------------------------------------------------------------------
        dec: list[nn.Module] = [nn.Conv2d(cfg.z_channels, cur, 3, padding=1), _Res(cur, cur)]
        for level, c in reversed(list(enumerate(chans))):
            for _ in range(cfg.num_res_blocks):
                dec.append(_Res(cur, c))
                cur = c
            if level != 0:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)]
        dec += [group_norm(cur), nn.SiLU(), nn.Conv2d(cur, cfg.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.z_channels, c.image_size // c.factor, c.image_size // c.factor)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[-1] % c.factor or x.shape[-2] % c.factor:
            raise ValueError(
                f"expected (B, {c.in_channels}, H, W) with H, W divisible by {c.factor}, got {tuple(x.shape)}"
            )
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise ValueError(f"expected latents (B, {self.config.z_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        """L1 reconstruction (per pixel) + kl_weight * KL (per pixel), as LDM's first stage."""
        x_rec, posterior = self(x, generator)
        rec = (x_rec - x).abs().flatten(1).mean(1)
        kl = posterior.kl() / x[0].numel()
        loss = (rec + self.config.kl_weight * kl).mean()
        return loss, {"rec_l1": rec.mean().item(), "kl": kl.mean().item()}


@torch.no_grad()
def scale_factor(ae: AutoencoderKL, images: Tensor, batch_size: int = 256) -> float:
    """1 / std of the latent means over `images` (LDM's rescaling to unit variance)."""
    zs = [ae.encode(images[i : i + batch_size]).mode() for i in range(0, len(images), batch_size)]
    return float(1.0 / torch.cat(zs).float().std())


class LatentSpace:
    """An autoencoder plus its latent scale factor: images <-> unit-variance latents."""

    def __init__(self, autoencoder: AutoencoderKL, scale: float):
        if not scale > 0:
            raise ValueError(f"latent scale factor must be positive, got {scale}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale = float(scale)

    @torch.no_grad()
    def encode(
        self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None, batch_size: int = 256
    ) -> Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            post = self.autoencoder.encode(images[i : i + batch_size])
            out.append((post.sample(generator) if sample else post.mode()) * self.scale)
        return torch.cat(out)

    def decode(self, latents: Tensor, batch_size: int = 256) -> Tensor:
        out = [
            self.autoencoder.decode(latents[i : i + batch_size] / self.scale)
            for i in range(0, len(latents), batch_size)
        ]
        return torch.cat(out)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape


def save_latent_space(space: LatentSpace, folder: str | Path, info: dict | None = None, **meta) -> Path:
    """config.json (kind, autoencoder config, scale_factor, info, `meta`) + model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(space.autoencoder.state_dict(), folder / "model.safetensors")
    write_json(
        folder / "config.json",
        {
            "kind": "autoencoder",
            "model": space.autoencoder.config_dict(),
            "scale_factor": space.scale,
            "info": info or {},
            **meta,
        },
    )
    return folder


def load_latent_space(folder: str | Path) -> LatentSpace:
    """The latent space of a folder written by `save_latent_space` (or `difflab train-autoencoder`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"autoencoder folder {folder} does not exist (train one with `difflab train-autoencoder --out {folder}`)"
        )
    config, weights = folder / "config.json", folder / "model.safetensors"
    if not config.exists() and (folder / "autoencoder.json").exists():  # written before config.json
        config, weights = folder / "autoencoder.json", folder / "autoencoder.safetensors"
    meta = read_json(config)
    model = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(model, dict) or model.get("arch") != AutoencoderKL.arch or "scale_factor" not in meta:
        raise ValueError(f"{config} does not describe a difflab autoencoder with a scale factor")
    ae = AutoencoderKL.from_config_dict(model)
    load_weights(ae, read_safetensors(weights)[0], weights, "the autoencoder of its config")
    return LatentSpace(ae, meta["scale_factor"])
