"""Variational diffusion: the three targets, the continuous ELBO, the learned schedule."""

import math

import pytest
import torch
from torch import nn

from difflab.core import GaussianMixture, sample_euler_ancestral
from difflab.methods.vdm import VDM, LogSNRSchedule
from difflab.nn.toy import ToyConfig, ToyMLP

F64 = torch.float64
GM = GaussianMixture.random(dim=2, k=3, seed=0, std_range=(0.2, 0.5))


class OracleNet(nn.Module):
    """The exact network for each target: F from the mixture's exact denoiser at sigma = e^(4 c)."""

    def __init__(self, prediction):
        super().__init__()
        self.prediction = prediction

    def forward(self, z, c_noise):
        sigma = torch.exp(4 * c_noise.to(F64)).reshape(-1, 1)
        x = z.to(F64) * (1 + sigma**2).sqrt()
        d = GM.denoiser(x, sigma.reshape(-1))
        out = {"eps": (x - d) / sigma, "x0": d, "score": (d - x) / sigma**2}[self.prediction]
        return out.to(z.dtype)


def _oracle(prediction, **sched):
    return VDM(OracleNet(prediction), LogSNRSchedule(**sched), prediction=prediction).double()


def test_the_three_targets_are_the_same_denoiser_and_the_same_bound():
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    x0, _ = GM.sample(200, torch.Generator().manual_seed(1))
    bounds = []
    for prediction in ("eps", "x0", "score"):
        vdm = _oracle(prediction)
        for sigma in (0.01, 0.3, 5.0):
            torch.testing.assert_close(vdm(x, sigma), GM.denoiser(x, sigma))
        bounds.append(vdm.nelbo(x0, n_t=8, generator=torch.Generator().manual_seed(2))["total"])
    torch.testing.assert_close(bounds[0], bounds[1])
    torch.testing.assert_close(bounds[0], bounds[2])


def test_continuous_elbo_of_the_exact_denoiser_is_a_tight_bound():
    """-ELBO >= -log p(x) for every x in expectation, with a gap that vanishes for an exact
    denoiser and a wide logSNR range: the mean gap is zero within its Monte Carlo error (~0.02)."""
    vdm = _oracle("eps", gamma_0=-12.0, gamma_1=10.0)
    x0, _ = GM.sample(4000, torch.Generator().manual_seed(3))
    terms = vdm.nelbo(x0, n_t=128, generator=torch.Generator().manual_seed(4))
    nll = -GM.log_prob(x0)
    gap = terms["total"] - nll
    se = gap.std() / math.sqrt(len(gap))
    assert se < 0.03
    assert gap.mean() > -4 * se, (gap.mean(), se)
    assert gap.mean() < 4 * se, (gap.mean(), se)
    assert terms["prior"].mean() < 1e-3
    torch.testing.assert_close(terms["recon"], torch.full_like(x0[:, 0], math.log(2 * math.pi * math.e) - 12.0))


def test_learned_schedule_is_monotone_with_fixed_endpoints_of_the_shape():
    sched = LogSNRSchedule(gamma_0=-8.0, gamma_1=4.0, learn_shape=True)
    with torch.no_grad():
        sched.a_raw.normal_(0, 2)  # a non-trivial shape
    t = torch.linspace(0, 1, 201)
    gamma = sched.gamma(t)
    assert (gamma[1:] > gamma[:-1]).all()
    torch.testing.assert_close(gamma[[0, -1]], torch.tensor([-8.0, 4.0]), atol=1e-5, rtol=0)
    assert sched.phi(t).min() >= -1e-6 and sched.phi(t).max() <= 1 + 1e-6
    sig = sched.sigmas(11)
    assert sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    torch.testing.assert_close(sched.t(sig[:-1]), torch.linspace(1, 0, 11, dtype=F64), atol=1e-6, rtol=0)
    _, dgamma = sched.gamma_and_derivative(t)
    num = (sched.gamma(t + 1e-3) - sched.gamma(t - 1e-3)) / 2e-3
    torch.testing.assert_close(dgamma[5:-5], num[5:-5], rtol=2e-3, atol=1e-3)


def test_shape_parameters_get_the_gradient_of_the_variance():
    """loss(): value unchanged; the network and endpoints get grad E[L], the shape grad E[L_inf^2]."""
    torch.manual_seed(0)
    vdm = VDM(ToyMLP(ToyConfig(dim=2, hidden=16, depth=1)), LogSNRSchedule(learn_shape=True)).double()
    x0, _ = GM.sample(32, torch.Generator().manual_seed(0))
    loss = vdm.loss(x0, torch.Generator().manual_seed(1))
    shape = [vdm.schedule.w_raw, vdm.schedule.a_raw, vdm.schedule.b_raw, vdm.schedule.c]
    other = list(vdm.net.parameters()) + [vdm.schedule.gamma_0, vdm.schedule.gamma_1]
    g_shape = torch.autograd.grad(loss.mean(), shape, retain_graph=True)
    g_other = torch.autograd.grad(loss.mean(), other)
    # the same draw without the trick
    g = torch.Generator().manual_seed(1)
    t = VDM.draw_times(32, g).to(F64)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    diff = vdm.diffusion_term(x0, t, noise)
    plain = vdm.prior_term(x0) + vdm.recon_term(x0) + diff
    torch.testing.assert_close(loss, plain)
    ref_shape = torch.autograd.grad(diff.pow(2).mean(), shape, retain_graph=True)
    ref_other = torch.autograd.grad(plain.mean(), other)
    for a, b in zip(g_shape, ref_shape):
        torch.testing.assert_close(a, b)
    for a, b in zip(g_other, ref_other):
        torch.testing.assert_close(a, b)


def test_a_tiny_vdm_learns_beyond_a_gaussian():
    torch.manual_seed(0)
    vdm = VDM(ToyMLP(ToyConfig(dim=2, hidden=64, depth=2)), LogSNRSchedule(learn_shape=True), prediction="eps")
    opt = torch.optim.Adam(vdm.parameters(), 3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        x0 = GM.sample(256, g)[0].float()
        loss = vdm.loss(x0, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_test = GM.sample(1000, torch.Generator().manual_seed(9))[0].float()
    nelbo = vdm.nelbo(x_test, n_t=16, generator=torch.Generator().manual_seed(3))["total"].mean().item()
    _, cov = GM.noisy_moments(0.0)
    h_gauss = 0.5 * math.log(torch.linalg.det(2 * math.pi * math.e * cov).item())  # best Gaussian fit
    h_true = -GM.log_prob(GM.sample(20000, torch.Generator().manual_seed(5))[0]).mean().item()
    assert h_true - 0.05 < nelbo < h_gauss - 0.3, (nelbo, h_true, h_gauss)
    # and it samples with difflab's ancestral sampler on its own grid
    x = torch.randn(500, 2, generator=g) * vdm.schedule.prior_std
    with torch.no_grad():
        out = sample_euler_ancestral(vdm, x, vdm.schedule.sigmas(100), noise=g)
    assert GM.log_prob(out.double()).mean() > -h_gauss


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="prediction"):
        VDM(nn.Identity(), LogSNRSchedule(), prediction="v")
    with pytest.raises(ValueError, match="gamma_0 < gamma_1"):
        LogSNRSchedule(gamma_0=3.0, gamma_1=-3.0)
