"""`difflab edit METHOD`: editing of one image with a trained run folder, training-free (SDEdit ... Prompt-to-Prompt)
or by optimisation on that image (Imagic, UniTune, DiffusionCLIP, Asyrp: the run itself is never changed).

| METHOD   | paper (difflab/methods/)                         | needs                               |
|----------|--------------------------------------------------|-------------------------------------|
| sdedit   | SDEdit, Meng et al. 2022 (sdedit.py)             | --strength t0; optional --mask      |
| ilvr     | ILVR, Choi et al. 2021 (ilvr.py)                 | --factor N, --stop                  |
| repaint  | RePaint, Lugmayr et al. 2022 (repaint.py)        | --mask; --jump-length j, --jump-n-sample r |
| blended  | Blended Diffusion, Avrahami et al. 2022 (blended.py) | --mask, --prompt TEXT, --clip FOLDER |
| diffedit | DiffEdit, Couairon et al. 2023 (diffedit.py)     | --prompt, --source-prompt           |
| p2p      | Prompt-to-Prompt, Hertz et al. 2022 (p2p.py)     | --prompt, --source-prompt           |

Masks are black-and-white images of the input's size. Which colour keeps the input is each
paper's own convention, printed on every run: RePaint's mask marks the known pixels (white =
keep, black = repaint); SDEdit's, Blended Diffusion's and DiffEdit's mark the region to edit
(white = edit, black = keep). `--invert-mask` flips a mask drawn the other way.

Prompts go to the run's own conditioning: text for a text-conditional run (through its text
encoder and the network's cross-attention), a class name ("Trouser", "3") or index for a
class-conditional one; the empty prompt "" is the unconditional model (the empty caption, or the
null class of a run trained with label dropout). Blended Diffusion's prompt is text for its
image-text model (`--clip`: a folder written by `save_clip`, or a `transformers` CLIP folder) and
guides the unconditional model. Prompt-to-Prompt edits a real image by DDIM-inverting it under the
source prompt, then regenerating [source, edit] from the inverted latent with the source's
attention injected (on a class-conditional model, which has no cross-attention: self-attention
only; refine and reweight need a text model's tokens). A latent-diffusion run (difflab's own, or a
diffusers Stable Diffusion folder) edits the image's latents: the mask is pooled to the latent grid
(a kept latent pixel covers only kept pixels), the result is decoded, and the pixels the mask keeps
are pasted back exactly; Blended Diffusion scores the decoded latent composite with the image-text model,
its gradient flowing back through the decoder.

Strengths are the papers' diffusion times: SDEdit's t0, Blended Diffusion's skipped fraction,
DiffEdit's encoding ratio and mask noise, Prompt-to-Prompt's inversion depth, ILVR's t_stop. An
edit at t0 starts from the noise level of diffusion time t0 on the model's schedule
(`Schedule.sigma_at_time`: DDPM's timestep t0 T, the SDEs' t = t0, and for an EDM model the papers'
VP SDE, where t0 = 0.5 is sigma 3.4), whatever --steps and the sampler, and runs round(t0 * steps)
steps from there (`core.sampling.edit_sigmas`); result.info records sigma_t0 and edit_steps.

Writes OUT (the edited image alone, at the model's resolution) and a strip
(input | mask | output, captioned) beside it.

Library use::

    pipe = Pipeline.from_pretrained("runs/digits")
    result = edit(pipe, "repaint", image, mask=keep, steps=50, seed=0)   # image (1, C, H, W) in [-1, 1]
    result.output, result.tiles
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.core.validation import (
    POS_INT,
    SEED,
    add_device_arguments,
    add_memory_argument,
    check_finite_tensor,
    check_output_file,
    number_arg,
)
from difflab.methods.editing import EDIT_METHODS, edit_method

__all__ = [
    "METHODS",
    "EditResult",
    "edit",
    "load_edit_image",
    "load_edit_mask",
    "save_clip",
    "load_clip",
    "add_edit_parser",
]

METHODS = EDIT_METHODS  # name -> EditMethod (difflab.methods.editing): each method's knobs and defaults


# --------------------------------------------------------------------------------------------
# Files in
# --------------------------------------------------------------------------------------------

_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _file(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file")
    return path


def _size_and_channels(path: Path, what: str) -> tuple[int, int, int]:
    """(width, height, channels) of an image file: 1 for grey modes, 3 for colour ones."""
    from difflab.data.images import image_header

    w, h, mode = image_header(path)
    return w, h, 1 if mode in _GREY_MODES else 3


def load_edit_image(path, channels: int, size: int, *, resize: bool = False) -> Tensor:
    """The input image as (1, channels, size, size) in [-1, 1]; it must already have the model's
    size and channel count unless `resize` (shorter side + centre crop, grey <-> RGB)."""
    from difflab.data import load_image

    path = _file(path, "image")
    w, h, c = _size_and_channels(path, "image")
    if not resize:
        if (w, h) != (size, size):
            raise ValueError(
                f"image {path} is {w}x{h}; the model takes {size}x{size} images "
                "(pass --resize to resize and centre-crop)"
            )
        if c != channels:
            kinds = {1: "grey", 3: "RGB"}
            raise ValueError(
                f"image {path} has {c} channel(s) ({kinds[c]}); the model takes {channels} "
                f"({kinds.get(channels, channels)}) (pass --resize to convert)"
            )
    return load_image(path, size if resize else None, channels=channels)[None]  # (1, C, H, W)


def load_edit_mask(path, size: int, *, resize: bool = False) -> Tensor:
    """A black-and-white mask file as (1, 1, size, size) in {0, 1} (1 = white).

    Every pixel must be near-black (< 32) or near-white (> 223) in grey; the file must have the
    image's size unless `resize` (applied after the check, then thresholded at 128)."""
    from difflab.data import load_image, load_mask

    path = _file(path, "mask")
    w, h, _ = _size_and_channels(path, "mask")
    if not resize and (w, h) != (size, size):
        raise ValueError(f"mask {path} is {w}x{h}; the image is {size}x{size} (masks must have the image's size)")
    grey = (load_image(path, None, channels=1)[0] + 1) * 127.5  # (H, W) grey values 0..255
    bad = (grey >= 32) & (grey <= 223)
    if bad.any():
        r, c = bad.nonzero()[0].tolist()
        raise ValueError(
            f"mask {path} is not binary: pixel (row {r}, col {c}) has grey value "
            f"{round(grey[r, c].item())}; use black (0) and white (255) only"
        )
    return load_mask(path, size if resize else None)[None]  # (1, 1, H, W)


def save_clip(model, folder) -> Path:
    """Write a SmallCLIP folder for `difflab edit blended --clip` (`difflab.train.clip.save_clip`:
    config.json + model.safetensors, the format `difflab train-clip` writes)."""
    from difflab.train.clip import save_clip as _save

    return _save(model, folder)


def load_clip(folder):
    """An image-text model from a folder: a SmallCLIP folder (`difflab train-clip`, `save_clip`;
    its clean towers, the ones Blended Diffusion scores x0 estimates with) or a transformers CLIP."""
    from difflab.nn.clip import HFCLIPWrapper
    from difflab.runfolder import read_json
    from difflab.train.clip import load_clip as _load

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--clip folder not found: {folder}")
    config = read_json(folder / "config.json")
    if config.get("model_type") == "clip":
        return HFCLIPWrapper(str(folder))
    if config.get("kind") == "clip" or config.get("arch") == "small_clip":
        return _load(folder)
    raise ValueError(
        f"{folder} holds neither a difflab SmallCLIP (`difflab train-clip`) nor a "
        "transformers CLIP (config.json 'model_type': 'clip')"
    )


# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# The edit
# --------------------------------------------------------------------------------------------


@dataclass
class EditResult:
    """output (1, C, H, W) in [-1, 1]; tiles: the strip, (caption, (1, C, H, W)) from input to output."""

    output: Tensor
    tiles: list[tuple[str, Tensor]]
    info: dict = field(default_factory=dict)


def _check_inputs(pipe, spec: EditMethod, image: Tensor, mask: Tensor | None) -> None:
    C, H, W = pipe.image_shape()
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"edit takes one image (1, C, H, W), got shape {tuple(image.shape)}")
    if tuple(image.shape[1:]) != (C, H, W):
        raise ValueError(
            f"image of shape {tuple(image.shape[1:])} does not fit the model, which takes "
            f"{(C, H, W)} (channels, height, width)"
        )
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN/inf values")
    if spec.mask is None and mask is not None:
        raise ValueError(f"{spec.name} takes no mask")
    if spec.mask == "required" and mask is None:
        raise ValueError(f"{spec.name} needs a mask ({spec.mask_convention()})")
    if mask is not None:
        if tuple(mask.shape) != (1, 1, H, W):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit the image: need (1, 1, {H}, {W})")
        if not torch.all((mask == 0) | (mask == 1)):
            bad = mask[(mask != 0) & (mask != 1)][0].item()
            raise ValueError(f"mask must be binary (0/1); found value {bad}")


def _as_tile(mask: Tensor, like: Tensor) -> Tensor:
    """A {0, 1} mask (1, 1, H, W) as a black-and-white tile with `like`'s channels, in [-1, 1]."""
    return (mask * 2 - 1).expand(-1, like.shape[1], -1, -1)


def _pool_mask(mask: Tensor, size: int, keep_white: bool) -> Tensor:
    """A pixel mask (1, 1, H, W) on a latent grid of size x size: a white = keep mask keeps a latent
    pixel only where all its pixels are kept (min pool); a white = edit mask edits it where any is."""
    if mask.shape[-1] == size:
        return mask
    k = mask.shape[-1] // size
    if keep_white:
        return -torch.nn.functional.max_pool2d(-mask, k)
    return torch.nn.functional.max_pool2d(mask, k)


def _to_pixels(caption: str, tile: Tensor, space, image: Tensor) -> Tensor:
    """A tile of a latent edit shown as pixels: masks upsampled (nearest), latents decoded."""
    if tile.shape[-1] == image.shape[-1]:
        return tile
    if caption.startswith("mask"):
        up = torch.nn.functional.interpolate(tile[:, :1], size=image.shape[-2:], mode="nearest")
        return up.expand(-1, image.shape[1], -1, -1)
    return space.decode(tile).clamp(-1, 1)


def _check_prompts(spec: EditMethod, prompt: str | None, source_prompt: str | None) -> None:
    if spec.prompt in ("text", "required") and (prompt is None or not prompt.strip()):
        wanted = "text for the image-text model" if spec.prompt == "text" else "the edit"
        raise ValueError(f"{spec.name} needs --prompt ({wanted})")
    if spec.source_prompt == "required" and source_prompt is None:
        raise ValueError(f"{spec.name} needs --source-prompt (what the input shows)")
    if spec.prompt == "none" and prompt is not None:
        raise ValueError(f"{spec.name} takes no prompt")
    if spec.source_prompt == "none" and source_prompt is not None:
        raise ValueError(f"{spec.name} takes no --source-prompt")


def edit(
    pipe,
    method: str,
    image: Tensor,
    *,
    mask: Tensor | None = None,
    prompt: str | None = None,
    source_prompt: str | None = None,
    clip=None,
    seed: int = 0,
    sampler: str | None = None,
    steps: int = 20,
    progress: bool = False,
    **knobs,
) -> EditResult:
    """Edit one image (1, C, H, W) in [-1, 1] with `method` on the run `pipe` (a `Pipeline`).

    `mask` (1, 1, H, W) in {0, 1} follows the method's convention (`METHODS[method].mask_convention()`);
    `knobs` are the method's parameters (`METHODS[method].knobs`, defaults where not given)."""
    from difflab.core.sampling import SAMPLERS

    spec = edit_method(method)
    k = spec.knob_values(knobs)
    _check_inputs(pipe, spec, image, mask)
    if sampler is not None:
        if spec.sampler is None:
            raise ValueError(f"{method} runs its own sampler; --sampler does not apply")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    _check_prompts(spec, prompt, source_prompt)

    D = pipe.denoiser
    device = next(D.parameters()).device
    image = image.to(device)
    mask = mask.to(device) if mask is not None else None
    space = getattr(pipe, "latent_space", None)
    # a latent-diffusion model edits the image's latents with the mask pooled to the latent grid (a
    # kept latent pixel covers only kept pixels), then decodes; the unedited pixels are pasted back
    z = space.encode(image) if space is not None else image
    z_mask = _pool_mask(mask, z.shape[-1], keep_white=spec.mask_keeps == "white") if mask is not None else None
    ctx = EditContext(
        D,
        z,
        z_mask,
        pipe.sigmas_for(steps),
        sampler or spec.sampler,
        seed,
        torch.Generator().manual_seed(seed),
        pipe,
        prompt,
        source_prompt,
        clip,
        progress,
        schedule=D.schedule,
    )
    first_tiles = [("input", image)]
    if mask is not None:
        first_tiles.append((f"mask: white = {'keep' if spec.mask_keeps == 'white' else 'edit'}", _as_tile(mask, image)))
    ctx.info.update({"method": method, "steps": steps, "sampler": ctx.sampler or "own", **k})
    with torch.no_grad(), pipe.autocast():
        out = spec.run(ctx, **k).float()
        tiles = ctx.tiles + (ctx.output_tiles if ctx.output_tiles is not None else [("output", out)])
        tiles = [(caption, t.float()) for caption, t in tiles]
        if space is not None:
            tiles = [(caption, _to_pixels(caption, t, space, image)) for caption, t in tiles]
            out = dict(tiles)["output"] if ctx.output_tiles is None else _to_pixels("output", out, space, image)
            if mask is not None:  # the pixels the mask keeps are the input's, exactly
                keep = mask if spec.mask_keeps == "white" else 1 - mask
                out = keep * image + (1 - keep) * out.clamp(-1, 1)
                tiles = [(c, out if c == "output" else t) for c, t in tiles]
    tiles = first_tiles + tiles
    check_finite_tensor(f"the {method} output", out, "(the model or a parameter gave NaN/inf)")
    out = out.clamp(-1, 1).cpu()
    tiles = [(caption, t.detach().clamp(-1, 1).cpu()) for caption, t in tiles]
    return EditResult(out, tiles, ctx.info)


# The command
# --------------------------------------------------------------------------------------------


def _strip_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_strip{out.suffix or '.png'}")


def _cmd_edit(args: argparse.Namespace) -> int:
    from difflab.data import save_image_grid
    from difflab.assets import resolve_run
    from difflab.pipeline import Pipeline

    method = args.method
    spec = METHODS[method]
    out = check_output_file(args.out, what="--out")
    strip = check_output_file(args.strip if args.strip else _strip_path(out), what="--strip")
    if out.resolve() == strip.resolve():
        raise ValueError(f"--strip {strip} is the same file as --out")
    pipe = Pipeline.from_pretrained(resolve_run(args.run)).to(args.device, args.dtype)  # a folder or a zoo name
    if args.low_memory:
        pipe.enable_low_memory()
    C, H, _ = pipe.image_shape()
    image = load_edit_image(args.image, C, H, resize=args.resize)
    mask = None
    if getattr(args, "mask", None):
        mask = load_edit_mask(args.mask, H, resize=args.resize)
        if args.invert_mask:
            mask = 1 - mask
    elif getattr(args, "invert_mask", False):
        raise ValueError("--invert-mask given without --mask")
    clip = load_clip(args.clip) if spec.prompt == "text" and args.clip else None
    print(spec.title)
    if spec.mask is not None:
        print(
            spec.mask_convention()
            + (" (--invert-mask: the file was flipped)" if mask is not None and args.invert_mask else "")
        )
    knobs = {kn.name: getattr(args, kn.name) for kn in spec.knobs}
    result = edit(
        pipe,
        method,
        image,
        mask=mask,
        prompt=getattr(args, "prompt", None),
        source_prompt=getattr(args, "source_prompt", None),
        clip=clip,
        seed=args.seed,
        sampler=getattr(args, "sampler", None),
        steps=args.steps,
        progress=not args.no_progress,
        **knobs,
    )
    save_image_grid(result.output, out, nrow=1, padding=0)
    captions = [caption for caption, _ in result.tiles]
    save_image_grid(torch.cat([t for _, t in result.tiles]), strip, nrow=len(result.tiles), labels=captions)
    if "scores" in result.info:
        print("image-text scores, best first: " + ", ".join(f"{s:.3f}" for s in result.info["scores"]))
    if "note" in result.info:
        print("note: " + result.info["note"])
    if "mask_fraction" in result.info:
        print(f"automatic mask covers {result.info['mask_fraction']:.1%} of the image")
    print(f"wrote {out} (the output) and {strip} ({' | '.join(captions)})")
    return 0


def _arg_type(knob: Knob):
    """argparse `type=` of a knob: numbers parsed and checked against the knob's range."""
    if knob.type in (int, float):
        return number_arg(lo=knob.lo, hi=knob.hi, lo_open=knob.lo_open, hi_open=knob.hi_open, integer=knob.type is int)
    return knob.type


def add_edit_parser(subparsers) -> argparse.ArgumentParser:
    """Register `difflab edit METHOD ...` on the `difflab` command's subparsers."""
    from difflab.core.sampling import SAMPLERS

    e = subparsers.add_parser(
        "edit",
        help="image editing with a run (training-free, or by optimisation on the image): " + ", ".join(METHODS),
        description="Edit one image with a trained run (the optimising methods tune a copy, never the run): "
        + "; ".join(f"{name}: {spec.title}" for name, spec in METHODS.items())
        + ". Masks are black-and-white images; "
        "RePaint's mask marks what to keep (white = keep), SDEdit's, Blended Diffusion's and DiffEdit's what to "
        "edit (white = edit). Prompts are text (text-conditional runs) or a class name or index (class-conditional "
        "runs); '' is the unconditional model. Writes OUT "
        "(the output alone) and OUT_strip.png (input | mask | output).",
    )
    methods = e.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name, spec in METHODS.items():
        m = methods.add_parser(
            name,
            help=spec.title,
            description=f"{spec.title}. {spec.summary} " + (spec.mask_convention() + "." if spec.mask else ""),
        )
        io = m.add_argument_group("input and output")
        io.add_argument("--run", required=True, help="run folder (config.json + model.safetensors)")
        io.add_argument("--image", required=True, help="input image (PNG...) of the model's size and channels")
        io.add_argument("--out", required=True, help="output PNG (the edited image alone)")
        io.add_argument("--strip", help="before/after strip PNG (default: OUT with _strip)")
        io.add_argument(
            "--resize",
            action="store_true",
            help="resize (shorter side + centre crop) and convert the image (and mask) to the model's "
            "size and channels instead of failing",
        )
        if spec.mask is not None:
            keep = spec.mask_convention().split(": ", 1)[1]
            io.add_argument(
                "--mask",
                required=spec.mask == "required",
                help=f"black-and-white mask of the image's size: {keep}"
                + (" (default: DiffEdit's automatic mask)" if name == "diffedit" else ""),
            )
            io.add_argument("--invert-mask", action="store_true", help="flip the mask's colours")
        cond = m.add_argument_group("prompts")
        if spec.prompt == "class":
            cond.add_argument(
                "--prompt", help="text or class (name or index) to condition on (default: the unconditional model)"
            )
        elif spec.prompt == "text":
            cond.add_argument("--prompt", required=True, help="text the edited region should match")
            cond.add_argument(
                "--clip",
                required=True,
                metavar="FOLDER",
                help="image-text model: a SmallCLIP folder (difflab.edit.save_clip) or a transformers CLIP folder",
            )
        elif spec.prompt == "required":
            cond.add_argument("--prompt", required=True, help="the edit: text, or a class of the run by name or index")
        if spec.source_prompt != "none":
            cond.add_argument(
                "--source-prompt",
                required=spec.source_prompt == "required",
                help="what the input shows: text, or a class of the run"
                + (" (default '': the unconditional model)" if spec.source_prompt == "optional" else ""),
            )
        run = m.add_argument_group("sampling")
        run.add_argument("--seed", type=SEED, default=0, help="seed of every random draw (default 0)")
        run.add_argument("--steps", type=POS_INT, default=20, help="steps of the sigma grid (default 20)")
        if spec.sampler is not None:
            run.add_argument(
                "--sampler",
                default=spec.sampler,
                choices=sorted(SAMPLERS),
                metavar="SAMPLER",
                help=f"one of {', '.join(sorted(SAMPLERS))} (default {spec.sampler})",
            )
        run.add_argument("--no-progress", action="store_true")
        add_device_arguments(run)
        add_memory_argument(run)
        knobs = m.add_argument_group(f"{name} parameters")
        for kn in spec.knobs:
            knobs.add_argument(
                "--" + kn.name.replace("_", "-"),
                dest=kn.name,
                type=_arg_type(kn),
                default=kn.default,
                choices=kn.choices,
                metavar=kn.metavar,
                help=kn.help + ("" if kn.default is None else f" (default {kn.default})"),
            )
        m.set_defaults(func=_cmd_edit)
    return e
