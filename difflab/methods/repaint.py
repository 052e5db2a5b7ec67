"""RePaint: Inpainting using Denoising Diffusion Probabilistic Models.
Lugmayr et al. 2022, https://arxiv.org/abs/2201.09865 (official code: andreas128/RePaint).

Notation (paper -> difflab, VE coordinates x = x0 + sigma n):
    m (1 = known pixel)                      -> `keep_mask` (N|1, 1|C, H, W), 1 = keep `known`
    x_{t-1}^known ~ N(sqrt(abar) x0, 1-abar) -> renoise(known, 0, sigma_{t-1})
    x_{t-1}^unknown ~ p_theta(x_{t-1}|x_t)   -> one ancestral step (DDPM posterior, eta = 1)
    x_{t-1} = m x^known + (1 - m) x^unknown
    resampling: x_t ~ N(sqrt(1-b_t) x_{t-1}, b_t I) -> renoise(x, sigma_{t-1}, sigma_t)
    T, jump length j, resamplings r          -> len(sigmas) - 1, `jump_length`, `jump_n_sample`

The paper's defaults are T = 250, j = 10, r = 10 (about 2,400 network calls); r = 1 is plain
"replace the known region" inpainting without resampling.

Usage::

    sigmas = sigmas_spaced(vp_linear(), 250, "trailing")
    out = repaint(denoiser, image, keep_mask, sigmas, noise=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.core.sampling import Step, ancestral_step, euler_step, noise_source, renoise
from difflab.core.validation import check_mask

__all__ = ["repaint", "jump_schedule", "EDIT"]


def jump_schedule(T: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """The sequence of grid levels RePaint visits, from T (pure noise) down to 0 (clean).

    Consecutive levels differ by one: a step down is a reverse (denoising) step, a step up
    re-noises. Every `jump_length` levels (except near the top) the walk goes back up
    `jump_length` levels, `jump_n_sample - 1` times (RePaint's Algorithm 1 with jumps).
    """
    if T < 1 or jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"need T, jump_length, jump_n_sample >= 1; got {T}, {jump_length}, {jump_n_sample}")
    # the official schedule's timestep t is our level t + 1 (its final clean image, t = -1, is our
    # level 0): jumps start at levels 1, 1 + j, 1 + 2j, ... so the finished image is never re-noised
    jumps = {j + 1: jump_n_sample - 1 for j in range(0, T - jump_length, jump_length)}
    t, levels = T, [T]
    while t > 0:
        t -= 1
        levels.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                levels.append(t)
    return levels


@torch.no_grad()
def repaint(
    denoiser,
    known: Tensor,
    keep_mask: Tensor,
    sigmas: Tensor,
    *,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    cond: dict | None = None,
    noise=None,
    callback=None,
    progress: bool = False,
    x: Tensor | None = None,
) -> Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1) on a decreasing sigma grid ending in 0."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas[-1] != 0 or not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError("RePaint needs a strictly decreasing sigma grid ending in 0")
    if not torch.isfinite(known).all():
        raise ValueError("known image contains NaN/inf values")
    m = check_mask(keep_mask, known, "keep_mask")
    draw = noise_source(noise)
    T = len(sigmas) - 1
    level_sigma = sigmas.flip(0)  # level l has noise sigma level_sigma[l]; level 0 is clean
    path = jump_schedule(T, jump_length, jump_n_sample)
    if x is None:
        x = draw(0, known) * float(level_sigma[T])
    ones = x.new_ones(x.shape[0])
    cond = cond or {}
    k = 1
    steps = range(len(path) - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="repaint", leave=False)
    for i in steps:
        a, b = path[i], path[i + 1]
        s_a, s_b = float(level_sigma[a]), float(level_sigma[b])
        if b < a:  # reverse step a -> b for the unknown region, forward marginal for the known one
            x0_hat = denoiser(x, ones * s_a, **cond)
            s_down, s_up = ancestral_step(s_a, s_b, eta=1.0)
            x_unknown = euler_step(x, x0_hat, s_a, s_down)
            if s_up > 0:
                x_unknown = x_unknown + s_up * draw(k, x)
                k += 1
            x_known = renoise(known, 0.0, s_b, draw(k, x) if s_b > 0 else torch.zeros_like(x))
            k += 1
            x = m * x_known + (1 - m) * x_unknown
            if callback is not None:
                out = callback(Step(i, x, s_a, s_b, x0_hat))
                x = x if out is None else out
        else:  # resampling: undo one step, x_a -> x_b with b = a + 1
            x = renoise(x, s_a, s_b, draw(k, x))
            k += 1
    return x


def _edit(ctx: EditContext, *, jump_length: int, jump_n_sample: int) -> Tensor:
    return repaint(
        ctx.denoiser,
        ctx.image,
        ctx.mask,
        ctx.sigmas,
        jump_length=jump_length,
        jump_n_sample=jump_n_sample,
        cond=ctx.cond(ctx.prompt),
        noise=ctx.generator,
        progress=ctx.progress,
    )


EDIT = EditMethod(
    "repaint",
    "RePaint (Lugmayr et al. 2022, arXiv 2201.09865)",
    "Fill the unknown (black) region; each step the known region comes from the noised input, with jumps back to "
    "harmonise.",
    mask="required",
    mask_keeps="white",
    prompt="class",
    source_prompt="none",
    sampler=None,
    knobs=(
        Knob(
            "jump_length",
            10,
            "j: levels to jump back (1 with --jump-n-sample 1: no resampling)",
            type=int,
            metavar="J",
            lo=1,
        ),
        Knob(
            "jump_n_sample",
            10,
            "r: passes over each jump (1: plain replacement, no resampling)",
            type=int,
            metavar="R",
            lo=1,
        ),
    ),
    run=_edit,
)
