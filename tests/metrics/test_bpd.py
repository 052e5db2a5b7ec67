"""Bits/dim against the exact discrete NLL of Gaussian-mixture data quantised to 256 levels.

Truth: P(k) = sum_j w_j prod_d [Phi(hi) - Phi(lo)] over each level's bin (`discrete_log_prob`).
Tolerances (bits/dim, means over the test points; measured offline with 2-4x more points):

  PF-ODE, exact divergence, 2-D mixture             |mean gap| < 0.02   (measured -0.001 +- 0.001)
  PF-ODE, Hutchinson 4 probes, 16-D mixture         |mean gap| < 0.03   (measured -0.007 +- 0.004)
  VLB, 8-D Gaussian, T = 50 / 200                   gap 0.15 / 0.007 (+- 0.015); at T = 1000: -0.017 +- 0.015
  VLB, 2-D mixture, T = 50 / 200                    gap 0.56 / 0.17 (+- 0.014);  at T = 1000: 0.044 +- 0.015

The VLB is an upper bound in expectation, and its gap shrinks as T grows (the DDPM betas scaled by
1000 / T, so sigma_min ~ 1 / T); the ODE with uniform dequantisation is exact up to Jensen's gap,
which is ~1e-3 bits/dim for densities this smooth on the scale of a bin.
"""

import math

import pytest
import torch

from difflab.core import GaussianMixture, Preconditioned, vp_linear
from difflab.metrics import discrete_log_prob, ode_bits_per_dim, quantize, vlb_bits_per_dim
from difflab.metrics.bpd import BIN_WIDTH, LOG2_LEVELS


def _data(gm, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = quantize(gm.sample(n, g)[0])
    truth = -discrete_log_prob(gm, x) / (x.shape[1] * math.log(2))
    return x, truth


def _grid(T):
    return vp_linear(T, 1e-4 * 1000 / T, 0.02 * 1000 / T)


def test_levels_and_the_discrete_truth_normalise():
    assert LOG2_LEVELS == pytest.approx(-math.log2(BIN_WIDTH))
    x = quantize(torch.tensor([[-1.0], [-0.5], [0.0], [0.3], [0.99]]))
    torch.testing.assert_close(quantize(x + 0.9 * BIN_WIDTH / 2), x)  # within half a bin
    torch.testing.assert_close(quantize(x), torch.round((x + 1) * 127.5) / 127.5 - 1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        quantize(torch.tensor([[1.5]]))
    # a 1-D mixture with mass beyond both edges: the 256 probabilities sum to one
    gm = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-0.95], [0.6]]), torch.tensor([[0.1**2], [0.3**2]]))
    levels = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).reshape(-1, 1)
    total = discrete_log_prob(gm, levels).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-12)


def test_ode_bits_per_dim_exact_divergence_matches_the_truth_in_2d():
    gm = GaussianMixture.random(dim=2, k=3, seed=0, spread=0.3, std_range=(0.05, 0.2))
    x, truth = _data(gm, 150)
    bpd = ode_bits_per_dim(
        gm.denoiser, x, sigma_min=1e-3, sigma_max=80.0, hutchinson=0, generator=torch.Generator().manual_seed(1)
    )
    gap = bpd - truth
    assert abs(gap.mean().item()) < 0.02, gap.mean()
    assert gap.abs().median().item() < 0.05  # per point: one dequantisation draw each


def test_ode_bits_per_dim_hutchinson_matches_the_truth_in_16d():
    gm = GaussianMixture.random(dim=16, k=3, seed=1, spread=0.2, std_range=(0.03, 0.1))
    x, truth = _data(gm, 60)
    bpd = ode_bits_per_dim(
        gm.denoiser, x, sigma_min=1e-3, sigma_max=80.0, hutchinson=4, generator=torch.Generator().manual_seed(1)
    )
    assert abs((bpd - truth).mean().item()) < 0.03, (bpd - truth).mean()


def test_vlb_bounds_the_gaussian_nll_and_tightens_as_T_grows():
    gm = GaussianMixture.gaussian(torch.zeros(8), 0.25)
    x, truth = _data(gm, 300)
    gaps, full = {}, {}
    for T in (50, 200):
        full[T], parts = vlb_bits_per_dim(
            gm.denoiser,
            x,
            schedule=_grid(T),
            batch_size=50_000,
            generator=torch.Generator().manual_seed(T),
            return_terms=True,
        )
        gaps[T] = (full[T] - truth).mean().item()
        torch.testing.assert_close(full[T], parts["prior"] + parts["decoder"] + parts["kl"])
    se = 0.03  # standard error of a mean gap over 300 points (per-point sd ~0.5 bits/dim)
    assert gaps[50] > 0.15 - 3 * se, gaps  # an upper bound, visibly loose at T = 50
    assert abs(gaps[200]) < 3 * se, gaps  # within 0.09 bits/dim at T = 200
    assert gaps[50] - gaps[200] > 0.05, gaps
    # 20 strata estimate the same sum without bias (per-point sd grows to ~1 bit/dim)
    strat = vlb_bits_per_dim(
        gm.denoiser, x, schedule=_grid(200), timesteps=20, batch_size=50_000, generator=torch.Generator().manual_seed(1)
    )
    assert strat.mean().item() == pytest.approx(full[200].mean().item(), abs=0.2)


def test_vlb_bounds_a_mixture_nll_and_tightens_as_T_grows():
    gm = GaussianMixture.random(dim=2, k=3, seed=0, spread=0.3, std_range=(0.05, 0.2))
    x, truth = _data(gm, 500)
    gaps = {}
    for T in (50, 200):
        bpd = vlb_bits_per_dim(
            gm.denoiser, x, schedule=_grid(T), generator=torch.Generator().manual_seed(T), batch_size=50_000
        )
        gaps[T] = (bpd - truth).mean().item()
    se = 0.04  # per-point sd ~0.9 bits/dim
    assert gaps[50] > 0.56 - 4 * se and gaps[200] > 0.17 - 4 * se, gaps  # above the truth
    assert gaps[200] < 0.17 + 4 * se, gaps
    assert gaps[50] - gaps[200] > 0.25, gaps


def test_vlb_and_ode_run_on_a_network_denoiser():
    # smoke test: a Preconditioned network on an EDM schedule (the VLB then uses vp_linear(1000))
    from difflab.core import EDM

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 16), torch.nn.Unflatten(1, (1, 4, 4)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net

        def forward(self, x, c_noise, **cond):
            return self.body(x)

    D = Preconditioned(Net(), EDM(), "edm").eval()
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    v = vlb_bits_per_dim(D, x, timesteps=5, generator=torch.Generator().manual_seed(0))
    o = ode_bits_per_dim(D, x, solver="rk4", n_steps=4, generator=torch.Generator().manual_seed(0))
    assert v.shape == o.shape == (3,) and torch.isfinite(v).all() and torch.isfinite(o).all()
