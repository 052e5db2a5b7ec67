"""Guidance: transforms Denoiser -> Denoiser, built by small factories and composed.

    guided = compose(cfg(4.0, uncond={"class_labels": null}), dynamic_threshold())(denoiser)

Every factory returns a `Transform` (a callable taking a denoiser and returning one); the
returned denoisers keep the signature D(x, sigma, **cond).

Convention for classifier-free guidance: `scale` is the library's s in
D_u + s (D_c - D_u); the paper's w (Ho & Salimans 2022, (1+w) eps_c - w eps_u) is s = 1 + w.
s = 1 is the plain conditional model, s = 0 the unconditional one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from difflab.core.denoiser import append_dims

__all__ = ["Transform", "cfg", "classifier_guidance", "clamp", "dynamic_threshold", "interval", "compose"]

Transform = Callable[[Callable], Callable]


def _sigma_vec(sigma, x: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _pad_to(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Right-pad t with zeros (False for masks) up to `shape` in every non-batch dim."""
    pad = []
    for have, want in reversed(list(zip(t.shape[1:], shape[1:]))):
        pad += [0, want - have]
    return torch.nn.functional.pad(t, pad) if any(pad) else t


def _cat_cond(cond: dict, uncond: dict, batch: int) -> dict:
    """Concatenate cond and uncond values along the batch: the keys must agree.

    Token sequences of different lengths (a prompt and the empty prompt) are right-padded with
    zeros; their key masks are padded with False, so the padding is never attended to.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cfg: cond keys {sorted(cond)} and uncond keys {sorted(uncond)} differ")
    out = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, Tensor):
            u = torch.as_tensor(u, device=c.device, dtype=c.dtype)
            if u.ndim != c.ndim:
                raise ValueError(f"cfg: uncond[{key!r}] has {u.ndim} dims, cond has {c.ndim}")
            if u.shape[0] != c.shape[0]:
                if u.shape[0] != 1:
                    raise ValueError(f"cfg: uncond[{key!r}] has batch {u.shape[0]}, expected 1 or {c.shape[0]}")
                u = u.expand(c.shape[0], *u.shape[1:])
            if u.shape[1:] != c.shape[1:]:
                shape = (c.shape[0], *(max(a, b) for a, b in zip(c.shape[1:], u.shape[1:])))
                c, u = _pad_to(c, shape), _pad_to(u, shape)
            out[key] = torch.cat([c, u])
        elif c is None and u is None:
            out[key] = None
        else:
            raise TypeError(f"cfg: cond[{key!r}] must be a tensor to batch, got {type(c).__name__}")
    return out


def cfg(scale: float, uncond: dict, rescale: float = 0.0) -> Transform:
    """Classifier-free guidance (Ho & Salimans 2022): D_u + scale (D_c - D_u), one batched call.

    `uncond` holds the null condition (same keys as the cond: e.g. the null class index or the
    empty prompt's tokens), with batch 1 or B. `rescale` in [0, 1] is Lin et al. 2024's guidance
    rescale: the guided x0 is matched to the per-sample std of the conditional x0, then mixed.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"cfg rescale must be in [0, 1], got {rescale}")

    def transform(denoiser):
        def guided(x: Tensor, sigma, **cond) -> Tensor:
            if scale == 1.0 and rescale == 0.0:
                return denoiser(x, sigma, **cond)
            B = x.shape[0]
            both = denoiser(torch.cat([x, x]), torch.cat([_sigma_vec(sigma, x)] * 2), **_cat_cond(cond, uncond, B))
            d_c, d_u = both[:B], both[B:]
            d = d_u + scale * (d_c - d_u)
            if rescale > 0:
                dims = tuple(range(1, x.ndim))
                std_c = d_c.std(dim=dims, keepdim=True)
                std_g = d.std(dim=dims, keepdim=True).clamp(min=1e-12)
                d = rescale * d * (std_c / std_g) + (1 - rescale) * d
            return d

        return guided

    return transform


def classifier_guidance(log_prob_fn: Callable[..., Tensor], scale: float) -> Transform:
    """Classifier guidance (Dhariwal & Nichol 2021): D + scale sigma^2 grad_x log p(y | x, sigma).

    `log_prob_fn(x, sigma, **cond)` returns (B,) log-probabilities of the wanted labels. In eps
    form this is eps - scale sigma grad log p (ADM's DDIM guidance, eq. 14, written in VE
    coordinates); in the ancestral form it shifts the mean by scale * Sigma * grad log p.
    """

    def transform(denoiser):
        def guided(x: Tensor, sigma, **cond) -> Tensor:
            d = denoiser(x, sigma, **cond)
            if scale == 0:
                return d
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                lp = log_prob_fn(xg, sigma, **cond)
                if lp.shape != (x.shape[0],):
                    raise ValueError(f"log_prob_fn must return shape ({x.shape[0]},), got {tuple(lp.shape)}")
                (grad,) = torch.autograd.grad(lp.sum(), xg)
            s = append_dims(_sigma_vec(sigma, x), x.ndim)
            return d + scale * s**2 * grad

        return guided

    return transform


def clamp(lo: float = -1.0, hi: float = 1.0) -> Transform:
    """Static thresholding: clip x0_hat to [lo, hi]."""

    def transform(denoiser):
        return lambda x, sigma, **cond: denoiser(x, sigma, **cond).clamp(lo, hi)

    return transform


def dynamic_threshold(percentile: float = 0.995, max_value: float = 1.0) -> Transform:
    """Imagen's dynamic thresholding (Saharia et al. 2022): s = max(quantile(|x0|, p), max_value),
    x0 <- clip(x0, -s, s) / s * max_value."""
    if not 0 < percentile <= 1:
        raise ValueError(f"percentile must be in (0, 1], got {percentile}")

    def transform(denoiser):
        def guided(x: Tensor, sigma, **cond) -> Tensor:
            d = denoiser(x, sigma, **cond)
            s = torch.quantile(d.flatten(1).abs().float(), percentile, dim=1).to(d.dtype)
            s = append_dims(s.clamp(min=max_value), d.ndim)
            return d.clamp(-s, s) / s * max_value

        return guided

    return transform


def interval(transform: Transform, sigma_lo: float = 0.0, sigma_hi: float = float("inf")) -> Transform:
    """Apply `transform` only where sigma_lo <= sigma <= sigma_hi (Kynkaanniemi et al. 2024)."""
    if sigma_lo > sigma_hi:
        raise ValueError(f"interval needs sigma_lo <= sigma_hi, got {sigma_lo} > {sigma_hi}")

    def wrap(denoiser):
        inner = transform(denoiser)

        def guided(x: Tensor, sigma, **cond) -> Tensor:
            s = _sigma_vec(sigma, x)
            inside = (s >= sigma_lo) & (s <= sigma_hi)
            if bool(inside.all()):
                return inner(x, sigma, **cond)
            if not bool(inside.any()):
                return denoiser(x, sigma, **cond)
            return torch.where(append_dims(inside, x.ndim), inner(x, sigma, **cond), denoiser(x, sigma, **cond))

        return guided

    return wrap


def compose(*transforms: Transform) -> Transform:
    """compose(a, b)(D) = b(a(D)): the first transform is applied innermost."""

    def transform(denoiser):
        for t in transforms:
            denoiser = t(denoiser)
        return denoiser

    return transform
