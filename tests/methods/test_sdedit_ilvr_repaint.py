"""SDEdit, ILVR and RePaint against closed forms on Gaussian / mixture data."""

import math

import pytest
import torch

from difflab.core import GaussianMixture, sample, sigmas_karras, sigmas_logsnr
from difflab.methods.ilvr import ilvr_callback, low_pass
from difflab.methods.repaint import jump_schedule, repaint
from difflab.core.sampling import slice_sigmas
from difflab.methods.sdedit import sdedit


def test_sdedit_output_distribution_is_exact_on_gaussian_data():
    # data N(mu, v); x(t0) = g + sigma0 z; the reverse SDE then samples p(x0 | x(t0)), so the
    # output is Gaussian with mean mu + k (g - mu), variance k^2 sigma0^2 + k sigma0^2... with
    # k = v / (v + sigma0^2): mean mu + k (g - mu), var k^2 s0^2 + v s0^2 / (v + s0^2).
    mu, v = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64) ** 2
    gm = GaussianMixture.gaussian(mu, v.sqrt())
    n = 20000
    guide = torch.tensor([2.0, 1.0], dtype=torch.float64).expand(n, 2)
    sigmas = sigmas_logsnr(200, 0.002, 20.0)
    strength = 0.55
    s0 = float(slice_sigmas(sigmas, strength)[0])
    out = sdedit(gm.denoiser, guide, sigmas, strength=strength, noise=torch.Generator().manual_seed(0))
    k = v / (v + s0**2)
    mean = mu + k * (guide[0] - mu)
    std = (k**2 * s0**2 + v * s0**2 / (v + s0**2)).sqrt()
    assert ((out.mean(0) - mean).abs() < 4 * std / math.sqrt(n) + 5e-3).all(), (out.mean(0), mean)
    torch.testing.assert_close(out.std(0), std, rtol=0.03, atol=0)


def test_sdedit_faithfulness_decreases_with_strength_and_mask_keeps_guide():
    gm = GaussianMixture.random(dim=16, k=4, seed=0)
    guide = gm.sample(64, torch.Generator().manual_seed(1))[0].reshape(64, 1, 4, 4) + 0.5
    sig = sigmas_karras(30, 0.002, 80.0)
    dists = [
        (sdedit(gm.denoiser, guide, sig, strength=s, noise=torch.Generator().manual_seed(0)) - guide)
        .flatten(1)
        .norm(dim=1)
        .mean()
        .item()
        for s in (0.2, 0.4, 0.6, 0.9)
    ]
    assert all(a < b for a, b in zip(dists, dists[1:])), dists
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1  # edit the top half only
    out = sdedit(gm.denoiser, guide, sig, strength=0.6, edit_mask=mask, noise=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[..., 2:, :], guide[..., 2:, :], rtol=0, atol=1e-12)
    assert (out[..., :2, :] - guide[..., :2, :]).abs().mean() > 0.05


def test_sdedit_errors():
    gm = GaussianMixture.gaussian(torch.zeros(4), 1.0)
    g = torch.zeros(2, 1, 2, 2)
    sig = sigmas_karras(5, 0.01, 10.0)
    with pytest.raises(ValueError, match="strength"):
        sdedit(gm.denoiser, g, sig, strength=1.5)
    with pytest.raises(ValueError, match=r"edit_mask of shape \(1, 1, 3, 3\)"):
        sdedit(gm.denoiser, g, sig, edit_mask=torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="binary"):
        sdedit(gm.denoiser, g, sig, edit_mask=torch.full((1, 1, 2, 2), 0.5))


def test_ilvr_output_shares_the_reference_low_frequencies_and_diversity_grows_with_n():
    gm = GaussianMixture.random(dim=64, k=5, seed=2, spread=1.0)
    ref = gm.sample(1, torch.Generator().manual_seed(3))[0].reshape(1, 1, 8, 8)
    sig = sigmas_karras(40, 0.002, 80.0)
    spread = {}
    for N in (2, 4, 8):
        x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(N), dtype=torch.float64) * 80
        cb = ilvr_callback(ref, N, noise=torch.Generator().manual_seed(0))
        out = sample(gm.denoiser, x, sig, method="euler_ancestral", callback=cb, noise=torch.Generator().manual_seed(1))
        torch.testing.assert_close(low_pass(out, N), low_pass(ref, N).expand_as(out), rtol=0, atol=1e-9)
        spread[N] = torch.pdist(out.flatten(1)).mean().item()
    assert spread[2] < spread[4] < spread[8], spread


def test_ilvr_errors():
    with pytest.raises(ValueError, match="factor 3 must divide"):
        ilvr_callback(torch.zeros(1, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="unknown filter"):
        low_pass(torch.zeros(1, 1, 8, 8), 2, "gauss")


def test_jump_schedule_matches_the_paper_walk():
    levels = jump_schedule(250, 10, 10)
    assert levels[0] == 250 and levels[-1] == 0
    assert all(abs(a - b) == 1 for a, b in zip(levels, levels[1:]))
    down = sum(1 for a, b in zip(levels, levels[1:]) if b < a)
    assert down == 250 + 24 * 9 * 10  # every 10 levels below 240: 9 extra passes of 10 steps
    assert jump_schedule(5, 10, 10) == [5, 4, 3, 2, 1, 0]


def _conditional_x2(gm, x1):
    """Exact p(x2 | x1) for a diagonal mixture: weights and component moments."""
    w = gm.weights * torch.exp(-0.5 * (x1 - gm.means[:, 0]) ** 2 / gm.variances[:, 0]) / gm.variances[:, 0].sqrt()
    w = w / w.sum()
    mean = (w * gm.means[:, 1]).sum()
    second = (w * (gm.variances[:, 1] + gm.means[:, 1] ** 2)).sum()
    return w, mean, (second - mean**2).sqrt()


def test_repaint_resampling_moves_the_fill_toward_the_exact_conditional():
    # Two modes; the known coordinate x1 = 0.6 says "upper mode" with probability 0.965
    # (exact). Plain replacement (r = 1) ignores most of that; RePaint's resampling (r = 10)
    # must cut the error in the mode share substantially. Measured here: r = 1 -> 0.63,
    # r = 10 -> 0.77, r = 20 -> 0.79 (RePaint is a biased approximation of the conditional).
    gm = GaussianMixture(
        torch.tensor([0.5, 0.5]), torch.tensor([[-1.0, -1.5], [1.0, 1.5]]), torch.tensor([[0.6, 0.3], [0.6, 0.3]]) ** 2
    )
    n = 3000
    known = torch.tensor([0.6, 0.0], dtype=torch.float64).reshape(1, 1, 1, 2).expand(n, 1, 1, 2)
    keep = torch.tensor([1.0, 0.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    w, _, _ = _conditional_x2(gm, 0.6)
    assert w[1] > 0.95
    sig = sigmas_logsnr(50, 0.005, 40.0)
    errs = {}
    for r in (1, 10):
        out = repaint(
            gm.denoiser, known, keep, sig, jump_length=5, jump_n_sample=r, noise=torch.Generator().manual_seed(0)
        )
        torch.testing.assert_close(out[..., 0], known[..., 0], rtol=0, atol=0)  # known pixel kept exactly
        share_upper = (out[:, 0, 0, 1] > 0).double().mean().item()
        errs[r] = abs(share_upper - w[1].item())
    assert errs[10] < 0.75 * errs[1], errs


def test_repaint_errors():
    gm = GaussianMixture.gaussian(torch.zeros(4), 1.0)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="ending in 0"):
        repaint(gm.denoiser, x, torch.ones(1, 1, 2, 2), torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="keep_mask must be binary"):
        repaint(gm.denoiser, x, torch.full((1, 1, 2, 2), 0.3), sigmas_karras(4, 0.1, 5.0))


def test_repaint_jumps_start_one_level_above_the_clean_image():
    """As in the official schedule: the finished image (level 0) is reached once, at the very end,
    and the walk turns upward only at levels 1, 1 + j, 1 + 2j, ... (official timesteps 0, j, 2j)."""
    from difflab.methods.repaint import jump_schedule

    for T, j, r in ((20, 5, 3), (250, 10, 10), (50, 5, 5)):
        levels = jump_schedule(T, j, r)
        assert levels[0] == T and levels[-1] == 0 and levels.count(0) == 1
        turns = [levels[i] for i in range(1, len(levels) - 1) if levels[i - 1] > levels[i] < levels[i + 1]]
        assert turns and all((t - 1) % j == 0 for t in turns)
        assert sorted(set(turns)) == list(range(1, T - j + 1, j))
        assert sum(1 for a, b in zip(levels, levels[1:]) if b < a) == T + len(set(turns)) * (r - 1) * j
