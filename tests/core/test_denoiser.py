import pytest
import torch

from difflab.core import EDM, VE, GaussianMixture, Preconditioned, from_eps, to_eps, to_score, vp_linear
from tests.core.conftest import OracleNet


@pytest.mark.parametrize(
    "prediction,schedule",
    [("eps", vp_linear()), ("x0", vp_linear()), ("v", vp_linear()), ("edm", EDM()), ("eps", VE())],
)
def test_oracle_network_gives_exact_denoiser_and_zero_loss(prediction, schedule):
    gm = GaussianMixture.random(dim=4, k=2, seed=1)
    net = OracleNet(gm, lambda net: Preconditioned(net, schedule, prediction))
    D = net.precond
    x0, _ = gm.sample(64, torch.Generator().manual_seed(0))
    x0 = x0.reshape(64, 1, 2, 2)
    sigma = torch.tensor([schedule.sigma_min * 3, 1.0, 10.0], dtype=torch.float64).repeat_interleave(22)[:64]
    noise = torch.randn_like(x0)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    torch.testing.assert_close(D(x, sigma), gm.denoiser(x, sigma), rtol=1e-6, atol=1e-6)
    # the loss in network space is the error of the exact target; it is not zero (x0 is random)
    # but equals ||D - x0||^2 / c_out^2, which checks target = (x0 - c_skip x) / c_out
    c_skip, c_out, _, _ = D.coefficients(sigma)
    per = D.loss(x0, sigma, noise)
    expect = ((gm.denoiser(x, sigma) - x0) ** 2).flatten(1).mean(1) / c_out**2
    torch.testing.assert_close(per.double(), expect, rtol=1e-5, atol=1e-8)


def test_v_prediction_is_alpha_eps_minus_sigma_x0():
    # v = alpha eps - sigma_vp x0 (Salimans & Ho 2022); our target in v space must equal it
    sched = vp_linear()
    D = Preconditioned(torch.nn.Identity(), sched, "v")
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 1.0, 4.0, 30.0], dtype=torch.float64)
    x = x0 + sigma[:, None] * eps
    alpha = 1 / (1 + sigma**2).sqrt()
    v = alpha[:, None] * eps - (sigma * alpha)[:, None] * x0
    torch.testing.assert_close(D.target(x0, x, sigma), v)


def test_tweedie_helpers_on_gaussian():
    gm = GaussianMixture.gaussian(torch.tensor([1.0, -2.0]), 0.5)
    x = torch.randn(10, 2, dtype=torch.float64) * 3
    sigma = torch.full((10,), 0.7, dtype=torch.float64)
    score = to_score(x, sigma, gm.denoiser(x, sigma))
    exact = -(x - gm.means[0]) / (0.25 + 0.49)
    torch.testing.assert_close(score, exact)
    eps = to_eps(x, sigma, gm.denoiser(x, sigma))
    torch.testing.assert_close(from_eps(x, sigma, eps), gm.denoiser(x, sigma))


def test_preconditioned_errors():
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        Preconditioned(torch.nn.Identity(), vp_linear(), "score")
    D = Preconditioned(torch.nn.Identity(), vp_linear(), "x0")
    with pytest.raises(ValueError, match=r"sigma must be a scalar or of shape \(4,\)"):
        D(torch.zeros(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="noise shape"):
        D.loss(torch.zeros(4, 2), 1.0, torch.zeros(4, 3))
