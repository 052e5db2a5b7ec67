"""Probability-flow likelihood against exact densities; Hutchinson's estimator; bits/dim."""

import math

import pytest
import torch

from difflab.core import GaussianMixture
from difflab.core.likelihood import bits_per_dim, dequantize, divergence, gaussian_prior, log_likelihood
from difflab.nn.toy import ToyConfig, ToyMLP

F64 = torch.float64
GM = GaussianMixture.random(dim=2, k=3, seed=0, std_range=(0.2, 0.5))


def test_exact_ode_likelihood_of_the_exact_denoiser_is_the_true_log_density():
    """With D the mixture's exact denoiser and the exact noisy marginal as prior, the ODE
    likelihood is the mixture's log-density at sigma_min, to solver tolerance."""
    x, _ = GM.sample(100, torch.Generator().manual_seed(1))
    lp, info = log_likelihood(
        GM.denoiser, x, 1e-3, 20.0, prior=lambda z: GM.log_prob(z, 20.0), rtol=1e-7, atol=1e-7, return_details=True
    )
    torch.testing.assert_close(lp, GM.log_prob(x, 1e-3), atol=2e-5, rtol=0)
    assert info["nfe"] > 10 and info["x_T"].shape == x.shape


def test_gaussian_prior_at_large_sigma_max_is_close_to_exact():
    x, _ = GM.sample(100, torch.Generator().manual_seed(2))
    lp, info = log_likelihood(GM.denoiser, x, 1e-3, 80.0, return_details=True)  # prior N(0, 80^2 I)
    exact = GM.log_prob(x, 1e-3)
    # the only error is the prior's mismatch at x_T: swapping in the exact marginal removes it
    swapped = lp - info["prior_logp"] + GM.log_prob(info["x_T"], 80.0)
    torch.testing.assert_close(swapped, exact, atol=2e-3, rtol=0)  # default rtol = atol = 1e-5
    assert (lp - exact).abs().max() < 0.05 and abs((lp - exact).mean()) < 5e-3


def test_fixed_step_rk4_converges_to_the_same_answer():
    x, _ = GM.sample(50, torch.Generator().manual_seed(3))
    exact = GM.log_prob(x, 1e-2)
    prior = lambda z: GM.log_prob(z, 10.0)  # noqa: E731
    errs = [
        (log_likelihood(GM.denoiser, x, 1e-2, 10.0, prior=prior, solver="rk4", n_steps=n) - exact).abs().max()
        for n in (16, 32, 64)
    ]
    assert errs[2] < 2e-4 and errs[1] / errs[2] > 8, errs  # fourth order: ~16x per halving


def _random_field(dim, seed=0):
    torch.manual_seed(seed)
    net = ToyMLP(ToyConfig(dim=dim, hidden=32, depth=2)).double()
    return lambda z: net(z, torch.full((z.shape[0],), 0.3, dtype=F64))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dim", [2, 8])
def test_hutchinson_is_unbiased(probe, dim):
    """Mean over many probes of z^T J z equals the exact trace (within 4 standard errors)."""
    fn = _random_field(dim)
    x = torch.randn(4, dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    _, exact = divergence(fn, x)
    # exact trace by the full Jacobian, as a check on divergence() itself
    jac = torch.stack([torch.autograd.functional.jacobian(fn, x[i : i + 1])[0, :, 0, :] for i in range(4)])
    torch.testing.assert_close(exact, jac.diagonal(dim1=1, dim2=2).sum(1))
    g = torch.Generator().manual_seed(2)
    n = 4000
    probes = (
        torch.randint(0, 2, (n, 4, dim), generator=g).to(F64) * 2 - 1
        if probe == "rademacher"
        else torch.randn(n, 4, dim, generator=g, dtype=F64)
    )
    singles = torch.stack([divergence(fn, x, probes=probes[i : i + 1])[1] for i in range(0, 400)])  # (400, 4)
    _, mean_all = divergence(fn, x, probes=probes)
    se = singles.std(0) * math.sqrt(1 / n) + 1e-12
    assert ((mean_all - exact).abs() < 4 * se).all(), (mean_all, exact, se)
    assert (singles.std(0) > 0).all()  # a real estimator, not the exact trace in disguise


def test_hutchinson_likelihood_is_unbiased_across_points():
    """With the same fixed-step solver, Hutchinson's log-likelihood differs from the exact one by
    zero-mean noise: the mean over points of the difference is within 4 standard errors of 0."""
    x, _ = GM.sample(400, torch.Generator().manual_seed(4))
    kw = dict(solver="rk4", n_steps=12)
    exact = log_likelihood(GM.denoiser, x, 1e-2, 20.0, **kw)
    hutch = log_likelihood(GM.denoiser, x, 1e-2, 20.0, hutchinson=1, generator=torch.Generator().manual_seed(5), **kw)
    diff = hutch - exact
    assert diff.std() > 1e-3
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff)), (diff.mean(), diff.std())


def test_dequantize_stays_in_the_pixel_bin():
    k = torch.arange(256, dtype=torch.float32).repeat(10)
    x = k / 127.5 - 1
    y = dequantize(x, torch.Generator().manual_seed(0))
    assert ((y - x).abs() <= 1 / 255 + 1e-6).all()
    assert torch.equal(((y + 1) * 127.5).round(), k)


def test_bits_per_dim_is_the_dequantised_bound():
    """bpd = -E log p(x + u) / (D ln 2) + log2(127.5) for 8-bit data, with p the model density."""
    gauss = GaussianMixture.gaussian(torch.zeros(4), 0.5)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 4, generator=g, dtype=F64) * 0.5).clamp(-1, 1)
    x = ((x + 1) * 127.5).round() / 127.5 - 1
    bpd = bits_per_dim(
        gauss.denoiser,
        x,
        1e-3,
        50.0,
        prior=lambda z: gauss.log_prob(z, 50.0),
        generator=torch.Generator().manual_seed(7),
        rtol=1e-7,
        atol=1e-7,
    )
    y = dequantize(x, torch.Generator().manual_seed(7))
    expected = -gauss.log_prob(y, 1e-3) / (4 * math.log(2)) + math.log2(127.5)
    torch.testing.assert_close(bpd, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="8-bit data"):
        bits_per_dim(gauss.denoiser, x * 3, 1e-3, 50.0)


def test_gaussian_prior_density():
    z = torch.randn(5, 3, dtype=F64)
    ref = torch.distributions.Normal(0.0, 7.0).log_prob(z).sum(1)
    torch.testing.assert_close(gaussian_prior(7.0)(z), ref)


def test_bad_arguments_are_refused():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="sigma_min"):
        log_likelihood(GM.denoiser, x, 1.0, 0.5)
    with pytest.raises(ValueError, match="hutchinson"):
        log_likelihood(GM.denoiser, x, 0.1, 1.0, hutchinson=-1)
    with pytest.raises(ValueError, match="solver"):
        log_likelihood(GM.denoiser, x, 0.1, 1.0, solver="euler")
