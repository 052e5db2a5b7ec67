import math

import pytest
import torch

from difflab.data.toys import (
    TOY_NAMES,
    eight_gaussians_params,
    sample_toy,
    toy_entropy,
    toy_extent,
    toy_log_density,
    toy_score,
)
from difflab.data import toys

F64 = torch.float64


def _grid(L, h):
    u = torch.arange(-L + h / 2, L, h, dtype=F64)
    X, Y = torch.meshgrid(u, u, indexing="xy")
    return torch.stack([X, Y], -1)  # (m, m, 2)


@pytest.mark.parametrize("name", TOY_NAMES)
def test_samples_deterministic_and_unit_scale(name):
    a = sample_toy(name, 20_000, torch.Generator().manual_seed(0))
    b = sample_toy(name, 20_000, torch.Generator().manual_seed(0))
    assert a.dtype == torch.float32 and a.shape == (20_000, 2) and torch.equal(a, b)
    assert a.mean(0).abs().max() < 0.05
    assert 0.6 < a.std(0).min() and a.std(0).max() < 1.3 and abs(a.var(0).mean() - 1) < 0.05
    assert a.abs().max() < toy_extent(name)


@pytest.mark.parametrize(
    "name,sigma", [(n, 0.0) for n in TOY_NAMES] + [("swiss_roll", 0.5), ("checkerboard", 0.3), ("moons", 1.0)]
)
def test_density_integrates_to_one(name, sigma):
    if name == "checkerboard" and sigma == 0:
        h = toys._CB_CELL / 16  # grid aligned with the squares: exact
        L = math.sqrt(3)
    else:
        h, L = 0.05, toy_extent(name, sigma)
    p = toy_log_density(name, _grid(L, h), sigma).exp()
    assert abs(float(p.sum()) * h * h - 1) < 1e-2
    assert abs(float(p.sum()) * h * h - 1) < 1e-4  # in fact far better than asked


@pytest.mark.parametrize("name", TOY_NAMES)
def test_histogram_of_samples_matches_density(name):
    """Total variation between the samples' histogram and the density's bin masses."""
    n, L, bins, sub = 100_000, toy_extent(name), 24, 4
    x = sample_toy(name, n, torch.Generator().manual_seed(1), dtype=F64)
    edges = torch.linspace(-L, L, bins + 1, dtype=F64)
    ix = torch.bucketize(x[:, 0].contiguous(), edges) - 1
    iy = torch.bucketize(x[:, 1].contiguous(), edges) - 1
    hist = torch.bincount(iy * bins + ix, minlength=bins * bins).to(F64) / n
    h = 2 * L / (bins * sub)
    p = toy_log_density(name, _grid(L, h), 0.0).exp() * h * h  # (bins*sub, bins*sub)
    mass = p.reshape(bins, sub, bins, sub).sum((1, 3)).reshape(-1)
    tv = 0.5 * (hist - mass).abs().sum()
    assert tv < 0.03, tv
    # a wrong density (another toy) is far away: the test can fail
    other = TOY_NAMES[(TOY_NAMES.index(name) + 1) % len(TOY_NAMES)]
    q = toy_log_density(other, _grid(L, h), 0.0).exp() * h * h
    assert 0.5 * (hist - q.reshape(bins, sub, bins, sub).sum((1, 3)).reshape(-1)).abs().sum() > 0.2


@pytest.mark.parametrize("name", TOY_NAMES)
def test_entropy_monte_carlo_matches_grid_entropy(name):
    H, se = toy_entropy(name, n=20_000, seed=3)
    L, h = toy_extent(name), (0.02 if name == "checkerboard" else 0.04)
    lp = toy_log_density(name, _grid(L, h), 0.0)
    p = lp.exp()
    H_grid = float(-(torch.where(p > 0, p * lp, torch.zeros_like(p))).sum() * h * h)
    tol = 5 * se + (0.01 if name == "checkerboard" else 1e-3)  # checkerboard: edge cells
    assert abs(H - H_grid) < tol, (H, se, H_grid)
    # samples from a different stream: their mean log-density is -H within the error
    x = sample_toy(name, 20_000, torch.Generator().manual_seed(4), dtype=F64)
    assert abs(float(-toy_log_density(name, x).mean()) - H) < 6 * se + 1e-12


def test_known_entropies():
    H, se = toy_entropy("checkerboard", n=5000)
    assert H == pytest.approx(math.log(6), abs=1e-12) and se < 1e-12
    # 8 well-separated gaussians: log 8 + entropy of one isotropic gaussian
    s = eight_gaussians_params()[2]
    H, se = toy_entropy("8gaussians", n=20_000)
    assert abs(H - (math.log(8) + 1 + math.log(2 * math.pi * s * s))) < 4 * se


def test_rings_bessel_form_equals_quadrature_over_angle():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([sample_toy("rings", 200, g, F64), 6 * (torch.rand(200, 2, generator=g, dtype=F64) - 0.5)])
    for sigma in (0.0, 0.4):
        s2 = toys.S0["rings"] ** 2 + sigma**2
        theta = torch.arange(2000, dtype=F64) * (2 * math.pi / 2000)  # periodic: trapezoid exact
        circle = torch.stack([torch.cos(theta), torch.sin(theta)], -1)
        terms = []
        for r in toys._RINGS_R:
            d2 = (x[:, None, :] - r * circle[None]).pow(2).sum(-1)
            terms.append(torch.logsumexp(-d2 / (2 * s2), 1) - math.log(2000) - math.log(2 * math.pi * s2))
        ref = torch.logsumexp(torch.stack(terms, 1), 1) - math.log(4)
        torch.testing.assert_close(toy_log_density("rings", x, sigma), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["swiss_roll", "moons"])
def test_curve_density_matches_fine_simpson(name):
    """Panel Gauss-Legendre against composite Simpson on a fine uniform grid of the parameter."""
    g = torch.Generator().manual_seed(2)
    x = torch.cat(
        [sample_toy(name, 200, g, F64), 2 * toy_extent(name) * (torch.rand(200, 2, generator=g, dtype=F64) - 0.5)]
    )
    s = toys.S0[name]
    if name == "swiss_roll":
        t = torch.linspace(toys._SR_T0, toys._SR_T1, 8001, dtype=F64)
        pts, m = [toys._curve(name, t)], [1.0]
    else:
        t = torch.linspace(0, math.pi, 4001, dtype=F64)
        pts = [toys._curve(name, t, torch.full_like(t, k, dtype=torch.long)) for k in (0, 1)]
        m = [0.5, 0.5]
    w = torch.ones_like(t)
    w[1:-1:2], w[2:-1:2] = 4, 2  # Simpson 1 4 2 ... 4 1
    w = w / w.sum()
    ref = torch.stack(
        [
            torch.logsumexp(torch.log(mk * w) - (x[:, None] - c[None]).pow(2).sum(-1) / (2 * s * s), 1)
            for c, mk in zip(pts, m)
        ],
        1,
    ).logsumexp(1)
    ref = ref - math.log(2 * math.pi * s * s)
    keep = ref > -25  # where the Simpson reference is exact
    torch.testing.assert_close(toy_log_density(name, x)[keep], ref[keep], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["swiss_roll", "checkerboard", "rings"])
def test_noisy_density_matches_monte_carlo_convolution(name):
    """p_sigma(x) = E_x0 N(x; x0, sigma^2): the exact formula against 200k samples of x0."""
    sigma = 0.6
    x0 = sample_toy(name, 200_000, torch.Generator().manual_seed(5), F64)
    x = torch.tensor([[0.0, 0.0], [0.7, -0.4], [-1.2, 1.0], [1.5, 1.5]], dtype=F64)
    d2 = (x[:, None] - x0[None]).pow(2).sum(-1)
    mc = torch.exp(-d2 / (2 * sigma**2)).mean(1) / (2 * math.pi * sigma**2)
    exact = toy_log_density(name, x, sigma).exp()
    torch.testing.assert_close(exact, mc, rtol=0.02, atol=1e-4)


def test_score_gives_exact_mixture_denoiser():
    """Tweedie on 8 gaussians: x + sigma^2 score = posterior mean, computed by hand."""
    w, mu, s0 = eight_gaussians_params()
    sigma = 0.7
    x = sample_toy("8gaussians", 64, torch.Generator().manual_seed(6), F64) + sigma * torch.randn(
        64, 2, generator=torch.Generator().manual_seed(7), dtype=F64
    )
    s2 = s0**2 + sigma**2
    logits = -(x[:, None] - mu[None]).pow(2).sum(-1) / (2 * s2)
    gamma = logits.softmax(1)  # (64, 8)
    post = mu[None] + (s0**2 / s2) * (x[:, None] - mu[None])  # (64, 8, 2)
    expected = (gamma[..., None] * post).sum(1)
    torch.testing.assert_close(x + sigma**2 * toy_score("8gaussians", x, sigma), expected)


def test_errors():
    with pytest.raises(ValueError, match="known"):
        sample_toy("spiral", 10)
    with pytest.raises(ValueError, match="shape"):
        toy_log_density("rings", torch.zeros(3, 3))
    assert toy_log_density("checkerboard", torch.tensor([[5.0, 5.0]])) == -math.inf
