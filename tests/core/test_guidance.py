"""Guidance transforms against closed forms on Gaussian data."""

import math

import pytest
import torch

from difflab.core import (
    GaussianMixture,
    cfg,
    clamp,
    classifier_guidance,
    compose,
    dynamic_threshold,
    interval,
    sample_heun,
    sigmas_karras,
)


def _two_gaussians():
    """Conditional denoiser: class 0 -> N(mu0, v), class 1 -> N(mu1, v); uncond = label -1."""
    mus = torch.tensor([[-1.0, 0.5], [2.0, -1.0]], dtype=torch.float64)
    v = torch.tensor([0.3, 0.6], dtype=torch.float64) ** 2
    gms = [GaussianMixture.gaussian(mus[k], v.sqrt()) for k in range(2)]
    marginal = GaussianMixture(torch.tensor([0.5, 0.5]), mus, torch.stack([v, v]))

    def D(x, sigma, labels):
        out = marginal.denoiser(x, sigma)
        for k in range(2):
            sel = labels == k
            if sel.any():
                s = sigma[sel] if torch.as_tensor(sigma).ndim else sigma
                out[sel] = gms[k].denoiser(x[sel], s)
        return out

    return D, gms, marginal, mus, v


def test_cfg_scale_one_is_the_conditional_denoiser_and_zero_the_unconditional():
    D, *_ = _two_gaussians()
    x = torch.randn(6, 2, dtype=torch.float64) * 2
    sig = torch.full((6,), 0.8, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    null = {"labels": torch.tensor([-1])}
    torch.testing.assert_close(cfg(1.0, null)(D)(x, sig, labels=y), D(x, sig, labels=y))
    torch.testing.assert_close(cfg(0.0, null)(D)(x, sig, labels=y), D(x, sig, labels=torch.full((6,), -1)))


def test_cfg_gives_the_tilted_distribution():
    # With D_u the two-component mixture's denoiser and D_c one component's, the guided score
    # s * score_c + (1 - s) * score_u is that of p_c^s p_u^(1-s). For a *single* Gaussian pair
    # with equal variances the tilted density is N(mu_u + s (mu_c - mu_u), v) at every sigma,
    # so sampling the guided ODE must land there exactly.
    mu_c, mu_u = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.0, 0.0], dtype=torch.float64)
    v = torch.tensor([0.4, 0.7], dtype=torch.float64) ** 2
    gc, gu = GaussianMixture.gaussian(mu_c, v.sqrt()), GaussianMixture.gaussian(mu_u, v.sqrt())

    def D(x, sigma, c):
        return torch.where(c[:, None] > 0, gc.denoiser(x, sigma), gu.denoiser(x, sigma))

    s = 3.0
    guided = cfg(s, {"c": torch.tensor([0])})(D)
    n = 20000
    target_mean = mu_u + s * (mu_c - mu_u)
    x = target_mean + (v + 20.0**2).sqrt() * torch.randn(
        n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    out = sample_heun(guided, x, sigmas_karras(30, 0.002, 20.0), cond={"c": torch.ones(n, dtype=torch.long)})
    se = v.sqrt() / math.sqrt(n)
    assert ((out.mean(0) - target_mean).abs() < 4 * se).all(), out.mean(0)
    torch.testing.assert_close(out.std(0), v.sqrt(), rtol=0.02, atol=0)


def test_cfg_rescale_matches_conditional_std():
    D, *_ = _two_gaussians()
    x = torch.randn(4, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    g = cfg(5.0, {"labels": torch.tensor([-1])}, rescale=1.0)(D)(x, 1.0, labels=y)
    dc = D(x, torch.full((4,), 1.0, dtype=torch.float64), labels=y)
    torch.testing.assert_close(g.std(dim=1), dc.std(dim=1))


def test_classifier_guidance_scale_one_turns_marginal_into_class_conditional():
    # Bayes: grad log p_sigma(x | y) = grad log p_sigma(x) + grad log p(y | x, sigma), so
    # D_uncond + 1 * sigma^2 grad log p(y|x) is exactly the class-conditional denoiser.
    _, gms, marginal, mus, v = _two_gaussians()

    def log_prob(x, sigma, labels):
        lj = marginal._log_joint(x, sigma)  # (n, K)
        return (lj - torch.logsumexp(lj, 1, keepdim=True)).gather(1, labels[:, None])[:, 0]

    D = lambda x, sigma, labels: marginal.denoiser(x, sigma)  # noqa: E731
    guided = classifier_guidance(log_prob, 1.0)(D)
    x = torch.randn(8, 2, dtype=torch.float64) * 2
    for sigma in [0.05, 0.5, 3.0]:
        sig = torch.full((8,), sigma, dtype=torch.float64)
        for k in range(2):
            y = torch.full((8,), k)
            torch.testing.assert_close(guided(x, sig, labels=y), gms[k].denoiser(x, sig), rtol=1e-9, atol=1e-9)


def test_clamp_threshold_interval_compose():
    base = lambda x, sigma: x * 3  # noqa: E731
    x = torch.linspace(-1, 1, 20).reshape(2, 10)
    assert clamp()(base)(x, 1.0).abs().max() == 1
    d = dynamic_threshold(percentile=1.0)(base)(x, 1.0)
    torch.testing.assert_close(d, x)  # s = max|3x| = 3 -> 3x / 3
    inside = interval(clamp(), 0.5, 2.0)(base)
    torch.testing.assert_close(inside(x, torch.tensor([1.0, 5.0])), torch.stack([(3 * x[0]).clamp(-1, 1), 3 * x[1]]))
    # compose applies the first transform innermost: clamp then scale-by-threshold
    both = compose(clamp(-0.5, 0.5), dynamic_threshold(percentile=1.0, max_value=0.25))(base)
    assert both(x, 1.0).abs().max().item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="rescale must be in"):
        cfg(2.0, {}, rescale=2.0)
    with pytest.raises(ValueError, match="sigma_lo <= sigma_hi"):
        interval(clamp(), 2.0, 1.0)


def test_cfg_pads_token_sequences_of_different_lengths():
    # a "text" denoiser whose output depends on the masked mean of the context tokens
    def D(x, sigma, context, context_mask):
        m = context_mask[..., None].to(x.dtype)
        pooled = (context * m).sum(1) / m.sum(1)
        return x * 0.5 + pooled[:, : x.shape[1]]

    x = torch.randn(3, 2, dtype=torch.float64)
    ctx, mask = torch.randn(3, 5, 4, dtype=torch.float64), torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    null_ctx, null_mask = torch.randn(1, 2, 4, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool)
    guided = cfg(3.0, {"context": null_ctx, "context_mask": null_mask})(D)
    got = guided(x, 1.0, context=ctx, context_mask=mask)
    d_c = D(x, 1.0, ctx, mask)
    d_u = D(x, 1.0, null_ctx.expand(3, 2, 4), null_mask.expand(3, 2))
    torch.testing.assert_close(got, d_u + 3.0 * (d_c - d_u))
