"""ILVR: Conditioning Method for Denoising Diffusion Probabilistic Models.
Choi et al. 2021, https://arxiv.org/abs/2108.02938 (official code: jychoi118/ilvr_adm).

Notation (paper -> difflab):
    y                         -> `reference` (N|1, C, H, W)
    phi_N                     -> `low_pass(x, N)`: downsample by N, upsample back
    y_{t-1} ~ q(y_{t-1}|y)    -> renoise(reference, 0, sigma_next) (VE coordinates)
    x_{t-1} = phi_N(y_{t-1}) + x'_{t-1} - phi_N(x'_{t-1})   (the refinement, each step)
    conditioning range [T, t_stop] -> steps whose sigma_next >= `sigma_stop`

Filters: "area" (box average down, nearest up) is an orthogonal projection, so with the
refinement applied down to sigma 0 the output's low-pass equals the reference's exactly;
"bicubic" (antialiased) is the paper's resizer, which is not a projection (approximate).

Usage::

    cb = ilvr_callback(reference, factor=4, sigma_stop=0.0)
    out = sample(denoiser, torch.randn_like(reference) * sigmas[0], sigmas,
                 method="euler_ancestral", callback=cb)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.core.sampling import Step, noise_source, renoise, sample

__all__ = ["low_pass", "ilvr_callback", "EDIT"]


def low_pass(x: Tensor, factor: int, filter: str = "area") -> Tensor:
    """phi_N: downsample by `factor` and upsample back to x's size."""
    if factor < 1 or x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"low-pass factor {factor} must divide the image size {tuple(x.shape[-2:])}")
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    if filter == "area":
        small = F.avg_pool2d(x, factor)
        return F.interpolate(small, size=(h, w), mode="nearest")
    if filter == "bicubic":
        small = F.interpolate(x, size=(h // factor, w // factor), mode="bicubic", antialias=True, align_corners=False)
        return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
    raise ValueError(f"unknown filter {filter!r}; known: 'area', 'bicubic'")


def ilvr_callback(reference: Tensor, factor: int, sigma_stop: float = 0.0, *, filter: str = "area", noise=None):
    """A sampler callback applying ILVR's refinement while sigma_next >= sigma_stop."""
    if not torch.isfinite(reference).all():
        raise ValueError("reference image contains NaN/inf values")
    low_pass(reference, factor, filter)  # validate factor/filter now, not mid-sampling
    draw = noise_source(noise)

    def refine(step: Step):
        if step.sigma_next < sigma_stop:
            return None
        if step.x.shape[1:] != reference.shape[1:]:
            raise ValueError(
                f"reference of shape {tuple(reference.shape)} does not fit samples of shape {tuple(step.x.shape)}"
            )
        y = renoise(reference, 0.0, step.sigma_next, draw(step.i, step.x) if step.sigma_next > 0 else None)
        return low_pass(y, factor, filter) + step.x - low_pass(step.x, factor, filter)

    return refine


def _edit(ctx: EditContext, *, factor: int, stop: float, filter: str) -> Tensor:
    sigma_stop = ctx.sigma_at(stop)  # the paper's t_stop as a diffusion time
    cb = ilvr_callback(ctx.image, factor, sigma_stop, filter=filter, noise=torch.Generator().manual_seed(ctx.seed + 1))
    x = torch.randn(ctx.image.shape, generator=ctx.generator).to(ctx.image.device) * float(ctx.sigmas[0])
    return sample(
        ctx.denoiser,
        x,
        ctx.sigmas,
        method=ctx.sampler,
        cond=ctx.cond(ctx.prompt),
        callback=cb,
        noise=ctx.generator,
        progress=ctx.progress,
    )


EDIT = EditMethod(
    "ilvr",
    "ILVR (Choi et al. 2021, arXiv 2108.02938)",
    "Sample from noise keeping the input's low frequencies: phi_N(x) = phi_N(input) each step.",
    mask=None,
    mask_keeps=None,
    prompt="class",
    source_prompt="none",
    sampler="euler_ancestral",
    knobs=(
        Knob(
            "factor",
            4,
            "N: the low-pass downsampling factor (must divide the image size); larger N keeps less of the input",
            type=int,
            metavar="N",
            lo=1,
        ),
        Knob(
            "stop",
            0.0,
            "the paper's t_stop: the diffusion time below which the refinement stops (0: refine "
            "every step, the output's low-pass equals the input's)",
            metavar="FRAC",
            lo=0.0,
            hi=1.0,
            hi_open=True,
        ),
        Knob(
            "filter",
            "area",
            "phi_N: 'area' (a projection: exact) or 'bicubic' (the paper's resizer)",
            type=str,
            choices=("area", "bicubic"),
        ),
    ),
    run=_edit,
)
