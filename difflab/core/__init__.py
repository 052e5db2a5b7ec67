"""difflab.core: the six interfaces every method is built from.

schedules (Schedule, grids) - denoiser (Preconditioned, to_eps, to_score) - sampling (sample_*)
- guidance (Denoiser -> Denoiser transforms) - attention (one function, hooks) - losses.
"""

from difflab.core.attention import AttentionHook, AttnContext, HookableAttention, attention, attention_hooks
from difflab.core.denoiser import PREDICTIONS, Denoiser, Preconditioned, append_dims, from_eps, to_eps, to_score
from difflab.core.guidance import cfg, clamp, classifier_guidance, compose, dynamic_threshold, interval
from difflab.core.losses import (
    DenoisingLoss,
    continuous_uniform,
    discrete_uniform,
    log_uniform,
    lognormal,
    min_snr,
    vlb_terms,
)
from difflab.core.oracle import GaussianMixture
from difflab.core.sampling import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    Step,
    ancestral_step,
    default_sigmas,
    euler_step,
    invert_euler,
    renoise,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m,
    sample_dpmpp_3m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_langevin,
    sample_unipc,
)
from difflab.core.schedules import (
    EDM,
    VE,
    ContinuousVP,
    DiscreteVP,
    Schedule,
    schedule_from_config,
    sigmas_karras,
    sigmas_logsnr,
    sigmas_spaced,
    timesteps_spaced,
    vp_cosine,
    vp_linear,
    vp_scaled_linear,
)

__all__ = [name for name in dir() if not name.startswith("_")]
