"""Noise schedules (network time <-> sigma) and sampling grids, all in float64.

difflab works in variance-exploding coordinates: x = x0 + sigma * n (Karras et al. 2022).
A variance-preserving model with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps is the same
process with sigma_t = sqrt((1 - abar_t) / abar_t) and network input x_t = x / sqrt(1 + sigma^2).

A `Schedule` maps the network's own time to sigma and back and knows the input scale; it owns no
solver state and no step counter. Sampling grids are plain decreasing tensors ending in 0.

Usage::

    sched = vp_linear()                         # DDPM: betas 1e-4 .. 0.02 over 1000 steps
    sigmas = sigmas_spaced(sched, 50, "trailing")
    sigmas = sigmas_karras(20, sched.sigma_min, sched.sigma_max)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "DiscreteVP",
    "ContinuousVP",
    "VE",
    "EDM",
    "vp_linear",
    "vp_scaled_linear",
    "vp_cosine",
    "betas_for",
    "sigmas_karras",
    "sigmas_spaced",
    "sigmas_logsnr",
    "timesteps_spaced",
]

F64 = torch.float64


def _as64(x) -> Tensor:
    return torch.as_tensor(x, dtype=F64)


class Schedule:
    """Base class: `sigma(t)`, `t(sigma)`, `c_noise(sigma)`, `scale(sigma)`, sigma range."""

    sigma_min: float
    sigma_max: float
    discrete: bool = False

    def sigma(self, t) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def t(self, sigma) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def c_noise(self, sigma) -> Tensor:
        """The time value a network trained on this schedule is fed (default: t(sigma))."""
        return self.t(sigma)

    def scale(self, sigma) -> Tensor:
        """Factor taking VE-coordinate x to the network's native input (VP: 1/sqrt(1+sigma^2))."""
        return torch.ones_like(_as64(sigma))

    def sigma_at_time(self, t0: float) -> float:
        """The noise level at the papers' diffusion time t0 in [0, 1] (SDEdit's t0, DiffEdit's encoding
        ratio, Blended Diffusion's skipped fraction, ILVR's t_stop), whatever grid a sampler uses.

        A schedule with a time axis uses its own (DDPM: timestep t0 T, the SDEs: t = t0). One without
        (EDM, where time is sigma) uses the VP SDE of the papers, beta from 0.1 to 20 (the continuous
        form of DDPM's linear betas: t0 = 0.5 is sigma 3.4), capped at sigma_max."""
        t0 = _check_t0(t0)
        sigma = float(torch.expm1(_as64(0.1 * t0 + 0.5 * (20.0 - 0.1) * t0 * t0)).sqrt())
        return min(sigma, float(self.sigma_max))

    def to_config(self) -> dict:
        raise NotImplementedError


def _check_t0(t0) -> float:
    t0 = float(t0)
    if not 0.0 <= t0 <= 1.0:  # NaN fails too
        raise ValueError(f"diffusion time t0 must be in [0, 1], got {t0}")
    return t0


# --------------------------------------------------------------------------------------------
# Variance preserving, discrete (DDPM / LDM / Improved DDPM)
# --------------------------------------------------------------------------------------------


def betas_for(
    kind: str,
    T: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> Tensor:
    """Betas of the named VP schedule: "linear" (DDPM), "scaled_linear" (LDM), "cosine"."""
    if T < 2:
        raise ValueError(f"a discrete schedule needs T >= 2 steps, got T={T}")
    if kind == "linear":
        b0 = 1e-4 if beta_start is None else beta_start
        b1 = 0.02 if beta_end is None else beta_end
        return torch.linspace(b0, b1, T, dtype=F64)
    if kind == "scaled_linear":  # linear in sqrt(beta) (LDM's "linear")
        b0 = 0.00085 if beta_start is None else beta_start
        b1 = 0.012 if beta_end is None else beta_end
        return torch.linspace(b0**0.5, b1**0.5, T, dtype=F64) ** 2
    if kind == "cosine":  # Nichol & Dhariwal 2021, eq. 17
        steps = torch.arange(T + 1, dtype=F64) / T
        abar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = 1 - abar[1:] / abar[:-1]
        return betas.clamp(max=max_beta)
    raise ValueError(f"unknown beta schedule {kind!r}; known: 'linear', 'scaled_linear', 'cosine'")


@dataclass(frozen=True, eq=False)
class DiscreteVP(Schedule):
    """Discrete variance-preserving schedule from betas; t in {0, ..., T-1}.

    sigma(t) for fractional t interpolates log sigma linearly between trained timesteps;
    t(sigma) inverts that interpolation (k-diffusion's convention). interpolation="linear"
    interpolates sigma itself (diffusers' Euler-type schedulers, interpolation_type "linear"); the
    two agree at trained timesteps. `quantize=True` rounds t(sigma) to the nearest trained timestep.
    """

    betas: Tensor
    kind: str = "custom"
    quantize: bool = False
    interpolation: str = "log"
    alphas_cumprod: Tensor = field(init=False, repr=False)
    sigmas: Tensor = field(init=False, repr=False)
    log_sigmas: Tensor = field(init=False, repr=False)
    discrete: bool = field(default=True, init=False)

    def __post_init__(self):
        betas = _as64(self.betas)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D tensor of length >= 2, got shape {tuple(betas.shape)}")
        if not torch.all((betas > 0) & (betas < 1)):
            raise ValueError(f"betas must lie in (0, 1); got min {betas.min():.3g}, max {betas.max():.3g}")
        if self.interpolation not in ("log", "linear"):
            raise ValueError(f"interpolation must be 'log' or 'linear', got {self.interpolation!r}")
        abar = torch.cumprod(1 - betas, 0)
        sig = ((1 - abar) / abar).sqrt()
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", abar)
        object.__setattr__(self, "sigmas", sig)
        object.__setattr__(self, "log_sigmas", sig.log())

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, t) -> Tensor:
        t = _as64(t).clamp(0, self.T - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.T - 1)
        w = t - lo
        if self.interpolation == "linear":
            return (1 - w) * self.sigmas[lo] + w * self.sigmas[hi]
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def t(self, sigma) -> Tensor:
        sigma = _as64(sigma)
        log_sigma = sigma.clamp(min=1e-300).log()
        dists = log_sigma.reshape(-1, 1) - self.log_sigmas  # (N, T)
        lo = (dists >= 0).cumsum(1).argmax(1).clamp(max=self.T - 2)
        hi = lo + 1
        if self.interpolation == "linear":
            low, high, value = self.sigmas[lo], self.sigmas[hi], sigma.reshape(-1)
        else:
            low, high, value = self.log_sigmas[lo], self.log_sigmas[hi], log_sigma.reshape(-1)
        w = ((low - value) / (low - high)).clamp(0, 1)
        t = ((1 - w) * lo + w * hi).reshape(sigma.shape)
        return t.round() if self.quantize else t

    def scale(self, sigma) -> Tensor:
        return 1 / (_as64(sigma) ** 2 + 1).sqrt()

    def sigma_at_time(self, t0: float) -> float:
        """DDPM's timestep t = t0 T (1-based: index t0 T - 1); t0 = 0 is the clean image."""
        t0 = _check_t0(t0)
        return 0.0 if t0 == 0 else float(self.sigma(max(t0 * self.T - 1, 0.0)))

    def to_config(self) -> dict:
        extra = {"interpolation": self.interpolation} if self.interpolation != "log" else {}
        if self.kind == "custom":
            return {"type": "DiscreteVP", "betas": self.betas.tolist(), "quantize": self.quantize, **extra}
        return {"type": "DiscreteVP", "kind": self.kind, "T": self.T, "quantize": self.quantize, **extra}


def vp_linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVP:
    """DDPM's linear betas, 1e-4 -> 0.02 over 1000 steps (Ho et al. 2020)."""
    betas = betas_for("linear", T, beta_start, beta_end)
    kind = "linear" if (beta_start, beta_end) == (1e-4, 0.02) else "custom"
    return DiscreteVP(betas, kind=kind)


def vp_scaled_linear(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> DiscreteVP:
    """LDM / Stable Diffusion: linear in sqrt(beta), 0.00085 -> 0.012."""
    betas = betas_for("scaled_linear", T, beta_start, beta_end)
    kind = "scaled_linear" if (beta_start, beta_end) == (0.00085, 0.012) else "custom"
    return DiscreteVP(betas, kind=kind)


def vp_cosine(T: int = 1000, s: float = 0.008) -> DiscreteVP:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021), betas clipped at 0.999."""
    return DiscreteVP(betas_for("cosine", T, cosine_s=s), kind="cosine" if s == 0.008 else "custom")


# --------------------------------------------------------------------------------------------
# Continuous-time schedules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ContinuousVP(Schedule):
    """Song et al. 2021 VP SDE: abar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2), t in [eps, 1].

    The network is fed c_noise = 999 t (the DDPM++ convention).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-3

    def _log_inv_abar(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def sigma(self, t) -> Tensor:
        return torch.expm1(self._log_inv_abar(_as64(t))).sqrt()

    def t(self, sigma) -> Tensor:
        d = self.beta_max - self.beta_min
        lg = torch.log1p(_as64(sigma) ** 2)
        return (-self.beta_min + (self.beta_min**2 + 2 * d * lg).sqrt()) / d

    def c_noise(self, sigma) -> Tensor:
        return 999 * self.t(sigma)

    def sigma_at_time(self, t0: float) -> float:
        return float(self.sigma(_check_t0(t0)))

    def scale(self, sigma) -> Tensor:
        return 1 / (_as64(sigma) ** 2 + 1).sqrt()

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.eps))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(1.0))

    def to_config(self) -> dict:
        return {"type": "ContinuousVP", "beta_min": self.beta_min, "beta_max": self.beta_max, "eps": self.eps}


@dataclass(frozen=True, eq=False)
class VE(Schedule):
    """Song et al. 2021 VE SDE / NCSN: sigma(t) = sigma_min (sigma_max / sigma_min)^t, t in [0, 1].

    The network is fed c_noise = ln(sigma / 2) (EDM's VE preconditioning).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def sigma(self, t) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _as64(t)

    def t(self, sigma) -> Tensor:
        return (_as64(sigma) / self.sigma_min).log() / math.log(self.sigma_max / self.sigma_min)

    def c_noise(self, sigma) -> Tensor:
        return (0.5 * _as64(sigma)).log()

    def sigma_at_time(self, t0: float) -> float:
        t0 = _check_t0(t0)
        return 0.0 if t0 == 0 else float(self.sigma(t0))

    def to_config(self) -> dict:
        return {"type": "VE", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


@dataclass(frozen=True, eq=False)
class EDM(Schedule):
    """Karras et al. 2022: sigma(t) = t, network fed ln(sigma) / 4; sampling with sigmas_karras."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0

    def sigma(self, t) -> Tensor:
        return _as64(t)

    def t(self, sigma) -> Tensor:
        return _as64(sigma)

    def c_noise(self, sigma) -> Tensor:
        return _as64(sigma).clamp(min=1e-20).log() / 4

    def to_config(self) -> dict:
        return {
            "type": "EDM",
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "sigma_data": self.sigma_data,
            "rho": self.rho,
        }


def schedule_from_config(cfg: dict) -> Schedule:
    """Rebuild a schedule saved by `Schedule.to_config()`."""
    from difflab.core.validation import check_number

    if not isinstance(cfg, dict):
        raise ValueError(f"a schedule config is a JSON object, got {type(cfg).__name__}")
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    for name, value in cfg.items():  # read from files: numbers must be numbers
        if name in (
            "sigma_min",
            "sigma_max",
            "sigma_data",
            "rho",
            "beta_min",
            "beta_max",
            "beta_d",
            "beta_0",
            "beta_1",
            "eps",
        ):
            check_number(f"schedule {name}", value, lo=0, lo_open=True)
        elif name == "T":
            check_number("schedule T", value, lo=1, hi=100_000, integer=True)
    if "sigma_min" in cfg and "sigma_max" in cfg and not cfg["sigma_min"] < cfg["sigma_max"]:
        raise ValueError(f"schedule sigma_min {cfg['sigma_min']} must be below sigma_max {cfg['sigma_max']}")
    if kind == "DiscreteVP":
        if "betas" in cfg:
            betas = cfg["betas"]
            if (
                not isinstance(betas, list)
                or not 2 <= len(betas) <= 100_000
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in betas)
            ):
                raise ValueError("schedule betas must be a list of 2 .. 100000 numbers in (0, 1)")
            return DiscreteVP(
                torch.tensor(cfg["betas"], dtype=F64),
                quantize=cfg.get("quantize", False),
                interpolation=cfg.get("interpolation", "log"),
            )
        betas = betas_for(cfg["kind"], cfg.get("T", 1000))
        return DiscreteVP(
            betas, kind=cfg["kind"], quantize=cfg.get("quantize", False), interpolation=cfg.get("interpolation", "log")
        )
    classes = {"ContinuousVP": ContinuousVP, "VE": VE, "EDM": EDM}
    if kind not in classes:
        raise ValueError(f"unknown schedule type {kind!r} in config; known: DiscreteVP, {', '.join(classes)}")
    return classes[kind](**cfg)


# --------------------------------------------------------------------------------------------
# Sampling grids: plain decreasing float64 tensors, ending in 0 unless append_zero=False
# --------------------------------------------------------------------------------------------


def _finish(sigmas: Tensor, append_zero: bool) -> Tensor:
    sigmas = sigmas.to(F64)
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if append_zero else sigmas


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps must be a positive int, got {n!r}")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, append_zero: bool = True) -> Tensor:
    """Karras et al. 2022, eq. 5: (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=F64) if n > 1 else torch.zeros(1, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, append_zero)


def sigmas_logsnr(n: int, sigma_min: float, sigma_max: float, append_zero: bool = True) -> Tensor:
    """Uniform in logSNR = -2 log sigma (DPM-Solver's 'logSNR' / k-diffusion's exponential grid)."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=F64) if n > 1 else torch.zeros(1, dtype=F64)
    return _finish((math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max))).exp(), append_zero)


def timesteps_spaced(T: int, n: int, spacing: str = "trailing", steps_offset: int = 0) -> Tensor:
    """Decreasing integer timesteps as diffusers' `timestep_spacing` builds them.

    leading: 0, T//n, 2T//n, ... (+ offset) — never visits T-1; trailing: T-1, T-1-T/n, ...;
    linspace: round(linspace(0, T-1, n)).
    """
    _check_n(n)
    if n > T:
        raise ValueError(f"cannot take {n} steps from a schedule of T={T} timesteps")
    if spacing == "leading":
        ratio = T // n
        ts = (torch.arange(n, dtype=F64) * ratio).round() + steps_offset
    elif spacing == "trailing":
        ratio = T / n
        ts = torch.arange(T, 0, -ratio, dtype=F64).round().flip(0) - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=F64).round()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; known: 'leading', 'trailing', 'linspace'")
    return ts.flip(0).long()


def sigmas_spaced(
    schedule: DiscreteVP, n: int, spacing: str = "trailing", steps_offset: int = 0, append_zero: bool = True
) -> Tensor:
    """Sigmas of a discrete schedule at diffusers-style spaced timesteps (see `timesteps_spaced`)."""
    if not getattr(schedule, "discrete", False):
        raise ValueError(f"sigmas_spaced needs a discrete schedule, got {type(schedule).__name__}")
    ts = timesteps_spaced(schedule.T, n, spacing, steps_offset)
    return _finish(schedule.sigmas[ts], append_zero)
