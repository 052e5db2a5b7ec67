"""Embeddings shared by the UNet and the DiT: noise level, class label, 2-D position.

The networks receive the noise level as `c_noise` from `core.Preconditioned`: 0..999 for a
discrete VP model, a continuous t in [0, 1], or ln(sigma)/4 for EDM. The sinusoidal embedding
resolves frequencies down to 1/max_period, so a narrow range of c_noise wants either a
`time_scale` (e.g. 1000 for t in [0, 1]) or random Fourier features (`kind="fourier"`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "timestep_embedding",
    "FourierFeatures",
    "TimestepEmbedder",
    "LabelEmbedder",
    "drop_labels",
    "sincos_pos_embed_2d",
]


# --------------------------------------------------------------------------------------------
# Noise level
# --------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half).

    t: (B,) float (any real values; fractional is fine) -> (B, dim) float32.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


class FourierFeatures(nn.Module):
    """Random Fourier features [cos(2 pi t w_i), sin(2 pi t w_i)], w_i ~ N(0, scale^2)."""

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"FourierFeatures needs an even dim, got {dim}")
        generator = torch.Generator().manual_seed(seed)
        # Persistent buffer: the frequencies are part of the trained model.
        self.register_buffer("freqs", torch.randn(dim // 2, generator=generator) * scale)

    def forward(self, t: Tensor) -> Tensor:
        args = 2 * math.pi * t.to(torch.float32)[:, None] * self.freqs.float()[None, :]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Noise-level embedding: frequency features of `time_scale * t`, then Linear-SiLU-Linear.

    kind: "positional" (sinusoidal, as ADM and DiT) or "fourier" (random features, as NCSN++).
    """

    def __init__(
        self,
        dim: int,
        frequency_dim: int = 256,
        *,
        kind: str = "positional",
        time_scale: float = 1.0,
        fourier_scale: float = 16.0,
        max_period: float = 10000.0,
    ):
        super().__init__()
        if kind not in ("positional", "fourier"):
            raise ValueError(f"time embedding kind must be 'positional' or 'fourier', got {kind!r}")
        self.kind = kind
        self.frequency_dim = frequency_dim
        self.time_scale = float(time_scale)
        self.max_period = float(max_period)
        self.fourier = FourierFeatures(frequency_dim, fourier_scale) if kind == "fourier" else None
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        t = t.to(torch.float32) * self.time_scale
        if self.fourier is not None:
            features = self.fourier(t)
        else:
            features = timestep_embedding(t, self.frequency_dim, self.max_period)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, dim)


# --------------------------------------------------------------------------------------------
# Class label (with a null class for classifier-free guidance)
# --------------------------------------------------------------------------------------------


def drop_labels(labels: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null label -1 with probability p (classifier-free training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label drop probability must be in [0, 1], got {p}")
    if p == 0.0:
        return labels
    device = generator.device if generator is not None else labels.device
    drop = (torch.rand(labels.shape, generator=generator, device=device) < p).to(labels.device)
    return torch.where(drop, torch.full_like(labels, -1), labels)


class LabelEmbedder(nn.Module):
    """Class-label embedding table with one extra null row, index `num_classes`.

    A label of -1 (or `num_classes`), or `labels=None`, selects the null row. In training mode
    each label is also dropped to null with probability `dropout_prob`.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout_prob <= 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1], got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_index(self) -> int:
        return self.num_classes

    def to_indices(self, labels: Tensor | None, batch_size: int) -> Tensor:
        """Labels (B,) with -1 for null -> table indices (B,) with `num_classes` for null."""
        device = self.embedding_table.weight.device
        if labels is None:
            return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.shape != (batch_size,):
            raise ValueError(f"class labels must have shape ({batch_size},), got {tuple(labels.shape)}")
        bad = (labels < -1) | (labels > self.num_classes)
        if labels.device.type != "meta" and bad.any():  # meta: shapes only (FLOP counting)
            raise ValueError(
                f"class label {labels[bad][0].item()} out of range: expected 0..{self.num_classes - 1}"
                f" or -1 / {self.num_classes} for the null class"
            )
        labels = labels.long()
        return torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor | None, batch_size: int) -> Tensor:
        indices = self.to_indices(labels, batch_size)
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(indices.shape, device=indices.device) < self.dropout_prob
            indices = torch.where(drop, torch.full_like(indices, self.num_classes), indices)
        return self.embedding_table(indices)  # (B, dim)


# --------------------------------------------------------------------------------------------
# 2-D position
# --------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """positions (N,) -> (N, dim): [sin(p w_i), cos(p w_i)], w_i = 10000^(-i/(dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega  # (dim/2,)
    args = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (N, dim)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, device=None) -> Tensor:
    """Fixed 2-D sin-cos position embedding for a grid_h x grid_w grid, row-major: (h*w, dim).

    The first half of the channels encodes the column (x), the second half the row (y).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float64, device=device)
    cols = torch.arange(grid_w, dtype=torch.float64, device=device)
    row, col = torch.meshgrid(rows, cols, indexing="ij")  # each (h, w)
    emb_x = _sincos_1d(dim // 2, col.reshape(-1))  # (h*w, dim/2)
    emb_y = _sincos_1d(dim // 2, row.reshape(-1))  # (h*w, dim/2)
    return torch.cat([emb_x, emb_y], dim=1).to(torch.float32)  # (h*w, dim)
