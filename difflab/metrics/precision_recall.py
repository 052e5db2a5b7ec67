"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models", arXiv:1904.06991).

Each set of features is a union of balls: around every point, a ball reaching its k-th nearest
neighbour in the same set (k = 3 in the paper). Then

    precision = fraction of generated points inside the real manifold   (fidelity)
    recall    = fraction of real points inside the generated manifold   (coverage)

Distances are Euclidean in feature space, computed in blocks (memory O(block * N)).

Usage::

    pr = precision_recall(real_features, fake_features, k=3)   # {"precision": ..., "recall": ...}
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["knn_radii", "in_manifold", "precision_recall"]


def _as_features(f, name: str) -> Tensor:
    f = torch.as_tensor(f)
    if f.ndim != 2:
        raise ValueError(f"{name} must be (N, d), got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contain NaN/inf values")
    return f


def knn_radii(features: Tensor, k: int = 3, block: int = 1024) -> Tensor:
    """Distance from each point to its k-th nearest other point of the same set, (N,)."""
    f = _as_features(features, "features")
    if not 1 <= k < len(f):
        raise ValueError(f"k must be in [1, {len(f) - 1}] for {len(f)} points, got {k}")
    out = []
    for a in range(0, len(f), block):
        d = torch.cdist(f[a : a + block], f)  # (b, N)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # [:, 0] is the point itself
    return torch.cat(out)


def in_manifold(points: Tensor, support: Tensor, radii: Tensor, block: int = 1024) -> Tensor:
    """For each point, whether some support point s_i has ||point - s_i|| <= radii_i, (N,) bool."""
    out = []
    for a in range(0, len(points), block):
        d = torch.cdist(points[a : a + block], support)  # (b, M)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


@torch.no_grad()
def precision_recall(real: Tensor, fake: Tensor, k: int = 3, block: int = 1024) -> dict[str, float]:
    """Kynkaanniemi et al.'s precision and recall of `fake` against `real` features."""
    real, fake = _as_features(real, "real features"), _as_features(fake, "fake features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]}")
    dtype = torch.promote_types(real.dtype, fake.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    real, fake = real.to(dtype), fake.to(dtype)
    precision = in_manifold(fake, real, knn_radii(real, k, block), block).double().mean().item()
    recall = in_manifold(real, fake, knn_radii(fake, k, block), block).double().mean().item()
    return {"precision": precision, "recall": recall}
