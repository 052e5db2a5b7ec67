"""Variational Diffusion Models — Kingma, Salimans, Poole, Ho 2021 (arXiv 2107.00630);
the continuous ELBO and its three equivalent targets as in Luo 2022 (arXiv 2208.11970).

Notation map (paper -> difflab, VE coordinates x = x0 + sigma n):

| paper                                  | here                                                |
|----------------------------------------|-----------------------------------------------------|
| gamma(t) = -log SNR(t), monotone       | `LogSNRSchedule.gamma(t)` = 2 ln sigma(t)            |
| z_t = alpha_t x + sigma_t eps (VP)     | z_t = x / sqrt(1 + sigma^2) (the network input)      |
| alpha_t^2 = sigmoid(-gamma), sigma_t^2 = sigmoid(gamma) | sigma = exp(gamma / 2)                |
| eps_hat, x_hat, score                  | x0_hat = x - sigma eps_hat = x_hat = x + sigma^2 s_hat |
| L_inf = 1/2 E_t[gamma'(t) ||eps - eps_hat||^2] | `diffusion` term = 1/2 gamma' SNR ||x0 - x0_hat||^2 |

-ELBO(x) = KL(q(z_1|x) || N(0, I)) + E[-log p(x | z_0)] + L_inf(x), in nats; with the
continuous-data decoder p(x | z_0) = N(x; z_0/alpha_0, SNR_0^-1 I) (x_{sigma_0} in VE
coordinates, variance sigma_0^2) the reconstruction term is d/2 (log 2 pi e + gamma_0) in
expectation. The three targets give the same per-sample loss as functions of x0_hat, so they
are the same bound; they differ only in what the network has to output.

The schedule gamma(t) = gamma_0 + (gamma_1 - gamma_0) phi(t) has learned endpoints (trained by
the ELBO, which depends on the schedule only through them) and a learned monotone shape phi
(phi(0) = 0, phi(1) = 1) trained, as in the paper, to minimise the variance of the Monte
Carlo estimate of L_inf: its parameters receive the gradient of E[L_inf^2] instead (a
gradient-only rescaling by 2 L_inf in the backward pass; the loss value is unchanged).

Usage::

    vdm = VDM(ToyMLP(ToyConfig(dim=2)), LogSNRSchedule(learn_shape=True), prediction="eps")
    loss = vdm.loss(x0).mean(); loss.backward()          # per-sample -ELBO estimate, nats
    nelbo = vdm.nelbo(x_test, n_t=64)["total"]           # low-variance evaluation
    x = sample_euler_ancestral(vdm, torch.randn(n, 2) * vdm.schedule.prior_std, vdm.schedule.sigmas(500))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.core.denoiser import sigma_batch
from difflab.core.schedules import Schedule

__all__ = ["LogSNRSchedule", "VDM", "PREDICTIONS"]

PREDICTIONS = ("eps", "x0", "score")
F64 = torch.float64


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradients by holder['w'] (set after forward)."""

    @staticmethod
    def forward(ctx, holder, *xs):
        ctx.holder = holder
        return tuple(x.clone() for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        w = ctx.holder["w"]
        return (None, *[None if g is None else g * w for g in grads])


class LogSNRSchedule(nn.Module, Schedule):
    """gamma(t) = -log SNR(t) = gamma_0 + (gamma_1 - gamma_0) phi(t) on t in [0, 1].

    phi is t ("linear": log sigma uniform in t, VDM's fixed schedule) or, with learn_shape, the
    normalised monotone net phi~(t) = w t + sum_k a_k sigmoid(b_k t + c_k) (w, a, b >= 0 by
    softplus), phi = (phi~(t) - phi~(0)) / (phi~(1) - phi~(0)). Also a difflab `Schedule`:
    sigma(t) = exp(gamma(t)/2), t(sigma) by bisection, scale = 1/sqrt(1 + sigma^2)."""

    def __init__(
        self,
        gamma_0: float = -10.0,
        gamma_1: float = 6.0,
        learn_endpoints: bool = True,
        learn_shape: bool = False,
        hidden: int = 64,
    ):
        nn.Module.__init__(self)
        if not gamma_0 < gamma_1:
            raise ValueError(f"need gamma_0 < gamma_1, got {gamma_0}, {gamma_1}")
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_0)), requires_grad=learn_endpoints)
        self.gamma_1 = nn.Parameter(torch.tensor(float(gamma_1)), requires_grad=learn_endpoints)
        self.learn_shape = learn_shape
        if learn_shape:
            g = torch.Generator().manual_seed(0)
            self.w_raw = nn.Parameter(torch.tensor(1.0))
            self.a_raw = nn.Parameter(torch.full((hidden,), -4.0))  # small: starts near linear
            self.b_raw = nn.Parameter(torch.randn(hidden, generator=g) + 2.0)
            self.c = nn.Parameter(torch.randn(hidden, generator=g) * 3)

    # ---- the schedule ----------------------------------------------------------------------

    def phi(self, t: Tensor) -> Tensor:
        """The monotone shape, phi(0) = 0, phi(1) = 1."""
        if not self.learn_shape:
            return t
        w, a, b = F.softplus(self.w_raw), F.softplus(self.a_raw), F.softplus(self.b_raw)

        def raw(s: Tensor) -> Tensor:
            return w * s + (a * torch.sigmoid(s[..., None] * b + self.c)).sum(-1)

        ends = raw(torch.tensor([0.0, 1.0], dtype=self.c.dtype))
        return (raw(t.to(self.c.dtype)) - ends[0]) / (ends[1] - ends[0])

    def gamma(self, t: Tensor) -> Tensor:
        """gamma(t) = 2 ln sigma(t), with gradients to the schedule's parameters."""
        return self.gamma_0 + (self.gamma_1 - self.gamma_0) * self.phi(t)

    def gamma_and_derivative(self, t: Tensor, holder: dict | None = None) -> tuple[Tensor, Tensor]:
        """(gamma(t), gamma'(t)), differentiable; with `holder`, the shape parameters get their
        gradient rescaled by holder['w'] (the variance-minimisation trick)."""
        with torch.enable_grad():
            t = t.detach().requires_grad_(True)
            p = self.phi(t)
            if self.learn_shape:
                (dp,) = torch.autograd.grad(p.sum(), t, create_graph=True)
            else:
                dp = torch.ones_like(t)
        if holder is not None and self.learn_shape:
            p, dp = _ScaleGrad.apply(holder, p, dp)
        span = self.gamma_1 - self.gamma_0
        return self.gamma_0 + span * p, span * dp

    # ---- the Schedule interface (float64, no gradients) ------------------------------------

    @torch.no_grad()
    def sigma(self, t) -> Tensor:
        t = torch.as_tensor(t, dtype=F64)
        return (0.5 * self.gamma(t.float()).double()).exp().reshape(t.shape)

    @torch.no_grad()
    def t(self, sigma) -> Tensor:
        target = 2 * torch.as_tensor(sigma, dtype=F64).log()
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(40):
            mid = (lo + hi) / 2
            below = self.gamma(mid.float()).double().reshape(mid.shape) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def c_noise(self, sigma) -> Tensor:
        return torch.as_tensor(sigma, dtype=F64).log() / 4

    def scale(self, sigma) -> Tensor:
        return 1 / (torch.as_tensor(sigma, dtype=F64) ** 2 + 1).sqrt()

    @property
    def sigma_min(self) -> float:
        return math.exp(0.5 * self.gamma_0.item())

    @property
    def sigma_max(self) -> float:
        return math.exp(0.5 * self.gamma_1.item())

    @property
    def prior_std(self) -> float:
        """Std of the prior N(0, I) on z_1 seen in VE coordinates: sqrt(1 + sigma_max^2)."""
        return math.sqrt(1 + self.sigma_max**2)

    def sigmas(self, n: int, append_zero: bool = True) -> Tensor:
        """sigma(t) on the uniform grid t = 1 ... 0 (n points), then 0: VDM's T-step sampler grid."""
        sig = self.sigma(torch.linspace(1, 0, n, dtype=F64))
        return torch.cat([sig, sig.new_zeros(1)]) if append_zero else sig

    def to_config(self) -> dict:
        return {
            "type": "LogSNRSchedule",
            "gamma_0": self.gamma_0.item(),
            "gamma_1": self.gamma_1.item(),
            "learn_shape": self.learn_shape,
        }


class VDM(nn.Module):
    """A continuous-time variational diffusion model: a denoiser D(x, sigma) and its -ELBO.

    net(z, c_noise) with z = x / sqrt(1 + sigma^2), c_noise = ln(sigma)/4 = gamma/8, predicts
    eps ("eps": x0_hat = x - sigma F), x0 ("x0": x0_hat = F) or the VE score ("score":
    x0_hat = x + sigma^2 F)."""

    def __init__(self, net: nn.Module, schedule: LogSNRSchedule, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; known: {', '.join(PREDICTIONS)}")
        self.net, self.schedule, self.prediction = net, schedule, prediction

    def _x0_hat(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        out = self.net(x / (1 + s**2).sqrt(), sigma.log() / 4, **cond)
        if self.prediction == "eps":
            return x - s * out
        if self.prediction == "x0":
            return out
        return x + s**2 * out

    def forward(self, x: Tensor, sigma, **cond) -> Tensor:
        """The Denoiser: x0_hat = D(x, sigma)."""
        sigma = sigma_batch(sigma, x, x.dtype)
        return self._x0_hat(x, sigma, **cond)

    # ---- the bound ---------------------------------------------------------------------------

    def prior_term(self, x0: Tensor) -> Tensor:
        """KL(q(z_1 | x) || N(0, I)) per sample, nats."""
        g1 = self.schedule.gamma_1
        var, mean2 = torch.sigmoid(g1), torch.sigmoid(-g1) * x0.flatten(1).pow(2)
        return 0.5 * (var + mean2 - 1 - F.logsigmoid(g1)).sum(1)

    def recon_term(self, x0: Tensor) -> Tensor:
        """E[-log N(x; x_{sigma_0}, sigma_0^2 I)] = d/2 (log 2 pi e + gamma_0) per sample, nats."""
        d = x0[0].numel()
        return (0.5 * d * (math.log(2 * math.pi) + 1 + self.schedule.gamma_0)).expand(x0.shape[0])

    def diffusion_term(self, x0: Tensor, t: Tensor, noise: Tensor, holder: dict | None = None, **cond) -> Tensor:
        """1/2 gamma'(t) SNR(t) ||x0 - x0_hat||^2 = 1/2 gamma'(t) ||eps - eps_hat||^2 at the given t."""
        gamma, dgamma = self.schedule.gamma_and_derivative(t, holder)
        sigma = (0.5 * gamma).exp().to(x0.dtype)
        s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
        x = x0 + s * noise
        x0_hat = self._x0_hat(x, sigma, **cond)
        return 0.5 * dgamma * (x0 - x0_hat).flatten(1).pow(2).sum(1) / sigma**2

    @staticmethod
    def draw_times(n: int, generator: torch.Generator | None = None, antithetic: bool = True) -> Tensor:
        """t ~ U(0, 1); antithetic = VDM's low-discrepancy sampler t_i = (u + i/n) mod 1."""
        if antithetic:
            u = torch.rand(1, generator=generator)
            return (u + torch.arange(n) / n) % 1.0
        return torch.rand(n, generator=generator)

    def loss(self, x0: Tensor, generator: torch.Generator | None = None, antithetic: bool = True, **cond) -> Tensor:
        """Per-sample one-sample estimate of -ELBO(x0) in nats (B,). Backprop of its mean trains
        the network and endpoints on the ELBO and a learned shape on the variance of L_inf."""
        t = self.draw_times(x0.shape[0], generator, antithetic).to(x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        holder: dict = {}
        diff = self.diffusion_term(x0, t, noise, holder, **cond)
        holder["w"] = 2 * diff.detach()  # d/d eta of L^2 = 2 L dL/d eta
        return self.prior_term(x0) + self.recon_term(x0) + diff

    @torch.no_grad()
    def nelbo(
        self, x0: Tensor, n_t: int = 64, generator: torch.Generator | None = None, chunk: int = 65536, **cond
    ) -> dict[str, Tensor]:
        """-ELBO per sample with L_inf averaged over n_t stratified times: dict(prior, recon,
        diffusion, total) of (B,) tensors, nats."""
        B = x0.shape[0]
        u = torch.rand(B, 1, generator=generator)
        t = ((torch.arange(n_t)[None] + u) / n_t).reshape(-1).to(x0.dtype)  # (B * n_t,)
        xr = x0.repeat_interleave(n_t, 0)  # (B * n_t, ...)
        noise = torch.randn(xr.shape, generator=generator, dtype=x0.dtype)
        parts = [
            self.diffusion_term(a, b, c, **cond) for a, b, c in zip(xr.split(chunk), t.split(chunk), noise.split(chunk))
        ]
        diff = torch.cat(parts).reshape(B, n_t).mean(1)
        prior, recon = self.prior_term(x0), self.recon_term(x0)
        return {"prior": prior, "recon": recon, "diffusion": diff, "total": prior + recon + diff}
