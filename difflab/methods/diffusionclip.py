"""DiffusionCLIP: Text-Guided Diffusion Models for Robust Image Manipulation.
Kim, Kwon, Ye 2022, https://arxiv.org/abs/2110.02711 (official code: gwang-kim/DiffusionCLIP).

The model itself is fine-tuned so that its deterministic DDIM chain turns images of the source
domain into the target text's:

    x_t0 = DDIM-inversion of x0 to t0 with the original model (s_inv steps, the paper's 40)
    x0_hat = DDIM generation from x_t0 with the model being tuned (s_gen steps, the paper's 6;
             the gradient flows through the whole chain)
    L = lambda_clip L_direction(x0_hat, y_tgt; x0, y_ref) + lambda_L1 |x0_hat - x0|
    L_direction = 1 - cos(E_I(x0_hat) - E_I(x0), E_T(y_tgt) - E_T(y_ref))

Editing (also of images the model was not tuned on): invert with the original model, generate
with the tuned one (s_test steps, the paper's 40). Several tuned models edit at once by mixing their
noise predictions, eps = sum_i w_i eps_i (`mix_denoisers`; the paper's multi-attribute transfer).

Notation (paper -> difflab):
    t0                 -> `strength`, the papers' diffusion time (`Schedule.sigma_at_time`); 0.5 = t0 500 of 1000
    s_inv, s_gen, s_test -> `inv_steps`, `train_steps`, `test_steps` (grids from t0 by `core.sampling.edit_sigmas`)
    lambda_clip, lambda_L1 -> `clip_weight` (official default 3), `l1_weight`
    E_I, E_T           -> an image-text model (`clip`: difflab's SmallCLIP or a transformers CLIP)
    epsilon_theta      -> the denoiser under a fixed cond: the paper's models are unconditional; on a
                          text-to-image model `difflab edit diffusionclip` conditions it on --source-prompt
                          (what the input shows), whose DDIM inversion reconstructs far better than the
                          empty prompt's (shapes-text-unet, t0 0.5, 40 steps: MSE 1e-5 against 0.02)

Usage::

    tuned, losses = diffusionclip_finetune(denoiser, images, clip, "a red circle", "a blue circle")
    out = diffusionclip_edit(denoiser, tuned, image, strength=0.5)
    both = diffusionclip_edit(denoiser, mix_denoisers([tuned_a, tuned_b], [0.5, 0.5]), image)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.core.sampling import edit_sigmas, invert_euler, progress_range, sample
from difflab.core.validation import check_finite_tensor, check_number
from difflab.methods.imagic import finish_tuning, trainable_copy

__all__ = [
    "directional_clip_loss",
    "ddim_grid",
    "ddim_invert",
    "ddim_generate",
    "diffusionclip_finetune",
    "diffusionclip_edit",
    "mix_denoisers",
    "EDIT",
]


def directional_clip_loss(
    clip,
    images: Tensor,
    ref_images: Tensor,
    target_text: Tensor,
    ref_text: Tensor,
    n_aug: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """1 - cos(E_I(images) - E_I(ref_images), E_T(target) - E_T(ref)) per image (B,); the text
    embeddings are (1, d) (or (B, d) without n_aug) from `clip.encode_text`. With n_aug > 0 it is averaged over
    n_aug random crops (`blended.augment`), each cut the same for an image and its reference: a
    direction that holds in every crop, not a texture one view of the image-text model reads as the
    target (Blended Diffusion's defence against adversarial gradients, not in DiffusionCLIP's paper)."""
    if not n_aug:
        d_img = clip.encode_image(images) - clip.encode_image(ref_images)
        d_txt = (target_text - ref_text).expand_as(d_img)
        return 1 - F.cosine_similarity(d_img, d_txt, dim=-1)
    from difflab.methods.blended import augment

    B = images.shape[0]
    both = augment(torch.cat([images, ref_images]), n_aug, generator).reshape(n_aug, 2 * B, *images.shape[1:])
    d_img = clip.encode_image(both[:, :B].flatten(0, 1)) - clip.encode_image(both[:, B:].flatten(0, 1))
    d_txt = (target_text - ref_text).expand_as(d_img)
    return (1 - F.cosine_similarity(d_img, d_txt, dim=-1)).reshape(n_aug, B).mean(0)


def check_direction_inputs(method: str, images: Tensor, source_text: str, target_text: str) -> None:
    """One-line errors for a method trained along an image-text direction: images (N, C, H, W), finite,
    and both ends of the direction given."""
    if images.ndim != 4 or len(images) < 1:
        raise ValueError(f"{method} needs images (N, C, H, W), got shape {tuple(images.shape)}")
    check_finite_tensor("the images", images)
    if not source_text.strip() or not target_text.strip():
        raise ValueError(f"{method} needs a source text and a target text (the direction's two ends)")


def ddim_grid(schedule, t0: float, steps: int) -> Tensor:
    """The decreasing sigma grid from the papers' t0 down to 0 in (about) `steps` steps."""
    t0 = check_number("strength (t0)", t0, lo=0.0, hi=1.0, lo_open=True)
    return edit_sigmas(schedule, t0, max(1, round(steps / t0)))


def ddim_invert(denoiser, x0: Tensor, grid: Tensor, cond: dict | None = None) -> Tensor:
    """Deterministic DDIM inversion of x0 up the reversed `grid` (to its first sigma)."""
    with torch.no_grad():
        return invert_euler(denoiser, x0, grid.flip(0), cond=cond)


def ddim_generate(denoiser, x: Tensor, grid: Tensor, cond: dict | None = None) -> Tensor:
    """DDIM (eta 0) from x at grid[0] down the grid, differentiable: x <- x0_hat + (s'/s)(x - x0_hat)."""
    cond = cond or {}
    for i in range(len(grid) - 1):
        s, s_next = float(grid[i]), float(grid[i + 1])
        x0_hat = denoiser(x, torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device), **cond)
        x = x0_hat + (s_next / s) * (x - x0_hat)
    return x


class _Mix(torch.nn.Module):
    def __init__(self, models, weights):
        super().__init__()
        self.models = torch.nn.ModuleList(models)
        self.weights = [float(w) for w in weights]
        self.schedule = models[0].schedule

    def forward(self, x, sigma, **cond):
        # x0_hat is affine in eps_hat at a fixed (x, sigma), so mixing x0 predictions with weights
        # summing to 1 is the paper's sum_i w_i eps_i
        return sum(w * m(x, sigma, **cond) for w, m in zip(self.weights, self.models))


def mix_denoisers(models: list, weights: list[float]):
    """The paper's multi-attribute transfer: one denoiser whose noise prediction is sum_i w_i eps_i
    (the weights must sum to 1)."""
    if len(models) != len(weights) or not models:
        raise ValueError(f"mix_denoisers needs one weight per model, got {len(models)} models, {len(weights)} weights")
    if abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"mix_denoisers weights must sum to 1, got {list(weights)} (sum {sum(weights):g})")
    return _Mix(models, weights)


def diffusionclip_finetune(
    denoiser,
    images: Tensor,
    clip,
    source_text: str,
    target_text: str,
    *,
    strength: float = 0.5,
    inv_steps: int = 40,
    train_steps: int = 6,
    iterations: int = 30,
    lr: float = 1e-4,
    clip_weight: float = 3.0,
    l1_weight: float = 1.0,
    cond: dict | None = None,
    decode=None,
    lora_rank: int = 0,
    n_aug: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[object, list[float]]:
    """A copy of `denoiser` fine-tuned on `images` (N, C, H, W) (latents with `decode` for a latent
    model) so that its `train_steps`-step DDIM chain from their inversions at t0 follows source_text ->
    target_text. `iterations` passes over the images (one Adam step per image). Returns (the tuned
    copy in eval mode with gradients off, the loss of every step)."""
    check_direction_inputs("DiffusionCLIP", images, source_text, target_text)
    cond = cond or {}
    inv_grid = ddim_grid(denoiser.schedule, strength, inv_steps)
    train_grid = ddim_grid(denoiser.schedule, strength, train_steps)
    with torch.no_grad():
        latents = torch.cat([ddim_invert(denoiser, x[None], inv_grid, cond) for x in images])
        pixels = images if decode is None else decode(images)
        t_ref, t_tgt = clip.encode_text([source_text]).detach(), clip.encode_text([target_text]).detach()
    tuned, params = trainable_copy(denoiser, lora_rank)
    aug_g = generator or torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in progress_range(iterations, progress, "diffusionclip: fine-tune"):
            for i in range(len(images)):
                opt.zero_grad(set_to_none=True)
                x0_hat = ddim_generate(tuned, latents[i : i + 1], train_grid, cond)
                out = x0_hat if decode is None else decode(x0_hat)
                loss = directional_clip_loss(clip, out, pixels[i : i + 1], t_tgt, t_ref, n_aug, aug_g).mean()
                loss = clip_weight * loss
                loss = loss + l1_weight * (x0_hat - images[i : i + 1]).abs().mean()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finish_tuning(tuned, params, lr, "DiffusionCLIP fine-tuning")
    return tuned.eval(), losses


def diffusionclip_edit(
    original,
    tuned,
    image: Tensor,
    *,
    strength: float = 0.5,
    inv_steps: int = 40,
    test_steps: int = 40,
    cond: dict | None = None,
) -> Tensor:
    """Invert `image` to t0 with the original model, generate with the tuned one (or a `mix_denoisers`)."""
    x_t = ddim_invert(original, image, ddim_grid(original.schedule, strength, inv_steps), cond)
    with torch.no_grad():
        return sample(tuned, x_t, ddim_grid(original.schedule, strength, test_steps), method="ddim", cond=cond)


def _edit(
    ctx: EditContext,
    *,
    strength: float,
    inv_steps: int,
    train_steps: int,
    test_steps: int,
    iterations: int,
    lr: float,
    clip_weight: float,
    l1_weight: float,
    lora_rank: int,
    n_aug: int,
) -> Tensor:
    decode = ctx.clip_decoder("diffusionclip")
    if ctx.prompts.conditioning == "text":  # the model conditioned on what the input shows: its DDIM
        cond = ctx.cond(ctx.source_prompt, "--source-prompt")  # inversion is near-exact (0.02 -> 1e-5 MSE)
    else:  # a class or unconditional model: the unconditional one, as the paper's
        cond = ctx.prompts.null_cond("diffusionclip fine-tunes the unconditional model")
    tuned, losses = diffusionclip_finetune(
        ctx.denoiser,
        ctx.image,
        ctx.clip,
        ctx.source_prompt,
        ctx.prompt,
        strength=strength,
        inv_steps=inv_steps,
        train_steps=train_steps,
        iterations=iterations,
        lr=lr,
        clip_weight=clip_weight,
        l1_weight=l1_weight,
        cond=cond,
        decode=decode,
        lora_rank=lora_rank,
        n_aug=n_aug,
        generator=torch.Generator().manual_seed(ctx.seed),
        progress=ctx.progress,
    )
    recon = diffusionclip_edit(
        ctx.denoiser, ctx.denoiser, ctx.image, strength=strength, inv_steps=inv_steps, test_steps=test_steps, cond=cond
    )
    out = diffusionclip_edit(
        ctx.denoiser, tuned, ctx.image, strength=strength, inv_steps=inv_steps, test_steps=test_steps, cond=cond
    )
    ctx.output_tiles = [("reconstruction (original model)", recon), ("output", out)]
    ctx.info.update(loss_start=losses[0] if losses else None, loss_end=losses[-1] if losses else None)
    return out


EDIT = EditMethod(
    "diffusionclip",
    "DiffusionCLIP (Kim, Kwon, Ye 2022, arXiv 2110.02711)",
    "Fine-tune a copy of the model so that its DDIM chain from the input's inversion at t0 moves "
    "--source-prompt -> --prompt for the image-text model, then invert and regenerate with it.",
    mask=None,
    mask_keeps=None,
    prompt="text",
    source_prompt="required",
    sampler=None,
    knobs=(
        Knob(
            "strength",
            0.5,
            "t0: the papers' diffusion time the input is DDIM-inverted to (paper: t0 = 500 of 1000)",
            metavar="T0",
            lo=0.0,
            hi=1.0,
            lo_open=True,
        ),
        Knob("inv_steps", 40, "DDIM inversion steps to t0 (paper: 40)", type=int, lo=1),
        Knob("train_steps", 6, "DDIM steps of the chain the loss backpropagates through (paper: 6)", type=int, lo=1),
        Knob("test_steps", 40, "DDIM steps of the edit (paper: 40)", type=int, lo=1),
        Knob("iterations", 30, "fine-tuning steps on the image", type=int, lo=0),
        Knob(
            "lr",
            1e-4,
            "fine-tuning learning rate (official: 8e-6 on 256 x 256 models; pass a smaller one for a large model)",
            metavar="LR",
            lo=0.0,
            lo_open=True,
        ),
        Knob("clip_weight", 3.0, "lambda_clip of the directional loss (official: 3)", lo=0.0),
        Knob("l1_weight", 1.0, "lambda_L1 of the identity loss |x0_hat - x0|", lo=0.0),
        Knob("lora_rank", 0, "train LoRA adapters of this rank instead of every weight (0: all)", type=int, lo=0),
        Knob(
            "n_aug",
            0,
            "average the directional loss over this many paired random crops (0: the paper's loss; a small "
            "image-text model is fooled by textures without them)",
            type=int,
            lo=0,
        ),
    ),
    run=_edit,
)
