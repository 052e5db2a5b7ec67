"""Edit strength is the papers' diffusion time t0 (issue 21): the noise level an edit starts from is
the schedule's sigma at t0, the same for every number of steps and every sampler, and the editors
really start there (the largest sigma the network sees)."""

import math

import pytest
import torch

from difflab.core.sampling import edit_sigmas
from difflab.core.schedules import EDM, VE, ContinuousVP, vp_cosine, vp_linear
from difflab.edit import edit
from difflab.pipeline import Pipeline


def _vp_sde_sigma(t):  # the papers' VP SDE, beta 0.1 .. 20
    return math.sqrt(math.expm1(0.1 * t + 0.5 * 19.9 * t * t))


def test_sigma_at_time_per_schedule_exact():
    s = vp_linear()
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    for t0 in (0.25, 0.5, 0.75, 1.0):  # DDPM's timestep t = t0 T (1-based)
        i = round(t0 * 1000) - 1
        assert s.sigma_at_time(t0) == pytest.approx(float(((1 - abar[i]) / abar[i]).sqrt()), rel=1e-12)
    assert s.sigma_at_time(0.5) == pytest.approx(3.4, abs=0.05)  # the "about 3.4"
    assert s.sigma_at_time(0) == 0.0
    c = vp_cosine()
    assert c.sigma_at_time(0.5) == pytest.approx(float(c.sigmas[499]), rel=1e-12)
    sde = ContinuousVP()
    assert sde.sigma_at_time(0.5) == pytest.approx(_vp_sde_sigma(0.5), rel=1e-12)
    ve = VE(0.01, 50.0)
    assert ve.sigma_at_time(0.5) == pytest.approx(0.01 * 5000**0.5, rel=1e-12)
    edm = EDM()  # no time axis: the papers' VP SDE, capped at sigma_max
    assert edm.sigma_at_time(0.5) == pytest.approx(_vp_sde_sigma(0.5), rel=1e-12)
    assert edm.sigma_at_time(0.75) == pytest.approx(_vp_sde_sigma(0.75), rel=1e-12)  # Blended's ~17
    assert 16 < edm.sigma_at_time(0.75) < 18
    assert edm.sigma_at_time(1.0) == 80.0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="t0 must be in"):
            edm.sigma_at_time(bad)


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_edit_grid_starts_at_t0_whatever_the_steps(steps):
    s = EDM()
    grid = edit_sigmas(s, 0.5, steps)
    assert float(grid[0]) == pytest.approx(_vp_sde_sigma(0.5), rel=1e-12)
    assert float(grid[-1]) == 0.0 and len(grid) - 1 == max(1, round(0.5 * steps))
    assert (grid[1:] < grid[:-1]).all()
    with pytest.raises(ValueError, match=r"strength \(t0\) must be in \(0, 1\]"):
        edit_sigmas(s, 0.0, steps)


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return Pipeline.from_pretrained(tiny_run)


def _max_sigma_seen(pipe, fn):
    seen = []

    def hook(module, args, kwargs):
        sigma = args[1] if len(args) > 1 else kwargs["sigma"]
        seen.append(float(torch.as_tensor(sigma).max()))

    h = pipe.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = fn()
    finally:
        h.remove()
    return max(seen), result


@pytest.mark.parametrize(
    "method,kw,t0",
    [
        ("sdedit", {"strength": 0.5}, 0.5),
        ("sdedit", {"strength": 0.3, "sampler": "dpmpp_2m"}, 0.3),
        ("p2p", {"strength": 0.6, "prompt": "3", "source_prompt": "7"}, 0.6),
    ],
)
def test_editors_start_at_the_papers_t0(pipe, method, kw, t0):
    image = torch.zeros(1, 1, 16, 16)
    want = pipe.denoiser.schedule.sigma_at_time(t0)
    for steps in (8, 20):
        top, result = _max_sigma_seen(pipe, lambda: edit(pipe, method, image, steps=steps, seed=0, **kw))
        assert result.info["sigma_t0"] == pytest.approx(want, rel=1e-9)
        assert result.info["edit_steps"] == round(t0 * steps)
        assert top == pytest.approx(want, rel=1e-6)  # nothing noisier reaches the network


def test_diffedit_mask_noise_and_ilvr_stop_are_diffusion_times(pipe):
    image = torch.zeros(1, 1, 16, 16)
    sched = pipe.denoiser.schedule
    r = edit(pipe, "diffedit", image, prompt="3", source_prompt="7", strength=0.4, mask_noise=0.5, n_draws=1, steps=10)
    assert r.info["sigma_t0"] == pytest.approx(sched.sigma_at_time(0.4), rel=1e-9)
    # ILVR samples from pure noise and stops refining below sigma(t_stop): the output's low-pass
    # then equals the input's only when stop = 0
    full = edit(pipe, "ilvr", image, factor=4, stop=0.0, steps=6, seed=0).output
    part = edit(pipe, "ilvr", image, factor=4, stop=0.5, steps=6, seed=0).output
    low = torch.nn.functional.avg_pool2d
    assert (low(full, 4) - low(image, 4)).abs().max() < 1e-4
    assert (low(part, 4) - low(image, 4)).abs().max() > 1e-3
