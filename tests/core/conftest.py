import pytest
import torch
from torch import nn

from difflab.core import GaussianMixture


class TinyEpsNet(nn.Module):
    """A small random epsilon-network eps(x_t, t) on (B, C, H, W), deterministic by seed."""

    def __init__(self, channels=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        self.time = nn.Linear(2, 8)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t, **cond):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        temb = self.time(torch.stack([torch.sin(t / 200), torch.cos(t / 300)], dim=1))
        h = torch.tanh(self.conv1(x) + temb[:, :, None, None])
        return self.conv2(h)


class OracleNet(nn.Module):
    """The exact network for Gaussian-mixture data, for a given schedule and prediction:
    F = (D_exact(x, sigma) - c_skip x) / c_out, recovering sigma from c_noise."""

    def __init__(self, gm, precond_factory):
        super().__init__()
        self.gm = gm
        self.precond = precond_factory(self)  # the Preconditioned that will call us

    def forward(self, x_in, c_noise, **cond):
        p = self.precond
        if p.prediction == "edm":
            sigma = torch.exp(4 * c_noise.double())
        else:
            from difflab.core import VE, ContinuousVP

            sched, c = p.schedule, c_noise.double()
            if isinstance(sched, VE):
                sigma = 2 * c.exp()  # c_noise = ln(sigma / 2)
            elif isinstance(sched, ContinuousVP):
                sigma = sched.sigma(c / 999)
            else:
                sigma = sched.sigma(c)
        c_skip, c_out, c_in, _ = p.coefficients(sigma)
        shape = (-1,) + (1,) * (x_in.ndim - 1)
        x = x_in.double() / c_in.reshape(shape)
        d = self.gm.denoiser(x, sigma)
        return ((d - c_skip.reshape(shape) * x) / c_out.reshape(shape)).to(x_in.dtype)


@pytest.fixture
def gm2():
    return GaussianMixture.random(dim=2, k=3, seed=0)
