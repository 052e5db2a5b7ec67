"""Sohl-Dickstein et al. 2015: the bound is exact for the exact reverse chain; loss is unbiased."""

import math

import torch
from torch import nn

from difflab.core import vp_linear
from difflab.data.toys import sample_toy, toy_entropy
from difflab.methods.sohl_dickstein import SohlDickstein
from difflab.nn.toy import ToyConfig, ToyMLP


class Zero(nn.Module):
    def forward(self, x, c):
        return torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)


def test_bound_is_tight_for_standard_normal_data_and_the_exact_reverse_chain():
    """For x0 ~ N(0, I) the chain is reversible: p(x_{t-1}|x_t) = N(sqrt(1-beta) x_t, beta I)
    (m = v = 0) is exact, the prior q(x_T) = N(0, I) is exact, so E[bound] = H = d/2 log(2 pi e)."""
    model = SohlDickstein(Zero(), vp_linear(200, 1e-3, 0.05))
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    bound = model.nll_bound(x0, generator=torch.Generator().manual_seed(1))
    nll = 0.5 * x0.pow(2).sum(1).double() + math.log(2 * math.pi)
    gap = bound - nll
    assert abs(gap.mean()) < 4 * gap.std() / math.sqrt(len(gap)) + 1e-3, (gap.mean(), gap.std())
    assert abs(bound.mean() - math.log(2 * math.pi * math.e)) < 0.05


def test_training_loss_is_an_unbiased_estimate_of_the_bound():
    torch.manual_seed(0)
    model = SohlDickstein(
        ToyMLP(ToyConfig(dim=2, out_dim=4, hidden=16, depth=1, time_scale=1000.0)), vp_linear(50, 2e-3, 0.3)
    )
    x0 = sample_toy("8gaussians", 40, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.nll_bound(x0.repeat(50, 1), generator=torch.Generator().manual_seed(1)).mean()
        draws = torch.cat([model.loss(x0.repeat(50, 1), torch.Generator().manual_seed(2 + i)) for i in range(10)])
    se = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean().double() - full) < 4 * se, (draws.mean(), full, se)


def test_a_short_training_on_the_swiss_roll_beats_the_gaussian_fit():
    torch.manual_seed(0)
    model = SohlDickstein(
        ToyMLP(ToyConfig(dim=2, out_dim=4, hidden=64, depth=2, time_scale=1000.0)), vp_linear(100, 1e-3, 0.2)
    )
    data = sample_toy("swiss_roll", 20000, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        x0 = data[torch.randint(0, len(data), (256,), generator=g)]
        loss = model.loss(x0, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_test = sample_toy("swiss_roll", 2000, torch.Generator().manual_seed(9))
    bound = model.nll_bound(x_test, generator=torch.Generator().manual_seed(3)).mean().item()
    h_gauss = 0.5 * math.log(torch.linalg.det(2 * math.pi * math.e * torch.cov(x_test.T.double())).item())
    h_true, _ = toy_entropy("swiss_roll", n=20000)
    assert h_true < bound < h_gauss - 0.2, (bound, h_true, h_gauss)
    x = model.sample(500, generator=torch.Generator().manual_seed(4))
    assert x.shape == (500, 2) and torch.isfinite(x).all()
