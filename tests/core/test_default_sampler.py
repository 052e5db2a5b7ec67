"""The default recipe, sample(D, x, default_sigmas(schedule, n)), against exact answers.

bench/samplers.py measures it against diffusers and k-diffusion; these are the properties that
must keep holding: on a sharp 2-D mixture with the DDPM schedule it is far more accurate than
DDIM (Euler, trailing timesteps) at the same 10 network calls and rarely changes mode.
"""

import math

import torch

from difflab.core import (
    DEFAULT_SAMPLER,
    GaussianMixture,
    default_sigmas,
    sample,
    sigmas_logsnr,
    sigmas_spaced,
    vp_linear,
)
from difflab.core.sampling import final_step, sigmas_soft_logsnr


def test_default_recipe_beats_ddim_trailing_at_nfe_10():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops in the reference solve: threads only add waiting
    try:
        _default_recipe_beats_ddim_trailing()
    finally:
        torch.set_num_threads(threads)


def _default_recipe_beats_ddim_trailing():
    sched = vp_linear()
    gm = GaussianMixture.random(dim=2, k=6, seed=0, spread=1.5, std_range=(0.03, 0.2))
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sched.sigma_max
    exact = gm.pf_endpoint(x, sched.sigma_max)
    comp = gm.responsibilities(exact, 0.0).argmax(1)

    calls = 0

    def counting(x, sigma):
        nonlocal calls
        calls += 1
        return gm.denoiser(x, sigma)

    ours = sample(counting, x, default_sigmas(sched, 10))
    assert calls == 10
    ddim = sample(gm.denoiser, x, sigmas_spaced(sched, 10, "trailing"), method="euler")
    err_ours = (ours - exact).norm(dim=1).median().item()
    err_ddim = (ddim - exact).norm(dim=1).median().item()
    flips_ours = (gm.responsibilities(ours, 0.0).argmax(1) != comp).sum().item()
    flips_ddim = (gm.responsibilities(ddim, 0.0).argmax(1) != comp).sum().item()
    # measured: ~2.4e-3 against ~6e-2 (25x), 2 flips against ~30 of 300
    assert err_ours * 8 < err_ddim, (err_ours, err_ddim)
    assert err_ours < 1e-2, err_ours
    assert flips_ours <= 6 and flips_ours * 4 <= flips_ddim, (flips_ours, flips_ddim)


def test_default_grid_shape():
    sched = vp_linear()
    for n in [1, 2, 5, 10, 50]:
        g = default_sigmas(sched, n)
        assert len(g) == n + 1 and g[-1] == 0 and g[0] == sched.sigma_max
        assert (g[1:] < g[:-1]).all()
        if n > 1:
            assert math.isclose(float(g[-2]), sched.sigma_min, rel_tol=1e-12)
    # far below the knee the grid is logSNR-uniform; above it the steps in log sigma grow
    g = sigmas_soft_logsnr(40, 1e-3, 200.0, sigma_knee=10.0, append_zero=False).log()
    steps = g[:-1] - g[1:]
    assert torch.allclose(steps[-5:], steps[-1].expand(5), rtol=1e-3)
    assert steps[0] > 3 * steps[-1]
    # with the knee far above sigma_max it is sigmas_logsnr
    torch.testing.assert_close(
        sigmas_soft_logsnr(12, 0.01, 5.0, sigma_knee=1e6), sigmas_logsnr(12, 0.01, 5.0), rtol=1e-9, atol=0
    )


def test_trapezoid_end_on_a_gaussian_is_fourth_order_in_sigma():
    # on N(mu, s^2) the flow from sigma to 0 maps x to mu + s / sqrt(s^2 + sigma^2) (x - mu):
    # the "denoise" end is off by ~ s u^2 / 2, the trapezoid by ~ s u^4 / 8 (u = sigma / s)
    s = 0.1
    gm = GaussianMixture.gaussian(torch.zeros(3), s)
    z = torch.randn(500, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for u in [0.1, 0.2, 0.4]:
        sigma = u * s
        x = math.sqrt(s**2 + sigma**2) * z
        exact = s * z
        d = gm.denoiser(x, sigma)
        err_den = (final_step(x, x, d, "denoise") - exact).norm(dim=1) / z.norm(dim=1)
        err_trap = (final_step(x, x, d, "trapezoid") - exact).norm(dim=1) / z.norm(dim=1)
        torch.testing.assert_close(err_den, torch.full_like(err_den, s * (1 - 1 / math.sqrt(1 + u**2))))
        bound = s * u**4 / 8
        assert (err_trap < 1.01 * bound).all() and (err_trap > 0.8 * bound).all(), (u, err_trap.max(), bound)


def test_default_sampler_name():
    assert DEFAULT_SAMPLER == "unipc_auto"
