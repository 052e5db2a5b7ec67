"""Imagic: Text-Based Real Image Editing with Diffusion Models.
Kawar et al. 2023, https://arxiv.org/abs/2210.09276 (no official code).

One input image x and one target text; three stages on a text-conditional model:

    (A) e_opt = argmin_e E_{sigma, n} ||F(x + sigma n, sigma; e) - target||^2 from e = e_tgt, the
        target text's embedding, with the model frozen (paper, Imagen: 100 Adam steps, lr 1e-3);
    (B) the model fine-tuned on x with e_opt held fixed (paper: 1500 steps, lr 5e-7 on Imagen's
        64 x 64 base; the diffusers community port: 1000 steps at 2e-6 on Stable Diffusion);
    (C) a generation from noise with the fine-tuned model and the interpolated embedding
        e(eta) = eta e_tgt + (1 - eta) e_opt under classifier-free guidance: eta 0 reconstructs x,
        eta 1 follows the target text; the paper's edits lie at eta 0.6-0.8.

Notation (paper -> difflab):
    e_tgt                  -> the target prompt's cond {"context": token states (1, T, d), "context_mask"}
                              (the text encoder's output sequence, as Imagen's T5 embedding)
    e_opt                  -> `ImagicFit.e_opt` (the same key mask, optimised states)
    the denoising loss     -> `Preconditioned.loss` at the model's training sigmas
                              (`core.losses.training_sigmas`: EDM's log-normal, DDPM's uniform t)
    fine-tuned model       -> `ImagicFit.denoiser`, a copy: the caller's model is never changed
                              (`lora_rank` > 0 trains LoRA adapters on the copy instead of every weight)

The paper's auxiliary super-resolution models are not part of difflab's single-stage models.

Usage::

    fit = imagic_fit(denoiser, x, pipe.cond("a blue circle"), generator=torch.Generator().manual_seed(0))
    out = fit.generate(0.7, sigmas, guidance_scale=3.0, uncond=pipe.cond(""), noise=torch.Generator().manual_seed(1))
    strip = [fit.generate(eta, sigmas, noise=...) for eta in (0, 0.25, 0.5, 0.75, 1)]   # the eta sweep
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor

from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.core.guidance import cfg
from difflab.core.losses import training_sigmas
from difflab.core.sampling import DEFAULT_SAMPLER, expand_cond, progress_range, sample
from difflab.core.validation import check_finite_tensor, check_number

__all__ = [
    "ImagicFit",
    "optimize_embedding",
    "finetune_on_image",
    "imagic_fit",
    "interpolate_cond",
    "parse_etas",
    "EDIT",
]

EMBED_KEY = "context"  # the text embedding in a text-conditional model's cond


def _check_text_cond(cond: dict, what: str) -> None:
    if EMBED_KEY not in cond or not isinstance(cond[EMBED_KEY], Tensor):
        raise ValueError(f"{what} has no text embedding ({EMBED_KEY!r}): Imagic needs a text-conditional model")
    if cond[EMBED_KEY].shape[0] != 1:
        raise ValueError(f"{what} must be one prompt (batch 1), got batch {cond[EMBED_KEY].shape[0]}")


def _denoising_loss(denoiser, x0: Tensor, cond: dict, sigma_draw, generator: torch.Generator, batch: int) -> Tensor:
    """The model's own training loss on `batch` noisings of the one image x0 (1, C, H, W)."""
    sigma = sigma_draw(batch, generator).to(x0.device)
    noise = torch.randn((batch, *x0.shape[1:]), generator=generator).to(x0.device)
    return denoiser.loss(x0.expand(batch, *x0.shape[1:]), sigma, noise, **expand_cond(cond, batch)).mean()


def _check_image(x0: Tensor) -> None:
    if x0.ndim != 4 or x0.shape[0] != 1:
        raise ValueError(f"Imagic edits one image (1, C, H, W), got shape {tuple(x0.shape)}")
    check_finite_tensor("the input image", x0)


def optimize_embedding(
    denoiser,
    x0: Tensor,
    cond: dict,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    batch: int = 4,
    sigma_draw=None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[dict, list[float]]:
    """Stage (A): the text embedding cond[EMBED_KEY] optimised (Adam) to reconstruct x0 with the
    denoiser frozen. Returns (the optimised cond, the loss of every step). No weight of `denoiser`
    changes, and no gradient is left on it."""
    _check_image(x0)
    _check_text_cond(cond, "the target cond")
    sigma_draw = sigma_draw or training_sigmas(denoiser.schedule)
    generator = generator or torch.Generator().manual_seed(0)
    e = cond[EMBED_KEY].detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([e], lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in progress_range(steps, progress, "imagic: embedding"):
            loss = _denoising_loss(denoiser, x0, {**cond, EMBED_KEY: e}, sigma_draw, generator, batch)
            (grad,) = torch.autograd.grad(loss, [e])  # only e: the model's .grad stays untouched
            e.grad = grad
            opt.step()
            losses.append(float(loss.detach()))
    check_finite_tensor("the optimised embedding", e, "(lower the embedding lr)")
    return {**cond, EMBED_KEY: e.detach().to(cond[EMBED_KEY].dtype)}, losses


def trainable_copy(denoiser, lora_rank: int = 0):
    """A deep copy of `denoiser` to fine-tune (the caller's model is never changed), and its trainable
    parameters: every weight, or LoRA adapters of rank `lora_rank` (> 0) on its attention projections."""
    tuned = copy.deepcopy(denoiser)
    if lora_rank:
        from difflab.nn.lora import add_lora

        add_lora(tuned.net, rank=lora_rank)
    else:
        tuned.requires_grad_(True)
    return tuned, [p for p in tuned.parameters() if p.requires_grad]


def finish_tuning(tuned, params, lr: float, what: str) -> None:
    """Gradients off and eval mode on a tuned copy; a one-line error if its weights diverged."""
    tuned.requires_grad_(False).eval()
    if not all(torch.isfinite(p).all() for p in params):
        raise ValueError(f"{what} diverged (NaN/inf weights) at lr {lr:g}: lower the learning rate")


def finetune_on_image(
    denoiser,
    x0: Tensor,
    cond: dict,
    *,
    steps: int = 200,
    lr: float = 1e-4,
    batch: int = 4,
    lora_rank: int = 0,
    sigma_draw=None,
    generator: torch.Generator | None = None,
    progress: bool = False,
):
    """Stage (B): a copy of `denoiser` fine-tuned (Adam) on x0 under the fixed `cond`; every weight,
    or LoRA adapters of rank `lora_rank` (> 0) on its attention projections. Returns (the tuned copy
    in eval mode with gradients off, the loss of every step); `denoiser` itself is not changed."""
    _check_image(x0)
    tuned, params = trainable_copy(denoiser, lora_rank)
    sigma_draw = sigma_draw or training_sigmas(tuned.schedule)
    generator = generator or torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(params, lr=lr)
    cond = {k: v.detach() if isinstance(v, Tensor) else v for k, v in cond.items()}
    losses = []
    with torch.enable_grad():
        for _ in progress_range(steps, progress, "imagic: fine-tune"):
            opt.zero_grad(set_to_none=True)
            loss = _denoising_loss(tuned, x0, cond, sigma_draw, generator, batch)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finish_tuning(tuned, params, lr, "Imagic fine-tuning")
    return tuned.eval(), losses


def interpolate_cond(e_tgt: dict, e_opt: dict, eta: float) -> dict:
    """e(eta) = eta e_tgt + (1 - eta) e_opt (the paper's eq. 2), the key mask of the target text."""
    eta = check_number("Imagic eta", eta, lo=0.0, hi=1.0)
    return {**e_tgt, EMBED_KEY: eta * e_tgt[EMBED_KEY] + (1 - eta) * e_opt[EMBED_KEY]}


@dataclass
class ImagicFit:
    """Stages (A) and (B) done: the fine-tuned copy, the target and optimised embeddings, the losses."""

    denoiser: object
    e_tgt: dict
    e_opt: dict
    shape: tuple  # (C, H, W) of the image (its latents for a latent model)
    embed_losses: list[float] = field(default_factory=list)
    tune_losses: list[float] = field(default_factory=list)

    def cond(self, eta: float) -> dict:
        return interpolate_cond(self.e_tgt, self.e_opt, eta)

    def generate(
        self,
        eta: float,
        sigmas: Tensor,
        *,
        guidance_scale: float = 1.0,
        uncond: dict | None = None,
        noise=None,
        x_T: Tensor | None = None,
        method: str = DEFAULT_SAMPLER,
        progress: bool = False,
    ) -> Tensor:
        """Stage (C): a generation (1, C, H, W) with e(eta) from x_T (default: unit noise from the
        `noise` generator times sigmas[0]), under CFG `guidance_scale` against `uncond` (the empty
        prompt's cond) when it is not 1."""
        cond = self.cond(eta)
        D = self.denoiser
        if guidance_scale != 1.0:
            if uncond is None:
                raise ValueError("Imagic with guidance_scale != 1 needs uncond (the empty prompt's cond)")
            D = cfg(guidance_scale, uncond)(D)
        if x_T is None:
            g = noise if isinstance(noise, torch.Generator) else torch.Generator().manual_seed(0)
            x_T = torch.randn((1, *self.shape), generator=g) * float(sigmas[0])
        return sample(D, x_T, sigmas, method=method, cond=cond, noise=noise, progress=progress)


def imagic_fit(
    denoiser,
    x0: Tensor,
    target_cond: dict,
    *,
    embed_steps: int = 100,
    embed_lr: float = 1e-3,
    tune_steps: int = 200,
    tune_lr: float = 1e-4,
    batch: int = 4,
    lora_rank: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> ImagicFit:
    """Stages (A) and (B) of Imagic on the one image x0 (1, C, H, W) (latents for a latent model)."""
    _check_image(x0)
    _check_text_cond(target_cond, "the target cond")
    generator = generator or torch.Generator().manual_seed(0)
    e_opt, embed_losses = optimize_embedding(
        denoiser, x0, target_cond, steps=embed_steps, lr=embed_lr, batch=batch, generator=generator, progress=progress
    )
    tuned, tune_losses = finetune_on_image(
        denoiser,
        x0,
        e_opt,
        steps=tune_steps,
        lr=tune_lr,
        batch=batch,
        lora_rank=lora_rank,
        generator=generator,
        progress=progress,
    )
    return ImagicFit(tuned, dict(target_cond), e_opt, tuple(x0.shape[1:]), embed_losses, tune_losses)


def parse_etas(text: str) -> list[float]:
    """The --sweep knob: comma-separated etas in [0, 1] ("" for none)."""
    etas = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"imagic sweep must be comma-separated numbers in [0, 1], got {text!r}") from None
        etas.append(check_number("imagic sweep eta", value, lo=0.0, hi=1.0))
    return etas


def _edit(
    ctx: EditContext,
    *,
    eta: float,
    embed_steps: int,
    embed_lr: float,
    tune_steps: int,
    tune_lr: float,
    batch: int,
    lora_rank: int,
    guidance_scale: float,
    sweep: str,
) -> Tensor:
    if ctx.prompts.conditioning != "text":
        raise ValueError(
            f"imagic optimises a text embedding: it needs a text-to-image model, this one is {ctx.prompts.conditioning}"
            "-conditional"
        )
    etas = parse_etas(sweep)
    fit = imagic_fit(
        ctx.denoiser,
        ctx.image,
        ctx.cond(ctx.prompt),
        embed_steps=embed_steps,
        embed_lr=embed_lr,
        tune_steps=tune_steps,
        tune_lr=tune_lr,
        batch=batch,
        lora_rank=lora_rank,
        generator=torch.Generator().manual_seed(ctx.seed),
        progress=ctx.progress,
    )
    uncond = ctx.cond("") if guidance_scale != 1.0 else None
    x_T = torch.randn((1, *fit.shape), generator=ctx.generator).to(ctx.image.device) * float(ctx.sigmas[0])

    def generate(e: float) -> Tensor:  # every eta from the same x_T and sampler noise
        noise = torch.Generator().manual_seed(ctx.seed + 1)
        return fit.generate(
            e, ctx.sigmas, guidance_scale=guidance_scale, uncond=uncond, noise=noise, x_T=x_T, method=ctx.sampler
        )

    out = generate(eta)
    ctx.output_tiles = [(f"eta {e:g}" + (" (reconstruction)" if e == 0 else ""), generate(e)) for e in etas]
    ctx.output_tiles.append((f"output (eta {eta:g})", out))
    ctx.info.update(
        embed_loss_start=fit.embed_losses[0] if fit.embed_losses else None,
        embed_loss_end=fit.embed_losses[-1] if fit.embed_losses else None,
        tune_loss_start=fit.tune_losses[0] if fit.tune_losses else None,
        tune_loss_end=fit.tune_losses[-1] if fit.tune_losses else None,
    )
    return out


EDIT = EditMethod(
    "imagic",
    "Imagic (Kawar et al. 2023, arXiv 2210.09276)",
    "Optimise --prompt's embedding to reconstruct the input, fine-tune a copy of the model on it, then generate "
    "from eta * target + (1 - eta) * optimised embedding.",
    mask=None,
    mask_keeps=None,
    prompt="required",
    source_prompt="none",
    sampler=DEFAULT_SAMPLER,
    knobs=(
        Knob(
            "eta",
            0.7,
            "interpolation toward the target text: 0 reconstructs the input, 1 is the target text on the "
            "fine-tuned model (paper: 0.6-0.8)",
            metavar="ETA",
            lo=0.0,
            hi=1.0,
        ),
        Knob("embed_steps", 100, "stage A: Adam steps on the text embedding (paper: 100)", type=int, lo=0),
        Knob("embed_lr", 1e-3, "stage A learning rate (paper: 1e-3)", metavar="LR", lo=0.0, lo_open=True),
        Knob(
            "tune_steps",
            200,
            "stage B: fine-tuning steps on the input (paper: 1500 on Imagen; 200 fit difflab's small models)",
            type=int,
            lo=0,
        ),
        Knob(
            "tune_lr",
            1e-4,
            "stage B learning rate (paper: 5e-7 on Imagen; pass a smaller one for a large model)",
            metavar="LR",
            lo=0.0,
            lo_open=True,
        ),
        Knob("batch", 4, "noisings of the input per step (stages A and B)", type=int, lo=1),
        Knob(
            "lora_rank", 0, "stage B trains LoRA adapters of this rank instead of every weight (0: all)", type=int, lo=0
        ),
        Knob("guidance_scale", 3.0, "classifier-free guidance of stage C against the empty prompt (1: none)", lo=0.0),
        Knob(
            "sweep",
            "0,0.25,0.5,0.75,1",
            "etas also generated for the strip, comma-separated ('' for none): the paper's trade-off curve",
            type=str,
            metavar="ETAS",
        ),
    ),
    run=_edit,
)
