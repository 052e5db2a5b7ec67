"""Exact answers: Gaussian-mixture data, whose denoiser, score and density are closed-form.

For data x0 ~ sum_k w_k N(mu_k, diag(v_k)) and x = x0 + sigma n,

    p_sigma(x) = sum_k w_k N(x; mu_k, diag(v_k + sigma^2)),
    D(x, sigma) = E[x0 | x] = sum_k r_k(x) (mu_k + v_k / (v_k + sigma^2) (x - mu_k)),

with responsibilities r_k proportional to w_k N(x; mu_k, v_k + sigma^2). A single Gaussian is
the case K = 1. `pf_endpoint` integrates the probability-flow ODE dx/dsigma = (x - D)/sigma
with a tight-tolerance solver (scipy DOP853 in log-sigma time, float64): the reference that
every ODE sampler must converge to.

Usage::

    gm = GaussianMixture.random(dim=2, k=3, seed=0)
    x = torch.randn(1000, 2, dtype=torch.float64) * 80
    x_exact = gm.pf_endpoint(x, sigma_from=80.0)
    x_ours = sample_dpmpp_2m(gm.denoiser, x, sigmas_karras(10, 0.002, 80.0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["GaussianMixture"]


@dataclass
class GaussianMixture:
    """Diagonal-covariance Gaussian mixture: weights (K,), means (K, d), variances (K, d)."""

    weights: Tensor
    means: Tensor
    variances: Tensor

    def __post_init__(self):
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.variances = torch.as_tensor(self.variances, dtype=torch.float64)
        if self.means.ndim != 2 or self.variances.shape != self.means.shape:
            raise ValueError(
                f"means and variances must both be (K, d); got {tuple(self.means.shape)}, {tuple(self.variances.shape)}"
            )
        if self.weights.shape != (self.means.shape[0],) or (self.weights < 0).any():
            raise ValueError(f"weights must be (K,) non-negative, got {self.weights.tolist()}")
        if (self.variances <= 0).any():
            raise ValueError("variances must be positive")
        self.weights = self.weights / self.weights.sum()

    @classmethod
    def gaussian(cls, mean, std) -> "GaussianMixture":
        """A single Gaussian N(mean, std^2 I) (std a scalar or per-dimension)."""
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        var = (torch.as_tensor(std, dtype=torch.float64) ** 2).expand_as(mean).clone()
        return cls(torch.ones(1), mean, var)

    @classmethod
    def random(
        cls, dim: int, k: int, seed: int = 0, spread: float = 1.0, std_range: tuple[float, float] = (0.05, 0.3)
    ) -> "GaussianMixture":
        """Sharp, unequal components: means N(0, spread^2), stds log-uniform, Dirichlet-ish weights."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(k, dim, generator=g, dtype=torch.float64) * spread
        lo, hi = math.log(std_range[0]), math.log(std_range[1])
        stds = (lo + torch.rand(k, 1, generator=g, dtype=torch.float64) * (hi - lo)).exp().expand(k, dim)
        weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
        return cls(weights, means, stds.clone() ** 2)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # ---- sampling and densities ------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x0 (n, d), component index (n,))."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.variances[comp].sqrt() * eps, comp

    def _log_joint(self, x: Tensor, sigma) -> Tensor:
        """log w_k + log N(x; mu_k, v_k + sigma^2), shape (n, K)."""
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2
        var = self.variances[None] + s2  # (n|1, K, d)
        diff = x[:, None, :] - self.means[None]  # (n, K, d)
        ll = -0.5 * ((diff**2 / var) + var.log() + math.log(2 * math.pi)).sum(-1)
        return ll + self.weights.log()[None]

    def log_prob(self, x: Tensor, sigma=0.0) -> Tensor:
        """log p_sigma(x) (n,) in nats."""
        return torch.logsumexp(self._log_joint(x, sigma), dim=1)

    def responsibilities(self, x: Tensor, sigma) -> Tensor:
        """p(component k | x) at noise level sigma, (n, K)."""
        return torch.softmax(self._log_joint(x, sigma), dim=1)

    def denoiser(self, x: Tensor, sigma, **cond) -> Tensor:
        """The exact denoiser E[x0 | x0 + sigma n = x], in x's shape and dtype."""
        shape, dtype = x.shape, x.dtype
        xf = x.to(torch.float64).reshape(shape[0], -1)
        sig = torch.as_tensor(sigma, dtype=torch.float64)
        sig = sig.expand(shape[0]) if sig.ndim == 0 else sig
        r = self.responsibilities(xf, sig)  # (n, K)
        s2 = sig.reshape(-1, 1, 1) ** 2
        gain = self.variances[None] / (self.variances[None] + s2)  # (n, K, d)
        post = self.means[None] + gain * (xf[:, None, :] - self.means[None])
        return (r[:, :, None] * post).sum(1).reshape(shape).to(dtype)

    __call__ = denoiser

    def score(self, x: Tensor, sigma) -> Tensor:
        """grad_x log p_sigma(x) = (D - x) / sigma^2."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        s = s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s
        return (self.denoiser(x, sigma).to(torch.float64) - x.to(torch.float64)) / s**2

    def noisy_moments(self, sigma: float) -> tuple[Tensor, Tensor]:
        """Mean (d,) and covariance (d, d) of p_sigma."""
        mean = (self.weights[:, None] * self.means).sum(0)
        second = (
            self.weights[:, None, None]
            * (torch.diag_embed(self.variances) + self.means[:, :, None] * self.means[:, None, :])
        ).sum(0)
        cov = second - mean[:, None] * mean[None, :] + sigma**2 * torch.eye(self.dim, dtype=torch.float64)
        return mean, cov

    # ---- the exact probability-flow solution -----------------------------------------------

    def pf_endpoint(
        self, x: Tensor, sigma_from: float, sigma_to: float = 0.0, rtol: float = 1e-10, atol: float = 1e-10
    ) -> Tensor:
        """Solve dx/dsigma = (x - D(x, sigma))/sigma from sigma_from to sigma_to (float64).

        Integrated in u = log sigma down to sigma_end = min(1e-7, ...); below that the flow moves
        x by less than the solver tolerance for any component variance >= 1e-6.
        """
        from scipy.integrate import solve_ivp

        shape = x.shape
        x0 = x.to(torch.float64).reshape(shape[0], -1)
        s_end = max(sigma_to, 1e-7 * math.sqrt(float(self.variances.min())))

        def rhs(u, y):  # dx/du = sigma dx/dsigma = x - D
            xt = torch.from_numpy(y).reshape(x0.shape)
            return (xt - self.denoiser(xt, math.exp(u))).reshape(-1).numpy()

        sol = solve_ivp(
            rhs, (math.log(sigma_from), math.log(s_end)), x0.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol
        )
        if not sol.success:
            raise RuntimeError(f"probability-flow reference solve failed: {sol.message}")
        out = torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(x0.shape)
        if sigma_to == 0:
            out = self.denoiser(out, s_end)
        return out.reshape(shape)
