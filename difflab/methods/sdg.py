"""More Control for Free! Image Synthesis with Semantic Diffusion Guidance (SDG).
Liu et al. 2023, https://arxiv.org/abs/2112.05744 (official code: xh-liu/SDG_code).

Guidance of an *unconditional* diffusion model by the gradient of a matching score F(x_t):

Notation (paper -> difflab, VE coordinates x = x0 + sigma n):
    E'_I(x_t, t)               -> `clip.encode_image(clip_input(x, sigma), c_noise(sigma))`, the
                                  image tower fine-tuned on noisy images (`difflab.train.clip.finetune_noise_aware`)
    E_T(l)                     -> `clip.encode_text([prompt])`
    language: F = cos(E'_I(x_t), E_T(l))                            -> `language_score`
    image content: F = cos(E'_I(x_t), E'_I(x'_t)), x'_t = ref + sigma n -> `content_score`
    image style: F = -sum_l ||G(f_l(x_t)) - G(f_l(x'_t))||_F^2       -> `style_score`
    mu + s Sigma grad F        -> core.guidance.classifier_guidance(F, s): D + s sigma^2 grad F

The image tower sees x / sqrt(1 + sigma^2) (unit-variance scaling, whatever the denoiser's own
preconditioning) and c_noise = ln(sigma) / 4.

Usage::

    clip = train_clip(shapes, steps=2000)                            # difflab.train.clip
    clip = finetune_noise_aware(clip, shapes, steps=1000)
    guided = sdg(denoiser, language_score(clip, "a red circle"), scale=200.0)
    x0 = sample(guided, x, sigmas)
"""

from __future__ import annotations


import torch
from torch import Tensor

from difflab.core.guidance import classifier_guidance
from difflab.nn.clip import SmallCLIP

__all__ = ["clip_input", "clip_c_noise", "language_score", "content_score", "style_score", "sdg"]


def clip_input(x: Tensor, sigma) -> Tensor:
    """x / sqrt(1 + sigma^2): the noisy image at unit scale."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1 + s**2).sqrt()


def clip_c_noise(sigma, like: Tensor) -> Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device).reshape(-1)
    return (
        s.clamp(min=1e-5).log() / 4 if s.numel() == like.shape[0] else s.clamp(min=1e-5).log().expand(like.shape[0]) / 4
    )


def language_score(clip, prompt: str):
    """F(x, sigma) = cos(E'_I(x_t), E_T(prompt)), (B,)."""
    with torch.no_grad():
        text = clip.encode_text([prompt])  # (1, dim)

    def score(x: Tensor, sigma, **cond) -> Tensor:
        return (clip.encode_image(clip_input(x, sigma), clip_c_noise(sigma, x)) * text).sum(-1)

    return score


def content_score(clip, reference: Tensor, generator: torch.Generator | None = None):
    """F(x, sigma) = cos(E'_I(x_t), E'_I(ref + sigma n)) with the reference noised to the same level."""

    def score(x: Tensor, sigma, **cond) -> Tensor:
        ref = _noised(reference, x, sigma, generator)
        with torch.no_grad():
            target = clip.encode_image(clip_input(ref, sigma), clip_c_noise(sigma, x))
        return (clip.encode_image(clip_input(x, sigma), clip_c_noise(sigma, x)) * target).sum(-1)

    return score


def _gram(f: Tensor) -> Tensor:
    b, c, h, w = f.shape
    flat = f.reshape(b, c, h * w)  # (B, C, H, W) -> (B, C, HW)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def style_score(clip: SmallCLIP, reference: Tensor, generator: torch.Generator | None = None):
    """F(x, sigma) = -sum_l ||G(f_l(x_t)) - G(f_l(ref_t))||_F^2 over the image tower's blocks."""

    def score(x: Tensor, sigma, **cond) -> Tensor:
        ref = _noised(reference, x, sigma, generator)
        with torch.no_grad():
            target = [_gram(f) for f in clip.features(clip_input(ref, sigma), clip_c_noise(sigma, x))]
        feats = clip.features(clip_input(x, sigma), clip_c_noise(sigma, x))
        return -sum(((_gram(f) - t) ** 2).flatten(1).sum(1) for f, t in zip(feats, target))

    return score


def _noised(reference: Tensor, like: Tensor, sigma, generator) -> Tensor:
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))
    ref = reference.to(like.dtype).expand_as(like)
    n = torch.randn(ref.shape, generator=generator, dtype=ref.dtype).to(ref.device)
    return ref + s * n


def sdg(denoiser, score_fn, scale: float):
    """The SDG-guided denoiser: D + scale sigma^2 grad_x F(x, sigma)."""
    return classifier_guidance(score_fn, scale)(denoiser)
