import math

import pytest
import torch

from difflab.core import (
    EDM,
    DenoisingLoss,
    GaussianMixture,
    Preconditioned,
    discrete_uniform,
    lognormal,
    min_snr,
    vlb_terms,
    vp_linear,
)
from difflab.core.losses import WEIGHTINGS, discretized_gaussian_log_likelihood, normal_kl, q_posterior
from tests.core.conftest import OracleNet


def test_x0_weighting_gives_the_mmse_of_the_exact_denoiser():
    # For Gaussian data N(mu, v I), E||D* - x0||^2 per dim = v sigma^2 / (v + sigma^2) (the MMSE).
    v = 0.25
    gm = GaussianMixture.gaussian(torch.zeros(16), math.sqrt(v))
    for prediction, sched in [("eps", vp_linear()), ("v", vp_linear()), ("edm", EDM())]:
        D = OracleNet(gm, lambda net: Preconditioned(net, sched, prediction)).precond
        loss = DenoisingLoss(lognormal(), weighting="x0")
        x0 = gm.sample(4000, torch.Generator().manual_seed(0))[0].reshape(4000, 1, 4, 4)
        sigma = torch.full((4000,), 0.7, dtype=torch.float64)
        got = loss(D, x0, sigma=sigma).item()
        mmse = v * 0.49 / (v + 0.49)
        assert got == pytest.approx(mmse, rel=0.03), prediction


def test_weightings_relate_as_documented():
    sched = vp_linear()
    D = Preconditioned(torch.nn.Identity(), sched, "eps")
    sigma = torch.tensor([0.05, 0.5, 5.0], dtype=torch.float64)
    _, c_out, _, _ = D.coefficients(sigma)
    snr = 1 / sigma**2
    torch.testing.assert_close(WEIGHTINGS["simple"](sigma, c_out, 0.5), torch.ones(3, dtype=torch.float64))
    # min-SNR-5 on an eps network: min(1, 5 / SNR) (Hang et al. 2023)
    torch.testing.assert_close(min_snr(5.0)(sigma, c_out, 0.5), (5 / snr).clamp(max=1))
    E = Preconditioned(torch.nn.Identity(), EDM(), "edm")
    _, c_edm, _, _ = E.coefficients(sigma)
    # EDM's lambda(sigma) c_out^2 = 1 for its own preconditioning
    torch.testing.assert_close(WEIGHTINGS["edm"](sigma, c_edm, 0.5), torch.ones(3, dtype=torch.float64))


def test_discrete_uniform_draws_trained_sigmas():
    s = vp_linear()
    sig = discrete_uniform(s)(1000, torch.Generator().manual_seed(0))
    assert torch.isin(sig, s.sigmas).all()
    assert sig.min() < s.sigmas[20] and sig.max() > s.sigmas[980]


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(10), torch.randn(10)
    l1, l2 = torch.randn(10), torch.randn(10)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * l1).exp()), torch.distributions.Normal(m2, (0.5 * l2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), ref)


def test_discretized_gaussian_is_a_distribution_over_256_levels():
    levels = torch.linspace(-1, 1, 256)
    for mean, log_scale in [(0.0, -2.0), (0.9, -4.0), (-1.2, 0.0)]:
        lp = discretized_gaussian_log_likelihood(levels, torch.full((256,), mean), torch.full((256,), log_scale))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_q_posterior_matches_bayes_rule():
    s = vp_linear(T=50)
    t = torch.tensor([3, 20, 49])
    x0, xt = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    mean, logvar = q_posterior(s, x0, xt, t)
    ab, b = s.alphas_cumprod, s.betas
    for i, ti in enumerate(t.tolist()):
        # prior x_{t-1} ~ N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}); likelihood x_t ~ N(sqrt(1-b_t) x_{t-1}, b_t)
        pm, pv = ab[ti - 1].sqrt() * x0[i], 1 - ab[ti - 1]
        a = (1 - b[ti]).sqrt()
        post_v = 1 / (1 / pv + a**2 / b[ti])
        post_m = post_v * (pm / pv + a * xt[i] / b[ti])
        torch.testing.assert_close(mean[i], post_m)
        torch.testing.assert_close(logvar[i], post_v.log().expand(2))


def test_vlb_terms_exact_denoiser_small_variance_kl_is_zero_when_x0_known():
    # if the network returns the true x0, the model mean equals the posterior mean: KL = 0 with
    # the "small" (posterior) variance
    sched = vp_linear(T=100)
    x0 = torch.rand(4, 1, 2, 2, dtype=torch.float64) * 2 - 1

    class Cheat(torch.nn.Module):
        def forward(self, x_in, c, **k):  # eps net that knows x0: eps = (x - x0)/sigma
            sigma = sched.sigma(c.double()).reshape(-1, 1, 1, 1)
            x = x_in * (1 + sigma**2).sqrt()
            return (x - x0) / sigma

    D = Preconditioned(Cheat(), sched, "eps")
    t = torch.tensor([1, 10, 50, 99])
    kl = vlb_terms(D, x0, t, variance="small")
    assert kl.abs().max() < 1e-6
    with pytest.raises(ValueError, match="variance must be"):
        vlb_terms(D, x0, t, variance="huge")


# --------------------------------------------------------------------------------------------
# L_hybrid (Nichol & Dhariwal 2021): L_simple + lambda L_vlb from one network call
# --------------------------------------------------------------------------------------------


class _CheatWithVariance(torch.nn.Module):
    """An eps net that knows x0, with a variance channel v = `v` (a learnable scalar), and a
    learnable scale `a` on the prediction so gradients can be told apart."""

    def __init__(self, sched, x0, v):
        super().__init__()
        self.sched, self.x0 = sched, x0
        self.a = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.v = torch.nn.Parameter(torch.tensor(float(v), dtype=torch.float64))

    def forward(self, x_in, c, **k):
        sigma = self.sched.sigma(c.double()).reshape(-1, 1, 1, 1)
        x = x_in * (1 + sigma**2).sqrt()
        eps = self.a * (x - self.x0) / sigma
        return torch.cat([eps, self.v * torch.ones_like(eps)], 1)


def _hybrid_setup(v):
    from difflab.core.losses import hybrid_terms

    sched = vp_linear(T=100)
    x0 = torch.rand(4, 1, 2, 2, dtype=torch.float64) * 2 - 1
    net = _CheatWithVariance(sched, x0, v)
    D = Preconditioned(net, sched, "eps", learned_variance=True)
    t = torch.tensor([0, 10, 50, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return hybrid_terms, D, net, x0, sched.sigmas[t], noise, t


def test_hybrid_vlb_is_zero_for_the_true_mean_and_posterior_variance():
    hybrid_terms, D, net, x0, sigma, noise, t = _hybrid_setup(v=-1.0)  # v = -1: log beta~, the posterior's
    mse, vb = hybrid_terms(D, x0, sigma, noise)
    assert mse.abs().max() < 1e-20  # the eps is exact
    assert vb[1:].abs().max() < 1e-9  # KL(q || p) = 0 at t > 0
    assert vb[0] > 0  # at t = 0: the discretised decoder's NLL, in bits
    # and it is vlb_terms' value (another code path: x_t built in VP coordinates) in bits
    ref = vlb_terms(D, x0, t, noise=noise, variance="learned") / math.log(2)
    torch.testing.assert_close(vb, ref.to(vb.dtype), rtol=1e-6, atol=1e-9)


def test_hybrid_gradients_vlb_trains_only_the_variance_and_mse_only_the_mean():
    hybrid_terms, D, net, x0, sigma, noise, t = _hybrid_setup(v=0.3)
    net.a.data.fill_(0.9)  # a wrong mean, so both terms have gradients to give
    mse, vb = hybrid_terms(D, x0, sigma, noise)
    vb[1:].sum().backward()
    assert net.a.grad is None or net.a.grad == 0  # the mean's gradient is stopped in L_vlb
    assert net.v.grad.abs() > 0
    net.zero_grad()
    mse, vb = hybrid_terms(D, x0, sigma, noise)
    mse.sum().backward()
    assert net.v.grad is None or net.v.grad == 0
    assert net.a.grad.abs() > 0


def test_denoising_loss_with_vlb_weight_is_l_hybrid():
    from difflab.core.losses import DenoisingLoss, discrete_uniform

    hybrid_terms, D, net, x0, sigma, noise, t = _hybrid_setup(v=0.3)
    net.a.data.fill_(0.9)
    mse, vb = hybrid_terms(D, x0, sigma, noise)
    loss = DenoisingLoss(discrete_uniform(D.schedule), vlb_weight=0.001)
    got = loss(D, x0, sigma=sigma, noise=noise, reduce=False)
    torch.testing.assert_close(got, mse + 0.001 * 100 * vb)  # lambda T L_t: the VLB's estimate
    plain = DenoisingLoss(discrete_uniform(D.schedule))(D, x0, sigma=sigma, noise=noise, reduce=False)
    torch.testing.assert_close(plain, mse.float())  # vlb_weight 0: L_simple on the prediction channels
    with pytest.raises(ValueError, match="vlb_weight must be"):
        DenoisingLoss(discrete_uniform(D.schedule), vlb_weight=float("nan"))


def test_fixed_vlb_weighting_is_ddpms_bound_with_sigma_beta():
    """w(t) ||eps - eps_hat||^2 is the part of KL(q || p_theta) (Sigma = beta_t) that depends on the
    network: the KL of a wrong network minus that of the exact one, at every t > 0."""
    from difflab.core.losses import DenoisingLoss, discrete_uniform, fixed_vlb_weight

    sched = vp_linear(T=100)
    x0 = torch.rand(4, 1, 2, 2, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 10, 50, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _CheatWithVariance(sched, x0, 0.0)
    wrong = _CheatWithVariance(sched, x0, 0.0)
    wrong.a.data.fill_(0.8)
    kl = {}
    for name, net in (("exact", exact), ("wrong", wrong)):
        D = Preconditioned(net, sched, "eps", learned_variance=True)  # the v channel is ignored below
        kl[name] = vlb_terms(D, x0, t, noise=noise, variance="large")
    D = Preconditioned(wrong, sched, "eps", learned_variance=True)
    loss = DenoisingLoss(discrete_uniform(sched), weighting="vlb")
    got = loss(D, x0, sigma=sched.sigmas[t], noise=noise, reduce=False).double()
    torch.testing.assert_close(got, kl["wrong"] - kl["exact"], rtol=1e-5, atol=1e-9)
    w = fixed_vlb_weight(D, sched.sigmas[t])
    beta = sched.betas[t]
    torch.testing.assert_close(w, beta / (2 * (1 - beta) * (1 - sched.alphas_cumprod[t])))
    with pytest.raises(ValueError, match="for an eps network"):
        fixed_vlb_weight(Preconditioned(wrong, sched, "v"), sched.sigmas[t])
