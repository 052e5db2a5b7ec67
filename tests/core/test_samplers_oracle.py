"""Samplers against exact answers on Gaussian and Gaussian-mixture data."""

import math

import pytest
import torch

from difflab.core import (
    SAMPLERS,
    GaussianMixture,
    invert_euler,
    sample,
    sample_ddpm,
    sample_euler,
    sample_euler_ancestral,
    sample_langevin,
    sigmas_karras,
    sigmas_logsnr,
    vp_linear,
)

SIGMA_MAX = 80.0


def _start(n, dim, seed, sigma=SIGMA_MAX):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma


# ---- ODE samplers converge to the exact probability-flow solution at their order ----------

# Global orders. DPM-Solver++(3M) starts with a first- and a second-order step (no extra network
# calls), which caps its global order at 2 in practice (as in k-diffusion's 3M); UniPC-3's
# corrector raises the order by one (Zhao et al. 2023, Thm 3.3), measured here as ~4.
ORDERS = {"euler": 1, "heun": 2, "dpmpp_2m": 2, "dpmpp_3m": 2, "unipc": 4}
TOL = {"euler": 0.02, "heun": 3e-3, "dpmpp_2m": 2e-3, "dpmpp_3m": 5e-4, "unipc": 5e-5}


@pytest.mark.parametrize("name", list(ORDERS))
def test_ode_sampler_converges_at_its_order(name):
    gm = GaussianMixture.random(dim=2, k=3, seed=3, std_range=(0.2, 0.5))
    x = _start(64, 2, seed=1)
    # the grid stops at sigma 0.01 then jumps to 0 (x = D(x, 0.01)): the reference is the exact
    # flow to 0.01 followed by the same jump, so the measured order is the solver's alone
    ref = gm.denoiser(gm.pf_endpoint(x, SIGMA_MAX, 0.01), 0.01)
    errs = []
    for n in [16, 32, 64, 128]:
        out = sample(gm.denoiser, x, sigmas_logsnr(n, 0.01, SIGMA_MAX), method=name)
        errs.append((out - ref).norm(dim=1).mean().item())
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert rates[-1] > ORDERS[name] - 0.35, (name, errs, rates)
    assert errs[-1] < TOL[name], (name, errs)


@pytest.mark.parametrize("kw", [dict(variant="vary"), dict(order="auto", variant="vary"), dict(variant="bh1")])
def test_unipc_variants_converge_at_order_4(kw):
    # "vary" (UniPC_v) and bh1 change only the low-order coefficients; order="auto" takes order 3
    # on these small steps (h < 0.5): all keep the corrector's fourth order
    gm = GaussianMixture.random(dim=2, k=3, seed=3, std_range=(0.2, 0.5))
    x = _start(64, 2, seed=1)
    ref = gm.denoiser(gm.pf_endpoint(x, SIGMA_MAX, 0.01), 0.01)
    errs = []
    for n in [32, 64, 128]:
        out = sample(gm.denoiser, x, sigmas_logsnr(n, 0.01, SIGMA_MAX), method="unipc", **kw)
        errs.append((out - ref).norm(dim=1).mean().item())
    assert math.log2(errs[-2] / errs[-1]) > 4 - 0.35, (kw, errs)
    assert errs[-1] < 5e-5, (kw, errs)


def test_truncated_reference_is_close_to_full_flow():
    gm = GaussianMixture.random(dim=2, k=3, seed=3, std_range=(0.2, 0.5))
    x = _start(16, 2, seed=1)
    full = gm.pf_endpoint(x, SIGMA_MAX)
    trunc = gm.denoiser(gm.pf_endpoint(x, SIGMA_MAX, 0.01), 0.01)
    assert (full - trunc).norm(dim=1).max() < 5e-3


# ---- stochastic samplers reach the data distribution ----------------------------------------


def _mixture_stats(gm, x):
    comp = gm.responsibilities(x, 0.0).argmax(1)
    freq = torch.bincount(comp, minlength=len(gm.weights)).double() / len(x)
    return x.mean(0), torch.cov(x.T), freq


STOCHASTIC = {
    "euler_ancestral": dict(eta=1.0),
    "dpmpp_2m_sde": dict(eta=1.0),
    "dpmpp_3m_sde": dict(eta=1.0),
    "heun": dict(s_churn=20.0),
}


@pytest.mark.parametrize("name", list(STOCHASTIC) + ["ddpm", "langevin"])
def test_stochastic_sampler_reproduces_mixture(name):
    gm = GaussianMixture(
        torch.tensor([0.6, 0.3, 0.1]),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]]),
        torch.tensor([[0.3, 0.3], [0.2, 0.5], [0.4, 0.1]]) ** 2,
    )
    n = 6000
    g = torch.Generator().manual_seed(7)
    if name == "ddpm":
        sched = vp_linear()
        x = _start(n, 2, 2, sched.sigma_max)
        out = sample_ddpm(gm.denoiser, x, sched, noise=g)
    elif name == "langevin":
        # annealed Langevin is an MCMC approximation: 30 levels x 50 steps, a_L / sigma_L^2 = 0.12
        sig = torch.cat(
            [
                torch.logspace(math.log10(20), math.log10(0.05), 30, dtype=torch.float64),
                torch.zeros(1, dtype=torch.float64),
            ]
        )
        x = _start(n, 2, 2, 20.0)
        out = sample_langevin(gm.denoiser, x, sig, noise=g, n_steps=50, step_lr=3e-4)
    else:
        x = _start(n, 2, 2)
        steps = 100 if name == "euler_ancestral" else 40  # first order: more steps for the same bias
        out = sample(gm.denoiser, x, sigmas_karras(steps, 0.005, SIGMA_MAX), method=name, noise=g, **STOCHASTIC[name])
    mean, cov, freq = _mixture_stats(gm, out)
    true_mean, true_cov = gm.noisy_moments(0.0)
    se = (true_cov.diag() / n).sqrt()
    assert ((mean - true_mean).abs() < 5 * se + 0.02).all(), (name, mean, true_mean)
    torch.testing.assert_close(cov, true_cov, atol=0.12, rtol=0.05)
    torch.testing.assert_close(freq, gm.weights, atol=0.025 if name != "langevin" else 0.03, rtol=0)
    # the within-component spread must also be right (not collapsed onto the means)
    comp = gm.responsibilities(out, 0.0).argmax(1)
    for k in range(3):
        sel = out[comp == k]
        torch.testing.assert_close(sel.std(0), gm.variances[k].sqrt(), rtol=0.15, atol=0.02)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "unipc"])
def test_deterministic_sampler_keeps_gaussian_marginal(name):
    # for Gaussian data the PF ODE maps N(0, (v + s^2)) exactly to N(mu, v); the sampled
    # variance must match to discretisation + sampling error
    gm = GaussianMixture.gaussian(torch.tensor([0.5, -1.0]), torch.tensor([0.3, 1.5]))
    # start from the exact noisy marginal N(mu, v + sigma^2), which the PF ODE maps onto N(mu, v)
    x = gm.means[0] + (gm.variances[0] + 400).sqrt() * _start(20000, 2, 5, 1.0)
    out = sample(gm.denoiser, x, sigmas_karras(30, 0.002, 20.0), method=name)
    se = gm.variances[0].sqrt() / math.sqrt(len(x))
    assert ((out.mean(0) - gm.means[0]).abs() < 4 * se).all(), (out.mean(0), gm.means[0])
    torch.testing.assert_close(out.std(0), gm.variances[0].sqrt(), rtol=0.02, atol=0)


def test_euler_ancestral_eta1_on_full_chain_is_ddpm():
    gm = GaussianMixture.random(dim=3, k=2, seed=4)
    sched = vp_linear(T=100)
    x = _start(8, 3, 1, sched.sigma_max)
    a = sample_ddpm(gm.denoiser, x, sched, noise=torch.Generator().manual_seed(0))
    sig = torch.cat([sched.sigmas.flip(0), torch.zeros(1, dtype=torch.float64)])
    b = sample_euler_ancestral(gm.denoiser, x, sig, eta=1.0, noise=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ddim_inversion_round_trip_converges():
    gm = GaussianMixture.random(dim=2, k=3, seed=0, std_range=(0.2, 0.4))
    x_lo = gm.sample(64, torch.Generator().manual_seed(0))[0] + 0.05 * torch.randn(64, 2, dtype=torch.float64)
    errs = []
    for n in [20, 40, 80, 160]:
        up = sigmas_logsnr(n, 0.05, 20.0, append_zero=False).flip(0)
        z = invert_euler(gm.denoiser, x_lo, up)
        back = sample_euler(gm.denoiser, z, up.flip(0))
        # median: a few points near a boundary between modes are ill-conditioned for any solver
        errs.append((back - x_lo).norm(dim=1).median().item())
    assert errs[-1] < 0.015, errs
    assert all(errs[i + 1] < 0.7 * errs[i] for i in range(3)), errs  # first order: ~halves


def test_callback_sees_every_step_and_can_replace_x():
    gm = GaussianMixture.gaussian(torch.zeros(2), 1.0)
    x = _start(4, 2, 0, 10.0)
    sig = sigmas_karras(6, 0.01, 10.0)
    seen = []

    def cb(step):
        seen.append((step.i, step.sigma, step.sigma_next))
        assert step.x0_hat.shape == x.shape
        return torch.zeros_like(step.x)  # pin x to 0 after every step

    for name in SAMPLERS:
        seen.clear()
        out = sample(gm.denoiser, x, sig, method=name, callback=cb, noise=torch.Generator().manual_seed(0))
        assert [s[0] for s in seen] == list(range(len(seen))) and len(seen) >= 5, name
        assert torch.count_nonzero(out) == 0 or name == "langevin", name


def test_injected_noise_gives_bit_identical_runs():
    gm = GaussianMixture.random(dim=2, k=2, seed=0)
    x = _start(16, 2, 0)
    sig = sigmas_karras(10, 0.01, SIGMA_MAX)
    for name in ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"]:
        a = sample(gm.denoiser, x, sig, method=name, noise=torch.Generator().manual_seed(3))
        b = sample(gm.denoiser, x, sig, method=name, noise=torch.Generator().manual_seed(3))
        c = sample(gm.denoiser, x, sig, method=name, noise=torch.Generator().manual_seed(4))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampler_errors():
    gm = GaussianMixture.gaussian(torch.zeros(2), 1.0)
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="unknown sampler 'dpm_fast'.*dpmpp_2m.*euler"):
        sample(gm.denoiser, x, sigmas_karras(4, 0.1, 1.0), method="dpm_fast")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_euler(gm.denoiser, x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="strictly increasing"):
        invert_euler(gm.denoiser, x, torch.tensor([2.0, 1.0, 0.0]))
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf"):
        sample_euler(gm.denoiser, bad, sigmas_karras(4, 0.1, 1.0))
    with pytest.raises(ValueError, match="finite and >= 0"):
        sample_euler(gm.denoiser, x, torch.tensor([1.0, float("nan"), 0.0]))


class _ConstVariance(torch.nn.Module):
    """An eps net (0.1 x_in) with a constant variance channel v: a learned-variance network whose
    v = -1 is DDPM's posterior variance beta~ and v = +1 its beta."""

    def __init__(self, v: float):
        super().__init__()
        self.v = v

    def forward(self, x_in, c_noise, **cond):
        return torch.cat([0.1 * x_in, torch.full_like(x_in, self.v)], 1)


@pytest.mark.parametrize("v,fixed", [(-1.0, "small"), (1.0, "large")])
@pytest.mark.parametrize("steps", [None, 7])
def test_sample_ddpm_learned_variance_at_its_ends_is_the_fixed_one(v, fixed, steps):
    from difflab.core import Preconditioned, vp_linear

    sched = vp_linear(T=50)
    D = Preconditioned(_ConstVariance(v), sched, "eps", learned_variance=True)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sched.sigma_max
    a = sample_ddpm(D, x, sched, variance="learned", steps=steps, noise=torch.Generator().manual_seed(1))
    b = sample_ddpm(D, x, sched, variance=fixed, steps=steps, noise=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_sample_ddpm_respaced_on_every_timestep_is_the_full_chain():
    from difflab.core import Preconditioned, vp_linear

    sched = vp_linear(T=40)
    D = Preconditioned(_ConstVariance(0.0), sched, "eps", learned_variance=True)
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sched.sigma_max
    full = sample_ddpm(D, x, sched, noise=torch.Generator().manual_seed(1))
    every = sample_ddpm(D, x, sched, steps=40, noise=torch.Generator().manual_seed(1))
    torch.testing.assert_close(every, full, rtol=1e-9, atol=1e-9)  # beta_t = 1 - abar_t / abar_(t-1), rounding only
    with pytest.raises(ValueError, match="learned-variance denoiser"):
        sample_ddpm(Preconditioned(torch.nn.Identity(), sched, "eps"), x, sched, variance="learned")
    clipped = sample_ddpm(D, x, sched, steps=5, clip_x0=True, noise=torch.Generator().manual_seed(1))
    assert clipped.abs().max() <= 1 + 1e-9  # the last step returns x0_hat, clipped
