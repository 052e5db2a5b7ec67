"""UniTune: Text-Driven Image Editing by Fine Tuning a Diffusion Model on a Single Image.
Valevski et al. 2022, https://arxiv.org/abs/2210.09477 (no public code).

Two steps on one input image x and an edit text:

    (1) fine-tune the model on x alone, captioned by a rare token ("[rare]"), every weight (the paper,
        on Imagen) or LoRA adapters here on request;
    (2) edit: noise x to the paper's t0 and denoise with the fine-tuned model under "[rare] <edit>"
        with classifier-free guidance (SDEdit's start), then interpolate the result with x ("blend":
        out = (1 - b) * edit + b * x, the paper's post-sampling interpolation that brings the input's
        details back; in pixels for a pixel model, in latents for a latent one).

The knobs are the paper's: the start t0 (higher: bolder edits, lower: closer to the input), the
guidance scale, the blend. No mask is needed: the fine-tuned model's bias toward x keeps what the
text does not change.

Notation (paper -> difflab):
    rare tokens           -> `identifier` (default "sks", as DreamBooth's)
    fine-tuned model      -> `unitune_fit(...)`, a copy (`imagic.finetune_on_image`): the caller's model
                             is never changed
    t0, guidance w        -> `strength` (the papers' diffusion time, `Schedule.sigma_at_time`), `guidance_scale`

Usage::

    tuned = unitune_fit(denoiser, x, pipe.cond("sks"), steps=128)
    out = unitune_edit(tuned, x, sigmas_from_t0, pipe.cond("sks a blue star"), uncond=pipe.cond(""),
                       guidance_scale=3.0, blend=0.0, noise=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.core.guidance import cfg
from difflab.core.validation import check_number
from difflab.methods.imagic import finetune_on_image
from difflab.methods.sdedit import sdedit, strength_knob

__all__ = ["unitune_fit", "unitune_edit", "EDIT"]


def unitune_fit(
    denoiser,
    x0: Tensor,
    rare_cond: dict,
    *,
    steps: int = 128,
    lr: float = 1e-4,
    batch: int = 4,
    lora_rank: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
):
    """Step (1): a copy of `denoiser` fine-tuned on the one image x0 (1, C, H, W) captioned by the rare
    token's cond. Returns (the copy, the loss of every step)."""
    return finetune_on_image(
        denoiser,
        x0,
        rare_cond,
        steps=steps,
        lr=lr,
        batch=batch,
        lora_rank=lora_rank,
        generator=generator,
        progress=progress,
    )


def unitune_edit(
    tuned,
    x0: Tensor,
    tail: Tensor,
    edit_cond: dict,
    *,
    uncond: dict | None = None,
    guidance_scale: float = 3.0,
    blend: float = 0.0,
    method: str = "euler_ancestral",
    noise=None,
    progress: bool = False,
) -> Tensor:
    """Step (2): SDEdit from x0 on the grid `tail` (starting at t0) with the fine-tuned model under
    "[rare] <edit>" and CFG against `uncond`, then (1 - blend) * edit + blend * x0."""
    blend = check_number("unitune blend", blend, lo=0.0, hi=1.0)
    D = tuned
    if guidance_scale != 1.0:
        if uncond is None:
            raise ValueError("UniTune with guidance_scale != 1 needs uncond (the empty prompt's cond)")
        D = cfg(guidance_scale, uncond)(tuned)
    out = sdedit(D, x0, tail, strength=1.0, method=method, cond=edit_cond, noise=noise, progress=progress)
    return (1 - blend) * out + blend * x0 if blend else out


def _edit(
    ctx: EditContext,
    *,
    strength: float,
    identifier: str,
    tune_steps: int,
    tune_lr: float,
    batch: int,
    lora_rank: int,
    guidance_scale: float,
    blend: float,
) -> Tensor:
    if ctx.prompts.conditioning != "text":
        raise ValueError(
            f"unitune binds a rare token to the image: it needs a text-to-image model, this one is "
            f"{ctx.prompts.conditioning}-conditional"
        )
    identifier = identifier.strip()
    if not identifier or len(identifier.split()) != 1:
        raise ValueError(f"unitune identifier must be one word, got {identifier!r}")
    tuned, losses = unitune_fit(
        ctx.denoiser,
        ctx.image,
        ctx.cond(identifier, "--identifier"),
        steps=tune_steps,
        lr=tune_lr,
        batch=batch,
        lora_rank=lora_rank,
        generator=torch.Generator().manual_seed(ctx.seed),
        progress=ctx.progress,
    )
    prompt = f"{identifier} {ctx.prompt}"
    out = unitune_edit(
        tuned,
        ctx.image,
        ctx.tail(strength),
        ctx.cond(prompt),
        uncond=ctx.cond("") if guidance_scale != 1.0 else None,
        guidance_scale=guidance_scale,
        blend=blend,
        method=ctx.sampler,
        noise=ctx.generator,
        progress=ctx.progress,
    )
    ctx.info.update(
        edit_prompt=prompt, tune_loss_start=losses[0] if losses else None, tune_loss_end=losses[-1] if losses else None
    )
    return out


EDIT = EditMethod(
    "unitune",
    "UniTune (Valevski et al. 2022, arXiv 2210.09477)",
    "Fine-tune a copy of the model on the input captioned by a rare token, then SDEdit from t0 under "
    "'[token] --prompt' with guidance, and blend the input back.",
    mask=None,
    mask_keeps=None,
    prompt="required",
    source_prompt="none",
    sampler="euler_ancestral",
    knobs=(
        strength_knob(0.8, "; the paper's t0, high for bold edits"),
        Knob("identifier", "sks", "the rare token the input is bound to", type=str, metavar="WORD"),
        Knob("tune_steps", 128, "fine-tuning steps on the input", type=int, lo=0),
        Knob(
            "tune_lr", 1e-4, "fine-tuning learning rate (smaller for a large model)", metavar="LR", lo=0.0, lo_open=True
        ),
        Knob("batch", 4, "noisings of the input per step", type=int, lo=1),
        Knob("lora_rank", 0, "train LoRA adapters of this rank instead of every weight (0: all)", type=int, lo=0),
        Knob("guidance_scale", 3.0, "classifier-free guidance against the empty prompt (1: none)", lo=0.0),
        Knob(
            "blend",
            0.0,
            "after sampling, (1 - b) * edit + b * input (a latent model: its latents): the input's details back (0: off)",
            metavar="B",
            lo=0.0,
            hi=1.0,
        ),
    ),
    run=_edit,
)
