"""More Control for Free! Image Synthesis with Semantic Diffusion Guidance (SDG).
Liu et al. 2023, https://arxiv.org/abs/2112.05744 (official code: xh-liu/SDG_code).

Guidance of an *unconditional* diffusion model by the gradient of a matching score F(x_t):

Notation (paper -> difflab, VE coordinates x = x0 + sigma n):
    E'_I(x_t, t)               -> `clip.encode_image(clip_input(x, sigma), c_noise(sigma))`, the
                                  image tower fine-tuned on noisy images (`finetune_noise_aware`)
    E_T(l)                     -> `clip.encode_text([prompt])`
    language: F = cos(E'_I(x_t), E_T(l))                            -> `language_score`
    image content: F = cos(E'_I(x_t), E'_I(x'_t)), x'_t = ref + sigma n -> `content_score`
    image style: F = -sum_l ||G(f_l(x_t)) - G(f_l(x'_t))||_F^2       -> `style_score`
    mu + s Sigma grad F        -> core.guidance.classifier_guidance(F, s): D + s sigma^2 grad F

The image tower sees x / sqrt(1 + sigma^2) (unit-variance scaling, whatever the denoiser's own
preconditioning) and c_noise = ln(sigma) / 4.

Usage::

    clip = train_clip(shapes, steps=2000); clip = finetune_noise_aware(clip, shapes, steps=1000)
    guided = sdg(denoiser, language_score(clip, "a red circle"), scale=200.0)
    x0 = sample(guided, x, sigmas)
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.core.guidance import classifier_guidance
from difflab.core.sampling import progress_range
from difflab.core.validation import MAX_LR, check_budget, check_number, check_training_state
from difflab.data import ImageData, batch_indices
from difflab.data._hash import seed_from
from difflab.nn.clip import SmallCLIP, SmallCLIPConfig
from difflab.nn.text import WordEncoder

__all__ = ["clip_input", "clip_c_noise", "train_clip", "finetune_noise_aware", "language_score", "content_score",
           "style_score", "sdg", "caption_vocabulary"]


def clip_input(x: Tensor, sigma) -> Tensor:
    """x / sqrt(1 + sigma^2): the noisy image at unit scale."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1 + s**2).sqrt()


def clip_c_noise(sigma, like: Tensor) -> Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device).reshape(-1)
    return s.clamp(min=1e-5).log() / 4 if s.numel() == like.shape[0] else s.clamp(min=1e-5).log().expand(like.shape[0]) / 4


def caption_vocabulary(captions) -> list[str]:
    return sorted({w for c in captions for w in WordEncoder.words(c)})


def train_clip(data: ImageData, *, steps: int = 2000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
               config: SmallCLIPConfig | None = None, progress: bool = True) -> SmallCLIP:
    """Contrastive image-caption training on clean images (CLIP's objective)."""
    if data.captions is None:
        raise ValueError(f"dataset {data.name!r} has no captions")
    check_budget(steps, None)
    check_number("lr", lr, lo=0, lo_open=True, hi=MAX_LR)
    config = config or SmallCLIPConfig(vocab=caption_vocabulary(data.captions), in_channels=data.images.shape[1],
                                       image_size=data.images.shape[-1])
    torch.manual_seed(seed)
    model = SmallCLIP(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    for step in progress_range(steps, progress, "train-clip"):
        idx = batch_indices(len(data.images), batch_size, seed, step)
        loss = model.contrastive_loss(data.images[idx], [data.captions[i] for i in idx.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        check_training_state(step + 1, loss.item(), model.parameters(), f"lower lr (now {lr})")
    return model.eval()


def finetune_noise_aware(clip: SmallCLIP, data: ImageData, *, steps: int = 1000, batch_size: int = 128,
                         lr: float = 1e-3, sigma_min: float = 0.01, sigma_max: float = 80.0, seed: int = 0,
                         progress: bool = True) -> SmallCLIP:
    """SDG's E'_I: fine-tune the image tower so E'_I(x_t, sigma) matches the frozen E_I(x_0)."""
    teacher = copy.deepcopy(clip).eval().requires_grad_(False)
    student = copy.deepcopy(clip).train()
    params = [p for n, p in student.named_parameters() if not n.startswith(("text", "text_proj"))]
    opt = torch.optim.AdamW(params, lr=lr)
    for step in progress_range(steps, progress, "finetune-noise-aware"):
        g = torch.Generator().manual_seed(seed_from(seed, step, 11))
        x0 = data.images[batch_indices(len(data.images), batch_size, seed, step)]
        u = torch.rand(len(x0), generator=g, dtype=torch.float64)
        sigma = (math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min))).exp()
        x = x0 + sigma.float().reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            target = teacher.encode_image(x0)
        pred = student.encode_image(clip_input(x, sigma), clip_c_noise(sigma, x))
        loss = (1 - (pred * target).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return student.eval().requires_grad_(False)


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
