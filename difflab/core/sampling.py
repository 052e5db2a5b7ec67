"""Samplers: short functions over a decreasing sigma grid, built from one-step primitives.

Every sampler has the signature

    sample_xxx(denoiser, x, sigmas, *, cond=None, callback=None, noise=None, progress=False, ...)

- `x` starts at noise level sigmas[0] (for a fresh sample: `torch.randn(...) * sigmas[0]`);
- `cond` is a dict passed to the denoiser as keyword arguments;
- `callback(step)` runs after every step with a `Step(i, x, sigma, sigma_next, x0_hat)` where
  `x` is already at `sigma_next`; it may return a replacement `x` (RePaint, ILVR, DiffEdit,
  Blended Diffusion) or None;
- `noise` is the noise source of stochastic samplers: None (torch's global RNG), a
  `torch.Generator`, or a callable `(i, like) -> Tensor`, so two runs can be compared bit for bit.

Solver state (multistep history) lives in local variables. Notation follows Karras et al. 2022
and Lu et al. 2022 (DPM-Solver++): d = (x - x0_hat) / sigma, lambda = -log sigma, h = lambda' - lambda.

DDIM is Euler on the probability-flow ODE (eta = 0) and the Euler-ancestral step with eta
in general; with eta = 1 it is DDPM's ancestral sampler with the posterior variance
(derivation in `ancestral_step`).

The recommended call is `sample(denoiser, x, default_sigmas(schedule, n))`: n network calls of
`DEFAULT_SAMPLER` (UniPC with varying coefficients, order by step size, trapezoidal end) on
`sigmas_soft_logsnr`. bench/samplers.py measures it against diffusers and k-diffusion on
Gaussian mixtures with exact probability-flow endpoints (bench/README.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from difflab.core.schedules import DiscreteVP
from difflab.core.validation import check_finite_tensor

__all__ = [
    "Step",
    "StepRunner",
    "check_grid",
    "expand_cond",
    "noise_source",
    "progress_range",
    "SAMPLERS",
    "sample",
    "euler_step",
    "ancestral_step",
    "renoise",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_ddim",
    "sample_ddpm",
    "sample_heun",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_unipc",
    "sample_unipc_auto",
    "final_step",
    "sigmas_soft_logsnr",
    "default_sigmas",
    "edit_sigmas",
    "sample_langevin",
    "invert_euler",
    "DEFAULT_SAMPLER",
]


@dataclass
class Step:
    """What a sampler's callback sees after step i: x is already at sigma_next."""

    i: int
    x: Tensor
    sigma: float
    sigma_next: float
    x0_hat: Tensor


NoiseSource = None | torch.Generator | Callable[[int, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Plumbing shared by every sampler
# --------------------------------------------------------------------------------------------


def noise_source(noise: NoiseSource) -> Callable[[int, Tensor], Tensor]:
    """Turn a sampler's ``noise`` argument (None, a Generator or ``fn(i, like)``) into ``fn(i, like)``."""
    if noise is None:
        return lambda i, like: torch.randn_like(like)
    if isinstance(noise, torch.Generator):
        # drawn on the generator's device (a CPU generator gives the same numbers for a CUDA x)
        return lambda i, like: torch.randn(like.shape, generator=noise, dtype=like.dtype, device=noise.device).to(
            like.device
        )
    if callable(noise):
        return noise
    raise TypeError(
        f"noise must be None, a torch.Generator or a callable (i, like) -> Tensor, got {type(noise).__name__}"
    )


def check_grid(x: Tensor, sigmas: Tensor, *, increasing: bool = False) -> Tensor:
    """Validate a sigma grid (1-D, finite, monotone) and a finite x; returns the grid as a tensor."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 values, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise ValueError(f"sigmas must be finite and >= 0, got {sigmas.tolist()}")
    diffs = sigmas[1:] - sigmas[:-1]
    if increasing and not (diffs > 0).all():
        raise ValueError(f"this sampler needs strictly increasing sigmas, got {sigmas.tolist()}")
    if not increasing and not (diffs < 0).all():
        raise ValueError(f"sigmas must be strictly decreasing (highest noise first), got {sigmas.tolist()}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"x contains {bad} NaN/inf values; the sampler's starting point must be finite")
    return sigmas.to(torch.float64)


def slice_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a decreasing grid that an edit re-runs (SDEdit's t0, DiffEdit's encoding ratio):
    the last round(strength * n) steps."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength (t0) must be in (0, 1], got {strength}")
    n = len(sigmas) - 1
    k = max(1, round(strength * n))
    return sigmas[n - k :]


def edit_sigmas(schedule, t0: float, steps: int) -> Tensor:
    """The grid an edit runs from the papers' diffusion time t0 (`Schedule.sigma_at_time`): it starts
    at that noise level whatever `steps` and the sampler are, and spends max(1, round(t0 * steps))
    steps down to 0 (a whole generation's `steps` at t0 = 1), spaced like `default_sigmas`."""
    if not 0.0 < t0 <= 1.0:
        raise ValueError(f"strength (t0) must be in (0, 1], got {t0}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"number of steps must be a positive int, got {steps!r}")
    start = float(schedule.sigma_at_time(t0))
    lo = float(schedule.sigma_min)
    k = max(1, round(t0 * steps))
    if start <= lo or k == 1:
        return torch.tensor([start, 0.0], dtype=torch.float64)
    return sigmas_soft_logsnr(k, lo, start)


def expand_cond(cond: dict | None, n: int) -> dict:
    """A cond dict for a batch of n: tensors of batch 1 are expanded to n, the rest kept as given."""
    out = {}
    for k, v in (cond or {}).items():
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == 1 and n > 1:
            v = v.expand(n, *v.shape[1:])
        out[k] = v
    return out


def cat_conds(*conds: dict) -> dict:
    """Cond dicts of batch 1 -> one dict of batch len(conds), in order; token sequences of different
    lengths are right-padded (zeros, and False in their key masks)."""
    out = {}
    for key in conds[0]:
        parts = [c[key] for c in conds]
        if parts[0].ndim >= 2:
            T = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, [0, 0] * (p.ndim - 2) + [0, T - p.shape[1]]) for p in parts]
        out[key] = torch.cat(parts)
    return out


class StepRunner:
    """Calls the denoiser with a (B,) sigma and the user's cond; runs the callback."""

    def __init__(self, denoiser, x: Tensor, cond: dict | None, callback):
        self.denoiser = denoiser
        self.cond = cond or {}
        self.callback = callback
        self.ones = x.new_ones(x.shape[0])

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        return self.denoiser(x, self.ones * sigma, **self.cond)

    def after(self, i: int, x: Tensor, sigma: float, sigma_next: float, x0_hat: Tensor) -> Tensor:
        if self.callback is None:
            return x
        new = self.callback(Step(i, x, sigma, sigma_next, x0_hat))
        return x if new is None else new


def progress_range(n: int, progress: bool, desc: str):
    """``range(n)``, or a tqdm bar over it when ``progress`` is set."""
    if not progress:
        return range(n)
    from tqdm.auto import trange

    return trange(n, desc=desc, leave=False)


# --------------------------------------------------------------------------------------------
# One-step primitives
# --------------------------------------------------------------------------------------------


def euler_step(x: Tensor, x0_hat: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Euler on dx/dsigma = (x - D) / sigma: x + (sigma_next - sigma) d."""
    if sigma_next == 0:
        return x0_hat
    return x0_hat + (sigma_next / sigma) * (x - x0_hat)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of the ancestral step: Euler to sigma_down, then add sigma_up noise.

    sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2, sigma_down^2 =
    sigma_next^2 - sigma_up^2. This is exactly DDIM's s_t (Song et al. 2021, eq. 16) written in
    VE coordinates: with abar = 1/(1+sigma^2), s_t^2 / abar_{t-1} equals sigma_up^2 above, and
    DDIM's direction coefficient sqrt(1 - abar_{t-1} - s_t^2)/sqrt(abar_{t-1}) equals sigma_down.
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def renoise(x: Tensor, sigma_from: float, sigma_to: float, noise: Tensor | None = None) -> Tensor:
    """Move x from noise level sigma_from up to sigma_to: x + sqrt(sigma_to^2 - sigma_from^2) n."""
    sigma_from, sigma_to = float(sigma_from), float(sigma_to)
    if sigma_to < sigma_from:
        raise ValueError(f"renoise goes up in noise: sigma_to={sigma_to} < sigma_from={sigma_from}")
    if noise is None:
        noise = torch.randn_like(x)
    return x + math.sqrt(sigma_to**2 - sigma_from**2) * noise


# --------------------------------------------------------------------------------------------
# First-order samplers
# --------------------------------------------------------------------------------------------


def sample_euler(
    denoiser,
    x,
    sigmas,
    *,
    cond=None,
    callback=None,
    noise=None,
    progress=False,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """Euler on the probability-flow ODE = DDIM with eta = 0 (optional EDM churn)."""
    sigmas = check_grid(x, sigmas)
    run, draw = StepRunner(denoiser, x, cond, callback), noise_source(noise)
    n = len(sigmas) - 1
    for i in progress_range(n, progress, "euler"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if s_churn > 0 and s_tmin <= sigma <= s_tmax:
            gamma = min(s_churn / n, 2**0.5 - 1)
            sigma_hat = sigma * (gamma + 1)
            x = x + draw(i, x) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
            sigma = sigma_hat
        x0_hat = run(x, sigma)
        x = euler_step(x, x0_hat, sigma, sigma_next)
        x = run.after(i, x, sigma, sigma_next, x0_hat)
    return x


def sample_euler_ancestral(
    denoiser, x, sigmas, *, cond=None, callback=None, noise=None, progress=False, eta=1.0, s_noise=1.0
):
    """Euler ancestral = DDIM with eta (eta = 1: DDPM's ancestral sampler, posterior variance)."""
    sigmas = check_grid(x, sigmas)
    run, draw = StepRunner(denoiser, x, cond, callback), noise_source(noise)
    for i in progress_range(len(sigmas) - 1, progress, "euler_ancestral"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0_hat = run(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = euler_step(x, x0_hat, sigma, sigma_down)
        if sigma_up > 0:
            x = x + draw(i, x) * (s_noise * sigma_up)
        x = run.after(i, x, sigma, sigma_next, x0_hat)
    return x


def sample_ddim(denoiser, x, sigmas, *, cond=None, callback=None, noise=None, progress=False, eta=0.0):
    """DDIM (Song et al. 2021) with eta; the same update as `sample_euler_ancestral`."""
    return sample_euler_ancestral(
        denoiser, x, sigmas, cond=cond, callback=callback, noise=noise, progress=progress, eta=eta
    )


def sample_ddpm(
    denoiser,
    x,
    schedule: DiscreteVP,
    *,
    cond=None,
    callback=None,
    noise=None,
    progress=False,
    variance: str = "small",
    steps: int | None = None,
    clip_x0: bool = False,
):
    """DDPM's ancestral sampler (Ho et al. 2020, Algorithm 2), over the full discrete chain or, with
    `steps`, over that many evenly spaced timesteps (Improved DDPM's respacing, section 4).

    Written in VP coordinates as the paper does: mu = c1 x0_hat + c2 x_t, with
    c1 = sqrt(abar_{t-1}) beta_t / (1 - abar_t), c2 = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t),
    and variance beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t ("small"), beta_t ("large"), or
    "learned": exp(v log beta_t + (1 - v) log beta~_t) with v = (out + 1) / 2 from a learned-variance
    denoiser's extra channels (Nichol & Dhariwal 2021, eq. 15). On a respaced chain beta_t is
    1 - abar_t / abar_{t_prev}. `clip_x0` clamps x0_hat to [-1, 1] each step as the official
    samplers do. `x` enters and leaves in VE coordinates, at sigma_T and 0. The reference for the
    other samplers.
    """
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"sample_ddpm needs a DiscreteVP schedule, got {type(schedule).__name__}")
    if variance not in ("small", "large", "learned"):
        raise ValueError(f"variance must be 'small', 'large' or 'learned', got {variance!r}")
    if variance == "learned" and not getattr(denoiser, "learned_variance", False):
        raise ValueError("variance='learned' needs a learned-variance denoiser (a learn_sigma network)")
    T = schedule.T
    if steps is None:
        ts = list(range(T))
    else:
        if not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
        ts = sorted({round(i * (T - 1) / max(steps - 1, 1)) for i in range(steps)})
    sigmas = torch.cat([schedule.sigmas[ts].flip(0), schedule.sigmas.new_zeros(1)])
    check_grid(x, sigmas)
    run, draw = StepRunner(denoiser, x, cond, callback), noise_source(noise)
    abar = schedule.alphas_cumprod
    x_t = x * math.sqrt(float(abar[ts[-1]]))  # VE -> VP
    n = len(ts)
    for i in progress_range(n, progress, "ddpm"):
        k = n - 1 - i
        t = ts[k]
        ab, ab_prev = float(abar[t]), (float(abar[ts[k - 1]]) if k > 0 else 1.0)
        beta = float(schedule.betas[t]) if steps is None else 1 - ab / ab_prev
        sigma_t = float(schedule.sigmas[t])
        if variance == "learned":
            x0_hat, v = denoiser.forward_with_variance(x_t / math.sqrt(ab), run.ones * sigma_t, **run.cond)
        else:
            x0_hat = run(x_t / math.sqrt(ab), sigma_t)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        c1 = math.sqrt(ab_prev) * beta / (1 - ab)
        c2 = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        x_t = c1 * x0_hat + c2 * x_t
        if k > 0:
            small = beta * (1 - ab_prev) / (1 - ab)
            if variance == "learned":
                frac = (v.to(x_t.dtype) + 1) / 2
                std = (0.5 * (frac * math.log(beta) + (1 - frac) * math.log(small))).exp()
                x_t = x_t + std * draw(i, x_t)
            else:
                x_t = x_t + math.sqrt(small if variance == "small" else beta) * draw(i, x_t)
        sigma_next = float(schedule.sigmas[ts[k - 1]]) if k > 0 else 0.0
        x_ve = run.after(i, x_t / math.sqrt(ab_prev), sigma_t, sigma_next, x0_hat)
        x_t = x_ve * math.sqrt(ab_prev)
    return x_t


FINAL_STEPS = ("denoise", "trapezoid")
UNIPC_H_MAX3 = 0.5  # largest step in lambda = -log sigma that `order="auto"` takes at order 3


def final_step(x: Tensor, x_eval: Tensor, x0_hat: Tensor, kind: str = "denoise") -> Tensor:
    """The last step of an ODE sampler, from sigma_n > 0 to 0, with no extra network call.

    x0_hat = D(x_eval, sigma_n); x is the solver's state at sigma_n (x_eval, or x_eval moved by
    a corrector). On dx/dsigma = eps_hat with eps_hat = (x - D)/sigma:
    - "denoise": x0_hat, the Euler step over [0, sigma_n] (what diffusers and k-diffusion do);
      exact when the data has no spread below sigma_n (a point mass or a thin manifold).
    - "trapezoid": x - (x_eval - x0_hat)/2, the trapezoidal rule with eps_hat(sigma = 0) = 0.
      For data with a smooth density eps_hat = -sigma grad log p_sigma(x) vanishes at sigma = 0,
      so this end is second order: on a Gaussian component of std s it is off by ~ s u^4 / 8
      per unit of noise (u = sigma_n / s) where "denoise" is off by ~ s u^2 / 2. Where the data
      is thinner than sigma_n it leaves up to sigma_n / 2 of noise (0.005 at the DDPM schedule's
      sigma_min, in [-1, 1] units: below one 8-bit level).
    """
    if kind == "denoise":
        return x0_hat
    if kind == "trapezoid":
        return x - 0.5 * (x_eval - x0_hat)
    raise ValueError(f"final step must be one of {', '.join(FINAL_STEPS)}, got {kind!r}")


# --------------------------------------------------------------------------------------------
# Higher-order ODE / SDE solvers
# --------------------------------------------------------------------------------------------


def sample_heun(
    denoiser,
    x,
    sigmas,
    *,
    cond=None,
    callback=None,
    noise=None,
    progress=False,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2); deterministic at s_churn=0."""
    sigmas = check_grid(x, sigmas)
    run, draw = StepRunner(denoiser, x, cond, callback), noise_source(noise)
    n = len(sigmas) - 1
    for i in progress_range(n, progress, "heun"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + draw(i, x) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
        x0_hat = run(x, sigma_hat)
        d = (x - x0_hat) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:  # second-order correction
            x0_next = run(x_next, sigma_next)
            d_next = (x_next - x0_next) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = run.after(i, x_next, sigma, sigma_next, x0_hat)
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, *, cond=None, callback=None, noise=None, progress=False):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), first order on the first and last step."""
    sigmas = check_grid(x, sigmas)
    run = StepRunner(denoiser, x, cond, callback)
    x0_prev, h_prev = None, None
    for i in progress_range(len(sigmas) - 1, progress, "dpmpp_2m"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0_hat = run(x, sigma)
        if sigma_next == 0:
            x_next = x0_hat
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if x0_prev is None:
                D = x0_hat
            else:
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * x0_prev
            x_next = (sigma_next / sigma) * x - math.expm1(-h) * D
            h_prev = h
        x0_prev = x0_hat
        x = run.after(i, x_next, sigma, sigma_next, x0_hat)
    return x


def sample_dpmpp_3m(denoiser, x, sigmas, *, cond=None, callback=None, noise=None, progress=False):
    """DPM-Solver++(3M), the deterministic third-order multistep solver (Lu et al. 2022, App. B)."""
    return sample_dpmpp_3m_sde(
        denoiser, x, sigmas, cond=cond, callback=callback, noise=noise, progress=progress, eta=0.0
    )


def sample_dpmpp_2m_sde(
    denoiser,
    x,
    sigmas,
    *,
    cond=None,
    callback=None,
    noise=None,
    progress=False,
    eta=1.0,
    s_noise=1.0,
    solver_type="midpoint",
):
    """DPM-Solver++(2M) SDE (Lu et al. 2022), data prediction, in VE coordinates."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sigmas = check_grid(x, sigmas)
    run, draw = StepRunner(denoiser, x, cond, callback), noise_source(noise)
    x0_prev, h_prev = None, None
    for i in progress_range(len(sigmas) - 1, progress, "dpmpp_2m_sde"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0_hat = run(x, sigma)
        if sigma_next == 0:
            x_next = x0_hat
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            x_next = (sigma_next / sigma) * math.exp(-eta_h) * x + (-math.expm1(-h - eta_h)) * x0_hat
            if x0_prev is not None:
                r = h_prev / h
                diff = (x0_hat - x0_prev) / r
                if solver_type == "heun":
                    x_next = x_next + ((-math.expm1(-h - eta_h)) / (-h - eta_h) + 1) * diff
                else:
                    x_next = x_next + 0.5 * (-math.expm1(-h - eta_h)) * diff
            if eta > 0:
                x_next = x_next + draw(i, x) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
            h_prev = h
        x0_prev = x0_hat
        x = run.after(i, x_next, sigma, sigma_next, x0_hat)
    return x


def sample_dpmpp_3m_sde(
    denoiser, x, sigmas, *, cond=None, callback=None, noise=None, progress=False, eta=1.0, s_noise=1.0
):
    """DPM-Solver++(3M) SDE; eta = 0 gives the deterministic 3M ODE solver."""
    sigmas = check_grid(x, sigmas)
    run, draw = StepRunner(denoiser, x, cond, callback), noise_source(noise)
    x0_1, x0_2, h_1, h_2 = None, None, None, None
    for i in progress_range(len(sigmas) - 1, progress, "dpmpp_3m_sde"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0_hat = run(x, sigma)
        if sigma_next == 0:
            x_next = x0_hat
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1)
            x_next = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * x0_hat
            if x0_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (x0_hat - x0_1) / r0
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x_next = x_next + phi_2 * d1 - phi_3 * d2
            elif x0_1 is not None:
                r = h_1 / h
                d = (x0_hat - x0_1) / r
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x_next = x_next + phi_2 * d
            if eta > 0:
                x_next = x_next + draw(i, x) * (sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
            h_2, h_1 = h_1, h
        x0_2, x0_1 = x0_1, x0_hat
        x = run.after(i, x_next, sigma, sigma_next, x0_hat)
    return x


def sample_unipc(
    denoiser,
    x,
    sigmas,
    *,
    cond=None,
    callback=None,
    noise=None,
    progress=False,
    order: int | str = 3,
    variant: str = "bh2",
    corrector: bool = True,
    final: str = "denoise",
    h_max3: float = UNIPC_H_MAX3,
):
    """UniPC (Zhao et al. 2023): UniP-p predictor + UniC corrector, data prediction, order <= 3.

    One network call per step: the corrector reuses the evaluation at the new point, which the
    next predictor step needs anyway. Lower order on the first steps (not enough history).
    `order="auto"`: order 3 where the step h = lambda' - lambda is at most `h_max3`, else 2
    (a third-order extrapolation over a step of h ~ 1 overshoots). `variant`: "bh1", "bh2" (the
    reference code's B(h) choices) or "vary" (see `_unipc_update`). `final` is the step from
    the last positive sigma to 0: "denoise" (x0_hat, Euler in sigma, as diffusers and
    k-diffusion end) or "trapezoid" (see `final_step`).
    """
    if order not in (1, 2, 3, "auto"):
        raise ValueError(f"UniPC order must be 1, 2, 3 or 'auto', got {order!r}")
    if variant not in ("bh1", "bh2", "vary"):
        raise ValueError(f"variant must be 'bh1', 'bh2' or 'vary', got {variant!r}")
    if final not in FINAL_STEPS:
        raise ValueError(f"final must be one of {', '.join(FINAL_STEPS)}, got {final!r}")
    sigmas = check_grid(x, sigmas)
    run = StepRunner(denoiser, x, cond, callback)
    lam = lambda s: -math.log(s)  # noqa: E731
    max_order = 3 if order == "auto" else order
    n = len(sigmas) - 1
    hist_x0: list[Tensor] = []  # model outputs, newest last
    hist_lam: list[float] = []
    x_prev_pred = None  # x before the last predictor step (corrector input)
    used_order, sigma_prev = 1, 0.0  # the last predictor's order and start (set with x_prev_pred)
    for i in progress_range(n, progress, "unipc"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x_eval = x
        x0_hat = run(x, sigma)
        if corrector and x_prev_pred is not None:  # UniC on the last step, with the new evaluation
            x = _unipc_update(
                x_prev_pred,
                hist_x0,
                hist_lam,
                lam(sigma),
                x0_hat,
                used_order,
                variant,
                sigma_from=sigma_prev,
                sigma_to=sigma,
            )
        hist_x0.append(x0_hat)
        hist_lam.append(lam(sigma))
        hist_x0, hist_lam = hist_x0[-max_order:], hist_lam[-max_order:]
        if sigma_next == 0:
            x_next = final_step(x, x_eval, x0_hat, final)
        else:
            used_order = min(max_order, len(hist_x0))
            if order == "auto" and lam(sigma_next) - lam(sigma) > h_max3:
                used_order = min(used_order, 2)
            x_prev_pred, sigma_prev = x, sigma
            x_next = _unipc_update(
                x,
                hist_x0[-used_order:],
                hist_lam[-used_order:],
                lam(sigma_next),
                None,
                used_order,
                variant,
                sigma_from=sigma,
                sigma_to=sigma_next,
            )
        x = run.after(i, x_next, sigma, sigma_next, x0_hat)
    return x


def sample_unipc_auto(
    denoiser,
    x,
    sigmas,
    *,
    cond=None,
    callback=None,
    noise=None,
    progress=False,
    variant: str = "vary",
    h_max3: float = UNIPC_H_MAX3,
):
    """difflab's default ODE sampler: UniPC_v, order 3 on steps h <= 0.5 else 2, trapezoidal end.

    `sample_unipc(..., order="auto", variant="vary", final="trapezoid")`; with `default_sigmas`
    it is the recipe that bench/samplers.py measures against diffusers and k-diffusion.
    """
    return sample_unipc(
        denoiser,
        x,
        sigmas,
        cond=cond,
        callback=callback,
        noise=noise,
        progress=progress,
        order="auto",
        variant=variant,
        corrector=True,
        final="trapezoid",
        h_max3=h_max3,
    )


def _unipc_update(x, hist_x0, hist_lam, lam_t, x0_t, order, variant, sigma_from, sigma_to):
    """One UniP (x0_t is None) or UniC (x0_t given) update of order `order` in VE coordinates.

    The coefficients rho solve the order conditions R rho = b, whose right side carries 1/B(h),
    so the update B(h) R^-1 b does not depend on B(h). "bh1"/"bh2" fix rho = 1/2 where the system
    is 1 x 1 (the order-2 predictor, the order-1 corrector), as the reference code does; "vary"
    solves it there too: UniPC with varying coefficients (Zhao et al. 2023, UniPC_v), the exact
    integral of the interpolating polynomial under the exponential weight.
    """
    fixed_half = variant != "vary"
    m0, lam_s0 = hist_x0[-1], hist_lam[-1]
    h = lam_t - lam_s0
    hh = -h  # data prediction
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else math.expm1(hh)
    rks, D1s = [], []
    for k in range(1, order):
        lam_sk, m_sk = hist_lam[-1 - k], hist_x0[-1 - k]
        rk = (lam_sk - lam_s0) / h
        rks.append(rk)
        D1s.append((m_sk - m0) / rk)
    rks.append(1.0)
    R, b = [], []
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_t = (sigma_to / sigma_from) * x - h_phi_1 * m0
    if x0_t is None:  # predictor
        if not D1s:
            return x_t
        if order == 2 and fixed_half:
            rhos = [0.5]
        else:
            rhos = torch.linalg.solve(
                torch.tensor(R, dtype=torch.float64)[:-1, :-1], torch.tensor(b, dtype=torch.float64)[:-1]
            ).tolist()
        return x_t - B_h * sum(r * d for r, d in zip(rhos, D1s))
    # corrector
    if order == 1 and fixed_half:
        rhos = [0.5]
    else:
        rhos = torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()
    corr = sum(r * d for r, d in zip(rhos[:-1], D1s)) if D1s else 0
    return x_t - B_h * (corr + rhos[-1] * (x0_t - m0))


# --------------------------------------------------------------------------------------------
# Score-based sampling and inversion
# --------------------------------------------------------------------------------------------


def sample_langevin(
    denoiser,
    x,
    sigmas,
    *,
    cond=None,
    callback=None,
    noise=None,
    progress=False,
    n_steps: int = 10,
    step_lr: float = 2e-5,
    denoise: bool = True,
):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) over the positive sigmas.

    At level sigma_i, `n_steps` updates x <- x + (a/2) score + sqrt(a) z with
    a = step_lr sigma_i^2 / sigma_L^2 and score = (D - x)/sigma^2. With `denoise`, the last
    positive level is followed by Tweedie's x0_hat = D(x, sigma_L) (grid ending in 0).
    """
    sigmas = check_grid(x, sigmas)
    run, draw = StepRunner(denoiser, x, cond, callback), noise_source(noise)
    levels = [float(s) for s in sigmas if s > 0]
    sigma_L = levels[-1]
    k = 0
    for i in progress_range(len(levels), progress, "langevin"):
        sigma = levels[i]
        a = step_lr * (sigma / sigma_L) ** 2
        for _ in range(n_steps):
            x0_hat = run(x, sigma)
            score = (x0_hat - x) / sigma**2
            x = x + 0.5 * a * score + math.sqrt(a) * draw(k, x)
            k += 1
        sigma_next = levels[i + 1] if i + 1 < len(levels) else 0.0
        x = run.after(i, x, sigma, sigma_next, x0_hat)
    if denoise and float(sigmas[-1]) == 0:
        x = run(x, sigma_L)
    return x


def invert_euler(denoiser, x, sigmas, *, cond=None, callback=None, noise=None, progress=False):
    """DDIM inversion: Euler steps on the probability-flow ODE with increasing sigma.

    If sigmas[0] == 0 (a clean image), the first derivative is taken at sigmas[1], the usual
    DDIM-inversion approximation. Returns x at sigmas[-1].
    """
    sigmas = check_grid(x, sigmas, increasing=True)
    run = StepRunner(denoiser, x, cond, callback)
    for i in progress_range(len(sigmas) - 1, progress, "invert"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        sigma_eval = sigma if sigma > 0 else sigma_next
        x0_hat = run(x, sigma_eval)
        d = (x - x0_hat) / sigma_eval
        x = x + (sigma_next - sigma) * d
        x = run.after(i, x, sigma, sigma_next, x0_hat)
    return x


# --------------------------------------------------------------------------------------------
# The default grid
# --------------------------------------------------------------------------------------------

SIGMA_KNEE = 20.0  # where `sigmas_soft_logsnr` stops being logSNR-uniform (data of unit scale)


def sigmas_soft_logsnr(
    n: int, sigma_min: float, sigma_max: float, sigma_knee: float = SIGMA_KNEE, append_zero: bool = True
) -> Tensor:
    """n sigmas uniform in log(sigma / sqrt(sigma^2 + knee^2)): logSNR-uniform below the knee.

    Equivalently uniform in -log(1/sigma^2 + 1/knee^2) / 2, the log-SNR with an SNR floor of
    1/knee^2. Far below the knee the steps are those of `sigmas_logsnr`; above it the step in
    lambda = -log sigma grows like sigma^2 / knee^2, so the nearly Gaussian top of the path
    (D barely moves there and its errors are shrunk by the rest of the flow) costs O(1) steps
    whatever sigma_max is. The grid converges as n grows (a smooth change of variable).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps must be a positive int, got {n!r}")
    if not (0 < sigma_min < sigma_max) or not sigma_knee > 0:
        raise ValueError(
            f"need 0 < sigma_min < sigma_max and sigma_knee > 0, got sigma_min={sigma_min}, "
            f"sigma_max={sigma_max}, sigma_knee={sigma_knee}"
        )

    def u(sigma: float) -> float:
        return math.log(sigma) - 0.5 * math.log(sigma**2 + sigma_knee**2)

    if n == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        us = torch.linspace(u(sigma_max), u(sigma_min), n, dtype=torch.float64)
        sigmas = sigma_knee * us.exp() / (-torch.expm1(2 * us)).sqrt()  # inverse of u
        sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if append_zero else sigmas


def default_sigmas(schedule, n: int) -> Tensor:
    """The grid of difflab's default recipe: n sigmas of `sigmas_soft_logsnr` over the schedule's range, 0.

    With `DEFAULT_SAMPLER` it costs n network calls: `sample(denoiser, x, default_sigmas(schedule, n))`.
    """
    return sigmas_soft_logsnr(n, float(schedule.sigma_min), float(schedule.sigma_max))


# --------------------------------------------------------------------------------------------
# Selection by name
# --------------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "ddim": sample_ddim,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "unipc": sample_unipc,
    "unipc_auto": sample_unipc_auto,
    "langevin": sample_langevin,
}

DEFAULT_SAMPLER = "unipc_auto"


def sample(denoiser, x, sigmas, method: str = DEFAULT_SAMPLER, **kw: Any) -> Tensor:
    """Run the sampler named `method` (see SAMPLERS)."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; known: {', '.join(sorted(SAMPLERS))}")
    out = SAMPLERS[method](denoiser, x, sigmas, **kw)
    check_finite_tensor(
        "the sampler's output",
        out,
        f"({method}, {len(sigmas) - 1} steps): the denoiser or its guidance returned NaN/inf",
    )
    return out
