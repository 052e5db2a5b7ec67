"""2-D toy distributions with exact (or quadrature-exact) log-densities: the likelihood oracle.

Each toy is a generative process simple enough that its density is known, and scaled so each
coordinate has a standard deviation near 1. Every density is also known after adding Gaussian
noise of any level ``sigma`` (``x = x0 + sigma * n``, difflab's convention), so
``toy_log_density(name, x, sigma)`` and ``toy_score`` are the exact noisy marginal and score
that a diffusion model is trained to learn.

The processes (all noise isotropic Gaussian, ``s^2 = s0^2 + sigma^2`` after diffusion noise):

- ``8gaussians``: k ~ U{0..7}, x = R (cos 2 pi k/8, sin 2 pi k/8) + s0 n, s0 = 0.1,
  R = sqrt(2 (1 - s0^2)) (unit variance per coordinate). Exact mixture density.
- ``checkerboard``: uniform on the 8 dark squares of a 4 x 4 board of side sqrt(3)/2 covering
  [-sqrt 3, sqrt 3]^2 (cell (i, j) is dark when i + j is even); density 1/6 there, entropy log 6.
  With sigma > 0 the density is a sum of products of normal-CDF differences (exact).
- ``rings``: k ~ U{1..4}, theta ~ U[0, 2 pi), x = k c (cos theta, sin theta) + s0 n, s0 = 0.08,
  c = sqrt((1 - s0^2) / 3.75). The integral over theta is closed-form:
  p(x) = 1/4 sum_k exp(-(|x| - r_k)^2 / 2s^2) I0e(|x| r_k / s^2) / (2 pi s^2).
- ``moons``: two half circles (sklearn's `make_moons` layout): m ~ U{0,1}, t ~ U[0, pi],
  curve_0 = (cos t, sin t), curve_1 = (1 - cos t, 1/2 - sin t), centred by (1/2, 1/4) and scaled
  by k so the mean per-coordinate variance is 1, plus s0 n with s0 = 0.1.
- ``swiss_roll``: t = 1.5 pi (1 + 2u), u ~ U[0, 1], curve k (t cos t, t sin t) - mean (the 2-D
  swiss roll of sklearn's `make_swiss_roll`, coordinates x and z), k such that the mean
  per-coordinate variance is 1, plus s0 n with s0 = 0.1.

For the two curve toys p(x) = E_t N(x; curve(t), s^2 I) is a 1-D integral, computed by
Gauss-Legendre quadrature on panels narrower than the Gaussian's width along the curve
(s / max speed), in log space (log-sum-exp), so it is accurate to ~1e-8 relative everywhere.

Usage::

    x = sample_toy("swiss_roll", 10_000, torch.Generator().manual_seed(0))
    logp = toy_log_density("swiss_roll", x)                # (10000,) float64
    H, se = toy_entropy("swiss_roll")                     # nats, Monte Carlo standard error
    score = toy_score("rings", x, sigma=0.5)             # grad log p_sigma, for oracle denoisers
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TOY_NAMES",
    "sample_toy",
    "toy_log_density",
    "toy_score",
    "toy_entropy",
    "toy_extent",
    "eight_gaussians_params",
]

TOY_NAMES = ("swiss_roll", "8gaussians", "checkerboard", "rings", "moons")
F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# Constants of the processes
# ---------------------------------------------------------------------------------------------

S0 = {"8gaussians": 0.1, "rings": 0.08, "moons": 0.1, "swiss_roll": 0.1, "checkerboard": 0.0}

_G8_R = math.sqrt(2 * (1 - S0["8gaussians"] ** 2))
_G8_MEANS = [(_G8_R * math.cos(2 * math.pi * k / 8), _G8_R * math.sin(2 * math.pi * k / 8)) for k in range(8)]

_CB_CELL = math.sqrt(3) / 2  # side of a square; board half-width sqrt(3)
_CB_DARK = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]

_RINGS_C = math.sqrt((1 - S0["rings"] ** 2) / 3.75)
_RINGS_R = [k * _RINGS_C for k in (1, 2, 3, 4)]

# moons: raw curves have per-coordinate variances 3/4 (x) and (1/2 - 4/pi^2) + (4/pi - 1/2)^2/4 (y)
_MOONS_VAR = 0.5 * (0.75 + (0.5 - 4 / math.pi**2) + (4 / math.pi - 0.5) ** 2 / 4)
_MOONS_K = math.sqrt((1 - S0["moons"] ** 2) / _MOONS_VAR)

_SR_T0, _SR_T1 = 1.5 * math.pi, 4.5 * math.pi


def _swiss_roll_constants() -> tuple[float, tuple[float, float]]:
    """Scale k and mean of the raw swiss-roll curve (t cos t, t sin t), t ~ U[1.5 pi, 4.5 pi]."""
    nodes, weights = np.polynomial.legendre.leggauss(200)
    t = _SR_T0 + (nodes + 1) / 2 * (_SR_T1 - _SR_T0)
    w = weights / 2  # uniform density x length
    xy = np.stack([t * np.cos(t), t * np.sin(t)])  # (2, Q)
    mean = (xy * w).sum(1)
    var = (((xy - mean[:, None]) ** 2) * w).sum(1).mean()
    k = math.sqrt((1 - S0["swiss_roll"] ** 2) / var)
    return k, (float(mean[0]), float(mean[1]))


_SR_K, _SR_MEAN = _swiss_roll_constants()


def eight_gaussians_params() -> tuple[Tensor, Tensor, float]:
    """Mixture weights (8,), means (8, 2) and the component std of ``8gaussians`` (float64)."""
    return torch.full((8,), 1 / 8, dtype=F64), torch.tensor(_G8_MEANS, dtype=F64), S0["8gaussians"]


def _check_name(name: str) -> None:
    if name not in TOY_NAMES:
        raise ValueError(f"unknown toy {name!r}; known: {TOY_NAMES}")


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _curve(name: str, t: Tensor, m: Tensor | None = None) -> Tensor:
    """Noise-free curve points (..., 2) at parameter t (and moon index m) for the curve toys."""
    if name == "swiss_roll":
        return torch.stack(
            [_SR_K * t * torch.cos(t) - _SR_K * _SR_MEAN[0], _SR_K * t * torch.sin(t) - _SR_K * _SR_MEAN[1]], -1
        )
    if name == "moons":
        x = torch.where(m == 0, torch.cos(t), 1 - torch.cos(t)) - 0.5
        y = torch.where(m == 0, torch.sin(t), 0.5 - torch.sin(t)) - 0.25
        return _MOONS_K * torch.stack([x, y], -1)
    raise AssertionError(name)


def sample_toy(
    name: str, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """n samples (n, 2) of a toy distribution, drawn from `generator` (deterministic given it)."""
    _check_name(name)
    g = generator
    noise = torch.randn(n, 2, generator=g, dtype=F64)
    if name == "8gaussians":
        k = torch.randint(0, 8, (n,), generator=g)
        x0 = torch.tensor(_G8_MEANS, dtype=F64)[k]
    elif name == "checkerboard":
        i = torch.randint(0, 4, (n,), generator=g)
        j = 2 * torch.randint(0, 2, (n,), generator=g) + i % 2  # i + j even
        u = torch.rand(n, 2, generator=g, dtype=F64)
        x0 = (torch.stack([i, j], -1).to(F64) + u - 2) * _CB_CELL
    elif name == "rings":
        k = torch.randint(0, 4, (n,), generator=g)
        theta = 2 * math.pi * torch.rand(n, generator=g, dtype=F64)
        r = torch.tensor(_RINGS_R, dtype=F64)[k]
        x0 = r[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], -1)
    elif name == "moons":
        m = torch.randint(0, 2, (n,), generator=g)
        t = math.pi * torch.rand(n, generator=g, dtype=F64)
        x0 = _curve("moons", t, m)
    else:  # swiss_roll
        t = _SR_T0 + (_SR_T1 - _SR_T0) * torch.rand(n, generator=g, dtype=F64)
        x0 = _curve("swiss_roll", t)
    return (x0 + S0[name] * noise).to(dtype)


# ---------------------------------------------------------------------------------------------
# Densities
# ---------------------------------------------------------------------------------------------


def _log_ndtr_diff(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable in both tails."""
    flip = lo > 0  # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return lb + torch.log1p(-torch.exp(la - lb))


def _log_gauss2(d2: Tensor, s2: float) -> Tensor:
    """log N(d; 0, s2 I) in 2-D from the squared distance d2."""
    return -d2 / (2 * s2) - math.log(2 * math.pi * s2)


def _speed(name: str, t: np.ndarray) -> np.ndarray:
    """|d curve / dt| of the curve toys."""
    if name == "swiss_roll":
        return _SR_K * np.sqrt(1 + t * t)
    return np.full_like(t, _MOONS_K)


def _curve_nodes(name: str, s: float, width: float = 1.5, order: int = 12) -> tuple[Tensor, Tensor]:
    """Quadrature nodes on the curve (Q, 2) and log weights (Q,) that sum to 1 in probability.

    `order`-point Gauss-Legendre on panels of equal arc length <= width * s (the Gaussian's width
    along the curve): log-density error < 1e-11 wherever log p > -60, ~1e-6 further out."""
    if name == "swiss_roll":
        pieces = [(_SR_T0, _SR_T1, None, 1.0)]
    else:
        pieces = [(0.0, math.pi, 0, 0.5), (0.0, math.pi, 1, 0.5)]
    gl_x, gl_w = np.polynomial.legendre.leggauss(order)
    nodes, logw = [], []
    for t0, t1, m, mass in pieces:
        fine = np.linspace(t0, t1, 4097)
        v = _speed(name, fine)
        arc = np.concatenate([[0.0], np.cumsum((v[1:] + v[:-1]) / 2 * np.diff(fine))])
        panels = max(8, math.ceil(arc[-1] / (width * s)))
        edges = np.interp(np.linspace(0, arc[-1], panels + 1), arc, fine)  # equal arc length
        edges[0], edges[-1] = t0, t1
        half = np.diff(edges)[:, None] / 2
        t = (edges[:-1, None] + half * (gl_x[None] + 1)).reshape(-1)
        w = (half * gl_w[None]).reshape(-1) / (t1 - t0) * mass  # uniform t, mixture mass
        tt = torch.from_numpy(t)
        mm = None if m is None else torch.full_like(tt, m, dtype=torch.long)
        nodes.append(_curve(name, tt, mm))
        logw.append(torch.from_numpy(np.log(w)))
    return torch.cat(nodes), torch.cat(logw)


def _curve_log_density(name: str, x: Tensor, s: float, chunk_elems: int = 1 << 21, **quad) -> Tensor:
    """log E_t N(x; curve(t), s^2 I) by panel Gauss-Legendre quadrature, chunked over points."""
    nodes, logw = _curve_nodes(name, s, **quad)
    nodes, logw = nodes.to(x.device), logw.to(x.device)
    # log w_q - |x - c_q|^2 / 2s^2 = (log w_q - |c_q|^2 / 2s^2) + x.c_q / s^2 - |x|^2 / 2s^2
    node_term = logw - nodes.pow(2).sum(-1) / (2 * s * s)  # (Q,)
    rows = max(1, chunk_elems // len(nodes))
    out = []
    for xs in x.split(rows):
        z = torch.addmm(node_term[None], xs, nodes.T, alpha=1 / (s * s))  # (M, Q)
        out.append(torch.logsumexp(z, dim=1) - xs.pow(2).sum(-1) / (2 * s * s) - math.log(2 * math.pi * s * s))
    return torch.cat(out) if out else x.new_zeros(0)


def toy_log_density(name: str, xy: Tensor, sigma: float = 0.0) -> Tensor:
    """Exact log-density (float64, shape xy.shape[:-1]) of the toy after noise of level sigma.

    sigma = 0 gives the data density itself; supports autograd (see `toy_score`)."""
    _check_name(name)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    xy = torch.as_tensor(xy)
    if xy.shape[-1] != 2:
        raise ValueError(f"expected points of shape (..., 2), got {tuple(xy.shape)}")
    shape = xy.shape[:-1]
    x = xy.reshape(-1, 2).to(F64)
    s2 = S0[name] ** 2 + float(sigma) ** 2
    if name == "8gaussians":
        means = torch.tensor(_G8_MEANS, dtype=F64, device=x.device)
        d2 = (x[:, None, :] - means[None]).pow(2).sum(-1)  # (M, 8)
        out = torch.logsumexp(_log_gauss2(d2, s2), dim=1) - math.log(8)
    elif name == "checkerboard":
        out = _checkerboard_log_density(x, math.sqrt(s2))
    elif name == "rings":
        rho = x.norm(dim=1, keepdim=True)  # (M, 1)
        r = torch.tensor(_RINGS_R, dtype=F64, device=x.device)[None]  # (1, 4)
        terms = -((rho - r) ** 2) / (2 * s2) + torch.log(torch.special.i0e(rho * r / s2)) - math.log(2 * math.pi * s2)
        out = torch.logsumexp(terms, dim=1) - math.log(4)
    else:
        out = _curve_log_density(name, x, math.sqrt(s2))
    return out.reshape(shape)


def _checkerboard_log_density(x: Tensor, s: float) -> Tensor:
    cells = torch.tensor(_CB_DARK, dtype=F64, device=x.device)  # (8, 2)
    lo = (cells - 2) * _CB_CELL  # (8, 2)
    hi = lo + _CB_CELL
    log_norm = -math.log(8 * _CB_CELL**2)
    if s == 0:
        xe = x[:, None, :]  # (M, 1, 2)
        inside = ((xe >= lo) & (xe < hi)).all(-1).any(-1)  # (M,)
        return torch.where(inside, torch.full_like(x[:, 0], log_norm), torch.full_like(x[:, 0], -math.inf))
    zlo = (lo[None] - x[:, None, :]) / s  # (M, 8, 2)
    zhi = (hi[None] - x[:, None, :]) / s
    terms = _log_ndtr_diff(zlo, zhi).sum(-1)  # (M, 8)
    return torch.logsumexp(terms, dim=1) + log_norm


def toy_score(name: str, xy: Tensor, sigma: float = 0.0) -> Tensor:
    """Score grad_x log p_sigma(x) (float64, same shape as xy), by autograd of the exact density.

    With Tweedie, the exact denoiser is D(x, sigma) = x + sigma^2 * score (sigma > 0)."""
    x = torch.as_tensor(xy).detach().to(F64).requires_grad_(True)
    with torch.enable_grad():
        logp = toy_log_density(name, x, sigma)
        (grad,) = torch.autograd.grad(logp.sum(), x)
    return grad


def toy_extent(name: str, sigma: float = 0.0) -> float:
    """Half-width L such that [-L, L]^2 holds all but ~1e-8 of the (noisy) toy's mass."""
    _check_name(name)
    s = math.sqrt(S0[name] ** 2 + sigma**2)
    core = {
        "8gaussians": _G8_R,
        "checkerboard": math.sqrt(3),
        "rings": _RINGS_R[-1],
        "moons": _MOONS_K * 1.5,
        "swiss_roll": _SR_K * (_SR_T1 + max(map(abs, _SR_MEAN))),
    }
    return core[name] + 6.5 * s


def toy_entropy(name: str, n: int = 100_000, seed: int = 0, sigma: float = 0.0) -> tuple[float, float]:
    """Differential entropy H = -E log p(x) in nats by Monte Carlo with the exact density.

    Returns (estimate, standard error); checkerboard at sigma = 0 is exactly log 6 (se 0)."""
    g = torch.Generator().manual_seed(seed)
    x = sample_toy(name, n, g, dtype=F64)
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=g, dtype=F64)
    logp = toy_log_density(name, x, sigma)
    return float(-logp.mean()), float(logp.std() / math.sqrt(n))
