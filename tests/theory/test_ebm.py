"""Energy-based models: score-matching losses, NCE, MCMC and the energy denoiser, against closed forms."""

import math

import pytest
import torch
from torch import nn

from difflab.core import GaussianMixture, sample_euler
from difflab.core.likelihood import log_likelihood
from difflab.methods.ebm import (
    EnergyDenoiser,
    GaussianNoise,
    ReplayBuffer,
    cd_loss,
    denoising_score_matching_loss,
    energy_grad,
    grid_log_density,
    grid_log_partition,
    implicit_score_matching_loss,
    langevin_mcmc,
    nce_loss,
    sliced_score_matching_loss,
)
from difflab.nn.toy import EnergyMLP, ToyConfig

F64 = torch.float64


class Quadratic(nn.Module):
    """E(x) = 1/2 (x - mu)^T P (x - mu), P = L L^T (L lower-triangular, positive diagonal)."""

    def __init__(self, dim=2, mu=None, chol=None):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(dim, dtype=F64) if mu is None else torch.as_tensor(mu, dtype=F64))
        raw = torch.zeros(dim, dim, dtype=F64) if chol is None else torch.as_tensor(chol, dtype=F64).clone()
        if chol is not None:
            raw.diagonal().copy_(raw.diagonal().log())
        self.raw = nn.Parameter(raw)

    @property
    def chol(self):
        return torch.tril(self.raw, -1) + torch.diag(self.raw.diagonal().exp())

    @property
    def precision(self):
        return self.chol @ self.chol.T

    def forward(self, x):
        d = (x - self.mu) @ self.chol  # (B, dim)
        return 0.5 * d.pow(2).sum(1)

    def log_z(self):
        """log of int exp(-E) = d/2 log 2 pi - log det L."""
        return 0.5 * len(self.mu) * math.log(2 * math.pi) - self.chol.diagonal().log().sum()


def _quadratic(seed=0, dim=2):
    g = torch.Generator().manual_seed(seed)
    chol = torch.tril(torch.randn(dim, dim, generator=g, dtype=F64)) * 0.5
    chol.diagonal().copy_(torch.rand(dim, generator=g, dtype=F64) + 0.5)
    return Quadratic(dim, torch.randn(dim, generator=g, dtype=F64), chol)


# ---- score matching ----------------------------------------------------------------------


def test_implicit_score_matching_on_a_quadratic_is_closed_form():
    """ISM = 1/2 |P (x - mu)|^2 - tr P."""
    e = _quadratic()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    P = e.precision.detach()
    expected = 0.5 * ((x - e.mu.detach()) @ P).pow(2).sum(1) - P.trace()
    torch.testing.assert_close(implicit_score_matching_loss(e, x), expected)


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
@pytest.mark.parametrize("variance_reduction", [False, True])
def test_sliced_equals_implicit_in_expectation_on_a_quadratic(projection, variance_reduction):
    e = _quadratic(seed=2, dim=3)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    ism = implicit_score_matching_loss(e, x)
    g = torch.Generator().manual_seed(3)
    draws = torch.stack(
        [
            sliced_score_matching_loss(
                e, x, n_projections=1, projection=projection, variance_reduction=variance_reduction, generator=g
            )
            for _ in range(3000)
        ]
    )  # (3000, 8)
    se = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - ism).abs() < 4 * se + 1e-9).all(), (draws.mean(0), ism, se)
    assert (draws.std(0) > 0).all()


def test_score_matching_losses_have_the_same_gradient_in_expectation():
    """On Gaussian data, minimising sliced SM recovers the data's mean and precision."""
    torch.manual_seed(0)
    mu_true = torch.tensor([1.0, -2.0], dtype=F64)
    cov_true = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64)
    g = torch.Generator().manual_seed(0)
    x = mu_true + torch.randn(4000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(cov_true).T
    e = Quadratic(2)
    opt = torch.optim.Adam(e.parameters(), 0.05)
    for _ in range(300):
        loss = sliced_score_matching_loss(e, x, variance_reduction=True, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(e.mu.detach(), mu_true, atol=0.06, rtol=0)
    torch.testing.assert_close(torch.linalg.inv(e.precision.detach()), cov_true, atol=0.08, rtol=0)


def test_denoising_score_matching_learns_the_noisy_density():
    """DSM at noise level sigma fits N(mu, Sigma + sigma^2 I), the data convolved with the noise."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 2, generator=g, dtype=F64) * torch.tensor([0.5, 1.0], dtype=F64) + 1.0
    sigma = 0.5
    e = Quadratic(2)
    opt = torch.optim.Adam(e.parameters(), 0.05)
    for _ in range(400):
        loss = denoising_score_matching_loss(e, x, sigma, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    cov = torch.linalg.inv(e.precision.detach())
    torch.testing.assert_close(cov, torch.diag(torch.tensor([0.25 + 0.25, 1.0 + 0.25], dtype=F64)), atol=0.08, rtol=0)
    torch.testing.assert_close(e.mu.detach(), torch.ones(2, dtype=F64), atol=0.06, rtol=0)


# ---- noise-contrastive estimation ---------------------------------------------------------


def test_nce_recovers_a_gaussians_parameters_and_log_z():
    mu_true = torch.tensor([0.5, -1.0], dtype=F64)
    cov_true = torch.tensor([[0.6, -0.3], [-0.3, 1.2]], dtype=F64)
    g = torch.Generator().manual_seed(0)
    x = mu_true + torch.randn(8000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(cov_true).T
    noise = GaussianNoise(torch.zeros(2, dtype=F64), 4 * torch.eye(2, dtype=F64))
    y = noise.sample(16000, g)
    e = Quadratic(2)
    log_z = nn.Parameter(torch.zeros((), dtype=F64))
    opt = torch.optim.LBFGS(list(e.parameters()) + [log_z], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nce_loss(e, log_z, x, y, noise.log_prob)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(e.mu.detach(), mu_true, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.linalg.inv(e.precision.detach()), cov_true, atol=0.06, rtol=0)
    # the learned normaliser is the true one of the learned energy, and of the data Gaussian
    assert abs(log_z.item() - e.log_z().item()) < 0.03
    true_log_z = math.log(2 * math.pi) + 0.5 * math.log(torch.linalg.det(cov_true).item())
    assert abs(log_z.item() - true_log_z) < 0.05


def test_gaussian_noise_fit_and_density():
    x = torch.randn(5000, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 + 3
    q = GaussianNoise.fit(x)
    torch.testing.assert_close(q.dist.loc, torch.full((2,), 3.0, dtype=F64), atol=0.1, rtol=0)
    y = q.sample(5, torch.Generator().manual_seed(1))
    ref = torch.distributions.MultivariateNormal(q.dist.loc, q.dist.covariance_matrix)
    torch.testing.assert_close(q.log_prob(y), ref.log_prob(y))


# ---- MCMC, contrastive divergence, replay buffer ------------------------------------------


def test_langevin_mcmc_samples_a_quadratic_energy():
    e = _quadratic(seed=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=g, dtype=F64) * 3
    out = langevin_mcmc(e, x, n_steps=400, step_size=0.02, generator=g)
    cov = torch.linalg.inv(e.precision.detach())
    torch.testing.assert_close(out.mean(0), e.mu.detach(), atol=0.07, rtol=0)
    # unadjusted Langevin inflates the variance by O(step): a 5% tolerance
    torch.testing.assert_close(torch.cov(out.T), cov, atol=0.05 * cov.abs().max().item(), rtol=0.05)


def test_persistent_cd_with_a_replay_buffer_fits_a_gaussian():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cov_true = torch.tensor([[1.0, 0.5], [0.5, 0.7]], dtype=F64)
    data = torch.randn(10000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(cov_true).T + 1.0
    e = Quadratic(2)
    # chains that mix (small step, 20 steps per use, 1% re-initialised): the ML fit. With a 5%
    # re-initialisation from N(0, 4) and 10 steps the buffer lags and the mean is off by ~0.1.
    buffer = ReplayBuffer(2000, lambda n: torch.randn(n, 2, generator=g, dtype=F64) * 2, reinit_prob=0.01, generator=g)
    opt = torch.optim.Adam(e.parameters(), 0.03)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    for _ in range(300):
        xb = data[torch.randint(0, len(data), (256,), generator=g)]
        xm, idx = buffer.sample(256)
        xm = langevin_mcmc(e, xm, n_steps=20, step_size=0.02, generator=g)
        buffer.update(idx, xm)
        loss = cd_loss(e, xb, xm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(e.mu.detach(), torch.ones(2, dtype=F64), atol=0.08, rtol=0)
    torch.testing.assert_close(torch.linalg.inv(e.precision.detach()), cov_true, atol=0.08, rtol=0)


def test_replay_buffer_reinitialises_the_stated_fraction():
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(1000, lambda n: torch.full((n, 2), 7.0), reinit_prob=0.2, generator=g)
    buf.data.zero_()
    x, idx = buf.sample(20000)
    frac = (x[:, 0] == 7.0).double().mean().item()
    assert abs(frac - 0.2) < 0.015
    buf.update(idx[:5], torch.full((5, 2), 3.0))
    assert (buf.data[idx[:5]] == 3.0).all()


# ---- energies as denoisers, quadrature ----------------------------------------------------


class MixtureEnergy(nn.Module):
    """E(x, c_noise) = -log p_sigma(x) of a Gaussian mixture, sigma = exp(4 c_noise)."""

    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, x, c_noise):
        return -self.gm.log_prob(x, torch.exp(4 * c_noise.to(F64)))


def test_energy_denoiser_of_the_true_noisy_energy_is_the_exact_denoiser():
    gm = GaussianMixture.random(dim=2, k=3, seed=1)
    D = EnergyDenoiser(MixtureEnergy(gm), noise_conditional=True)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    for sigma in [0.05, 0.5, 3.0]:
        torch.testing.assert_close(D(x, sigma), gm.denoiser(x, sigma))
    # ... so difflab's samplers and the ODE likelihood run on it
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 20
    sigmas = torch.tensor([20.0, 5.0, 1.0, 0.2, 0.0], dtype=F64)
    torch.testing.assert_close(sample_euler(D, x_T, sigmas), sample_euler(gm.denoiser, x_T, sigmas))
    x0, _ = gm.sample(20, torch.Generator().manual_seed(2))
    lp = log_likelihood(D, x0, 1e-2, 20.0, prior=lambda z: gm.log_prob(z, 20.0), solver="rk4", n_steps=24)
    torch.testing.assert_close(
        lp, log_likelihood(gm.denoiser, x0, 1e-2, 20.0, prior=lambda z: gm.log_prob(z, 20.0), solver="rk4", n_steps=24)
    )


def test_energy_denoiser_of_an_unconditional_energy_is_tweedie():
    e = _quadratic(seed=5)
    D = EnergyDenoiser(e)
    assert not D.noise_conditional
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    P, mu = e.precision.detach(), e.mu.detach()
    torch.testing.assert_close(D(x, 0.3), x - 0.09 * (x - mu) @ P)
    _, g = energy_grad(e, x)
    torch.testing.assert_close(g, (x - mu) @ P)


def test_grid_quadrature_gives_the_true_log_partition():
    e = _quadratic(seed=6)
    assert abs(grid_log_partition(e, extent=8.0, n=400, dtype=F64) - e.log_z().item()) < 1e-3
    neg_e, log_z = grid_log_density(e, extent=8.0, n=50, dtype=F64)
    assert neg_e.shape == (50, 50)


def test_energy_mlp_is_noise_conditional_only_on_request():
    e = EnergyMLP(ToyConfig(dim=2, hidden=16, depth=1, noise_conditional=False))
    x = torch.randn(4, 2)
    assert e(x).shape == (4,)
    with pytest.raises(ValueError, match="noise_conditional"):
        e(x, torch.zeros(4))
    ec = EnergyMLP(ToyConfig(dim=2, hidden=16, depth=1, noise_conditional=True))
    assert ec(x, torch.zeros(4)).shape == (4,)
    assert EnergyDenoiser(ec).noise_conditional
