"""Score SDEs (Song et al. 2021, arXiv 2011.13456): VE, VP, sub-VP; reverse-SDE and PC samplers.

Every SDE here is linear, dx = f(t) x dt + g(t) dw on t in [eps, 1], and its marginal is

    x_t = s(t) (x0 + sigma(t) n),   n ~ N(0, I)

i.e. difflab's VE state x_ve = x_t / s(t) at noise level sigma(t). The drift and diffusion follow
from (s, sigma):  f = d log s / dt,  g^2 = s^2 d sigma^2 / dt.

| SDE    | s(t)          | sigma(t)                   | f(t)       | g(t)^2                      |
|--------|---------------|----------------------------|------------|-----------------------------|
| VE     | 1             | smin (smax/smin)^t         | 0          | 2 sigma^2 log(smax/smin)    |
| VP     | sqrt(abar)    | sqrt((1 - abar) / abar)    | -beta/2    | beta                        |
| sub-VP | sqrt(abar)    | (1 - abar) / sqrt(abar)    | -beta/2    | beta (1 - abar^2)           |

with beta(t) = beta_min + t (beta_max - beta_min), abar(t) = exp(-B(t)), B = int_0^t beta.
(For sub-VP, sigma = 2 sinh(B/2).) The score in native coordinates is
grad log p_t(x) = (D(x/s, sigma) - x/s) / (s sigma^2) (Tweedie, scaled by 1/s).

In VE coordinates every one of these has the same reverse SDE,
dx_ve = -d(sigma^2) score_ve + sqrt(d(sigma^2)) dw, and the same probability-flow ODE: they differ
only in how t maps to sigma, hence in the grid and in what an Euler-Maruyama step in t does.

Each SDE is also a `Schedule` (sigma(t), t(sigma), scale(sigma) = s(t(sigma)), c_noise), so
`Preconditioned(net, SubVPSDE(), "eps")` trains on it directly.

Samplers follow difflab's convention (`core.sampling`): x enters in VE coordinates at sigmas[0]
and leaves at sigmas[-1] (0 means "take x0_hat"), the denoiser is any D(x, sigma, **cond).
`sde.sigmas(n)` builds the paper's uniform t-grid t_i = 1 ... eps as a sigma grid ending in 0.

- `sample_reverse_sde`: Euler-Maruyama on the reverse SDE in the SDE's native coordinates.
- `sample_pc`: predictor-corrector (Song et al. 2021, Algorithms 2-5); predictor
  "euler_maruyama" | "reverse_diffusion" | None, corrector "langevin" | None, with the
  signal-to-noise step rule eps = 2 alpha (r ||z|| / ||score||)^2.
- NCSN (Song & Ermon 2019): annealed Langevin over geometric noise levels is
  `core.sample_langevin(denoiser, x, ncsn_sigmas(...))`; `ncsn_sigmas` builds the levels.

Usage::

    sde = VPSDE()
    x = torch.randn(n, 2) * sde.sigma_max
    x0 = sample_pc(denoiser, x, sde.sigmas(500), sde=sde, snr=0.16)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.core.sampling import check_grid, noise_source, StepRunner, progress_range
from difflab.core.schedules import VE, ContinuousVP, _as64, sigmas_logsnr

__all__ = ["SDE", "VESDE", "VPSDE", "SubVPSDE", "sample_reverse_sde", "sample_pc", "ncsn_sigmas", "langevin_snr_step"]

F64 = torch.float64


class SDE:
    """A linear SDE dx = f(t) x dt + g(t) dw with marginal x_t = s(t) (x0 + sigma(t) n).

    Subclasses give `s(t)`, `sigma(t)`, `t(sigma)`, `f(t)`, `g2(t)` (float64) and `t_eps`."""

    t_eps: float = 1e-3

    def s(self, t) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def f(self, t) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def g2(self, t) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def scale(self, sigma) -> Tensor:
        """s(t(sigma)): VE-coordinate x times this is the native x_t (the network input scale)."""
        return self.s(self.t(sigma))

    def marginal(self, x0: Tensor, t, noise: Tensor | None = None) -> Tensor:
        """A draw of x_t ~ q(x_t | x0) = N(s x0, s^2 sigma^2 I) in native coordinates."""
        t = _as64(t)
        if noise is None:
            noise = torch.randn_like(x0)
        s, sig = self.s(t), self.sigma(t)
        if s.ndim:
            s, sig = s.reshape(-1, *([1] * (x0.ndim - 1))), sig.reshape(-1, *([1] * (x0.ndim - 1)))
        return (s * (x0 + sig * noise)).to(x0.dtype)

    def prior_std(self) -> float:
        """Std of the native prior p_1 = N(0, s(1)^2 (1 + sigma(1)^2) I) (1 for VP, ~sigma_max for VE)."""
        s, sig = float(self.s(1.0)), float(self.sigma(1.0))
        return s * math.sqrt(1 + sig**2)

    def score(self, denoiser, x: Tensor, t, **cond) -> Tensor:
        """Native-coordinate score grad log p_t(x) = (D(x/s, sigma) - x/s) / (s sigma^2)."""
        t = _as64(t)
        s, sig = float(self.s(t)), float(self.sigma(t))
        x_ve = x / s
        x0_hat = denoiser(x_ve, x.new_ones(x.shape[0]) * sig, **cond)
        return (x0_hat - x_ve) / (s * sig**2)

    def t_grid(self, n: int, t_eps: float | None = None) -> Tensor:
        """The paper's uniform grid t_i = 1 ... t_eps, n points, float64."""
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"a t-grid needs n >= 2 points, got {n!r}")
        return torch.linspace(1.0, self.t_eps if t_eps is None else t_eps, n, dtype=F64)

    def sigmas(self, n: int, t_eps: float | None = None, append_zero: bool = True) -> Tensor:
        """sigma(t) on `t_grid(n)`, decreasing, then 0 (the final jump to x0_hat)."""
        sig = self.sigma(self.t_grid(n, t_eps))
        return torch.cat([sig, sig.new_zeros(1)]) if append_zero else sig


@dataclass(frozen=True, eq=False)
class VESDE(VE, SDE):
    """VE SDE: sigma(t) = sigma_min (sigma_max / sigma_min)^t, s = 1, f = 0, g^2 = d sigma^2/dt."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_eps: float = 1e-5

    def s(self, t) -> Tensor:
        return torch.ones_like(_as64(t))

    def f(self, t) -> Tensor:
        return torch.zeros_like(_as64(t))

    def g2(self, t) -> Tensor:
        return 2 * self.sigma(t) ** 2 * math.log(self.sigma_max / self.sigma_min)


@dataclass(frozen=True, eq=False)
class VPSDE(ContinuousVP, SDE):
    """VP SDE (DDPM's continuous limit): f = -beta/2, g^2 = beta, s = sqrt(abar)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-3

    @property
    def t_eps(self) -> float:
        return self.eps

    def beta(self, t) -> Tensor:
        return self.beta_min + _as64(t) * (self.beta_max - self.beta_min)

    def s(self, t) -> Tensor:
        return torch.exp(-0.5 * self._log_inv_abar(_as64(t)))

    def f(self, t) -> Tensor:
        return -0.5 * self.beta(t)

    def g2(self, t) -> Tensor:
        return self.beta(t)


@dataclass(frozen=True, eq=False)
class SubVPSDE(VPSDE):
    """sub-VP SDE: f = -beta/2, g^2 = beta (1 - abar^2); x_t = sqrt(abar) x0 + (1 - abar) n.

    In VE coordinates sigma = (1 - abar)/sqrt(abar) = 2 sinh(B/2), B = -log abar."""

    def sigma(self, t) -> Tensor:
        return 2 * torch.sinh(0.5 * self._log_inv_abar(_as64(t)))

    def t(self, sigma) -> Tensor:
        B = 2 * torch.asinh(0.5 * _as64(sigma))
        d = self.beta_max - self.beta_min
        return (-self.beta_min + (self.beta_min**2 + 2 * d * B).sqrt()) / d

    def scale(self, sigma) -> Tensor:
        return self.s(self.t(sigma))

    def g2(self, t) -> Tensor:
        return self.beta(t) * -torch.expm1(-2 * self._log_inv_abar(_as64(t)))

    def to_config(self) -> dict:
        return {"type": "SubVPSDE", "beta_min": self.beta_min, "beta_max": self.beta_max, "eps": self.eps}


def ncsn_sigmas(n: int = 10, sigma_min: float = 0.01, sigma_max: float = 1.0, append_zero: bool = True) -> Tensor:
    """NCSN's geometric noise levels sigma_1 > ... > sigma_L (Song & Ermon 2019: L=10, 1 -> 0.01)."""
    return sigmas_logsnr(n, sigma_min, sigma_max, append_zero=append_zero)


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


def langevin_snr_step(score: Tensor, z: Tensor, snr: float, alpha: float = 1.0) -> float:
    """Song et al. 2021, Algorithm 4/5: eps = 2 alpha (snr ||z|| / ||score||)^2, norms averaged over
    the batch (as the official code does). The rule is the same in VE and native coordinates."""
    grad_norm = score.flatten(1).norm(dim=1).mean()
    noise_norm = z.flatten(1).norm(dim=1).mean()
    return float(2 * alpha * (snr * noise_norm / grad_norm.clamp(min=1e-30)) ** 2)


def _t_of(sde: SDE, sigmas: Tensor) -> list[float]:
    return [float(sde.t(s)) if s > 0 else 0.0 for s in sigmas]


def sample_reverse_sde(denoiser, x, sigmas, *, sde: SDE, cond=None, callback=None, noise=None, progress=False):
    """Euler-Maruyama on the reverse SDE dx = [f x - g^2 score] dt + g dw-bar (Song et al. 2021)."""
    return sample_pc(
        denoiser,
        x,
        sigmas,
        sde=sde,
        predictor="euler_maruyama",
        corrector=None,
        cond=cond,
        callback=callback,
        noise=noise,
        progress=progress,
    )


def sample_pc(
    denoiser,
    x,
    sigmas,
    *,
    sde: SDE,
    predictor: str | None = "euler_maruyama",
    corrector: str | None = "langevin",
    snr: float = 0.16,
    n_corrector: int = 1,
    cond=None,
    callback=None,
    noise=None,
    progress=False,
):
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1 with Algorithms 2-5).

    For each grid point, `n_corrector` Langevin steps at sigma_i (x <- x + eps score + sqrt(2 eps) z,
    eps from the signal-to-noise rule) then one predictor step sigma_i -> sigma_{i+1}:
    - "euler_maruyama": in native coordinates x_t = s x_ve with dt = t_{i+1} - t_i < 0,
      x <- x + (f x - g^2 score) dt + sqrt(g^2 |dt|) z, the coefficients taken at t_i;
    - "reverse_diffusion": the ancestral step of the discretised SDE in VE coordinates,
      x <- x + (sigma^2 - sigma_next^2) score + sqrt(sigma^2 - sigma_next^2) z (the same for all SDEs);
    - None: corrector only.
    A step to sigma = 0 returns Tweedie's x0_hat = D(x, sigma) (the paper's final denoising).
    The Langevin corrector's alpha (1 - beta_i for discrete VP) is taken as 1.
    """
    if predictor not in ("euler_maruyama", "reverse_diffusion", None):
        raise ValueError(f"predictor must be 'euler_maruyama', 'reverse_diffusion' or None, got {predictor!r}")
    if corrector not in ("langevin", None):
        raise ValueError(f"corrector must be 'langevin' or None, got {corrector!r}")
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a VESDE, VPSDE or SubVPSDE, got {type(sde).__name__}")
    sigmas = check_grid(x, sigmas)
    run, draw = StepRunner(denoiser, x, cond, callback), noise_source(noise)
    ts = _t_of(sde, sigmas)
    k = 0  # noise counter: one draw per stochastic update
    for i in progress_range(len(sigmas) - 1, progress, "pc"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if corrector == "langevin":
            for _ in range(n_corrector):
                score = (run(x, sigma) - x) / sigma**2
                z = draw(k, x)
                k += 1
                eps = langevin_snr_step(score, z, snr)
                x = x + eps * score + math.sqrt(2 * eps) * z
        x0_hat = run(x, sigma)
        if sigma_next == 0:
            x_next = x0_hat
        elif predictor is None:
            x_next = x
        elif predictor == "reverse_diffusion":
            dvar = sigma**2 - sigma_next**2
            x_next = x + dvar * (x0_hat - x) / sigma**2 + math.sqrt(dvar) * draw(k, x)
            k += 1
        else:  # Euler-Maruyama in native coordinates
            t, t_next = ts[i], ts[i + 1]
            dt = t_next - t
            s, s_next = float(sde.s(t)), float(sde.s(t_next))
            f, g2 = float(sde.f(t)), float(sde.g2(t))
            x_nat = s * x
            score_nat = (x0_hat - x) / (s * sigma**2)
            x_nat = x_nat + (f * x_nat - g2 * score_nat) * dt + math.sqrt(g2 * -dt) * draw(k, x)
            k += 1
            x_next = x_nat / s_next
        x = run.after(i, x_next, sigma, sigma_next, x0_hat)
    return x
