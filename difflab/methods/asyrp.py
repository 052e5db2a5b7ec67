"""Asyrp: Diffusion Models already have a Semantic Latent Space.
Kwon, Jeong, Uh 2023, https://arxiv.org/abs/2210.10960 (official code: kwonminki/Asyrp_official).

The frozen model's bottleneck (h-space: the output of the UNet's middle block) carries semantics: a
small network f_t learns a shift delta_h = f_t(h_t) such that the asymmetric reverse process

    x_{t-1} = sqrt(a_{t-1}) P_t(eps(x_t | h_t + delta_h)) + sqrt(1 - a_{t-1}) D_t(eps(x_t | h_t))

(only the x0 prediction P_t sees the shifted h; the direction D_t keeps the original) turns images
toward a target text. In difflab's coordinates (x = x0 + sigma n) a DDIM step is
x' = x0_hat + sigma' eps_hat, so the asymmetric step is x' = x0_hat(shifted) + sigma' eps_hat(original).

    training: invert images to x_T (DDIM, the original model); for each step of the editing interval
              [T, t_edit]: L = lambda_clip L_direction(P_t^edit, y_tgt; P_t^orig, y_src)
              + lambda_recon |P_t^edit - P_t^orig|, one Adam step of f_t, then the asymmetric step
    editing:  asymmetric steps on [T, t_edit] with delta_h scaled by `scale` (the paper's linearity),
              plain DDIM on [t_edit, t_boost], stochastic DDPM steps below t_boost (quality boosting)

One f_t edits every image (it is not tuned per image), and the model is never changed.

Notation (paper -> difflab):
    h-space          -> `h_module(net)`: difflab's `UNet.mid`, a diffusers UNet's `mid_block`
    f_t              -> `DeltaH` (1x1 convolutions with a noise-level embedding; zero at init)
    t_edit, t_boost  -> `edit_t`, `boost_t`: the papers' diffusion times (`Schedule.sigma_at_time`)
    L_direction      -> `diffusionclip.directional_clip_loss`

Usage::

    f, losses = asyrp_train(denoiser, images, clip, "a red circle", "a green circle")
    x_T = asyrp_invert(denoiser, image, steps=40)
    out = asyrp_sample(denoiser, x_T, f, steps=40, scale=1.0)          # scale 0: the plain reconstruction
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.core.sampling import ancestral_step, progress_range
from difflab.core.validation import check_number
from difflab.methods.diffusionclip import check_direction_inputs, ddim_grid, ddim_invert, directional_clip_loss

__all__ = ["DeltaH", "h_module", "shifted_h", "asyrp_invert", "asyrp_sample", "asyrp_train", "EDIT"]


def h_module(net: nn.Module) -> nn.Module:
    """The module whose output is the h-space: difflab's UNet.mid, a (wrapped) diffusers UNet's mid_block."""
    if hasattr(net, "mid") and isinstance(net.mid, nn.Module):
        return net.mid
    inner = getattr(net, "unet", net)
    if getattr(inner, "mid_block", None) is not None:
        return inner.mid_block
    raise ValueError(
        f"{type(net).__name__} has no UNet bottleneck (h-space): Asyrp needs a UNet (difflab's or a diffusers one), "
        "not a transformer"
    )


class DeltaH(nn.Module):
    """f_t: delta_h = conv1x1(SiLU(GroupNorm(conv1x1(h)) + emb(sigma))), zero at init."""

    def __init__(self, channels: int, hidden: int | None = None, emb_dim: int = 64):
        super().__init__()
        hidden = hidden or channels
        self.channels = channels
        self.emb_dim = emb_dim
        self.inp = nn.Conv2d(channels, hidden, 1)
        self.norm = nn.GroupNorm(min(32, hidden) if hidden % min(32, hidden) == 0 else 1, hidden)
        self.emb = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.out = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _embed(self, sigma: Tensor) -> Tensor:
        c = torch.log(sigma.float().clamp(min=1e-6)) / 4  # (B,)
        half = self.emb_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=c.device) / half)
        args = c[:, None] * freqs[None] * 100
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)

    def forward(self, h: Tensor, sigma: Tensor) -> Tensor:
        if h.shape[1] != self.channels:
            raise ValueError(f"DeltaH was built for {self.channels} h-space channels, got {h.shape[1]}")
        e = self.emb(self._embed(sigma.to(h.device)).to(h.dtype))
        return self.out(F.silu(self.norm(self.inp(h)) + e[:, :, None, None]))


@contextlib.contextmanager
def shifted_h(net: nn.Module, delta: DeltaH, sigma: Tensor, scale: float = 1.0):
    """Within the block, every forward of `net` has its h-space shifted by scale * delta(h, sigma)."""
    module = h_module(net)

    def hook(_module, _args, h):
        return h + scale * delta(h, sigma.expand(h.shape[0])).to(h.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _sigma(x: Tensor, s: float) -> Tensor:
    return torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)


def _interval(schedule, edit_t: float, boost_t: float) -> tuple[float, float]:
    edit_t = check_number("asyrp edit_t", edit_t, lo=0.0, hi=1.0)
    boost_t = check_number("asyrp boost_t", boost_t, lo=0.0, hi=1.0)
    if boost_t > edit_t:
        raise ValueError(f"asyrp boost_t ({boost_t}) must not exceed edit_t ({edit_t}): boosting follows the edit")
    edit_sigma = float(schedule.sigma_at_time(edit_t)) if edit_t > 0 else 0.0
    boost_sigma = float(schedule.sigma_at_time(boost_t)) if boost_t > 0 else 0.0
    return edit_sigma, boost_sigma


def asyrp_invert(denoiser, image: Tensor, *, steps: int = 40, cond: dict | None = None) -> Tensor:
    """x_T of `image` by deterministic DDIM inversion with the original model over the whole grid."""
    return ddim_invert(denoiser, image, ddim_grid(denoiser.schedule, 1.0, steps), cond)


def asyrp_sample(
    denoiser,
    x_T: Tensor,
    delta: DeltaH | None,
    *,
    steps: int = 40,
    scale: float = 1.0,
    edit_t: float = 0.5,
    boost_t: float = 0.0,
    cond: dict | None = None,
    noise: torch.Generator | None = None,
    asymmetric: bool = True,
    progress: bool = False,
) -> Tensor:
    """The reverse process from x_T on the whole `steps`-step DDIM grid: asymmetric steps with
    scale * delta_h while sigma >= sigma(edit_t), DDIM (eta 0) below, stochastic DDPM steps (eta 1)
    below sigma(boost_t). `asymmetric=False` shifts h in both terms (the paper's ablation)."""
    cond = cond or {}
    grid = ddim_grid(denoiser.schedule, 1.0, steps)
    edit_sigma, boost_sigma = _interval(denoiser.schedule, edit_t, boost_t)
    g = noise or torch.Generator().manual_seed(0)
    x = x_T
    with torch.no_grad():
        for i in progress_range(len(grid) - 1, progress, "asyrp"):
            s, s_next = float(grid[i]), float(grid[i + 1])
            sig = _sigma(x, s)
            x0_orig = denoiser(x, sig, **cond)
            x0 = x0_orig
            if delta is not None and scale != 0 and s >= edit_sigma:
                with shifted_h(denoiser.net, delta, sig, scale):
                    x0 = denoiser(x, sig, **cond)
            direction = x - (x0_orig if asymmetric else x0)  # sigma * eps_hat: D_t's term
            down, up = ancestral_step(s, s_next, 1.0 if s < boost_sigma else 0.0)  # boosting: DDPM's step
            x = x0 + (down / s) * direction  # = core's euler_step when nothing is shifted
            if up > 0:
                x = x + up * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    return x


def asyrp_train(
    denoiser,
    images: Tensor,
    clip,
    source_text: str,
    target_text: str,
    *,
    steps: int = 40,
    edit_t: float = 0.5,
    iterations: int = 5,
    lr: float = 3e-2,
    clip_weight: float = 1.0,
    recon_weight: float = 1.0,
    cond: dict | None = None,
    decode=None,
    n_aug: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[DeltaH, list[float]]:
    """f_t trained on `images` (N, C, H, W) with the model frozen: `iterations` passes, each image
    inverted to x_T and taken down the editing interval with one Adam step per timestep."""
    check_direction_inputs("Asyrp", images, source_text, target_text)
    cond = cond or {}
    net = denoiser.net
    module = h_module(net)
    probe = {}
    handle = module.register_forward_hook(lambda m, a, h: probe.setdefault("h", h))
    with torch.no_grad():
        denoiser(images[:1], _sigma(images[:1], 1.0), **cond)
    handle.remove()
    delta = DeltaH(probe["h"].shape[1]).to(images.device)
    opt = torch.optim.Adam(delta.parameters(), lr=lr)
    grid = ddim_grid(denoiser.schedule, 1.0, steps)
    edit_sigma, _ = _interval(denoiser.schedule, edit_t, 0.0)
    with torch.no_grad():
        x_Ts = torch.cat([asyrp_invert(denoiser, x[None], steps=steps, cond=cond) for x in images])
        t_ref, t_tgt = clip.encode_text([source_text]).detach(), clip.encode_text([target_text]).detach()
    losses = []
    aug_g = generator or torch.Generator().manual_seed(0)
    frozen = [p.requires_grad for p in denoiser.parameters()]
    denoiser.requires_grad_(False)
    try:
        for _ in progress_range(iterations, progress, "asyrp: train f_t"):
            for n in range(len(images)):
                x = x_Ts[n : n + 1]
                for i in range(len(grid) - 1):
                    s, s_next = float(grid[i]), float(grid[i + 1])
                    if s < edit_sigma:
                        break
                    sig = _sigma(x, s)
                    with torch.no_grad():
                        x0_orig = denoiser(x, sig, **cond)
                    with torch.enable_grad():
                        opt.zero_grad(set_to_none=True)
                        with shifted_h(net, delta, sig):
                            x0_edit = denoiser(x, sig, **cond)
                        a = x0_edit if decode is None else decode(x0_edit)
                        b = x0_orig if decode is None else decode(x0_orig)
                        loss = clip_weight * directional_clip_loss(clip, a, b, t_tgt, t_ref, n_aug, aug_g).mean()
                        loss = loss + recon_weight * (x0_edit - x0_orig).abs().mean()
                        loss.backward()
                        opt.step()
                    losses.append(float(loss.detach()))
                    x = (x0_edit.detach() + s_next * (x - x0_orig) / s).detach()  # the asymmetric step
    finally:
        for p, r in zip(denoiser.parameters(), frozen):
            p.requires_grad_(r)
    return delta.eval().requires_grad_(False), losses


def _edit(
    ctx: EditContext,
    *,
    edit_t: float,
    boost_t: float,
    iterations: int,
    lr: float,
    clip_weight: float,
    recon_weight: float,
    scale: float,
    model_prompt: str | None,
    n_aug: int,
) -> Tensor:
    steps = len(ctx.sigmas) - 1  # --steps: the DDIM steps of the inversion and the reverse process (paper: 40)
    decode = ctx.clip_decoder("asyrp")
    if model_prompt:  # the model conditioned on a neutral text: not --source-prompt, whose words (a colour, say)
        cond = ctx.cond(model_prompt, "--model-prompt")  # would pull every step back to the source
    else:  # the paper's unconditional model
        cond = ctx.prompts.null_cond("asyrp edits with the unconditional model (or give --model-prompt)")
    delta, losses = asyrp_train(
        ctx.denoiser,
        ctx.image,
        ctx.clip,
        ctx.source_prompt,
        ctx.prompt,
        steps=steps,
        edit_t=edit_t,
        iterations=iterations,
        lr=lr,
        clip_weight=clip_weight,
        recon_weight=recon_weight,
        cond=cond,
        decode=decode,
        n_aug=n_aug,
        generator=torch.Generator().manual_seed(ctx.seed),
        progress=ctx.progress,
    )
    x_T = asyrp_invert(ctx.denoiser, ctx.image, steps=steps, cond=cond)
    run = lambda k: asyrp_sample(  # noqa: E731
        ctx.denoiser, x_T, delta, steps=steps, scale=k, edit_t=edit_t, boost_t=boost_t, cond=cond, noise=ctx.generator
    )
    ctx.output_tiles = [("reconstruction (scale 0)", run(0.0)), (f"output (scale {scale:g})", out := run(scale))]
    ctx.info.update(loss_start=losses[0] if losses else None, loss_end=losses[-1] if losses else None)
    return out


EDIT = EditMethod(
    "asyrp",
    "Asyrp (Kwon, Jeong, Uh 2023, arXiv 2210.10960)",
    "Learn a shift of the frozen UNet's bottleneck (h-space) that moves --source-prompt -> --prompt for the "
    "image-text model, then regenerate the input's DDIM inversion with only the x0 prediction shifted.",
    mask=None,
    mask_keeps=None,
    prompt="text",
    source_prompt="required",
    sampler=None,
    knobs=(
        Knob(
            "edit_t",
            0.5,
            "the papers' diffusion time where the edit interval [T, t_edit] ends (the paper picks it by LPIPS)",
            metavar="T",
            lo=0.0,
            hi=1.0,
        ),
        Knob(
            "boost_t",
            0.0,
            "stochastic (DDPM) steps below this diffusion time: quality boosting (0: off)",
            metavar="T",
            lo=0.0,
            hi=1.0,
        ),
        Knob("iterations", 5, "training passes over the image (one Adam step of f_t per timestep)", type=int, lo=0),
        Knob(
            "lr",
            3e-2,
            "learning rate of f_t (Adam; papers/asyrp's pilot: 1e-3 and 3e-3 left the colour unchanged)",
            metavar="LR",
            lo=0.0,
            lo_open=True,
        ),
        Knob("clip_weight", 1.0, "lambda_clip of the directional loss", lo=0.0),
        Knob("recon_weight", 1.0, "lambda_recon of |P_t^edit - P_t^orig|", lo=0.0),
        Knob("scale", 1.0, "delta_h is multiplied by this at editing (the paper's linearity: 0 = no edit)"),
        Knob(
            "model_prompt",
            None,
            "the text a text-to-image model is conditioned on while it inverts and edits (default: the unconditional "
            "model, as the paper's); a neutral one such as 'a circle' inverts better, --source-prompt's colour would "
            "hold the edit back",
            type=str,
            metavar="TEXT",
        ),
        Knob(
            "n_aug",
            0,
            "average the directional loss over this many paired random crops (0: the paper's loss)",
            type=int,
            lo=0,
        ),
    ),
    run=_edit,
)
