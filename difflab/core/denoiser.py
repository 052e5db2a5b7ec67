"""Denoisers: D(x, sigma, **cond) -> x0_hat, the currency of every sampler and guidance method.

`Preconditioned` wraps a raw network F with the scalings of Karras et al. 2022 (Table 1):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

| prediction | c_skip        | c_out        | c_in                 | c_noise           |
|------------|---------------|--------------|----------------------|-------------------|
| "eps"      | 1             | -sigma       | s(sigma)             | schedule.c_noise  |
| "x0"       | 0             | 1            | s(sigma)             | schedule.c_noise  |
| "v"        | s^2           | -sigma s     | s(sigma)             | schedule.c_noise  |
| "edm"      | sd^2/(sigma^2+sd^2) | sigma sd/sqrt(sigma^2+sd^2) | 1/sqrt(sigma^2+sd^2) | ln(sigma)/4 |

with s(sigma) = schedule.scale(sigma) (1/sqrt(1+sigma^2) for VP, 1 for VE) and sd = sigma_data.
The training target in the network's own space is (x0 - c_skip x) / c_out; `loss` returns that
squared error, whose weight c_out^2 turns it into the x0-space error.

Tweedie: score = (D(x, sigma) - x) / sigma^2 (`to_score`), eps_hat = (x - D) / sigma (`to_eps`).

Usage::

    net = create_model("unet-s")
    denoiser = Preconditioned(net, vp_linear(), prediction="eps")
    x0_hat = denoiser(x, sigma, class_labels=y)
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from difflab.core.schedules import EDM, Schedule

__all__ = ["Denoiser", "Preconditioned", "to_eps", "to_score", "from_eps", "append_dims", "sigma_batch", "PREDICTIONS"]

PREDICTIONS = ("eps", "x0", "v", "edm")


class Denoiser(Protocol):
    """Any callable D(x, sigma, **cond) -> x0_hat; sigma is a scalar or a (B,) tensor."""

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor: ...


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a (B,) tensor broadcasts against (B, ...)."""
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a {v.ndim}-D tensor to {ndim} dims")
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


def sigma_batch(sigma, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """sigma (a scalar or one per sample) as a (B,) tensor on x's device (in `dtype` if given);
    a clear error for any other shape. Every Denoiser takes its sigma through this."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or of shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def _sigma_like(sigma, x: Tensor) -> Tensor:
    """sigma (scalar or (B,)) as a (B, 1, ..., 1) tensor."""
    return append_dims(sigma_batch(sigma, x), x.ndim)


def to_eps(x: Tensor, sigma, x0_hat: Tensor) -> Tensor:
    """eps_hat = (x - D(x, sigma)) / sigma."""
    return (x - x0_hat) / _sigma_like(sigma, x).to(x.dtype)


def from_eps(x: Tensor, sigma, eps: Tensor) -> Tensor:
    """x0_hat = x - sigma eps_hat (the inverse of `to_eps`)."""
    return x - _sigma_like(sigma, x).to(x.dtype) * eps


def to_score(x: Tensor, sigma, x0_hat: Tensor) -> Tensor:
    """Tweedie: grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2."""
    s = _sigma_like(sigma, x).to(x.dtype)
    return (x0_hat - x) / s**2


class Preconditioned(nn.Module):
    """Wraps a network F(x_in, c_noise, **cond) as a denoiser with Karras et al.'s scalings.

    `learned_variance=True` means the network returns 2C channels (Improved DDPM / ADM): the first
    C are the prediction, the last C the variance interpolation v in [-1, 1] (`variance_output`).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        prediction: str = "eps",
        sigma_data: float | None = None,
        learned_variance: bool = False,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; known: {', '.join(PREDICTIONS)}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        if sigma_data is None:
            sigma_data = schedule.sigma_data if isinstance(schedule, EDM) else 0.5
        self.sigma_data = float(sigma_data)
        self.learned_variance = learned_variance

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) in float64 for a (B,) sigma."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if self.prediction == "edm":
            sd = self.sigma_data
            c_skip = sd**2 / (sigma**2 + sd**2)
            c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
            c_in = 1 / (sigma**2 + sd**2).sqrt()
            c_noise = sigma.clamp(min=1e-20).log() / 4
            return c_skip, c_out, c_in, c_noise
        s = self.schedule.scale(sigma)
        c_noise = self.schedule.c_noise(sigma)
        if self.prediction == "eps":
            return torch.ones_like(sigma), -sigma, s, c_noise
        if self.prediction == "x0":
            return torch.zeros_like(sigma), torch.ones_like(sigma), s, c_noise
        return s**2, -sigma * s, s, c_noise  # v

    def coeffs_for(self, x: Tensor, sigma) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for a batch x at `sigma`, shaped to broadcast against x:
        what a model fed the denoiser's inputs (a noise-aware classifier) needs."""
        sigma = sigma_batch(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma.cpu() if sigma.device.type != "cpu" else sigma)
        dt = x.dtype
        dims = lambda c: append_dims(c.to(device=x.device, dtype=dt), x.ndim)  # noqa: E731
        return dims(c_skip), dims(c_out), dims(c_in), c_noise.to(device=x.device, dtype=torch.float32)

    def _net(self, x_in: Tensor, c_noise: Tensor, cond: dict) -> Tensor:
        """The network's output on x_in's device. A network moved elsewhere (`Pipeline.to("cuda")`)
        gets its inputs moved to it, and a network cast to bf16/fp16 runs under autocast of its
        dtype, so callers that hold float32 CPU tensors need not know where or how it runs."""
        param = next(self.net.parameters(), None)
        home = x_in.device
        if param is not None and param.device != home:
            x_in, c_noise = x_in.to(param.device), c_noise.to(param.device)
            cond = {k: v.to(param.device) if isinstance(v, Tensor) else v for k, v in cond.items()}
        if param is not None and param.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(param.device.type, dtype=param.dtype):
                out = self.net(x_in, c_noise, **cond)
        else:  # no context at all: an autocast the caller opened (bf16 training) stays in force
            out = self.net(x_in, c_noise, **cond)
        out = out.to(home)
        if self.learned_variance:
            c = out.shape[1] // 2
            if out.shape[1] != 2 * c:
                raise ValueError(f"learned_variance needs an even channel count, network gave {out.shape[1]}")
        return out

    def forward(self, x: Tensor, sigma, **cond) -> Tensor:
        c_skip, c_out, c_in, c_noise = self.coeffs_for(x, sigma)
        out = self._net(c_in * x, c_noise, cond)
        if self.learned_variance:
            out = out[:, : out.shape[1] // 2]
        return c_skip * x + c_out * out.to(x.dtype)

    def forward_with_variance(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor]:
        """(x0_hat, v) for a learned-variance network; v is the raw interpolation output."""
        if not self.learned_variance:
            raise ValueError("forward_with_variance needs a Preconditioned(..., learned_variance=True)")
        c_skip, c_out, c_in, c_noise = self.coeffs_for(x, sigma)
        out = self._net(c_in * x, c_noise, cond)
        c = out.shape[1] // 2
        return c_skip * x + c_out * out[:, :c].to(x.dtype), out[:, c:]

    def target(self, x0: Tensor, x: Tensor, sigma) -> Tensor:
        """The regression target in the network's own space: (x0 - c_skip x) / c_out."""
        c_skip, c_out, _, _ = self.coeffs_for(x, sigma)
        return (x0 - c_skip * x) / c_out

    def loss(self, x0: Tensor, sigma, noise: Tensor | None = None, **cond) -> Tensor:
        """Per-sample mean squared error in the network's own output space, shape (B,).

        x = x0 + sigma noise. For "eps" this is DDPM's L_simple at that sigma; multiply by
        c_out^2 for the x0-space error, by the EDM weight for EDM's loss (see core.losses).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        c_skip, c_out, c_in, c_noise = self.coeffs_for(x0, sigma)
        sig = _sigma_like(sigma, x0).to(x0.dtype)
        x = x0 + sig * noise
        out = self._net(c_in * x, c_noise, cond)
        if self.learned_variance:
            out = out[:, : out.shape[1] // 2]
        if self.prediction == "eps":
            target = noise  # exact: (x0 - x) / (-sigma) = noise
        else:
            target = (x0 - c_skip * x) / c_out
        return (out.float() - target.float()).pow(2).flatten(1).mean(1)
