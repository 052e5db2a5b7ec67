"""Our samplers against diffusers' schedulers and k-diffusion on the same network and noise."""

import math

import pytest
import torch

from difflab.core import (
    Preconditioned,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_euler_ancestral,
    sample_heun,
    sigmas_karras,
    sigmas_spaced,
    vp_linear,
)
from tests.core.conftest import TinyEpsNet
from tests.refs import diffusers_schedulers, k_sampling

SHAPE = (3, 2, 4, 4)


def _setup(seed=0):
    torch.manual_seed(seed)
    net = TinyEpsNet(channels=2, seed=seed).double()
    sched = vp_linear()
    denoiser = Preconditioned(net, sched, "eps")
    return net, sched, denoiser


def _float64(ref):
    """diffusers builds its betas in float32; recompute them in float64 (its own formula:
    linspace(1e-4, 0.02)) to compare the algorithms, not the rounding."""
    ref.betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, 0)
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    return ref


class _Noises:
    """A fixed list of noise tensors, handed out in order, for both implementations."""

    def __init__(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.noise = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(n)]

    def ours(self, i, like):
        return self.noise[i]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(spacing, eta):
    diffusers = diffusers_schedulers()
    net, sched, denoiser = _setup()
    n = 20
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing=spacing,
        steps_offset=0,
    )
    _float64(ref).set_timesteps(n)
    noises = _Noises(n)
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sample = x_vp.clone()
    for i, t in enumerate(ref.timesteps):
        eps = net(sample, t.double())
        sample = ref.step(eps, t, sample, eta=eta, variance_noise=noises.noise[i]).prev_sample
    sigmas = sigmas_spaced(sched, n, spacing)
    x = x_vp * math.sqrt(1 + float(sigmas[0]) ** 2)  # VP -> VE at the first sigma
    ours = sample_euler_ancestral(denoiser, x, sigmas, eta=eta, noise=noises.ours)
    torch.testing.assert_close(ours, sample, rtol=1e-9, atol=1e-9)


def test_ddpm_matches_diffusers():
    diffusers = diffusers_schedulers()
    net, sched, denoiser = _setup()
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, variance_type="fixed_small"
    )
    _float64(ref).set_timesteps(1000)
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sample = x_vp.clone()
    g = torch.Generator().manual_seed(5)
    for t in ref.timesteps:
        eps = net(sample, t.double())
        sample = ref.step(eps, t, sample, generator=g).prev_sample
    x = x_vp * sched.sigmas[-1].item() / math.sqrt(1 - float(sched.alphas_cumprod[-1]))  # VP -> VE
    g2 = torch.Generator().manual_seed(5)
    ours = sample_ddpm(
        denoiser, x, sched, noise=lambda i, like: torch.randn(like.shape, generator=g2, dtype=like.dtype)
    )
    torch.testing.assert_close(ours, sample, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("n", [10, 20])
def test_dpmpp_2m_matches_diffusers_and_k_diffusion(n):
    diffusers = diffusers_schedulers()
    K = k_sampling()
    net, sched, denoiser = _setup()
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2
    )
    ref.set_timesteps(n)
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sample = x_vp.clone()
    for t in ref.timesteps:
        eps = net(sample, t.double())
        sample = ref.step(eps, t, sample).prev_sample
    sigmas = torch.cat([sched.sigmas[ref.timesteps], torch.zeros(1, dtype=torch.float64)])
    x = x_vp * math.sqrt(1 + float(sigmas[0]) ** 2)
    ours = sample_dpmpp_2m(denoiser, x, sigmas)
    torch.testing.assert_close(ours, sample, rtol=1e-5, atol=1e-5)
    theirs = K.sample_dpmpp_2m(denoiser, x, sigmas, disable=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_k_diffusion_samplers_match_on_karras_grid():
    K = k_sampling()
    net, sched, denoiser = _setup()
    sigmas = sigmas_karras(12, sched.sigma_min, sched.sigma_max)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * sigmas[0]
    noises = _Noises(len(sigmas))

    def k_noise():
        it = iter(noises.noise)
        return lambda sigma, sigma_next: next(it)

    cases = [
        (sample_euler_ancestral, K.sample_euler_ancestral, dict(eta=0.7), True),
        (sample_dpmpp_2m_sde, K.sample_dpmpp_2m_sde, dict(eta=1.0), True),
        (sample_dpmpp_2m_sde, K.sample_dpmpp_2m_sde, dict(eta=1.0, solver_type="heun"), True),
        (sample_dpmpp_3m_sde, K.sample_dpmpp_3m_sde, dict(eta=1.0), True),
        (sample_heun, K.sample_heun, dict(), False),
    ]
    for ours_fn, k_fn, kw, stochastic in cases:
        ours = ours_fn(denoiser, x, sigmas, noise=noises.ours, **kw)
        extra = dict(noise_sampler=k_noise()) if stochastic else {}
        theirs = k_fn(denoiser, x, sigmas, disable=True, **kw, **extra)
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9, msg=f"{ours_fn.__name__} {kw}")
