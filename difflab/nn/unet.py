"""ADM-style UNet (Dhariwal & Nichol 2021, arXiv 2105.05233), with LDM-style cross-attention.

Residual blocks with the noise-level (+ class) embedding, optionally as adaptive group norm
(`use_scale_shift_norm`: GroupNorm(h) * (1 + scale) + shift) and BigGAN-style up/down sampling
inside residual blocks (`resblock_updown`); multi-head self-attention at chosen resolutions;
cross-attention to tokens (query from the UNet, key/value from `context`) when `context_dim` is
set; Palette-style conditioning by concatenating `x_cond` to the input; a doubled output for a
learned variance (Improved DDPM). The last conv of every residual block, every attention output
projection and the output conv start at zero, so the network outputs zero at init.

The bottleneck (Asyrp's h-space) is the output of `unet.mid`, a module called once per
forward as `unet.mid(h, emb, context, context_mask)`. Read or replace it with a torch forward
hook::

    def shift_h(module, args, h):
        return h + delta_h          # returning a tensor replaces the bottleneck
    handle = unet.mid.register_forward_hook(shift_h)
    ...
    handle.remove()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nn.base import Backbone
from difflab.nn.embeddings import LabelEmbedder, TimestepEmbedder
from difflab.nn.layers import Attention, group_norm, zero_module

__all__ = ["UNetConfig", "UNet", "ResBlock", "SpatialAttention"]


@dataclass
class UNetConfig:
    """ADM UNet hyper-parameters.

    attention_resolutions are absolute feature-map sides, in pixels of an input of side
    `image_size`: with image_size=32 and channel_mult=(1, 2, 2) the levels have sides 32, 16, 8,
    so attention_resolutions=(16,) puts attention at the second level. The network accepts other
    input sizes (divisible by 2^(levels-1)); attention stays at the levels chosen here.
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None  # None: same as in_channels
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    mid_attention: bool = True  # self-attention (and cross-attention) in the middle block
    num_heads: int = 4
    head_channels: int | None = None  # if set, heads = channels // head_channels (overrides num_heads)
    dropout: float = 0.0
    num_classes: int | None = None  # None: unconditional; else null class index = num_classes
    class_dropout_prob: float = 0.0  # in-model label dropout (training mode); the loop has its own
    context_dim: int | None = None  # None: no cross-attention
    extra_in_channels: int = 0  # channels of x_cond, concatenated to x
    learn_sigma: bool = False  # output 2 * out_channels: (eps or x0 or v, variance values)
    resblock_updown: bool = True  # BigGAN-style down/up sampling inside residual blocks
    use_scale_shift_norm: bool = True  # GroupNorm(h) * (1 + scale) + shift
    time_embedding: str = "positional"  # or "fourier"
    time_scale: float = 1.0  # c_noise is multiplied by this before the embedding
    fourier_scale: float = 16.0

    def __post_init__(self):
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if not self.channel_mult:
            raise ValueError("channel_mult must name at least one level, got ()")
        for name in ("image_size", "in_channels", "out_channels", "channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.extra_in_channels < 0:
            raise ValueError(f"extra_in_channels must be >= 0, got {self.extra_in_channels}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by {factor} "
                f"(2^(levels-1) for channel_mult={self.channel_mult})"
            )
        sides = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        unknown = [r for r in self.attention_resolutions if r not in sides]
        if unknown:
            raise ValueError(f"attention_resolutions {unknown} match no level; the level sides are {sides}")
        if self.context_dim is not None and not (self.attention_resolutions or self.mid_attention):
            raise ValueError(
                f"context_dim={self.context_dim} needs attention somewhere: "
                "set attention_resolutions or mid_attention=True"
            )

    def heads_for(self, channels: int) -> int:
        """Number of attention heads for a block of `channels` channels."""
        if self.head_channels is None:
            if channels % self.num_heads:
                raise ValueError(f"{channels} channels are not divisible by num_heads={self.num_heads}")
            return self.num_heads
        if channels % self.head_channels:
            raise ValueError(f"{channels} channels are not divisible by head_channels={self.head_channels}")
        return channels // self.head_channels


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class Downsample(nn.Module):
    """Halve the spatial size: stride-2 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding, optionally resampling (BigGAN-style).

    resample: None, "down" (2x2 average pool) or "up" (nearest), applied to both paths
    between the first norm-activation and the first conv.
    """

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        out_channels: int | None = None,
        *,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        resample: str | None = None,
    ):
        super().__init__()
        out_channels = out_channels or channels
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm_in = group_norm(channels)
        self.conv_in = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.norm_out = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm_in(x))
        h = self.conv_in(self._resample(h))
        x = self._resample(x)
        emb_out = self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, C or 2C) -> (B, C or 2C, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.norm_out(h) * (1 + scale) + shift
        else:
            h = self.norm_out(h + emb_out)
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Self-attention over the H*W positions, then (optionally) cross-attention to tokens."""

    def __init__(self, channels: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        self.norm = group_norm(channels)
        self.self_attn = Attention(channels, num_heads, zero_out=True)
        self.cross_attn = None
        if context_dim is not None:
            self.cross_norm = nn.LayerNorm(channels)
            self.cross_attn = Attention(channels, num_heads, context_dim=context_dim, bias=False, zero_out=True)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        normed = self.norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        tokens = tokens + self.self_attn(normed, hw=(h, w))
        if self.cross_attn is not None:
            tokens = tokens + self.cross_attn(self.cross_norm(tokens), context, context_mask, hw=(h, w))
        return tokens.transpose(1, 2).reshape(b, c, h, w)  # (B, H*W, C) -> (B, C, H, W)


class Stage(nn.ModuleList):
    """A sequence of layers, each called with the inputs its kind needs."""

    def forward(
        self,
        h: Tensor,
        emb: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialAttention):
                h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return h


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------


class UNet(Backbone):
    """ADM UNet: encoder, middle block (`self.mid`, the h-space), decoder with skip connections."""

    arch = "unet"
    config_cls = UNetConfig

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = UNetConfig(**overrides)
        elif overrides:
            raise ValueError(f"give a config or keyword overrides, not both: {sorted(overrides)}")
        self.config = cfg = config
        ch = cfg.channels
        emb_dim = 4 * ch

        def resblock(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(
                cin,
                emb_dim,
                cout,
                dropout=cfg.dropout,
                use_scale_shift_norm=cfg.use_scale_shift_norm,
                resample=resample,
            )

        def attention(channels: int) -> SpatialAttention:
            return SpatialAttention(channels, cfg.heads_for(channels), cfg.context_dim)

        # ---- conditioning embeddings ---------------------------------------------------------
        self.time_embed = TimestepEmbedder(
            emb_dim,
            frequency_dim=ch,
            kind=cfg.time_embedding,
            time_scale=cfg.time_scale,
            fourier_scale=cfg.fourier_scale,
        )
        self.label_embed = (
            LabelEmbedder(cfg.num_classes, emb_dim, cfg.class_dropout_prob) if cfg.num_classes is not None else None
        )

        # ---- encoder -------------------------------------------------------------------------
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.extra_in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [ch]
        cur = ch
        side = cfg.image_size
        num_levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                stage = Stage([resblock(cur, mult * ch)])
                cur = mult * ch
                if side in cfg.attention_resolutions:
                    stage.append(attention(cur))
                self.down.append(stage)
                skip_channels.append(cur)
            if level != num_levels - 1:
                sampler = resblock(cur, cur, "down") if cfg.resblock_updown else Downsample(cur)
                self.down.append(Stage([sampler]))
                skip_channels.append(cur)
                side //= 2

        # ---- middle (h-space) ----------------------------------------------------------------
        self.mid = Stage([resblock(cur, cur)])
        if cfg.mid_attention:
            self.mid.append(attention(cur))
        self.mid.append(resblock(cur, cur))

        # ---- decoder -------------------------------------------------------------------------
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                stage = Stage([resblock(cur + skip_channels.pop(), mult * ch)])
                cur = mult * ch
                if side in cfg.attention_resolutions:
                    stage.append(attention(cur))
                if level != 0 and i == cfg.num_res_blocks:
                    stage.append(resblock(cur, cur, "up") if cfg.resblock_updown else Upsample(cur))
                    side *= 2
                self.up.append(stage)
        assert not skip_channels

        # ---- output --------------------------------------------------------------------------
        self.norm_out = group_norm(cur)
        out = cfg.out_channels * (2 if cfg.learn_sigma else 1)
        self.conv_out = zero_module(nn.Conv2d(cur, out, 3, padding=1))

    @property
    def sample_size(self) -> int:
        return self.config.image_size

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        x_cond: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W), t (B,) -> (B, out_channels * (2 if learn_sigma else 1), H, W)."""
        t, context_mask = self.check_inputs(x, t, class_labels, context, context_mask, x_cond)
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} is not divisible by {factor} "
                f"(2^(levels-1) for channel_mult={self.config.channel_mult})"
            )

        emb = self.time_embed(t)  # (B, 4 * channels)
        if self.label_embed is not None:
            emb = emb + self.label_embed(class_labels, x.shape[0])
        if x_cond is not None:
            x = torch.cat([x, x_cond.to(x.dtype)], dim=1)  # (B, C + C_cond, H, W)

        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = self.run_stage(stage, h, emb, context, context_mask)
            skips.append(h)
        h = self.run_stage(self.mid, h, emb, context, context_mask)
        for stage in self.up:
            skip = skips.pop()
            h = torch.cat([h, skip.to(h.dtype)], dim=1)  # (B, C_h + C_skip, H, W)
            h = self.run_stage(stage, h, emb, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))
