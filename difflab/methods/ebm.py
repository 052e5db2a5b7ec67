"""How to Train Your Energy-Based Models — Song & Kingma 2021 (arXiv 2101.03288).

An energy network E_theta(x) defines p_theta(x) = exp(-E_theta(x)) / Z_theta. Four ways to fit it:

1. Maximum likelihood with MCMC: grad of -log p = E_data[grad E] - E_model[grad E], the model
   expectation from Langevin chains x <- x - eps grad E + sqrt(2 eps) z (the card's
   x <- x - (e^2/2) grad E + e z with eps = e^2/2). Short-run chains started from noise every
   step (`ReplayBuffer` off), or persistent contrastive divergence with a replay buffer (JEM:
   10k samples, 5% re-initialised, 20 steps). `cd_loss` adds Du & Mordatch's alpha (E^2) term.
2. Score matching, which never needs Z:
   - implicit (Hyvarinen 2005): E[ 1/2 |grad E|^2 - tr(hess E) ], exact trace;
   - sliced (Song et al. 2019): E_v[ 1/2 (v . grad E)^2 - v^T hess E v ] (or with the
     variance-reduced 1/2 |grad E|^2 first term), one Hessian-vector product per projection;
   - denoising (Vincent 2011): E |-grad E(x~) + (x~ - x)/sigma^2|^2 sigma^2 / 2, x~ = x + sigma n:
     diffusion's training objective at one noise level.
3. Noise-contrastive estimation (Gutmann & Hyvarinen 2010): logistic regression of data against
   noise q with logit G = -E(x) - c - log q(x) - log nu, where c = log Z is a learned scalar.

`EnergyDenoiser` turns an energy into a difflab Denoiser by Tweedie, D(x, sigma) =
x - sigma^2 grad E(x[, sigma]), so every sampler (and the probability-flow likelihood) runs on
it. For 2-D models, `grid_log_partition` computes log Z by quadrature on a grid.

Notation: paper E_theta = `energy(x)`; Z_theta; c = `log_z`; nu = noise-to-data ratio.

Usage::

    energy = EnergyMLP(ToyConfig(dim=2, noise_conditional=False))
    loss = sliced_score_matching_loss(energy, x).mean()
    x_model = langevin_mcmc(energy, buffer.sample(256), n_steps=20, step_size=0.01)
    log_z = grid_log_partition(energy, extent=4.0)
    samples = sample_langevin(EnergyDenoiser(energy), x, torch.tensor([0.05, 0.0]))
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from difflab.core.denoiser import sigma_batch

__all__ = [
    "energy_grad",
    "EnergyDenoiser",
    "langevin_mcmc",
    "ReplayBuffer",
    "cd_loss",
    "implicit_score_matching_loss",
    "sliced_score_matching_loss",
    "denoising_score_matching_loss",
    "GaussianNoise",
    "nce_loss",
    "grid_log_partition",
    "grid_log_density",
]


def _call(energy, x: Tensor, c_noise=None) -> Tensor:
    e = energy(x) if c_noise is None else energy(x, c_noise)
    if e.shape != (x.shape[0],):
        raise ValueError(f"an energy must return one value per sample, shape ({x.shape[0]},), got {tuple(e.shape)}")
    return e


def energy_grad(energy, x: Tensor, c_noise=None, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """(E(x), grad_x E(x)); x need not require grad. create_graph for losses that differentiate it."""
    with torch.enable_grad():
        xr = x if x.requires_grad else x.detach().requires_grad_(True)
        e = _call(energy, xr, c_noise)
        (g,) = torch.autograd.grad(e.sum(), xr, create_graph=create_graph)
    return e, g


# --------------------------------------------------------------------------------------------
# Energy -> Denoiser
# --------------------------------------------------------------------------------------------


class EnergyDenoiser(nn.Module):
    """Tweedie on an energy: D(x, sigma) = x + sigma^2 grad log p = x - sigma^2 grad_x E.

    A noise-conditional energy E(x, c_noise) is fed c_noise = ln(sigma)/4 (EDM's convention); an
    unconditional one models p_0 and its denoiser is right only for small sigma. The gradient
    graph is kept when grad mode is on (training, or the exact divergence of a likelihood), so
    sample under `torch.no_grad()` (the gradient itself is still taken inside)."""

    def __init__(self, energy: nn.Module, noise_conditional: bool | None = None):
        super().__init__()
        self.energy = energy
        if noise_conditional is None:
            noise_conditional = bool(getattr(getattr(energy, "config", None), "noise_conditional", False))
        self.noise_conditional = noise_conditional

    @staticmethod
    def c_noise(sigma: Tensor) -> Tensor:
        return sigma.clamp(min=1e-20).log() / 4

    def forward(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = sigma_batch(sigma, x, x.dtype)
        create_graph = torch.is_grad_enabled()
        c = self.c_noise(sigma) if self.noise_conditional else None
        _, g = energy_grad(self.energy, x, c, create_graph=create_graph)
        return x - sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2 * g


# --------------------------------------------------------------------------------------------
# Maximum likelihood: Langevin MCMC, replay buffer, contrastive divergence
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def langevin_mcmc(
    energy,
    x: Tensor,
    n_steps: int,
    step_size: float,
    noise_scale: float | None = None,
    generator: torch.Generator | None = None,
    grad_clip: float | None = None,
) -> Tensor:
    """Unadjusted Langevin x <- x - step_size grad E + noise_scale z (noise_scale default
    sqrt(2 step_size): exact Langevin; JEM decouples them, e.g. step 1, noise 0.01)."""
    if n_steps < 0 or step_size <= 0:
        raise ValueError(f"need n_steps >= 0 and step_size > 0, got {n_steps}, {step_size}")
    noise_scale = math.sqrt(2 * step_size) if noise_scale is None else noise_scale
    x = x.detach().clone()
    for _ in range(n_steps):
        _, g = energy_grad(energy, x)
        if grad_clip is not None:
            g = g.clamp(-grad_clip, grad_clip)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x - step_size * g + noise_scale * z
    return x


class ReplayBuffer:
    """Persistent chains for PCD (Tieleman 2008; Du & Mordatch 2019; JEM): `sample(n)` draws n
    stored states, each re-initialised from `init_fn(k)` with probability `reinit_prob`; after
    the MCMC steps `update(idx, x)` writes them back."""

    def __init__(
        self,
        size: int,
        init_fn: Callable[[int], Tensor],
        reinit_prob: float = 0.05,
        generator: torch.Generator | None = None,
    ):
        if size < 1 or not 0 <= reinit_prob <= 1:
            raise ValueError(f"need size >= 1 and reinit_prob in [0, 1], got {size}, {reinit_prob}")
        self.init_fn, self.reinit_prob, self.generator = init_fn, reinit_prob, generator
        self.data = init_fn(size).detach().clone()

    def __len__(self) -> int:
        return len(self.data)

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """(x (n, ...), indices (n,)): stored states with a reinit_prob fraction re-initialised."""
        idx = torch.randint(0, len(self.data), (n,), generator=self.generator)
        x = self.data[idx].clone()
        fresh = torch.rand(n, generator=self.generator) < self.reinit_prob
        if fresh.any():
            x[fresh] = self.init_fn(int(fresh.sum())).to(x.dtype)
        return x, idx

    def update(self, idx: Tensor, x: Tensor) -> None:
        self.data[idx] = x.detach().to(self.data.dtype)


def cd_loss(energy, x_data: Tensor, x_model: Tensor, alpha: float = 0.0) -> Tensor:
    """Contrastive divergence: E(x_data).mean() - E(x_model).mean() + alpha (E_data^2 + E_model^2).mean().

    Its gradient is the maximum-likelihood gradient when x_model ~ p_theta (x_model is detached)."""
    e_data = _call(energy, x_data)
    e_model = _call(energy, x_model.detach())
    loss = e_data.mean() - e_model.mean()
    if alpha:
        loss = loss + alpha * (e_data.pow(2).mean() + e_model.pow(2).mean())
    return loss


# --------------------------------------------------------------------------------------------
# Score matching
# --------------------------------------------------------------------------------------------


def implicit_score_matching_loss(energy, x: Tensor) -> Tensor:
    """Hyvarinen's objective per sample: 1/2 |grad E|^2 - tr(hess E), exact trace (d backward passes)."""
    x = x.detach().requires_grad_(True)
    _, g = energy_grad(energy, x, create_graph=True)
    gf = g.flatten(1)
    trace = torch.zeros(x.shape[0], dtype=g.dtype, device=x.device)
    for j in range(gf.shape[1]):
        (h,) = torch.autograd.grad(gf[:, j].sum(), x, create_graph=True)
        trace = trace + h.flatten(1)[:, j]
    return 0.5 * gf.pow(2).sum(1) - trace


def sliced_score_matching_loss(
    energy,
    x: Tensor,
    n_projections: int = 1,
    variance_reduction: bool = False,
    projection: str = "gaussian",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sliced score matching per sample, averaged over projections v (E[v v^T] = I):
    1/2 (v . grad E)^2 - v^T hess(E) v, or with variance_reduction (SSM-VR) 1/2 |grad E|^2 - v^T hess(E) v."""
    x = x.detach().requires_grad_(True)
    _, g = energy_grad(energy, x, create_graph=True)
    total = torch.zeros(x.shape[0], dtype=g.dtype, device=x.device)
    for _ in range(n_projections):
        if projection == "gaussian":
            v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        elif projection == "rademacher":
            v = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        else:
            raise ValueError(f"projection must be 'gaussian' or 'rademacher', got {projection!r}")
        gv = (g * v).flatten(1).sum(1)
        (hv,) = torch.autograd.grad(gv.sum(), x, create_graph=True)
        vhv = (hv * v).flatten(1).sum(1)
        first = 0.5 * g.flatten(1).pow(2).sum(1) if variance_reduction else 0.5 * gv.pow(2)
        total = total + first - vhv
    return total / n_projections


def denoising_score_matching_loss(
    energy, x: Tensor, sigma, generator: torch.Generator | None = None, noise_conditional: bool | None = None
) -> Tensor:
    """Denoising score matching per sample: sigma^2/2 |s(x~) + (x~ - x)/sigma^2|^2 = 1/2 |sigma s + n|^2
    with s = -grad E(x~[, ln(sigma)/4]), x~ = x + sigma n (NCSN's lambda(sigma) = sigma^2 weight)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    n = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    s_b = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    x_tilde = (x + s_b * n).detach().requires_grad_(True)
    if noise_conditional is None:
        noise_conditional = bool(getattr(getattr(energy, "config", None), "noise_conditional", False))
    c = EnergyDenoiser.c_noise(sigma) if noise_conditional else None
    _, g = energy_grad(energy, x_tilde, c, create_graph=True)
    return 0.5 * (n - s_b * g).flatten(1).pow(2).sum(1)


# --------------------------------------------------------------------------------------------
# Noise-contrastive estimation
# --------------------------------------------------------------------------------------------


class GaussianNoise:
    """The NCE noise distribution q = N(mean, cov) (full covariance), e.g. fitted to the data."""

    def __init__(self, mean: Tensor, cov: Tensor):
        self.dist = torch.distributions.MultivariateNormal(torch.as_tensor(mean), torch.as_tensor(cov))

    @classmethod
    def fit(cls, x: Tensor, inflate: float = 1.0) -> "GaussianNoise":
        """Moment-matched to data x (n, d), covariance scaled by inflate^2."""
        return cls(x.mean(0), torch.cov(x.T) * inflate**2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        d = self.dist.loc.shape[0]
        z = torch.randn(n, d, generator=generator, dtype=self.dist.loc.dtype)
        return self.dist.loc + z @ self.dist.scale_tril.T

    def log_prob(self, x: Tensor) -> Tensor:
        return self.dist.log_prob(x.to(self.dist.loc.dtype)).to(x.dtype)


def nce_loss(
    energy, log_z: Tensor, x_data: Tensor, x_noise: Tensor, noise_log_prob: Callable[[Tensor], Tensor]
) -> Tensor:
    """NCE's logistic loss with nu = len(x_noise)/len(x_data) noise samples per data point:
    -E_data log sig(G) - nu E_noise log(1 - sig(G)), G(x) = -E(x) - log_z - log q(x) - log nu."""
    nu = len(x_noise) / len(x_data)

    def logit(x):
        return -_call(energy, x) - log_z - noise_log_prob(x) - math.log(nu)

    g_data, g_noise = logit(x_data), logit(x_noise)
    return nn.functional.softplus(-g_data).mean() + nu * nn.functional.softplus(g_noise).mean()


# --------------------------------------------------------------------------------------------
# 2-D quadrature
# --------------------------------------------------------------------------------------------


def _grid(extent: float, n: int, dtype=torch.float32) -> tuple[Tensor, float]:
    c = torch.linspace(-extent, extent, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(c, c, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).to(dtype)  # (n*n, 2), row-major in y
    return pts, float(c[1] - c[0]) ** 2


@torch.no_grad()
def grid_log_density(
    energy, extent: float, n: int = 400, chunk: int = 65536, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, float]:
    """(-E on an n x n grid over [-extent, extent]^2, (n, n) float64 with row = y; log Z).

    log Z by the midpoint rule; log p = -E - log Z. Accurate when exp(-E) is negligible outside
    the square and smooth on the grid's scale."""
    pts, cell = _grid(extent, n, dtype)
    neg_e = torch.cat([-_call(energy, p).double() for p in pts.split(chunk)])
    log_z = float(torch.logsumexp(neg_e, 0)) + math.log(cell)
    return neg_e.reshape(n, n), log_z


def grid_log_partition(energy, extent: float, n: int = 400, dtype: torch.dtype = torch.float32) -> float:
    """log Z = log int exp(-E) over [-extent, extent]^2 by quadrature on an n x n grid."""
    return grid_log_density(energy, extent, n, dtype=dtype)[1]
