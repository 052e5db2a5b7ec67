"""Blended Diffusion for Text-driven Editing of Natural Images.
Avrahami et al. 2022, https://arxiv.org/abs/2111.14818 (official code: omriav/blended-diffusion).

Local text-guided editing with an *unconditional* diffusion model and an image-text model:

Notation (paper -> difflab, VE coordinates x = x0 + sigma n):
    x, m, d (image, mask 1 = edit, text)   -> `image`, `edit_mask`, `prompt`
    x0_hat(x_t) (the model's estimate)     -> denoiser(x, sigma)
    D_CLIP(x0_hat ⊙ m, d) over augmentations (8, averaged) -> `clip_loss` (1 - cos on each augmentation)
    range loss (keep x0_hat in [-1, 1])    -> `range_loss` (mean over pixels), weight `lambda_range`
    guided step: mean + s Sigma grad        -> core.guidance.classifier_guidance(-loss, s)
    x_{t-1} = m ⊙ x_fg + (1 - m) ⊙ noised(x) (each step) -> the sampler callback
    skip the first 25 of 100 steps          -> `strength` = 0.75: start from the noised input
    final background paste, rank K outputs by CLIP -> done in `blended_diffusion`

Usage::

    outs, scores = blended_diffusion(denoiser, clip, image, mask, "a red circle", sigmas, n_candidates=4)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.core.guidance import classifier_guidance
from difflab.core.sampling import Step, expand_cond, noise_source, renoise, sample, slice_sigmas
from difflab.core.validation import check_mask
from difflab.methods.sdedit import strength_knob

__all__ = ["augment", "clip_loss", "range_loss", "blended_diffusion", "EDIT"]


def augment(
    x: Tensor, n: int, generator: torch.Generator | None = None, min_scale: float = 0.7, noise_std: float = 0.05
) -> Tensor:
    """n random crops (resized back) with a little pixel noise, per image: (n * B, C, H, W)."""
    B, _, H, W = x.shape
    outs = []
    for _ in range(n):
        s = float(min_scale + (1 - min_scale) * torch.rand(1, generator=generator))
        h, w = max(1, round(H * s)), max(1, round(W * s))
        top = int(torch.randint(0, H - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, W - w + 1, (1,), generator=generator))
        crop = F.interpolate(x[:, :, top : top + h, left : left + w], size=(H, W), mode="bilinear", align_corners=False)
        outs.append(crop + noise_std * torch.randn(crop.shape, generator=generator, dtype=crop.dtype).to(crop.device))
    return torch.cat(outs)  # (n * B, C, H, W)


def clip_loss(clip, images: Tensor, text_emb: Tensor, n_aug: int = 8, generator=None) -> Tensor:
    """Mean over augmentations of 1 - cos(E_I(aug(x)), E_T(d)), per image (B,)."""
    B = images.shape[0]
    emb = clip.encode_image(augment(images, n_aug, generator))  # (n * B, dim)
    return (1 - emb @ text_emb.reshape(-1)).reshape(n_aug, B).mean(0)


def range_loss(x: Tensor) -> Tensor:
    """Mean over pixels of the squared excess outside [-1, 1], per image (B,).

    A mean, as the official code's `range_loss` (`.mean([1, 2, 3])`), so that its weight
    `lambda_range` = 50 means what it does there whatever the image size. A sum made the range
    term C*H*W times stronger (3072x at 32x32): its guidance step overshot and blew x0_hat up to
    inf/NaN within a few steps of a 20-step grid at the default scale."""
    return ((x - x.clamp(-1, 1)) ** 2).flatten(1).mean(1)


@torch.no_grad()  # the guidance gradient is taken inside classifier_guidance (enable_grad)
def blended_diffusion(
    denoiser,
    clip,
    image: Tensor,
    edit_mask: Tensor,
    prompt: str,
    sigmas: Tensor,
    *,
    scale: float = 100.0,
    lambda_range: float = 50.0,
    n_aug: int = 8,
    strength: float = 0.75,
    n_candidates: int = 4,
    noise=None,
    method: str = "euler_ancestral",
    aug_generator: torch.Generator | None = None,
    cond: dict | None = None,
    decode=None,
) -> tuple[Tensor, Tensor]:
    """Blended Diffusion (Avrahami et al. 2022, Algorithm 1 + ranking). Returns (candidates
    sorted best first (K, C, H, W), their CLIP similarity scores (K,)) for one image (1, C, H, W).

    `cond` is the denoiser's own conditioning (batch 1 or K), for backbones that need one: the
    null class of a class-conditional model, the empty prompt's tokens of a text-to-image UNet.
    `decode`: for a latent-diffusion model, `image` and `edit_mask` live on the latent grid and
    the image-text and range losses score decode(the latent composite) in pixels, the gradient
    flowing back through the (differentiable) decoder; the candidates returned are latents."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"blended_diffusion edits one image of shape (1, C, H, W), got {tuple(image.shape)}")
    if not prompt or not prompt.strip():
        raise ValueError("blended_diffusion needs a non-empty prompt")
    m = check_mask(edit_mask, image, "edit_mask")
    with torch.no_grad():
        text = clip.encode_text([prompt])
    draw = noise_source(noise)
    K = n_candidates
    src = image.expand(K, *image.shape[1:])

    def score(x: Tensor, sigma, **cond) -> Tensor:  # -(D_CLIP + lambda range) on the masked x0 estimate
        x0 = denoiser(x, sigma, **cond)
        composite = m * x0 + (1 - m) * src
        if decode is None:
            return -(clip_loss(clip, composite, text, n_aug, aug_generator) + lambda_range * range_loss(x0))
        pixels = decode(composite)  # the background decodes in range: the range term sees the edit
        return -(clip_loss(clip, pixels, text, n_aug, aug_generator) + lambda_range * range_loss(pixels))

    guided = classifier_guidance(score, scale)(denoiser)
    tail = slice_sigmas(torch.as_tensor(sigmas, dtype=torch.float64), strength)
    x = renoise(src, 0.0, float(tail[0]), draw(-1, src))

    def blend(step: Step):
        background = renoise(src, 0.0, step.sigma_next, draw(100_000 + step.i, src))
        return m * step.x + (1 - m) * background

    out = sample(guided, x, tail, method=method, cond=expand_cond(cond, K), callback=blend, noise=noise)
    out = m * out + (1 - m) * src  # final background paste: unmasked pixels are the input's exactly
    with torch.no_grad():
        sims = clip.encode_image(out if decode is None else decode(out)) @ text.reshape(-1)
    order = sims.argsort(descending=True)
    return out[order], sims[order]


def _edit(
    ctx: EditContext, *, strength: float, guidance_scale: float, lambda_range: float, n_aug: int, candidates: int
) -> Tensor:
    decode = ctx.clip_decoder("blended")  # a latent model: losses on decoded composites
    outs, sims = blended_diffusion(
        ctx.denoiser,
        ctx.clip,
        ctx.image,
        ctx.mask,
        ctx.prompt,
        ctx.tail(strength),  # starts at the paper's t0 (0.75: 25 of 100 steps skipped)
        scale=guidance_scale,
        lambda_range=lambda_range,
        n_aug=n_aug,
        strength=1.0,
        n_candidates=candidates,
        noise=ctx.generator,
        method=ctx.sampler,
        aug_generator=torch.Generator().manual_seed(ctx.seed + 1),
        cond=ctx.prompts.null_cond("blended guides the unconditional model"),
        decode=decode,
    )
    ctx.info["scores"] = sims.tolist()
    ctx.output_tiles = [
        (f"{'output' if i == 0 else f'#{i + 1}'} (score {s:.2f})", o[None])
        for i, (o, s) in enumerate(zip(outs, sims.tolist()))
    ]
    return outs[:1]


EDIT = EditMethod(
    "blended",
    "Blended Diffusion (Avrahami et al. 2022, arXiv 2111.14818)",
    "Edit the white region toward --prompt with image-text (CLIP) guidance; the background is blended in every "
    "step and pasted back exactly.",
    mask="required",
    mask_keeps="black",
    prompt="text",
    source_prompt="none",
    sampler="euler_ancestral",
    knobs=(
        strength_knob(0.75, " (the paper skips 25 of 100 steps: 0.75)"),
        Knob("guidance_scale", 100.0, "scale of the image-text guidance gradient", metavar="S"),
        Knob("lambda_range", 50.0, "weight of the range loss keeping x0_hat in [-1, 1]", metavar="L", lo=0.0),
        Knob("n_aug", 8, "augmentations averaged in the image-text loss", type=int, metavar="K", lo=1),
        Knob("candidates", 4, "outputs generated and ranked by the image-text score", type=int, metavar="K", lo=1),
    ),
    run=_edit,
)
