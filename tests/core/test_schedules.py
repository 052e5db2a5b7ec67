import math

import numpy as np
import pytest
import torch

from difflab.core import (
    EDM,
    VE,
    ContinuousVP,
    schedule_from_config,
    sigmas_karras,
    sigmas_logsnr,
    sigmas_spaced,
    timesteps_spaced,
    vp_cosine,
    vp_linear,
    vp_scaled_linear,
)
from tests.refs import diffusers_schedulers, k_sampling


@pytest.mark.parametrize(
    "ours,theirs", [(vp_linear, "linear"), (vp_scaled_linear, "scaled_linear"), (vp_cosine, "squaredcos_cap_v2")]
)
def test_discrete_betas_match_diffusers(ours, theirs):
    diffusers = diffusers_schedulers()
    kw = dict(beta_start=0.00085, beta_end=0.012) if theirs == "scaled_linear" else {}
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, **kw)
    s = ours()
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), ref.alphas_cumprod.double().numpy(), rtol=2e-6, atol=1e-7)
    assert s.T == 1000


def test_ddpm_linear_endpoints():
    s = vp_linear()
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # sigma_t = sqrt((1 - abar)/abar)
    abar = s.alphas_cumprod
    torch.testing.assert_close(s.sigmas, ((1 - abar) / abar).sqrt())
    assert s.sigma_min < 0.011 and s.sigma_max > 150


@pytest.mark.parametrize(
    "sched",
    [vp_linear(), vp_cosine(), ContinuousVP(), VE(), EDM()],
    ids=lambda s: type(s).__name__ + getattr(s, "kind", ""),
)
def test_sigma_t_roundtrip(sched):
    sig = torch.logspace(math.log10(sched.sigma_min), math.log10(sched.sigma_max), 57, dtype=torch.float64)
    torch.testing.assert_close(sched.sigma(sched.t(sig)), sig, rtol=1e-9, atol=0)


def test_discrete_t_is_integer_at_trained_sigmas_and_quantize_rounds():
    s = vp_linear()
    ts = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(s.t(s.sigmas[ts]), ts.double(), atol=1e-9, rtol=0)
    mid = (s.sigmas[10] * s.sigmas[11]).sqrt()  # log-midpoint -> t = 10.5
    assert s.t(mid).item() == pytest.approx(10.5, abs=1e-9)
    q = schedule_from_config({**s.to_config(), "quantize": True})
    assert q.t(mid).item() in (10.0, 11.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [10, 25, 50])
def test_timesteps_match_diffusers_ddim(spacing, n):
    diffusers = diffusers_schedulers()
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(n)
    assert timesteps_spaced(1000, n, spacing).tolist() == ref.timesteps.tolist()


def test_leading_never_visits_last_timestep():
    assert 999 not in timesteps_spaced(1000, 10, "leading").tolist()
    assert timesteps_spaced(1000, 10, "trailing")[0].item() == 999


def test_karras_and_logsnr_grids_match_k_diffusion():
    K = k_sampling()
    torch.testing.assert_close(sigmas_karras(12, 0.002, 80.0).float(), K.get_sigmas_karras(12, 0.002, 80.0))
    torch.testing.assert_close(sigmas_logsnr(12, 0.002, 80.0).float(), K.get_sigmas_exponential(12, 0.002, 80.0))


def test_grids_end_in_zero_and_decrease():
    for g in [sigmas_karras(5, 0.01, 10.0), sigmas_logsnr(5, 0.01, 10.0), sigmas_spaced(vp_linear(), 5)]:
        assert g[-1].item() == 0 and (g[1:] < g[:-1]).all() and g.dtype == torch.float64
    assert sigmas_karras(5, 0.01, 10.0, append_zero=False)[-1].item() == pytest.approx(0.01)


def test_config_roundtrip():
    for s in [vp_linear(), vp_cosine(), ContinuousVP(beta_max=10.0), VE(0.02, 30.0), EDM()]:
        r = schedule_from_config(s.to_config())
        sig = torch.tensor([0.05, 1.0, 5.0], dtype=torch.float64)
        torch.testing.assert_close(r.t(sig), s.t(sig))


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown beta schedule 'cubic'"):
        from difflab.core.schedules import betas_for

        betas_for("cubic")
    with pytest.raises(ValueError, match="unknown spacing 'middle'"):
        timesteps_spaced(1000, 10, "middle")
    with pytest.raises(ValueError, match="sigma_min=5"):
        sigmas_karras(10, 5.0, 1.0)
    with pytest.raises(ValueError, match="positive int"):
        sigmas_karras(0, 0.1, 1.0)
    with pytest.raises(ValueError, match="unknown schedule type"):
        schedule_from_config({"type": "Nope"})
