"""DiffEdit: Diffusion-based Semantic Image Editing with Mask Guidance.
Couairon et al. 2023, https://arxiv.org/abs/2210.11427.

Notation (paper -> difflab, VE coordinates x = x0 + sigma n):
    Q (query text), R (reference text) -> `query_cond`, `ref_cond`: the denoiser's cond dicts
    mask: |eps(x_t, Q) - eps(x_t, R)| at 50% noise, averaged over channels and n = 10 draws,
          rescaled to [0, 1], thresholded at 0.5                -> `diffedit_mask`
    encoding ratio r, DDIM encoding x_0 -> x_r                   -> invert_euler over sigmas[-k:]
    decoding with Q, y_t = M y_t + (1 - M) x_t (the inverted latent of the same step)
                                                                 -> `diffedit`

The mask step uses differences of x0_hat, which equal those of eps_hat up to the factor sigma
(eps_hat = (x - x0_hat)/sigma at the same x): the normalised mask is the same.

Usage::

    mask = diffedit_mask(denoiser, image, query_cond, ref_cond, sigma=sigma_half)
    out = diffedit(denoiser, image, mask, sigmas, query_cond, ref_cond, strength=0.5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.core.guidance import cfg
from difflab.core.sampling import Step, expand_cond, invert_euler, sample_euler, slice_sigmas

__all__ = ["diffedit_mask", "diffedit", "EDIT"]


@torch.no_grad()
def diffedit_mask(
    denoiser,
    image: Tensor,
    query_cond: dict,
    ref_cond: dict,
    *,
    sigma: float,
    n_draws: int = 10,
    threshold: float = 0.5,
    smooth: int = 0,
    clamp: float | None = 3.0,
    generator: torch.Generator | None = None,
    return_soft: bool = False,
):
    """DiffEdit step 1: where do the query and reference predictions disagree? (B, 1, H, W) in {0, 1}.

    The per-pixel difference |D(x, Q) - D(x, R)| (channel mean) is averaged over `n_draws` noises at
    `sigma`. The paper then "removes extreme values" and rescales to [0, 1]: with `clamp` (default 3)
    the map is clipped at clamp x its mean and divided by that (diffusers' mask_thresholding_ratio),
    so a pixel is in the mask when its difference exceeds threshold x clamp x the mean (1.5x by
    default); with clamp=None it is min-max rescaled, which a single peak makes much stricter."""
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got {tuple(image.shape)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    B = image.shape[0]
    s = image.new_full((B,), float(sigma))
    diff = torch.zeros_like(image[:, :1])
    qc, rc = expand_cond(query_cond, B), expand_cond(ref_cond, B)
    for _ in range(n_draws):
        x = image + sigma * torch.randn(image.shape, generator=generator, dtype=image.dtype).to(image.device)
        d = denoiser(x, s, **qc) - denoiser(x, s, **rc)
        diff += d.abs().mean(1, keepdim=True) / n_draws
    if smooth > 0:  # optional box blur (odd kernel) before normalising
        diff = F.avg_pool2d(F.pad(diff, [smooth] * 4, mode="replicate"), 2 * smooth + 1, stride=1)
    if clamp is not None:
        if not clamp > 0:
            raise ValueError(f"clamp (difflab edit --mask-clamp) must be positive or None, got {clamp}")
        top = (clamp * diff.flatten(1).mean(1)).reshape(-1, 1, 1, 1).clamp(min=1e-12)
        soft = diff.clamp(max=top) / top
    else:
        lo = diff.flatten(1).min(1).values.reshape(-1, 1, 1, 1)
        hi = diff.flatten(1).max(1).values.reshape(-1, 1, 1, 1)
        soft = (diff - lo) / (hi - lo).clamp(min=1e-12)
    mask = (soft > threshold).to(image.dtype)
    return (mask, soft) if return_soft else mask


@torch.no_grad()
def diffedit(
    denoiser,
    image: Tensor,
    mask: Tensor,
    sigmas: Tensor,
    query_cond: dict,
    ref_cond: dict | None = None,
    *,
    strength: float = 0.5,
    progress: bool = False,
) -> Tensor:
    """DiffEdit steps 2-3: DDIM-encode to the ratio `strength`, decode with the query, keeping the
    unmasked region on the inverted trajectory."""
    if mask.shape[-2:] != image.shape[-2:] or mask.shape[1] != 1:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit image {tuple(image.shape)}: need (B|1, 1, H, W)"
        )
    tail = slice_sigmas(torch.as_tensor(sigmas, dtype=torch.float64), strength)  # decreasing, ends in 0
    up = tail.flip(0)  # 0 -> sigma_r
    B = image.shape[0]
    qc = expand_cond(query_cond, B)
    rc = expand_cond(ref_cond if ref_cond is not None else query_cond, B)
    inverted = {0.0: image}

    def store(step: Step):
        inverted[step.sigma_next] = step.x

    x_r = invert_euler(denoiser, image, up, cond=rc, callback=store, progress=progress)

    def keep(step: Step):
        return mask * step.x + (1 - mask) * inverted[step.sigma_next]

    return sample_euler(denoiser, x_r, tail, cond=qc, callback=keep, progress=progress)


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def _edit(
    ctx: EditContext,
    *,
    strength: float,
    threshold: float,
    n_draws: int,
    mask_clamp: float,
    mask_noise: float,
    guidance_scale: float,
) -> Tensor:
    qc, rc = ctx.cond(ctx.prompt, "--prompt"), ctx.cond(ctx.source_prompt or "", "--source-prompt")
    if _same(qc, rc):
        raise ValueError(
            f"--prompt {ctx.prompt!r} and --source-prompt {ctx.source_prompt or ''!r} are the same "
            "condition: DiffEdit needs two different ones"
        )
    mask = ctx.mask
    if mask is None:
        sigma_mask = ctx.sigma_at(mask_noise)
        mask = diffedit_mask(
            ctx.denoiser,
            ctx.image,
            qc,
            rc,
            sigma=sigma_mask,
            n_draws=n_draws,
            threshold=threshold,
            clamp=mask_clamp,
            generator=ctx.generator,
        )
        ctx.tiles.append(("mask (automatic): white = edit", ctx.mask_tile(mask)))
        ctx.info["mask_fraction"] = float(mask.mean())
    # the paper: DDIM-encode with the unconditional model (empty prompt / null class), decode with
    # the query under classifier-free guidance (which, given the null condition, is D_u)
    uc = ctx.cond("", "--source-prompt")
    guided = cfg(guidance_scale, uc)(ctx.denoiser) if guidance_scale != 1.0 else ctx.denoiser
    return diffedit(guided, ctx.image, mask, ctx.tail(strength), qc, uc, strength=1.0, progress=ctx.progress)


EDIT = EditMethod(
    "diffedit",
    "DiffEdit (Couairon et al. 2023, arXiv 2210.11427)",
    "Find where --prompt and --source-prompt disagree (the automatic mask), DDIM-encode to ratio r, decode under "
    "--prompt keeping the rest on the inverted path.",
    mask="optional",
    mask_keeps="black",
    prompt="required",
    source_prompt="optional",
    sampler=None,
    knobs=(
        Knob(
            "strength",
            0.5,
            "r: encoding ratio, the paper's diffusion time the input is DDIM-encoded to (then round(r * steps) "
            "steps back), independent of --steps",
            metavar="R",
            lo=0.0,
            hi=1.0,
            lo_open=True,
        ),
        Knob(
            "threshold",
            0.5,
            "threshold on the normalised prediction difference (automatic mask)",
            metavar="T",
            lo=0.0,
            hi=1.0,
        ),
        Knob("n_draws", 10, "noise draws averaged for the automatic mask", type=int, metavar="K", lo=1),
        Knob(
            "mask_clamp",
            3.0,
            "the mask's difference map is clipped at this multiple of its mean, then rescaled "
            "to [0, 1] (the paper's removal of extreme values)",
            metavar="C",
            lo=0.0,
        ),
        Knob(
            "mask_noise",
            0.5,
            "diffusion time of the automatic mask's noise (paper: 50%%, t = 0.5)",
            metavar="FRAC",
            lo=0.0,
            hi=1.0,
            lo_open=True,
        ),
        Knob(
            "guidance_scale",
            1.0,
            "classifier-free guidance s of the decoding under --prompt (the paper decodes with CFG; 1 = none)",
            metavar="S",
        ),
    ),
    run=_edit,
)
