"""DiT: a transformer on patches with adaLN-Zero blocks (Peebles & Xie 2023, arXiv 2212.09748).

Patchify by a stride-p conv, add frozen 2-D sin-cos positions, run `depth` blocks conditioned
on c = embed(t) + embed(class) through adaptive LayerNorm (shift, scale, gate for attention and
for the MLP, all from Linear(SiLU(c)) initialised to zero, so every block starts as the
identity), then an adaptive final layer (zero-initialised, so the output starts at zero) and
unpatchify. Optional cross-attention to tokens after self-attention in every block
(`context_dim`), zero-initialised too. Inputs of any size divisible by the patch size work;
the positions are computed for the actual grid.

Sizes: `DIT_SIZES` holds the paper's S/B/L/XL and tiny T/XS/M for CPU runs; names are
"DiT-<size>/<patch>" (see `difflab.nn.create_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from difflab.nn.base import Backbone
from difflab.nn.embeddings import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d
from difflab.nn.layers import Attention

__all__ = ["DiTConfig", "DiT", "DiTBlock", "FinalLayer", "DIT_SIZES"]

# size -> (hidden_size, depth, num_heads). Paper sizes (Table 1) and tiny ones for CPU.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "T": (64, 4, 2),
    "XS": (96, 6, 3),
    "M": (192, 8, 3),  # "mini": a third CPU size between XS and the paper's S
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


@dataclass
class DiTConfig:
    """DiT hyper-parameters. input_size is the side of the (latent or pixel) input.

    class_dropout_prob defaults to 0: difflab's training loop drops labels itself
    (`label_dropout`); the paper's in-model dropout is 0.1.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int | None = None  # None: same as in_channels
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int | None = 1000  # None: unconditional; else null class index = num_classes
    class_dropout_prob: float = 0.0  # labels dropped to null in training mode (CFG)
    learn_sigma: bool = True  # output 2 * out_channels: (eps, variance values)
    context_dim: int | None = None  # None: no cross-attention
    extra_in_channels: int = 0  # channels of x_cond, concatenated to x
    frequency_dim: int = 256  # size of the sinusoidal noise-level features
    time_embedding: str = "positional"  # or "fourier"
    time_scale: float = 1.0  # c_noise is multiplied by this before the embedding
    fourier_scale: float = 16.0

    def __post_init__(self):
        if self.out_channels is None:
            self.out_channels = self.in_channels
        for name in ("input_size", "patch_size", "in_channels", "out_channels", "hidden_size", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (2-D positions), got {self.hidden_size}")
        if self.extra_in_channels < 0:
            raise ValueError(f"extra_in_channels must be >= 0, got {self.extra_in_channels}")

    @property
    def image_size(self) -> int:
        """Alias of input_size, the name the UNet uses."""
        return self.input_size


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive LayerNorm output: x * (1 + scale) + shift, per sample. x (B, N, D), shift (B, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """Transformer MLP: Linear, GELU (tanh), Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: gated self-attention, optional cross-attention, gated MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = None
        if context_dim is not None:
            self.cross_norm = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = Attention(hidden_size, num_heads, context_dim=context_dim, bias=False, zero_out=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        hw: tuple[int, int] | None = None,
    ) -> Tensor:
        """x (B, N, D) tokens, c (B, D) conditioning -> (B, N, D)."""
        (shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp) = self.ada_ln(c).chunk(
            6, dim=1
        )  # 6 x (B, D)
        attn_in = modulate(self.norm1(x), shift_attn, scale_attn)
        x = x + gate_attn[:, None, :] * self.attn(attn_in, hw=hw)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), context, context_mask, hw=hw)
        x = x + gate_mlp[:, None, :] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Adaptive LayerNorm and a linear map from each token to its patch's p*p*C values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada_ln(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


# --------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------


class DiT(Backbone):
    """Diffusion transformer with adaLN-Zero conditioning on noise level and class."""

    arch = "dit"
    config_cls = DiTConfig

    def __init__(self, config: DiTConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = DiTConfig(**overrides)
        elif overrides:
            raise ValueError(f"give a config or keyword overrides, not both: {sorted(overrides)}")
        self.config = cfg = config
        d, p = cfg.hidden_size, cfg.patch_size
        self.out_channels = cfg.out_channels * (2 if cfg.learn_sigma else 1)

        # ---- embeddings ----------------------------------------------------------------------
        self.patch_embed = nn.Conv2d(cfg.in_channels + cfg.extra_in_channels, d, p, stride=p)
        grid = cfg.input_size // p
        # Frozen positions, not saved: they are a function of the grid.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, grid, grid)[None], persistent=False)
        self.time_embed = TimestepEmbedder(
            d,
            cfg.frequency_dim,
            kind=cfg.time_embedding,
            time_scale=cfg.time_scale,
            fourier_scale=cfg.fourier_scale,
        )
        self.label_embed = (
            LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob) if cfg.num_classes is not None else None
        )

        # ---- transformer ---------------------------------------------------------------------
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.context_dim) for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(d, p, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, small embeddings, zero adaLN and final layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Patch embedding initialised like a linear layer on the flattened patch.
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # (D, C, p, p) -> (D, C*p*p)
        nn.init.zeros_(self.patch_embed.bias)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.embedding_table.weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada_ln[-1].weight)
            nn.init.zeros_(block.ada_ln[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.to_out.weight)
                nn.init.zeros_(block.cross_attn.to_out.bias)
        nn.init.zeros_(self.final_layer.ada_ln[-1].weight)
        nn.init.zeros_(self.final_layer.ada_ln[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def sample_size(self) -> int:
        return self.config.input_size

    def num_patches(self, height: int | None = None, width: int | None = None) -> int:
        """Number of tokens for an input of the given (default: configured) size."""
        p = self.config.patch_size
        return ((height or self.config.input_size) // p) * ((width or self.config.input_size) // p)

    def positions(self, grid_h: int, grid_w: int, like: Tensor) -> Tensor:
        """Sin-cos positions (1, grid_h * grid_w, D) for the token grid, in `like`'s dtype."""
        grid = self.config.input_size // self.config.patch_size
        if (grid_h, grid_w) == (grid, grid):
            pos = self.pos_embed
        else:
            pos = sincos_pos_embed_2d(self.config.hidden_size, grid_h, grid_w, like.device)[None]
        return pos.to(device=like.device, dtype=like.dtype)

    def unpatchify(self, x: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """Tokens (B, h*w, p*p*C) -> image (B, C, h*p, w*p)."""
        b = x.shape[0]
        p, c = self.config.patch_size, self.out_channels
        x = x.reshape(b, grid_h, grid_w, p, p, c)  # (B, h*w, p*p*C) -> (B, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, h, w, p, p, C) -> (B, C, h, p, w, p)
        return x.reshape(b, c, grid_h * p, grid_w * p)  # (B, C, h, p, w, p) -> (B, C, h*p, w*p)

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
        p = self.config.patch_size
        height, width = x.shape[-2:]
        if height % p or width % p:
            raise ValueError(f"image size {(height, width)} is not divisible by patch_size {p}")
        grid_h, grid_w = height // p, width // p

        # ---- tokens --------------------------------------------------------------------------
        if x_cond is not None:
            x = torch.cat([x, x_cond.to(x.dtype)], dim=1)  # (B, C + C_cond, H, W)
        tokens = self.patch_embed(x)  # (B, D, h, w)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)
        tokens = tokens + self.positions(grid_h, grid_w, tokens)

        # ---- conditioning --------------------------------------------------------------------
        c = self.time_embed(t)  # (B, D)
        if self.label_embed is not None:
            c = c + self.label_embed(class_labels, x.shape[0])

        # ---- blocks --------------------------------------------------------------------------
        for block in self.blocks:
            tokens = self.run_stage(partial(block, hw=(grid_h, grid_w)), tokens, c, context, context_mask)
        tokens = self.final_layer(tokens, c)  # (B, h*w, p*p*C_out)
        return self.unpatchify(tokens, grid_h, grid_w)  # (B, C_out, H, W)
