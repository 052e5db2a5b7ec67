"""Negative log-likelihood of 8-bit images in bits per dimension, two ways.

Data convention. difflab images are 8-bit levels k in {0..255} mapped to x = k / 127.5 - 1, so
level k owns the bin [x - 1/255, x + 1/255] of width Delta = 2/255 (the two edge bins reach out to
-inf and +inf). The quantity reported is the discrete NLL, -log2 P(k) / D, in bits per dimension.

(a) The DDPM variational bound (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, App. for L_0):

    -log P(k) <= L_prior + sum_{t=1}^{T-1} L_t + L_0,
    L_prior = KL(q(x_T | x0) || N(0, I)),  L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)),
    L_0 = -log p(k | x_1)   (the discretised Gaussian decoder, edge bins open),

in the 0-based indexing of `difflab.core.losses.vlb_terms` (its t = 0 is L_0). Every term is in
nats per dimension; bits/dim = total / ln 2. Because the decoder is discrete, no change of
variables is needed. A denoiser trained on another schedule (EDM, VE) is evaluated on a
DiscreteVP grid (vp_linear(1000) unless another is given): the bound holds for any denoiser.
With `timesteps=K` the sum over t = 1..T-1 is estimated without bias from K strata (one
uniformly drawn t per stratum and sample, weighted by the stratum's size); L_0 and L_prior are
always computed exactly.

(b) The probability-flow ODE (Song et al. 2021), via `difflab.core.likelihood` with uniform
dequantisation. For y = x + u, u ~ U[-Delta/2, Delta/2]^D, Jensen gives

    -log P(k) = -log int_bin p(y) dy = -log E_u[p(x + u) Delta^D] <= -E_u log p(x + u) - D log Delta,

so bits/dim = (-E_u log p(x + u)) / (D ln 2) + log2(1 / Delta) with log2(1 / Delta) = log2(127.5)
= 6.99435. (Equivalently: dequantised data z = k + U[0, 1) in [0, 256) maps to x-space by
x = (z - 1/2) / 127.5 - 1, Jacobian 1/127.5 per dimension, so log p_z = log p_x - D log 127.5.
The familiar "+ log2(128) = 7" belongs to the other convention x = z / 128 - 1 with bins of
width 2/256; it differs from ours by 0.0056 bits/dim.) The ODE integrates the density
p_{sigma_min} of the data smoothed by N(0, sigma_min^2), which for sigma_min well below the bin
width is the dequantised density to within the solver tolerance. The ODE estimate is exact for
the model's own density; it is an upper bound on the discrete NLL only through Jensen's
dequantisation gap (tiny when the density is smooth on the scale of a bin).

Usage::

    bpd = vlb_bits_per_dim(denoiser, images)                      # (B,) bits/dim, all T terms
    bpd = vlb_bits_per_dim(denoiser, images, timesteps=50)        # unbiased, 50 strata
    bpd = ode_bits_per_dim(denoiser, images, hutchinson=1)        # one Rademacher probe
    truth = -discrete_log_prob(gm, quantize(x)) / (x[0].numel() * math.log(2))   # mixtures
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.core.losses import normal_kl, vlb_terms
from difflab.core.schedules import DiscreteVP, vp_linear

__all__ = [
    "BIN_WIDTH",
    "LOG2_LEVELS",
    "quantize",
    "OnGrid",
    "vlb_bits_per_dim",
    "ode_bits_per_dim",
    "discrete_log_prob",
]

BIN_WIDTH = 2 / 255  # width of one 8-bit level in [-1, 1]
LOG2_LEVELS = math.log2(127.5)  # -log2 BIN_WIDTH: the dequantisation term per dimension


def quantize(x: Tensor) -> Tensor:
    """Snap data in [-1, 1] to the 256 levels k / 127.5 - 1 (k = round((x + 1) * 127.5))."""
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN/inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - 1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"bits/dim needs 8-bit data in [-1, 1], got range [{lo:.4g}, {hi:.4g}]")
    return ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


class OnGrid:
    """A denoiser D(x, sigma) seen on a DiscreteVP grid (what `vlb_terms` needs: `.schedule`)."""

    learned_variance = False

    def __init__(self, denoiser, schedule: DiscreteVP):
        if not isinstance(schedule, DiscreteVP):
            raise ValueError(f"the VLB needs a DiscreteVP grid, got {type(schedule).__name__}")
        self.denoiser = denoiser
        self.schedule = schedule

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        return self.denoiser(x, sigma, **cond)


def _vlb_model(denoiser, schedule: DiscreteVP | None):
    own = getattr(denoiser, "schedule", None)
    if schedule is None:
        schedule = own if isinstance(own, DiscreteVP) else vp_linear(1000)
    if schedule is own:
        return denoiser, schedule
    return OnGrid(denoiser, schedule), schedule


def _strata(T: int, k: int) -> list[tuple[int, int]]:
    """k contiguous strata [a, b) covering t = 1..T-1 as evenly as possible."""
    edges = torch.linspace(1, T, k + 1).round().long().tolist()
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


@torch.no_grad()
def vlb_bits_per_dim(
    denoiser,
    x0: Tensor,
    *,
    schedule: DiscreteVP | None = None,
    variance: str | None = None,
    timesteps: int | None = None,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    batch_size: int = 256,
    progress: bool = False,
    return_terms: bool = False,
):
    """DDPM variational bound on -log2 P(k) / D per image (B,), in bits/dim.

    variance: the reverse-step variance: "learned" for a learned-variance Preconditioned on its
    own DiscreteVP schedule (the default there), else "large" = beta_t (the default) or "small"
    = beta~_t. With the exact denoiser of 4-D Gaussian data (std 0.2) and T = 1000, "large" is
    0.03 bits/dim above the true NLL and "small" 0.78 (its decoder variance, beta~_1 clipped,
    is half the noise actually left at t = 1).
    timesteps: None sums all T - 1 KL terms; K estimates their sum from K strata (unbiased).
    batch_size: items per denoiser call (several timesteps of the batch go into one call).
    With `return_terms`: (bpd, {"prior", "decoder", "kl"}) with each part (B,) in bits/dim.
    """
    cond = cond or {}
    x0 = quantize(x0)
    model, sched = _vlb_model(denoiser, schedule)
    if variance is None:
        variance = "learned" if getattr(model, "learned_variance", False) else "large"
    T = sched.T
    B = x0.shape[0]
    dt = x0.dtype
    if timesteps is None:
        blocks = [(t, t + 1) for t in range(1, T)]
    else:
        if not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps must be None (all) or a positive int, got {timesteps!r}")
        blocks = _strata(T, min(timesteps, T - 1))

    # every (block, item) pair gets its own t, noise and weight; run in chunks of batch_size
    t_all = [torch.zeros(B, dtype=torch.long)]  # t = 0: the decoder term, exactly
    w_all = [torch.ones(B, dtype=torch.float64)]
    for a, b in blocks:
        t_all.append(
            torch.full((B,), a, dtype=torch.long)
            if b - a == 1
            else a + torch.randint(0, b - a, (B,), generator=generator)
        )
        w_all.append(torch.full((B,), float(b - a), dtype=torch.float64))
    t_all, w_all = torch.cat(t_all), torch.cat(w_all)  # (n_blocks + 1) * B
    item = torch.arange(len(t_all)) % B
    terms = torch.zeros(len(t_all), dtype=torch.float64)
    chunks = range(0, len(t_all), max(1, batch_size))
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="bits/dim (VLB)", leave=False)
    for c in chunks:
        sl = slice(c, c + batch_size)
        idx = item[sl]
        xb = x0[idx.to(x0.device)]
        nb = torch.randn(xb.shape, generator=generator, dtype=dt).to(x0.device)
        cb = {k: v[idx.to(v.device)] if torch.is_tensor(v) and v.ndim and len(v) == B else v for k, v in cond.items()}
        terms[sl] = vlb_terms(model, xb, t_all[sl].to(x0.device), nb, variance, **cb).to(torch.float64).cpu()
    weighted = (w_all * terms).reshape(-1, B)  # (n_blocks + 1, B)
    ab_T = float(sched.alphas_cumprod[-1])
    x0c = x0.to(torch.float64).cpu()
    prior = (
        normal_kl(
            math.sqrt(ab_T) * x0c,
            torch.full_like(x0c, math.log(1 - ab_T)),
            torch.zeros_like(x0c),
            torch.zeros_like(x0c),
        )
        .flatten(1)
        .mean(1)
    )
    ln2 = math.log(2)
    parts = {"prior": prior / ln2, "decoder": weighted[0] / ln2, "kl": weighted[1:].sum(0) / ln2}
    bpd = parts["prior"] + parts["decoder"] + parts["kl"]
    if return_terms:
        return bpd, parts
    return bpd


def ode_bits_per_dim(
    denoiser,
    x0: Tensor,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    hutchinson: int | None = None,
    n_dequant: int = 1,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    **kw,
) -> Tensor:
    """Probability-flow ODE bound on -log2 P(k) / D per image (B,), bits/dim (see module doc).

    Wraps `difflab.core.likelihood.bits_per_dim`. sigma_min / sigma_max default to the
    denoiser's schedule's range (sigma_min at most 2e-3, well under the bin width 2/255).
    hutchinson: None picks the exact divergence for D <= 16 and one Rademacher probe above;
    0 forces the exact divergence. kw (solver, rtol, atol, n_steps, prior, ...) go to
    `difflab.core.likelihood.log_likelihood`.
    """
    from difflab.core.likelihood import bits_per_dim

    x0 = quantize(x0)
    sched = getattr(denoiser, "schedule", None)
    if sigma_min is None:
        sigma_min = min(2e-3, float(sched.sigma_min)) if sched is not None else 2e-3
    if sigma_max is None:
        sigma_max = float(sched.sigma_max) if sched is not None else 80.0
    D = x0[0].numel()
    if hutchinson is None:
        hutchinson = 0 if D <= 16 else 1
    params = getattr(denoiser, "parameters", None)
    device = next(params(), torch.empty(0)).device if params is not None else torch.device("cpu")
    if device.type != "cpu":  # the solver's state lives on the CPU (scipy); the network need not
        model = denoiser

        def denoiser(x, sigma, **c):
            return model(x.to(device), torch.as_tensor(sigma).to(device), **c).to(x.device)

        cond = {k: v.to(device) if torch.is_tensor(v) else v for k, v in (cond or {}).items()}
    return bits_per_dim(
        denoiser,
        x0.cpu(),
        sigma_min,
        sigma_max,
        n_dequant=n_dequant,
        generator=generator,
        hutchinson=hutchinson,
        cond=cond,
        **kw,
    )


def discrete_log_prob(gm, x: Tensor) -> Tensor:
    """log P(k) in nats (n,) of 8-bit data x (on the levels) under a diagonal Gaussian mixture
    `difflab.core.GaussianMixture`: P(k) = sum_j w_j prod_d [Phi(hi_d) - Phi(lo_d)] over each
    level's bin [x - 1/255, x + 1/255], the edge bins open to -inf / +inf (the truth for bits/dim)."""
    x = quantize(x.to(torch.float64)).reshape(x.shape[0], -1)
    lo = torch.where(x < -1 + BIN_WIDTH / 4, torch.full_like(x, -math.inf), x - BIN_WIDTH / 2)
    hi = torch.where(x > 1 - BIN_WIDTH / 4, torch.full_like(x, math.inf), x + BIN_WIDTH / 2)
    std = gm.variances.sqrt()[None]  # (1, K, d)
    a = (lo[:, None, :] - gm.means[None]) / std  # (n, K, d)
    b = (hi[:, None, :] - gm.means[None]) / std
    # Phi(b) - Phi(a), computed on the side of the tail where it does not cancel
    upper = a > 0
    mass = torch.where(
        upper, torch.special.ndtr(-a) - torch.special.ndtr(-b), torch.special.ndtr(b) - torch.special.ndtr(a)
    )
    log_mass = mass.clamp(min=1e-300).log().sum(-1)  # (n, K)
    return torch.logsumexp(log_mass + gm.weights.log()[None], dim=1)
