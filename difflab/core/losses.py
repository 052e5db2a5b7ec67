"""Denoising losses: only the sigma distribution and the weight differ between papers.

    loss_fn = DenoisingLoss(discrete_uniform(vp_linear()), weighting="simple")   # DDPM L_simple
    loss_fn = DenoisingLoss(lognormal(-1.2, 1.2), weighting="simple")            # EDM (with prediction="edm")
    loss_fn = DenoisingLoss(discrete_uniform(sched), weighting=min_snr(5.0))     # min-SNR-5
    loss = loss_fn(denoiser, x0, class_labels=y)

`Preconditioned.loss` returns the squared error in the network's own output space; its weight
c_out^2 turns it into the x0-space error ||D - x0||^2. A weighting here is a function
w(sigma, c_out) -> per-sample weight on the network-space error:

| name      | x0-space weight          | network-space weight (eps net: c_out^2 = sigma^2) |
|-----------|--------------------------|----------------------------------------------------|
| "simple"  | 1 / c_out^2              | 1   (DDPM L_simple; EDM's loss with prediction="edm") |
| "x0"      | 1                        | c_out^2 |
| "snr"     | SNR = 1/sigma^2          | c_out^2 / sigma^2 |
| min_snr(g)| min(SNR, g)              | min(SNR, g) c_out^2  (Hang et al. 2023) |
| "v"       | SNR + 1                  | (SNR + 1) c_out^2   (the v-prediction loss) |
| "edm"     | (sigma^2+sd^2)/(sigma sd)^2 | that times c_out^2 |
| "vlb"     | DDPM's true bound, fixed Sigma = beta_t (eps nets, DiscreteVP) | beta_t / (2 alpha_t (1 - abar_t)) |

Also the DDPM variational-bound pieces (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021) for
learned variances and bits/dim: `q_posterior`, `normal_kl`, `discretized_gaussian_log_likelihood`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from difflab.core.denoiser import Preconditioned
from difflab.core.schedules import EDM, DiscreteVP, Schedule

__all__ = [
    "DenoisingLoss",
    "discrete_uniform",
    "lognormal",
    "log_uniform",
    "continuous_uniform",
    "training_sigmas",
    "min_snr",
    "WEIGHTINGS",
    "q_posterior",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "vlb_terms",
    "hybrid_terms",
    "fixed_vlb_weight",
]

SigmaSampler = Callable[[int, torch.Generator | None], Tensor]


# --------------------------------------------------------------------------------------------
# Sigma distributions: (batch, generator) -> (B,) float64 sigmas
# --------------------------------------------------------------------------------------------


def discrete_uniform(schedule: DiscreteVP) -> SigmaSampler:
    """DDPM: t ~ Uniform{0, ..., T-1}, sigma = sigma_t."""
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"discrete_uniform needs a DiscreteVP schedule, got {type(schedule).__name__}")

    def draw(n: int, generator: torch.Generator | None = None) -> Tensor:
        t = torch.randint(0, schedule.T, (n,), generator=generator)
        return schedule.sigmas[t]

    return draw


def lognormal(p_mean: float = -1.2, p_std: float = 1.2) -> SigmaSampler:
    """EDM: ln sigma ~ N(P_mean, P_std^2)."""

    def draw(n: int, generator: torch.Generator | None = None) -> Tensor:
        return (torch.randn(n, generator=generator, dtype=torch.float64) * p_std + p_mean).exp()

    return draw


def log_uniform(sigma_min: float, sigma_max: float) -> SigmaSampler:
    """ln sigma ~ Uniform(ln sigma_min, ln sigma_max) (NCSN/VE training)."""

    def draw(n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min))).exp()

    return draw


def continuous_uniform(schedule: Schedule, t_min: float = 1e-3, t_max: float = 1.0) -> SigmaSampler:
    """Score-SDE training: t ~ Uniform(t_min, t_max), sigma = schedule.sigma(t)."""

    def draw(n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return schedule.sigma(t_min + u * (t_max - t_min))

    return draw


def training_sigmas(schedule: Schedule) -> SigmaSampler:
    """The sigma distribution a model of this schedule is usually trained on, for the methods that
    fine-tune or optimise against a pretrained model's loss (Imagic, UniTune): EDM's log-normal for
    an EDM schedule, DDPM's uniform timesteps for a discrete VP one, uniform t otherwise."""
    if isinstance(schedule, EDM):
        return lognormal()
    if isinstance(schedule, DiscreteVP):
        return discrete_uniform(schedule)
    return continuous_uniform(schedule)


# --------------------------------------------------------------------------------------------
# Weightings: (sigma (B,) float64, c_out (B,) float64, sigma_data) -> (B,) weight
# --------------------------------------------------------------------------------------------


def min_snr(gamma: float = 5.0) -> Callable:
    """Min-SNR-gamma weighting (Hang et al. 2023): x0-space weight min(1/sigma^2, gamma)."""

    def weight(sigma: Tensor, c_out: Tensor, sigma_data: float) -> Tensor:
        return (1 / sigma**2).clamp(max=gamma) * c_out**2

    weight.__name__ = f"min_snr_{gamma:g}"
    return weight


WEIGHTINGS: dict[str, Callable] = {
    "simple": lambda sigma, c_out, sd: torch.ones_like(sigma),
    "x0": lambda sigma, c_out, sd: c_out**2,
    "snr": lambda sigma, c_out, sd: c_out**2 / sigma**2,
    "v": lambda sigma, c_out, sd: (1 / sigma**2 + 1) * c_out**2,
    "edm": lambda sigma, c_out, sd: (sigma**2 + sd**2) / (sigma * sd) ** 2 * c_out**2,
    "min_snr": min_snr(5.0),
}


class DenoisingLoss:
    """E_sigma[ w(sigma) ||F(c_in x, c_noise) - target||^2 ] with x = x0 + sigma n."""

    def __init__(self, sigma_sampler: SigmaSampler, weighting: str | Callable = "simple", vlb_weight: float = 0.0):
        """weighting "vlb": Ho et al.'s "true variational bound" objective with the fixed variance beta_t:
        L_{t-1} per dimension = beta_t / (2 alpha_t (1 - abar_t)) ||eps - eps_hat||^2 (their eq. 8 with
        eq. 11; L_0 in the same Gaussian form, L_T constant), for an eps network on a DiscreteVP
        schedule. With t drawn uniformly its mean is the bound / T."""
        """vlb_weight = lambda > 0: Improved DDPM's L_hybrid = L_simple + lambda L_vlb for a
        learned-variance denoiser on a DiscreteVP schedule (the paper: 0.001); L_vlb is estimated
        as T L_t in bits/dim at the drawn t, so lambda T = 1 at T = 1000 (ADM's and DiT's code)."""
        if not (vlb_weight >= 0 and math.isfinite(vlb_weight)):
            raise ValueError(f"vlb_weight must be a finite number >= 0, got {vlb_weight}")
        self.vlb_weight = float(vlb_weight)
        self.fixed_vlb = weighting == "vlb"
        if self.fixed_vlb:
            weighting = WEIGHTINGS["simple"]  # replaced per batch by fixed_vlb_weight
        if isinstance(weighting, str):
            if weighting not in WEIGHTINGS:
                raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
            weighting = WEIGHTINGS[weighting]
        self.sigma_sampler = sigma_sampler
        self.weighting = weighting

    def __call__(
        self,
        denoiser: Preconditioned,
        x0: Tensor,
        *,
        generator: torch.Generator | None = None,
        sigma: Tensor | None = None,
        noise: Tensor | None = None,
        reduce: bool = True,
        **cond,
    ) -> Tensor:
        """Mean weighted loss (or per-sample losses with reduce=False)."""
        if not isinstance(denoiser, Preconditioned):
            raise TypeError(f"DenoisingLoss needs a Preconditioned denoiser, got {type(denoiser).__name__}")
        if not torch.isfinite(x0).all():
            raise ValueError("training batch x0 contains NaN/inf values")
        B = x0.shape[0]
        if sigma is None:
            sigma = self.sigma_sampler(B, generator)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        vb = None
        if self.vlb_weight > 0:
            per_sample, vb = hybrid_terms(denoiser, x0, sigma, noise, **cond)
        else:
            per_sample = denoiser.loss(x0, sigma.to(x0.device), noise, **cond)
        _, c_out, _, _ = denoiser.coefficients(sigma)
        if self.fixed_vlb:
            w = fixed_vlb_weight(denoiser, sigma).to(per_sample.device, per_sample.dtype)
        else:
            w = self.weighting(sigma, c_out, denoiser.sigma_data).to(per_sample.device, per_sample.dtype)
        losses = w * per_sample
        if vb is not None:
            losses = losses + self.vlb_weight * denoiser.schedule.T * vb.to(losses.dtype)
        return losses.mean() if reduce else losses


# --------------------------------------------------------------------------------------------
# The DDPM variational bound (for learned variances and bits/dim)
# --------------------------------------------------------------------------------------------


def q_posterior(schedule: DiscreteVP, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and log-variance of q(x_{t-1} | x_t, x0) in VP coordinates (Ho et al. 2020, eq. 7)."""
    ab = schedule.alphas_cumprod.to(x0.device)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    betas = schedule.betas.to(x0.device)
    c1 = ab_prev[t].sqrt() * betas[t] / (1 - ab[t])
    c2 = (1 - betas[t]).sqrt() * (1 - ab_prev[t]) / (1 - ab[t])
    var = betas[t] * (1 - ab_prev[t]) / (1 - ab[t])
    # log of the clipped variance: at t = 0 the posterior variance is 0; use beta~_1 there (as ADM)
    var_clipped = torch.where(t == 0, betas[1] * (1 - ab[0]) / (1 - ab[1]), var)
    dims = lambda v: v.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)  # noqa: E731
    return dims(c1) * x0 + dims(c2) * x_t, dims(var_clipped.log()).expand_as(x0)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The standard normal CDF via erf."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(
    x: Tensor, means: Tensor, log_scales: Tensor, bin_width: float = 2 / 255
) -> Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 levels under N(means, e^(2 log_scales)),
    with the edge bins extended to +-inf (Ho et al. 2020, eq. 13). Elementwise, nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + bin_width / 2))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - bin_width / 2))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, cdf_delta.clamp(min=1e-12).log()),
    )


def vlb_terms(
    denoiser: Preconditioned, x0: Tensor, t: Tensor, noise: Tensor | None = None, variance: str = "learned", **cond
) -> Tensor:
    """Per-sample VLB term L_{t} in nats (B,): KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0,
    the discretised decoder NLL -log p(x0|x1) at t = 0.

    variance: "learned" (Improved DDPM's interpolation between log beta~ and log beta by the
    network's v output), "small" (beta~_t) or "large" (beta_t).
    """
    schedule = _discrete(denoiser, "vlb_terms")
    if noise is None:
        noise = torch.randn_like(x0)
    t = t.to(torch.long)
    ab = schedule.alphas_cumprod.to(x0.device)[t].to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    sigma = schedule.sigmas[t]
    if variance == "learned":
        x0_hat, v = denoiser.forward_with_variance(x_t / ab.sqrt(), sigma, **cond)
    else:
        x0_hat, v = denoiser(x_t / ab.sqrt(), sigma, **cond), None
    return _vb(schedule, x0, x_t, t, x0_hat, v, variance)


def _discrete(denoiser: Preconditioned, what: str) -> DiscreteVP:
    if not isinstance(denoiser.schedule, DiscreteVP):
        raise ValueError(f"{what} needs a DiscreteVP schedule, got {type(denoiser.schedule).__name__}")
    return denoiser.schedule


def _vb(schedule: DiscreteVP, x0: Tensor, x_t: Tensor, t: Tensor, x0_hat: Tensor, v: Tensor | None, variance: str):
    """L_t in nats (B,) of the reverse step whose mean comes from x0_hat and whose variance is
    `variance` ("learned": from v in [-1, 1])."""
    true_mean, true_logvar = q_posterior(schedule, x0, x_t, t)
    model_mean, _ = q_posterior(schedule, x0_hat, x_t, t)
    min_log = true_logvar  # log beta~ (clipped)
    max_log = schedule.betas.to(x0.device)[t].log().to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1))).expand_as(x0)
    if variance == "learned":
        frac = (v.to(x0.dtype) + 1) / 2
        model_logvar = frac * max_log + (1 - frac) * min_log
    elif variance == "small":
        model_logvar = min_log
    elif variance == "large":
        model_logvar = max_log
    else:
        raise ValueError(f"variance must be 'learned', 'small' or 'large', got {variance!r}")
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl)


def fixed_vlb_weight(denoiser: Preconditioned, sigma: Tensor) -> Tensor:
    """(B,) weights on the eps MSE that make it DDPM's L_{t-1} with Sigma = beta_t: beta_t / (2 alpha_t
    (1 - abar_t)), t read off sigma (which must lie on the DiscreteVP grid)."""
    schedule = _discrete(denoiser, 'weighting "vlb"')
    if denoiser.prediction != "eps":
        raise ValueError(f'weighting "vlb" is DDPM\'s bound for an eps network, got prediction {denoiser.prediction!r}')
    t = schedule.t(torch.as_tensor(sigma, dtype=torch.float64).cpu()).round().long()
    abar = schedule.alphas_cumprod
    ab_prev = torch.where(t > 0, abar[(t - 1).clamp(min=0)], torch.ones_like(abar[t]))
    alpha = abar[t] / ab_prev
    return (1 - alpha) / (2 * alpha * (1 - abar[t]))


def hybrid_terms(denoiser: Preconditioned, x0: Tensor, sigma: Tensor, noise: Tensor, **cond) -> tuple[Tensor, Tensor]:
    """Improved DDPM's two terms from one network call, per sample (B,): the network-space squared error
    of the prediction channels (L_simple for eps) and L_t of the VLB in bits per dimension, its mean
    from the prediction with the gradient stopped (so L_vlb trains the variance channels only), its
    variance the learned interpolation (Nichol & Dhariwal 2021, section 3.1). sigma must lie on the
    DiscreteVP grid (discrete_uniform draws it there)."""
    schedule = _discrete(denoiser, "L_hybrid")
    if not denoiser.learned_variance:
        raise ValueError("L_hybrid needs a learned-variance network (learn_sigma=True: 2C output channels)")
    c_skip, c_out, c_in, c_noise = denoiser.coeffs_for(x0, sigma)
    sig = sigma.to(x0.device, x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    x = x0 + sig * noise
    out = denoiser._net(c_in * x, c_noise, cond)
    c = out.shape[1] // 2
    mean, v = out[:, :c], out[:, c:]
    target = noise if denoiser.prediction == "eps" else (x0 - c_skip * x) / c_out
    dt = torch.promote_types(x0.dtype, torch.float32)  # float32 at least (bf16 training), float64 kept
    mse = (mean.to(dt) - target.to(dt)).pow(2).flatten(1).mean(1)
    t = schedule.t(sigma.cpu()).round().long().to(x0.device)
    x0_hat = (c_skip * x + c_out * mean.detach().to(x.dtype)).to(dt)
    x_t = (x / (1 + sig**2).sqrt()).to(dt)
    vb = _vb(schedule, x0.to(dt), x_t, t, x0_hat, v.to(dt), "learned") / math.log(2.0)
    return mse, vb
