"""SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations.
Meng et al. 2022, https://arxiv.org/abs/2108.01073 (official code: ermongroup/SDEdit).

Notation (paper -> difflab):
    x^(g) guide image        -> `guide` (N, C, H, W), in the data range
    t0 in [0, 1]             -> `strength`: `difflab edit` and `edit()` start at the paper's t0 (the
                                diffusion time of the model's schedule, `Schedule.sigma_at_time`);
                                `sdedit(...)` itself re-runs that fraction of the grid it is given
                                (`core.sampling.edit_sigmas(schedule, t0, steps)` builds the t0 one)
    x(t0) = x^(g) + sigma(t0) z  (VE-SDE; VP is the same process in difflab coordinates)
    reverse SDE from t0      -> any difflab sampler on the grid's tail (ancestral by default)
    mask Omega (edit region) -> `edit_mask` (N|1, 1|C, H, W), 1 = may change, 0 = keep the guide

t0 in [0.3, 0.6] trades faithfulness to the guide (small t0) for realism (large t0).

Usage::

    sigmas = default_grid(denoiser.schedule, 50)
    out = sdedit(denoiser, strokes, sigmas, strength=0.5, noise=torch.Generator().manual_seed(0))
    out = sdedit(denoiser, photo, sigmas, strength=0.6, edit_mask=m)   # masked variant
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.core.sampling import Step, noise_source, renoise, sample, slice_sigmas
from difflab.core.validation import check_mask

__all__ = ["sdedit", "strength_knob", "EDIT"]


def sdedit(
    denoiser,
    guide: Tensor,
    sigmas: Tensor,
    *,
    strength: float = 0.5,
    edit_mask: Tensor | None = None,
    method: str = "euler_ancestral",
    cond: dict | None = None,
    noise=None,
    callback=None,
    progress: bool = False,
    **sampler_kw,
) -> Tensor:
    """SDEdit (Meng et al. 2022, Algorithm 1; masked variant Algorithm 3 with `edit_mask`)."""
    if not torch.isfinite(guide).all():
        raise ValueError("guide image contains NaN/inf values")
    tail = slice_sigmas(torch.as_tensor(sigmas, dtype=torch.float64), strength)
    draw = noise_source(noise)
    x = renoise(guide, 0.0, float(tail[0]), draw(-1, guide))  # x(t0) = x^(g) + sigma(t0) z
    user_cb = callback
    if edit_mask is not None:
        m = check_mask(edit_mask, guide, "edit_mask")

        def keep_guide(step: Step):
            # outside the mask, reset to the guide perturbed to the current noise level
            x_known = renoise(guide, 0.0, step.sigma_next, draw(10_000 + step.i, guide))
            x_new = m * step.x + (1 - m) * x_known
            if user_cb is not None:
                step.x = x_new
                out = user_cb(step)
                return x_new if out is None else out
            return x_new

        callback = keep_guide
    return sample(
        denoiser, x, tail, method=method, cond=cond, noise=noise, callback=callback, progress=progress, **sampler_kw
    )


def strength_knob(default: float, note: str = "") -> Knob:
    """The edit strength t0 in (0, 1] (SDEdit's; Blended Diffusion's skipped steps)."""
    return Knob(
        "strength",
        default,
        "the paper's t0: the diffusion time the input is noised to, in (0, 1] (on DDPM's linear schedule "
        "0.5 is sigma 3.4), then round(t0 * steps) steps down; independent of --steps and the sampler" + note,
        metavar="T0",
        lo=0.0,
        hi=1.0,
        lo_open=True,
    )


def _edit(ctx: EditContext, *, strength: float) -> Tensor:
    return sdedit(
        ctx.denoiser,
        ctx.image,
        ctx.tail(strength),  # starts at the paper's t0, whatever the steps and the sampler
        strength=1.0,
        edit_mask=ctx.mask,
        method=ctx.sampler,
        cond=ctx.cond(ctx.prompt),
        noise=ctx.generator,
        progress=ctx.progress,
    )


EDIT = EditMethod(
    "sdedit",
    "SDEdit (Meng et al. 2022, arXiv 2108.01073)",
    "Noise the input to t0 and denoise: small t0 stays faithful, large t0 turns strokes realistic.",
    mask="optional",
    mask_keeps="black",
    prompt="class",
    source_prompt="none",
    sampler="euler_ancestral",
    knobs=(strength_knob(0.5, "; 0.3-0.6 is the paper's range"),),
    run=_edit,
)
