"""A small image-text contrastive model (the stand-in for CLIP, which cannot be had offline here).

    model = SmallCLIP(SmallCLIPConfig(vocab=shapes_vocabulary()))
    loss = model.contrastive_loss(images, captions)          # CLIP's symmetric InfoNCE
    img = model.encode_image(images)                          # (B, dim), unit norm
    txt = model.encode_text(["a red circle on the left"])     # (B, dim), unit norm

The image encoder takes an optional noise level (`c_noise`), so the same network can be made
noise-aware (Semantic Diffusion Guidance's E'_I: fine-tuned so that E'_I(x_t, t) matches the
clean embedding E_I(x_0)). `features(x)` exposes intermediate feature maps for Gram-matrix style
losses. A real CLIP from `transformers` (a local folder) fits the same interface through
`HFCLIPWrapper` when the user has one.
"""

from __future__ import annotations

import os

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nn.base import Backbone
from difflab.nn.embeddings import TimestepEmbedder
from difflab.nn.layers import group_norm
from difflab.nn.text import WordEncoder

__all__ = ["SmallCLIPConfig", "SmallCLIP", "HFCLIPWrapper"]


@dataclass
class SmallCLIPConfig:
    vocab: list[str] = field(default_factory=list)
    in_channels: int = 3
    image_size: int = 32
    channels: int = 32
    dim: int = 128
    text_dim: int = 128
    text_depth: int = 2
    max_length: int = 16
    noise_aware: bool = True  # image encoder conditioned on c_noise (0 for clean images)


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(cin, cout, 3, padding=1), group_norm(cout)
        self.conv2, self.norm2 = nn.Conv2d(cout, cout, 3, padding=1), group_norm(cout)
        self.emb = nn.Linear(emb_dim, 2 * cout)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        return F.silu(self.norm2(self.conv2(h)) * (1 + scale) + shift)


class SmallCLIP(Backbone):
    """CNN image tower (noise-aware) + word-level transformer text tower, joint embedding space."""

    arch = "small_clip"
    config_cls = SmallCLIPConfig

    def __init__(self, config: SmallCLIPConfig | None = None, **overrides):
        super().__init__()
        self.config = cfg = config if config is not None else SmallCLIPConfig(**overrides)
        if not cfg.vocab:
            raise ValueError("SmallCLIPConfig.vocab is empty: give the caption vocabulary")
        ch, emb_dim = cfg.channels, 4 * cfg.channels
        self.time_embed = TimestepEmbedder(emb_dim, frequency_dim=ch)
        self.stem = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList(
            [_ConvBlock(ch, ch, emb_dim), _ConvBlock(ch, 2 * ch, emb_dim), _ConvBlock(2 * ch, 4 * ch, emb_dim)]
        )
        self.image_proj = nn.Linear(4 * ch, cfg.dim)
        self.text = WordEncoder(cfg.vocab, cfg.text_dim, cfg.text_depth, max_length=cfg.max_length)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # ln(1 / 0.07), as CLIP

    # ---- image tower ------------------------------------------------------------------------

    def features(self, x: Tensor, c_noise: Tensor | float = 0.0) -> list[Tensor]:
        """Feature maps after each block (for style/Gram losses): [(B, C_i, H_i, W_i)]."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected images (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        t = torch.as_tensor(c_noise if cfg.noise_aware else 0.0, dtype=torch.float32, device=x.device)
        emb = self.time_embed(t.expand(x.shape[0]) if t.ndim == 0 else t)
        h, feats = self.stem(x), []
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            feats.append(h)
            if i < len(self.blocks) - 1:
                h = F.avg_pool2d(h, 2)
        return feats

    def encode_image(self, x: Tensor, c_noise: Tensor | float = 0.0) -> Tensor:
        h = self.features(x, c_noise)[-1].mean((2, 3))  # (B, C, H, W) -> (B, C)
        return F.normalize(self.image_proj(h), dim=-1)

    # ---- text tower -------------------------------------------------------------------------

    def encode_text(self, prompts, truncate: bool = False) -> Tensor:
        states, mask = self.text(prompts, truncate)
        m = mask[..., None].to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)  # masked mean over tokens
        return F.normalize(self.text_proj(pooled), dim=-1)

    # ---- training ---------------------------------------------------------------------------

    def contrastive_loss(self, images: Tensor, captions, c_noise: Tensor | float = 0.0) -> Tensor:
        """CLIP's symmetric cross-entropy over the batch's image-caption similarity matrix."""
        img, txt = self.encode_image(images, c_noise), self.encode_text(captions)
        logits = self.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B)
        target = torch.arange(len(img), device=img.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def clip_embeds(out) -> Tensor:
    """The projected embeddings of transformers' CLIPModel.get_image/text_features: a tensor in
    transformers 4, a ModelOutput whose pooler_output holds them in transformers 5."""
    return out if isinstance(out, Tensor) else out.pooler_output


class HFCLIPWrapper(nn.Module):
    """A real CLIP from a local `transformers` folder behind SmallCLIP's interface (clean images
    only: `c_noise` is ignored, as SDG's un-finetuned baseline)."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        if not os.path.isdir(path):  # a local folder given by the user: never a hub id to download
            raise FileNotFoundError(f"CLIP folder {path} does not exist")
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.size = self.model.config.vision_config.image_size
        self.register_buffer("mean", torch.tensor([0.4815, 0.4578, 0.4082]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2686, 0.2613, 0.2758]).reshape(1, 3, 1, 1))

    def encode_image(self, x: Tensor, c_noise=None) -> Tensor:
        x = F.interpolate((x + 1) / 2, size=(self.size, self.size), mode="bicubic", align_corners=False)
        feats = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
        return F.normalize(clip_embeds(feats), dim=-1)

    def encode_text(self, prompts, truncate: bool = False) -> Tensor:
        batch = self.tokenizer(list(prompts), padding=True, truncation=truncate, return_tensors="pt")
        return F.normalize(clip_embeds(self.model.get_text_features(**batch)), dim=-1)
