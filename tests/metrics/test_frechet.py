import numpy as np
import pytest
import torch

from difflab.metrics import GaussianStats, frechet_distance, mean_cov


def _random_spd(d, rng, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_commuting_covariances_match_the_closed_form():
    # diagonal covariances commute: FD = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(0)
    d = 20
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # and a rotated pair that still commutes (same eigenvectors): the same number
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_general_covariances_match_an_eigendecomposition():
    # tr((C1 C2)^{1/2}) = sum sqrt(eig(C1^{1/2} C2 C1^{1/2})), computed independently with eigh
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.3
    c1, c2 = _random_spd(d, rng), _random_spd(d, rng, 2.0)
    w, v = np.linalg.eigh(c1)
    s1 = v @ np.diag(np.sqrt(w)) @ v.T
    lam = np.linalg.eigvalsh(s1 @ c2 @ s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.sum(np.sqrt(lam.clip(0)))
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)
    # symmetric in its two arguments; torch tensors accepted
    assert frechet_distance(torch.tensor(mu2), torch.tensor(c2), mu1, c1) == pytest.approx(expected, rel=1e-9)


def test_identical_and_singular_inputs():
    rng = np.random.default_rng(2)
    mu, c = rng.standard_normal(16), _random_spd(16, rng)
    assert frechet_distance(mu, c, mu, c) == pytest.approx(0.0, abs=1e-8)
    # rank-deficient covariances (fewer samples than dimensions): finite, non-negative, and
    # equal to the closed form for these commuting projections
    p = np.diag([1.0] * 4 + [0.0] * 12)
    fd = frechet_distance(mu, p, mu + 1, 4 * p)
    assert fd == pytest.approx(16 + 4 * (2 - 1) ** 2, rel=1e-4)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_running_stats_equal_numpy_cov():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1000, 8, generator=g, dtype=torch.float64) * 3 + 100  # offset: cancellation check
    stats = GaussianStats()
    for chunk in f.split(137):
        stats.update(chunk)
    mu, cov = stats.mean_cov()
    mu_ref, cov_ref = mean_cov(f)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(cov, cov_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(cov_ref, np.cov(f.numpy(), rowvar=False), rtol=1e-12)


def test_sample_fd_of_two_gaussians_approaches_the_truth():
    # features drawn from N(0, I) and N(m, 4 I) in 8-D: FD = |m|^2 + 8 (2 - 1)^2
    g = torch.Generator().manual_seed(3)
    m = torch.full((8,), 0.5, dtype=torch.float64)
    a = torch.randn(20000, 8, generator=g, dtype=torch.float64)
    b = m + 2 * torch.randn(20000, 8, generator=g, dtype=torch.float64)
    fd = frechet_distance(*mean_cov(a), *mean_cov(b))
    assert fd == pytest.approx(2.0 + 8.0, rel=0.02)
