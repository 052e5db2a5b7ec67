"""Score SDEs against closed forms; reverse-SDE, PC and annealed Langevin sampling on the oracle."""

import math

import pytest
import torch

from difflab.core import GaussianMixture, sample_langevin
from difflab.core.sde import SDE, SubVPSDE, VESDE, VPSDE, langevin_snr_step, ncsn_sigmas, sample_pc, sample_reverse_sde

F64 = torch.float64
SDES = {"ve": lambda: VESDE(sigma_min=0.01, sigma_max=20.0), "vp": VPSDE, "subvp": SubVPSDE}


@pytest.mark.parametrize("name", list(SDES))
def test_drift_and_diffusion_follow_from_the_marginal(name):
    """f = d log s/dt and g^2 = s^2 d sigma^2/dt (finite differences); t(sigma(t)) = t."""
    sde = SDES[name]()
    t = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=F64)
    h = 1e-6
    f_num = (sde.s(t + h).log() - sde.s(t - h).log()) / (2 * h)
    g2_num = sde.s(t) ** 2 * (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(sde.f(t), f_num, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sde.g2(t), g2_num, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sde.t(sde.sigma(t)), t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sde.scale(sde.sigma(t)), sde.s(t), rtol=1e-9, atol=1e-12)


def test_closed_forms_of_the_three_sdes():
    t = torch.tensor([0.2, 0.7], dtype=F64)
    vp, sub = VPSDE(), SubVPSDE()
    abar = torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2))
    torch.testing.assert_close(vp.sigma(t), ((1 - abar) / abar).sqrt())
    torch.testing.assert_close(sub.sigma(t), (1 - abar) / abar.sqrt())
    torch.testing.assert_close(sub.g2(t), (0.1 + 19.9 * t) * (1 - abar**2))
    ve = VESDE(sigma_min=0.01, sigma_max=50.0)
    torch.testing.assert_close(ve.sigma(t), 0.01 * 5000**t)
    torch.testing.assert_close(ve.g2(t), 2 * ve.sigma(t) ** 2 * math.log(5000))


@pytest.mark.parametrize("name", list(SDES))
def test_forward_sde_simulation_reaches_the_closed_form_marginal(name):
    """Euler-Maruyama on dx = f x dt + g dw from Gaussian data gives N(s mu, s^2 (v + sigma^2))."""
    sde = SDES[name]()
    g = torch.Generator().manual_seed(0)
    mu, std = torch.tensor([1.5, -0.5], dtype=F64), 0.3
    x = mu + std * torch.randn(10000, 2, generator=g, dtype=F64)
    t0, t1, n = sde.t_eps, 0.5, 1000
    x = sde.marginal(x, t0, torch.randn(x.shape, generator=g, dtype=F64))  # start at t_eps
    ts = torch.linspace(t0, t1, n + 1, dtype=F64)
    for i in range(n):
        t, dt = ts[i], ts[i + 1] - ts[i]
        x = x + sde.f(t) * x * dt + (sde.g2(t) * dt).sqrt() * torch.randn(x.shape, generator=g, dtype=F64)
    s, sig = sde.s(t1), sde.sigma(t1)
    mean_ref, std_ref = s * mu, s * (std**2 + sig**2).sqrt()
    torch.testing.assert_close(x.mean(0), mean_ref, atol=4 * float(std_ref) / math.sqrt(10000) + 1e-3, rtol=0)
    torch.testing.assert_close(x.std(0), std_ref.expand(2), rtol=0.03, atol=0)


@pytest.mark.parametrize("name", list(SDES))
def test_score_of_gaussian_data_in_native_coordinates(name):
    """sde.score(D, x, t) = -(x - s mu) / (s^2 (v + sigma^2)) for Gaussian data N(mu, v I)."""
    sde = SDES[name]()
    mu, std = torch.tensor([0.7, -1.2], dtype=F64), 0.4
    gauss = GaussianMixture.gaussian(mu, std)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 3
    for t in [0.01, 0.3, 0.9]:
        s, sig = float(sde.s(t)), float(sde.sigma(t))
        expected = -(x - s * mu) / (s**2 * (std**2 + sig**2))
        torch.testing.assert_close(sde.score(gauss.denoiser, x, t), expected, rtol=1e-9, atol=1e-9)


def test_grid_is_the_papers_uniform_t_grid():
    sde = VPSDE()
    sig = sde.sigmas(11)
    assert sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    torch.testing.assert_close(sde.t(sig[:-1]), torch.linspace(1, 1e-3, 11, dtype=F64))


def _check_distribution(gm, out, x0, tol_logp=0.06):
    """Mean, covariance, mode frequencies and E[log p] of samples against the mixture."""
    mean, cov = gm.noisy_moments(0.0)
    torch.testing.assert_close(out.mean(0), mean, atol=0.06, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), cov, atol=0.12, rtol=0.05)
    freq = torch.bincount(gm.responsibilities(out, 0.0).argmax(1), minlength=len(gm.weights)).double() / len(out)
    torch.testing.assert_close(freq, gm.weights, atol=0.03, rtol=0)
    # the average log-density of samples matches that of true data (-entropy), within a few MC se
    assert abs(gm.log_prob(out).mean() - gm.log_prob(x0).mean()) < tol_logp


ORACLE = GaussianMixture.random(dim=2, k=3, seed=0, std_range=(0.2, 0.5))


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize(
    "predictor,corrector", [("euler_maruyama", None), ("euler_maruyama", "langevin"), ("reverse_diffusion", "langevin")]
)
def test_reverse_sde_and_pc_reach_the_data_distribution(name, predictor, corrector):
    sde = SDES[name]()
    g = torch.Generator().manual_seed(0)
    x0, _ = ORACLE.sample(4000, g)
    x = torch.randn(4000, 2, generator=g, dtype=F64) * sde.sigma_max  # the prior N(0, sigma_max^2 I)
    out = sample_pc(
        ORACLE.denoiser, x, sde.sigmas(150), sde=sde, predictor=predictor, corrector=corrector, snr=0.16, noise=g
    )
    _check_distribution(ORACLE, out, x0)


def test_corrector_alone_is_annealed_langevin_with_the_snr_rule():
    sde = VESDE(sigma_min=0.01, sigma_max=20.0)
    g = torch.Generator().manual_seed(1)
    x0, _ = ORACLE.sample(3000, g)
    x = torch.randn(3000, 2, generator=g, dtype=F64) * sde.sigma_max
    out = sample_pc(
        ORACLE.denoiser,
        x,
        sde.sigmas(300),
        sde=sde,
        predictor=None,
        corrector="langevin",
        n_corrector=2,
        snr=0.16,
        noise=g,
    )
    _check_distribution(ORACLE, out, x0, tol_logp=0.1)


def test_ncsn_annealed_langevin_over_geometric_levels():
    """NCSN (Song & Ermon 2019): core.sample_langevin on ncsn_sigmas reaches the mixture."""
    g = torch.Generator().manual_seed(2)
    x0, _ = ORACLE.sample(2500, g)
    sigmas = ncsn_sigmas(20, 0.05, 10.0)
    ratio = sigmas[:-2] / sigmas[1:-1]
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))  # geometric
    x = torch.rand(2500, 2, generator=g, dtype=F64) * 8 - 4  # NCSN starts from uniform noise
    # mode weights are the slow part: with 60 steps per level they are off by ~0.05
    out = sample_langevin(ORACLE.denoiser, x, sigmas, n_steps=200, step_lr=2e-3, noise=g)
    _check_distribution(ORACLE, out, x0, tol_logp=0.1)


def test_reverse_sde_is_reproducible_and_uses_the_callback():
    sde = SubVPSDE()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * sde.sigma_max
    seen = []
    a = sample_reverse_sde(
        ORACLE.denoiser,
        x,
        sde.sigmas(20),
        sde=sde,
        noise=torch.Generator().manual_seed(5),
        callback=lambda st: seen.append(st.sigma_next),
    )
    b = sample_reverse_sde(ORACLE.denoiser, x, sde.sigmas(20), sde=sde, noise=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and len(seen) == 20 and seen[-1] == 0.0


def test_snr_rule_step_size():
    score = torch.full((4, 2), 3.0)
    z = torch.full((4, 2), 1.0)
    # eps = 2 (r |z| / |score|)^2 = 2 (0.1 / 3)^2
    assert math.isclose(langevin_snr_step(score, z, 0.1), 2 * (0.1 / 3) ** 2, rel_tol=1e-6)


def test_bad_arguments_are_refused():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="predictor"):
        sample_pc(ORACLE.denoiser, x, VPSDE().sigmas(3), sde=VPSDE(), predictor="heun")
    with pytest.raises(TypeError, match="sde"):
        sample_pc(ORACLE.denoiser, x, VPSDE().sigmas(3), sde="vp")
    assert isinstance(VPSDE(), SDE)
