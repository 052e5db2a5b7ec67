"""The Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs",
arXiv:1606.03498) with a domain classifier in Inception's place:

    IS = exp( E_x KL( p(y | x) || p(y) ) ),   p(y) = E_x p(y | x),

between 1 (every image gets the same prediction) and the number of classes (confident
predictions, all classes equally often). With difflab's Fashion-MNIST / digits / shapes
classifiers this is an analogue, comparable only between models scored by the same classifier.

Usage::

    probs = feature_extractor("fmnist").features_and_probs(samples)[1]
    score = inception_score(probs)                  # float
    mean, std = inception_score(probs, splits=10)   # the paper's 10-split mean and std
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["inception_score"]


def _score(p: Tensor) -> float:
    p_y = p.mean(0, keepdim=True)
    kl = torch.xlogy(p, p).sum(1) - (p * p_y.clamp(min=1e-300).log()).sum(1)  # KL(p(y|x) || p(y)), (N,)
    return math.exp(kl.mean().item())


def inception_score(probs: Tensor, splits: int = 1) -> float | tuple[float, float]:
    """exp(E KL(p(y|x) || p(y))) of class probabilities (N, K); with splits > 1, (mean, std) over
    that many equal parts (p(y) estimated within each part)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"probs must be (N, classes), got {tuple(p.shape)}")
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-4):
        raise ValueError("probs must be non-negative with rows summing to 1 (softmax outputs)")
    if splits == 1:
        return _score(p)
    if not 1 < splits <= len(p):
        raise ValueError(f"splits must be in [1, {len(p)}], got {splits}")
    scores = torch.tensor([_score(part) for part in p.chunk(splits)], dtype=torch.float64)
    return scores.mean().item(), scores.std().item()
