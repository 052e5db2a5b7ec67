"""DreamBooth's scores (Ruiz et al. 2023, section 4.1) on any feature extractor.

    subject_similarity(f, ref)   per sample, the mean cosine similarity of its features to a subject's
                                 real images' features (DINO / CLIP-I with those extractors; PRES when
                                 the samples are of the plain class prompt)
    pairwise_distance(f)         mean 1 - cos over distinct pairs of one prompt's samples (the paper's
                                 DIV uses LPIPS; any features work)
    gini_simpson(labels, k)      the chance that two samples drawn with replacement differ in a
                                 discrete attribute (1 - sum p^2): diversity of, e.g., predicted colours

Features are rows of (N, D); they are L2-normalised here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["subject_similarity", "pairwise_distance", "gini_simpson"]


def _unit(f: Tensor) -> Tensor:
    if f.ndim != 2 or len(f) < 1:
        raise ValueError(f"features must be (N, D) with N >= 1, got shape {tuple(f.shape)}")
    return F.normalize(f.double(), dim=1)


def subject_similarity(f: Tensor, ref: Tensor) -> Tensor:
    """(N,): each sample's mean cosine similarity to the reference images' features."""
    return (_unit(f) @ _unit(ref).T).mean(1)


def pairwise_distance(f: Tensor) -> float:
    """Mean 1 - cos over the N (N - 1) ordered pairs of distinct rows (repeated rows count as distance 0)."""
    n = len(f)
    if n < 2:
        raise ValueError(f"pairwise_distance needs at least 2 samples, got {n}")
    u = _unit(f)
    return float((1 - u @ u.T).sum() / (n * (n - 1)))  # the diagonal adds 0


def gini_simpson(labels: Tensor, k: int) -> float:
    """1 - sum_c p_c^2 over the k classes of integer labels (N,)."""
    if labels.numel() < 1:
        raise ValueError("gini_simpson needs at least one label")
    p = torch.bincount(labels.reshape(-1).long(), minlength=k).double() / labels.numel()
    return float(1 - (p**2).sum())
