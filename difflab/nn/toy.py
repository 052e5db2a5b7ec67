"""Small MLPs for 2-D (or any low-dimensional) data: denoising nets and energy nets.

`ToyMLP` has the backbone signature that `core.Preconditioned` calls, `net(x_in, c_noise)`, and
returns `out_dim` numbers per point (the prediction, or prediction and variance/log-variance for
models such as Sohl-Dickstein's). `EnergyMLP` returns one scalar energy E(x) per point, with an
optional noise-level input, `E(x, c_noise)`, for noise-conditional energies. Both use SiLU, a
smooth activation, so second derivatives (score matching, exact divergences) are non-zero.

The noise level enters as sinusoidal features of `time_scale * c_noise` concatenated with
`c_noise` itself, then added to every hidden layer (FiLM-free, ResNet-style MLP).

Usage::

    net = ToyMLP(ToyConfig(dim=2, hidden=128, depth=3))
    denoiser = Preconditioned(net, EDM(), prediction="edm")
    energy = EnergyMLP(ToyConfig(dim=2, hidden=128, depth=3))
    e = energy(x)                      # (B,)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from difflab.nn.embeddings import timestep_embedding

__all__ = ["ToyConfig", "ToyMLP", "EnergyMLP"]


@dataclass
class ToyConfig:
    """dim: data dimension; out_dim: outputs per point (default dim); depth: residual blocks;
    noise_conditional: whether forward takes c_noise; time_scale: c_noise multiplier before the
    sinusoidal features (e.g. 1 for c_noise = ln(sigma)/4 or 999 t, 1000 for t in [0, 1])."""

    dim: int = 2
    hidden: int = 128
    depth: int = 3
    out_dim: int | None = None
    noise_conditional: bool = True
    time_dim: int = 32
    time_scale: float = 1.0


class _Block(nn.Module):
    def __init__(self, hidden: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.lin1 = nn.Linear(hidden, hidden)
        self.lin2 = nn.Linear(hidden, hidden)
        self.cond = nn.Linear(cond_dim, hidden) if cond_dim else None
        self.act = nn.SiLU()

    def forward(self, h: Tensor, c: Tensor | None) -> Tensor:
        z = self.lin1(self.act(self.norm(h)))
        if self.cond is not None:
            z = z + self.cond(c)
        return h + self.lin2(self.act(z))


class _Trunk(nn.Module):
    def __init__(self, config: ToyConfig, out_dim: int):
        super().__init__()
        self.config = config
        cond_dim = config.time_dim + 1 if config.noise_conditional else 0
        self.inp = nn.Linear(config.dim, config.hidden)
        self.blocks = nn.ModuleList(_Block(config.hidden, cond_dim) for _ in range(config.depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden, out_dim))

    def _cond(self, x: Tensor, c_noise) -> Tensor | None:
        if not self.config.noise_conditional:
            if c_noise is not None:
                raise ValueError("this network was built with noise_conditional=False; pass no c_noise")
            return None
        if c_noise is None:
            raise ValueError("this network is noise-conditional: call it as net(x, c_noise)")
        c = torch.as_tensor(c_noise, device=x.device, dtype=torch.float32).reshape(-1)
        if c.numel() == 1:
            c = c.expand(x.shape[0])
        if c.shape != (x.shape[0],):
            raise ValueError(f"c_noise must be a scalar or ({x.shape[0]},), got {tuple(c.shape)}")
        emb = timestep_embedding(c * self.config.time_scale, self.config.time_dim)  # (B, time_dim)
        return torch.cat([emb, c[:, None]], dim=1).to(x.dtype)  # (B, time_dim + 1)

    def features(self, x: Tensor, c_noise=None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"expected points of shape (B, {self.config.dim}), got {tuple(x.shape)}")
        c = self._cond(x, c_noise)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)


class ToyMLP(_Trunk):
    """Residual MLP F(x, c_noise) -> (B, out_dim): a denoising network for low-dimensional data."""

    def __init__(self, config: ToyConfig | None = None, **overrides):
        config = dataclasses.replace(config or ToyConfig(), **overrides)
        super().__init__(config, config.out_dim or config.dim)

    def forward(self, x: Tensor, c_noise=None, **cond) -> Tensor:
        return self.features(x, c_noise)


class EnergyMLP(_Trunk):
    """Residual MLP energy E(x[, c_noise]) -> (B,); the model density is exp(-E) / Z.

    `quadratic` adds 0.5 * quadratic * |x|^2 so that exp(-E) stays integrable however the MLP
    extrapolates (a confining term; set 0 to remove)."""

    def __init__(self, config: ToyConfig | None = None, quadratic: float = 0.05, **overrides):
        config = dataclasses.replace(config or ToyConfig(noise_conditional=False), **overrides)
        super().__init__(config, 1)
        self.quadratic = float(quadratic)

    def forward(self, x: Tensor, c_noise=None) -> Tensor:
        e = self.features(x, c_noise)[:, 0]
        if self.quadratic:
            e = e + 0.5 * self.quadratic * x.pow(2).sum(1)
        return e
