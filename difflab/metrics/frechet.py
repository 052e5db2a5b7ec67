"""Frechet distance between Gaussians fitted to features (Heusel et al. 2017, "GANs trained by a
two time-scale update rule converge to a local Nash equilibrium", arXiv:1706.08500).

    FD = ||mu_1 - mu_2||^2 + tr(C_1) + tr(C_2) - 2 tr((C_1 C_2)^{1/2})

in float64; (C_1 C_2)^{1/2} by scipy's `sqrtm`. C_1 C_2 is similar to the PSD matrix
C_1^{1/2} C_2 C_1^{1/2}, so its square root has real non-negative eigenvalues; round-off can
leave a small imaginary part (dropped when it is below 1e-3 of the trace scale, an error above)
or a singular product (then eps I is added to both covariances, as pytorch-fid does).
With Inception-v3 pool3 features this is FID; with a domain classifier's penultimate layer
(difflab.metrics.classifiers) it is FD-FMNIST, FD-digits, FD-shapes.

Features are accumulated in float64 by `GaussianStats` (sums of x and x x^T, shifted by the first
batch's mean against cancellation), so 60,000 images never sit in memory as features.

Usage::

    stats = GaussianStats(); stats.update(features_a); mu1, cov1 = stats.mean_cov()
    fd = frechet_distance(mu1, cov1, mu2, cov2)
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

__all__ = ["frechet_distance", "GaussianStats", "mean_cov"]


def _as_np64(a) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^{1/2}) between two Gaussians (float64)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(_as_np64(mu1)), np.atleast_1d(_as_np64(mu2))
    cov1, cov2 = np.atleast_2d(_as_np64(cov1)), np.atleast_2d(_as_np64(cov2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,):
        raise ValueError(f"means must both be ({d},), got {mu1.shape} and {mu2.shape}")
    if cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"covariances must both be ({d}, {d}), got {cov1.shape} and {cov2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("cov1", cov1), ("cov2", cov2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN/inf values")
    diff = mu1 - mu2

    def sqrt_product(c1, c2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on near-singular input; we check below
            return linalg.sqrtm(c1 @ c2)

    covmean = sqrt_product(cov1, cov2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = sqrt_product(cov1 + offset, cov2 + offset)
        if not np.isfinite(covmean).all():
            raise ValueError(
                "sqrtm(cov1 @ cov2) is not finite even with eps * I added; "
                "are the covariances valid (symmetric positive semi-definite)?"
            )
    if np.iscomplexobj(covmean):
        scale = max(1.0, abs(np.trace(cov1)), abs(np.trace(cov2)))
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3 * scale:
            raise ValueError(
                f"sqrtm(cov1 @ cov2) has a large imaginary component ({imag:.3g}); "
                "the covariances are not positive semi-definite"
            )
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))
    round_off = 1e-9 * max(1.0, float(np.trace(cov1) + np.trace(cov2)))
    return 0.0 if -round_off < fd < 0 else fd  # identical inputs give -1e-13 and the like


def mean_cov(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of features (N, d) in float64."""
    f = _as_np64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, d), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


class GaussianStats:
    """Running mean and covariance of feature batches (float64, shifted sums)."""

    def __init__(self):
        self.n = 0
        self.shift: Tensor | None = None
        self.s1: Tensor | None = None
        self.s2: Tensor | None = None

    def update(self, features: Tensor) -> "GaussianStats":
        f = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, d), got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError("features contain NaN/inf values")
        if self.shift is None:
            self.shift = f.mean(0)
            d = f.shape[1]
            self.s1 = torch.zeros(d, dtype=torch.float64)
            self.s2 = torch.zeros(d, d, dtype=torch.float64)
        elif f.shape[1] != self.shift.shape[0]:
            raise ValueError(f"feature dimension changed from {self.shift.shape[0]} to {f.shape[1]}")
        c = f - self.shift
        self.s1 += c.sum(0)
        self.s2 += c.T @ c
        self.n += f.shape[0]
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (d,), unbiased covariance (d, d)) as float64 numpy arrays."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, have {self.n}")
        m = self.s1 / self.n
        cov = (self.s2 - self.n * torch.outer(m, m)) / (self.n - 1)
        cov = 0.5 * (cov + cov.T)
        return (m + self.shift).numpy(), cov.numpy()
