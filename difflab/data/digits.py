"""scikit-learn's handwritten digits (UCI optdigits test set): 1797 images of 8 x 8, values 0..16.

Upsampled to 16 x 16 by bilinear interpolation (half-pixel centres, ``align_corners=False``; each
output pixel is a convex combination of input pixels, so the range stays [0, 16]) and scaled to
[-1, 1]. The train/test split is a seeded stratified split: within each class a permutation from
``torch.Generator().manual_seed(seed)`` puts round(test_fraction * count) images in test.

Usage::

    x, y = load_digits("train")            # (1437, 1, 16, 16) float32 in [-1, 1], int64 0..9
    x, y = load_digits("test", size=8)     # the original 8 x 8 grid
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CLASS_NAMES", "load_digits", "digits_split"]

CLASS_NAMES = tuple(str(d) for d in range(10))
SPLITS = ("train", "test", "all")


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    images = d.images.astype(np.float32)  # (1797, 8, 8), 0..16
    labels = d.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_split(labels: Tensor, seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """Stratified split of indices (train, test), each sorted; deterministic given seed."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def load_digits(
    split: str = "train", *, size: int = 16, seed: int = 0, test_fraction: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Digits images (N,1,size,size) float32 in [-1,1] and labels (N,) int64 in 0..9."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    if int(size) != size or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    images, labels = _raw()
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(labels.copy())
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.div_(8.0).sub_(1.0)  # 0..16 -> [-1, 1]
    if split != "all":
        train, test = digits_split(y, seed, test_fraction)
        idx = train if split == "train" else test
        x, y = x[idx], y[idx]
    return x.contiguous(), y
