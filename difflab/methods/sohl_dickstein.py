"""Deep Unsupervised Learning using Nonequilibrium Thermodynamics — Sohl-Dickstein, Weiss,
Maheswaranathan, Ganguli 2015 (arXiv 1503.03585).

The first diffusion model: a fixed Gaussian forward chain q(x_t | x_{t-1}) =
N(sqrt(1 - beta_t) x_{t-1}, beta_t I) and a learned reverse chain whose every kernel has a
learned mean AND a learned diagonal covariance, trained by the variational bound.

Notation map (paper -> here; VP coordinates, as the paper; the data is x^(0)):

| paper                                  | here                                                  |
|----------------------------------------|-------------------------------------------------------|
| T, beta_t (t = 1..T)                   | `schedule.T`, `schedule.betas[t]` (t = 0..T-1)         |
| x^(t)                                  | x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps           |
| f_mu(x^(t), t)                         | mean = sqrt(1 - beta_t) x_t + sqrt(beta_t) m(x_t, t)   |
| f_Sigma(x^(t), t) (diagonal)           | log var = log beta_t + v(x_t, t)                       |
| -K (the bound on the negative log-likelihood) | `nll_bound(x0)`, nats per sample                |

Both m and v come from one network net(x_t, c_noise = t / T) with 2 d outputs; m = v = 0 is
the exact reverse kernel when the data is N(0, I) (the chain is then reversible).

The bound (paper eq. 14, written as the sum of its KL terms):

    -log p(x0) <= KL(q(x_{T-1} | x0) || N(0, I)) + sum_{t=1}^{T-1} KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
                  - log p(x0 | x_0-noisy),

the last term a continuous Gaussian density (the data is continuous). Training draws one t per
sample and weights its term by T (an unbiased estimate of the sum).

Usage::

    model = SohlDickstein(ToyMLP(ToyConfig(dim=2, out_dim=4, time_scale=1000.0)), vp_linear(1000))
    loss = model.loss(x0).mean(); loss.backward()
    bits = model.nll_bound(x_test).mean() / math.log(2)
    x = model.sample(2000)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difflab.core.losses import normal_kl, q_posterior
from difflab.core.schedules import DiscreteVP

__all__ = ["SohlDickstein"]


class SohlDickstein(nn.Module):
    """The 2015 diffusion model: learned-mean, learned-diagonal-covariance reverse kernels."""

    def __init__(self, net: nn.Module, schedule: DiscreteVP):
        super().__init__()
        if not isinstance(schedule, DiscreteVP):
            raise ValueError(f"SohlDickstein needs a DiscreteVP schedule, got {type(schedule).__name__}")
        self.net, self.schedule = net, schedule
        self.register_buffer("betas", schedule.betas.float(), persistent=False)
        self.register_buffer("abar", schedule.alphas_cumprod.float(), persistent=False)

    @property
    def T(self) -> int:
        return self.schedule.T

    def reverse_kernel(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log variance) of p(x_{t-1} | x_t), each (B, d), for integer t (B,)."""
        out = self.net(x_t, t.to(x_t.dtype) / self.T)
        d = x_t.shape[1]
        if out.shape != (x_t.shape[0], 2 * d):
            raise ValueError(f"the network must return (B, 2 d) = {(x_t.shape[0], 2 * d)}, got {tuple(out.shape)}")
        m, v = out[:, :d], out[:, d:]
        beta = self.betas[t].to(x_t.dtype)[:, None]
        mean = (1 - beta).sqrt() * x_t + beta.sqrt() * m
        return mean, beta.log() + v

    def diffuse(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x0) in VP coordinates."""
        ab = self.abar[t].to(x0.dtype)[:, None]
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def prior_term(self, x0: Tensor) -> Tensor:
        """KL(q(x_{T-1} | x0) || N(0, I)) per sample, nats (no parameters)."""
        ab = self.abar[-1].to(x0.dtype)
        return normal_kl(ab.sqrt() * x0, (1 - ab).log().expand_as(x0), torch.zeros_like(x0), torch.zeros_like(x0)).sum(
            1
        )

    def term(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The bound's term at t per sample, nats: the KL for t >= 1, -log p(x0 | x_0) at t = 0."""
        x_t = self.diffuse(x0, t, noise)
        mean, logvar = self.reverse_kernel(x_t, t)
        true_mean, true_logvar = q_posterior(self.schedule, x0.double(), x_t.double(), t)
        kl = normal_kl(true_mean.to(x0.dtype), true_logvar.to(x0.dtype), mean, logvar).sum(1)
        nll = 0.5 * ((x0 - mean).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi)).sum(1)
        return torch.where(t == 0, nll, kl)

    def loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample unbiased estimate of the bound (nats): prior + T * term(t), t ~ U{0..T-1}."""
        t = torch.randint(0, self.T, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return self.prior_term(x0) + self.T * self.term(x0, t, noise)

    @torch.no_grad()
    def nll_bound(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The full bound per sample, nats: every one of the T terms evaluated (one noise draw each)."""
        total = self.prior_term(x0).double()
        for t in range(self.T):
            tt = torch.full((x0.shape[0],), t, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            total += self.term(x0, tt, noise).double()
        return total

    @torch.no_grad()
    def sample(
        self, n: int, dim: int = 2, generator: torch.Generator | None = None, final_noise: bool = True
    ) -> Tensor:
        """Ancestral sampling from N(0, I) through the T learned kernels (VP coordinates = data)."""
        dtype = self.betas.dtype
        x = torch.randn(n, dim, generator=generator, dtype=dtype)
        for t in reversed(range(self.T)):
            tt = torch.full((n,), t, dtype=torch.long)
            mean, logvar = self.reverse_kernel(x, tt)
            if t == 0 and not final_noise:
                return mean
            x = mean + (0.5 * logvar).exp() * torch.randn(x.shape, generator=generator, dtype=dtype)
        return x
