"""Noise-aware image classifier: the UNet's encoder half with attention pooling (ADM, Dhariwal &
Nichol 2021, Sec. 4 / guided-diffusion's EncoderUNetModel), used for classifier guidance.

    clf = NoisyClassifier(ClassifierConfig(image_size=32, in_channels=1, num_classes=10))
    logits = clf(x_in, c_noise)          # same inputs as the diffusion network: c_in * x, c_noise
    feats = clf.features(x_in, c_noise)  # pooled features (B, pool_dim)

`heads` gives several classification heads at once (e.g. the shapes set's attributes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from difflab.core.denoiser import Preconditioned
from difflab.nn.base import Backbone, load_weights
from difflab.nn.embeddings import TimestepEmbedder
from difflab.nn.layers import Attention, group_norm
from difflab.nn.unet import Downsample, ResBlock, SpatialAttention, Stage
from difflab.runfolder import atomic_save_safetensors, read_json, read_safetensors, write_json

__all__ = [
    "ClassifierConfig",
    "NoisyClassifier",
    "preconditioning_of",
    "save_classifier",
    "classifier_files",
    "load_classifier",
]


@dataclass
class ClassifierConfig:
    """Hyper-parameters of the noise-aware classifier (defaults: small, for 32x32 CPU work)."""

    image_size: int = 32
    in_channels: int = 3
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 2
    num_classes: int = 10
    heads: dict[str, int] = field(default_factory=dict)  # extra named heads: name -> classes
    pool_dim: int = 128
    dropout: float = 0.0
    time_scale: float = 1.0

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")


class AttentionPool(nn.Module):
    """ADM's attention pooling: the mean token (plus positions) attends to all positions."""

    def __init__(self, channels: int, side: int, num_heads: int, out_dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(side * side + 1, channels) / channels**0.5)
        self.attn = Attention(channels, num_heads, context_dim=channels)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, h: Tensor) -> Tensor:
        tokens = h.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + self.pos  # (B, 1 + HW, C)
        pooled = self.attn(tokens[:, :1], tokens)  # (B, 1, C)
        return self.proj(pooled[:, 0])


class NoisyClassifier(Backbone):
    """Encoder half of the ADM UNet + attention pooling -> logits (or a dict of logits)."""

    arch = "classifier"
    config_cls = ClassifierConfig

    def __init__(self, config: ClassifierConfig | None = None, **overrides):
        super().__init__()
        self.config = cfg = config if config is not None else ClassifierConfig(**overrides)
        ch = cfg.channels
        emb_dim = 4 * ch
        self.time_embed = TimestepEmbedder(emb_dim, frequency_dim=ch, time_scale=cfg.time_scale)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        stages, cur, side = [], ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                stage = Stage([ResBlock(cur, emb_dim, mult * ch, dropout=cfg.dropout)])
                cur = mult * ch
                if side in cfg.attention_resolutions:
                    stage.append(SpatialAttention(cur, cfg.num_heads))
                stages.append(stage)
            if level != len(cfg.channel_mult) - 1:
                stages.append(Stage([Downsample(cur)]))
                side //= 2
        self.down = nn.ModuleList(stages)
        self.mid = Stage(
            [
                ResBlock(cur, emb_dim, dropout=cfg.dropout),
                SpatialAttention(cur, cfg.num_heads),
                ResBlock(cur, emb_dim, dropout=cfg.dropout),
            ]
        )
        self.norm_out = group_norm(cur)
        self.pool = AttentionPool(cur, side, cfg.num_heads, cfg.pool_dim)
        self.head = nn.Linear(cfg.pool_dim, cfg.num_classes)
        self.extra_heads = nn.ModuleDict({k: nn.Linear(cfg.pool_dim, n) for k, n in cfg.heads.items()})
        self._side = side

    def features(self, x: Tensor, t: Tensor | float = 0.0) -> Tensor:
        """Pooled features (B, pool_dim)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected (B, {cfg.in_channels}, H, W) input, got {tuple(x.shape)}")
        if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
            raise ValueError(
                f"classifier built for {cfg.image_size}x{cfg.image_size} images, got {tuple(x.shape[-2:])}"
            )
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(t)
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h, emb)
        h = self.mid(h, emb)
        h = torch.nn.functional.silu(self.norm_out(h))
        return self.pool(h)

    def forward(self, x: Tensor, t: Tensor | float = 0.0, *, all_heads: bool = False):
        """Logits (B, num_classes); with `all_heads`, a dict {"class": ..., name: ...}."""
        f = self.features(x, t)
        logits = self.head(f)
        if not all_heads:
            return logits
        return {"class": logits, **{k: h(f) for k, h in self.extra_heads.items()}}


# --------------------------------------------------------------------------------------------
# A classifier folder: config.json (classifier config, the preconditioning it was trained on) + weights
# --------------------------------------------------------------------------------------------


def preconditioning_of(denoiser: Preconditioned) -> dict:
    """What fixes the classifier's inputs (c_in x, c_noise): prediction, schedule, sigma_data."""
    return {
        "prediction": denoiser.prediction,
        "schedule": denoiser.schedule.to_config(),
        "sigma_data": denoiser.sigma_data,
    }


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
        raise FileNotFoundError(
            f"classifier folder {folder} does not exist (train one with `difflab train-classifier --out {folder}`)"
        )
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
    load_weights(clf, read_safetensors(weights)[0], weights, "the classifier of its config")
    return clf.eval().requires_grad_(False)
