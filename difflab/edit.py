"""`difflab edit METHOD`: training-free editing of one image with a trained run folder.

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
only; refine and reweight need a text model's tokens). Latent-diffusion runs are not supported:
their decoder would not keep the unedited pixels.

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
from typing import Any, Callable

import torch
from torch import Tensor

from difflab.core.validation import (FINITE, POS_INT, SEED, check_finite_tensor, check_number, check_output_file,
                                     number_arg)

__all__ = ["METHODS", "EditResult", "edit", "load_edit_image", "load_edit_mask", "save_clip", "load_clip",
           "add_edit_parser"]


# --------------------------------------------------------------------------------------------
# What each method takes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knob:
    """One method parameter: `edit(..., name=value)` and the flag --name-with-dashes."""

    name: str
    default: Any
    help: str
    type: Callable = float
    choices: tuple | None = None
    metavar: str | None = None


@dataclass(frozen=True)
class Method:
    title: str
    summary: str
    mask: str | None  # None: takes no mask; "optional"; "required"
    mask_keeps: str | None  # the mask colour that keeps the input: "white" or "black"
    prompt: str  # "class": an optional class for the model; "text": required; "none"
    source_prompt: str  # "none", "optional", "required"
    sampler: str | None  # default sampler; None: the method's own, fixed
    knobs: tuple[Knob, ...] = field(default_factory=tuple)


# argparse types of the knobs: floats must be finite, ints integers (each method checks its ranges)
_KNOB_TYPES = {float: FINITE, int: number_arg(integer=True)}

_STRENGTH = "fraction of the sigma grid re-run from the noised input (SDEdit's t0), in (0, 1]"

METHODS: dict[str, Method] = {
    "sdedit": Method(
        "SDEdit (Meng et al. 2022, arXiv 2108.01073)",
        "Noise the input to t0 and denoise: small t0 stays faithful, large t0 turns strokes realistic.",
        mask="optional", mask_keeps="black", prompt="class", source_prompt="none", sampler="euler_ancestral",
        knobs=(Knob("strength", 0.5, _STRENGTH + "; 0.3-0.6 is the paper's range", metavar="T0"),)),
    "ilvr": Method(
        "ILVR (Choi et al. 2021, arXiv 2108.02938)",
        "Sample from noise keeping the input's low frequencies: phi_N(x) = phi_N(input) each step.",
        mask=None, mask_keeps=None, prompt="class", source_prompt="none", sampler="euler_ancestral",
        knobs=(Knob("factor", 4, "N: the low-pass downsampling factor (must divide the image size); larger N "
                                 "keeps less of the input", type=int, metavar="N"),
               Knob("stop", 0.0, "fraction of the last steps left without the refinement (the paper's t_stop; "
                                 "0: refine every step, the output's low-pass equals the input's)", metavar="FRAC"),
               Knob("filter", "area", "phi_N: 'area' (a projection: exact) or 'bicubic' (the paper's resizer)",
                    type=str, choices=("area", "bicubic")))),
    "repaint": Method(
        "RePaint (Lugmayr et al. 2022, arXiv 2201.09865)",
        "Fill the unknown (black) region; each step the known region comes from the noised input, with "
        "jumps back to harmonise.",
        mask="required", mask_keeps="white", prompt="class", source_prompt="none", sampler=None,
        knobs=(Knob("jump_length", 10, "j: levels to jump back (1 with --jump-n-sample 1: no resampling)",
                    type=int, metavar="J"),
               Knob("jump_n_sample", 10, "r: passes over each jump (1: plain replacement, no resampling)",
                    type=int, metavar="R"))),
    "blended": Method(
        "Blended Diffusion (Avrahami et al. 2022, arXiv 2111.14818)",
        "Edit the white region toward --prompt with image-text (CLIP) guidance; the background is "
        "blended in every step and pasted back exactly.",
        mask="required", mask_keeps="black", prompt="text", source_prompt="none", sampler="euler_ancestral",
        knobs=(Knob("strength", 0.75, _STRENGTH + " (the paper skips 25 of 100 steps: 0.75)", metavar="T0"),
               Knob("guidance_scale", 100.0, "scale of the image-text guidance gradient", metavar="S"),
               Knob("lambda_range", 50.0, "weight of the range loss keeping x0_hat in [-1, 1]", metavar="L"),
               Knob("n_aug", 8, "augmentations averaged in the image-text loss", type=int, metavar="K"),
               Knob("candidates", 4, "outputs generated and ranked by the image-text score", type=int,
                    metavar="K"))),
    "diffedit": Method(
        "DiffEdit (Couairon et al. 2023, arXiv 2210.11427)",
        "Find where --prompt and --source-prompt disagree (the automatic mask), DDIM-encode to ratio r, "
        "decode under --prompt keeping the rest on the inverted path.",
        mask="optional", mask_keeps="black", prompt="required", source_prompt="optional", sampler=None,
        knobs=(Knob("strength", 0.5, "r: encoding ratio, the fraction of the grid inverted and re-decoded",
                    metavar="R"),
               Knob("threshold", 0.5, "threshold on the normalised prediction difference (automatic mask)",
                    metavar="T"),
               Knob("n_draws", 10, "noise draws averaged for the automatic mask", type=int, metavar="K"),
               Knob("mask_clamp", 3.0, "the mask's difference map is clipped at this multiple of its mean, then "
                                       "rescaled to [0, 1] (the paper's removal of extreme values)", metavar="C"),
               Knob("mask_noise", 0.5, "noise level of the automatic mask, as a fraction of the grid (paper: 50%%)",
                    metavar="FRAC"),
               Knob("guidance_scale", 1.0, "classifier-free guidance s of the decoding under --prompt (the paper "
                                           "decodes with CFG; 1 = none)", metavar="S"))),
    "p2p": Method(
        "Prompt-to-Prompt (Hertz et al. 2022, arXiv 2208.01626)",
        "DDIM-invert the input under --source-prompt, then regenerate [source, edit] from the same latent, "
        "injecting the source's attention maps into the edit.",
        mask=None, mask_keeps=None, prompt="required", source_prompt="required", sampler="euler",
        knobs=(Knob("edit", "swap", "edit kind: 'swap' (the edit keeps the source's maps), 'refine' (aligned "
                                    "tokens), 'reweight' (scale one token's maps); refine and reweight need token "
                                    "maps (a text-conditional model)", type=str,
                    choices=("swap", "refine", "reweight")),
               Knob("cross_replace", 0.8, "fraction of the steps with cross-attention injected (tau_c)",
                    metavar="FRAC"),
               Knob("self_replace", 0.4, "fraction of the steps with self-attention injected (tau_s)",
                    metavar="FRAC"),
               Knob("self_max_pixels", 256, "self-attention is injected in layers of at most this many pixels "
                                            "(paper: 16x16)", type=int, metavar="P"),
               Knob("strength", 1.0, "fraction of the grid inverted and regenerated (1: from pure noise)",
                    metavar="FRAC"),
               Knob("reweight_token", None, "--edit reweight: the token index to scale", type=int,
                    metavar="I"),
               Knob("reweight_scale", 2.0, "--edit reweight: the scale c of that token's maps", metavar="C"))),
}


def mask_convention(method: str) -> str:
    """The sentence printed on every run: which mask colour keeps the input."""
    spec = METHODS[method]
    if spec.mask_keeps == "white":
        return f"{method} mask: white = keep (known pixels), black = repaint"
    if spec.mask_keeps == "black":
        return f"{method} mask: white = edit, black = keep the input"
    return f"{method} takes no mask"


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
            raise ValueError(f"image {path} is {w}x{h}; the model takes {size}x{size} images "
                             "(pass --resize to resize and centre-crop)")
        if c != channels:
            kinds = {1: "grey", 3: "RGB"}
            raise ValueError(f"image {path} has {c} channel(s) ({kinds[c]}); the model takes {channels} "
                             f"({kinds.get(channels, channels)}) (pass --resize to convert)")
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
        raise ValueError(f"mask {path} is not binary: pixel (row {r}, col {c}) has grey value "
                         f"{round(grey[r, c].item())}; use black (0) and white (255) only")
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
    raise ValueError(f"{folder} holds neither a difflab SmallCLIP (`difflab train-clip`) nor a "
                     "transformers CLIP (config.json 'model_type': 'clip')")


# --------------------------------------------------------------------------------------------
# Prompts -> the model's conditioning
# --------------------------------------------------------------------------------------------


class _Prompts:
    """A run's prompts -> its network's cond: a class (name or index) of a class-conditional model,
    text of a text-conditional one; "" (or no prompt) is the unconditional model."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.k = pipe.num_classes
        self.kind = getattr(pipe, "conditioning", None) or ("class" if self.k is not None else "none")
        if getattr(pipe, "latent_space", None) is not None:
            raise ValueError("difflab edit works on pixel-space runs; this run samples latents (its decoder "
                             "would not keep the unedited pixels)")
        self.names = [str(n) for n in pipe.class_names]
        self.dropout = float(pipe.config.get("train", {}).get("label_dropout", 0.0) or 0.0)
        if self.kind == "class" and self.k is None:
            raise ValueError("this run's config names no classes for a class-conditional model")

    @property
    def has_tokens(self) -> bool:
        return self.kind == "text"

    def known(self) -> str:
        if self.names:
            return ", ".join(repr(n) for n in self.names) + f" or an index 0..{self.k - 1}"
        return f"an index 0..{self.k - 1}"

    def _text(self, prompt: str) -> dict:
        states, mask = self.pipe.encode_prompts([prompt])
        return {"context": states, "context_mask": mask}

    def null(self, why: str) -> dict:
        """The unconditional model's cond: {}, the null class or the empty prompt."""
        if self.kind == "text":
            return self._text("")
        if self.k is None:
            return {}
        if self.dropout <= 0:
            raise ValueError(f"{why}, but this run was trained without label dropout: it has no null class")
        return {"class_labels": torch.tensor([-1])}

    def __call__(self, prompt: str | None, flag: str) -> dict:
        if self.kind == "text":
            return self._text(prompt or "")
        if self.k is None:
            if prompt:
                raise ValueError(f"{flag} {prompt!r}: this run's model is unconditional and takes no prompt")
            return {}
        if prompt is None or not prompt.strip():
            if self.dropout <= 0:
                raise ValueError(f"this run was trained without label dropout, so it has no unconditional "
                                 f"mode: give {flag} CLASS ({self.known()})")
            return {"class_labels": torch.tensor([-1])}
        text = prompt.strip()
        lowered = [n.lower() for n in self.names]
        if text.lower() in lowered:
            label = lowered.index(text.lower())
        elif text.isdigit() and int(text) < self.k:
            label = int(text)
        else:
            raise ValueError(f"{flag} {prompt!r} names no class of this run; known: {self.known()}")
        return {"class_labels": torch.tensor([label])}

    def token_ids(self, prompt: str) -> list[int]:
        """The text encoder's token ids of a prompt (for Prompt-to-Prompt's token alignment)."""
        out = self.pipe.text_encoder.tokenize([prompt])
        ids, mask = (out["input_ids"], out["attention_mask"]) if isinstance(out, dict) else out
        return ids[0][mask[0].bool()].tolist()


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def _stack(*conds: dict) -> dict:
    """Cond dicts of batch 1 -> one dict of batch len(conds), in order; token sequences of different
    lengths are right-padded (zeros, and False in their key masks)."""
    out = {}
    for key in conds[0]:
        parts = [c[key] for c in conds]
        if parts[0].ndim >= 2:
            T = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, [0, 0] * (p.ndim - 2) + [0, T - p.shape[1]]) for p in parts]
        out[key] = torch.cat(parts)
    return out


# --------------------------------------------------------------------------------------------
# The edit
# --------------------------------------------------------------------------------------------


@dataclass
class EditResult:
    """output (1, C, H, W) in [-1, 1]; tiles: the strip, (caption, (1, C, H, W)) from input to output."""

    output: Tensor
    tiles: list[tuple[str, Tensor]]
    info: dict = field(default_factory=dict)


def _as_tile(mask: Tensor, channels: int) -> Tensor:
    """A {0, 1} mask (1, 1, H, W) as a black-and-white image (1, C, H, W) in [-1, 1]."""
    return (mask * 2 - 1).expand(-1, channels, -1, -1)


def _knob_values(method: str, knobs: dict) -> dict:
    spec = METHODS[method]
    names = {k.name for k in spec.knobs}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise ValueError(f"{method} has no parameter(s) {unknown}; it takes {sorted(names)}")
    values = {k.name: k.default for k in spec.knobs}
    values.update({k: v for k, v in knobs.items() if v is not None})
    for k in spec.knobs:
        if k.choices is not None and values[k.name] not in k.choices:
            raise ValueError(f"{method} {k.name} must be one of {list(k.choices)}, got {values[k.name]!r}")
    for k in spec.knobs:  # numbers are finite (the API too: a NaN strength must not sample a black image)
        if k.type in (int, float) and values[k.name] is not None:
            check_number(f"{method} {k.name}", values[k.name], integer=k.type is int)
    for name in ("n_aug", "candidates", "n_draws", "self_max_pixels"):
        if name in values and values[name] < 1:
            raise ValueError(f"{method} {name} must be >= 1, got {values[name]}")
    return values


def _check_inputs(pipe, method: str, image: Tensor, mask: Tensor | None) -> None:
    C, H, W = pipe.image_shape()
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"edit takes one image (1, C, H, W), got shape {tuple(image.shape)}")
    if tuple(image.shape[1:]) != (C, H, W):
        raise ValueError(f"image of shape {tuple(image.shape[1:])} does not fit the model, which takes "
                         f"{(C, H, W)} (channels, height, width)")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN/inf values")
    spec = METHODS[method]
    if spec.mask is None and mask is not None:
        raise ValueError(f"{method} takes no mask")
    if spec.mask == "required" and mask is None:
        raise ValueError(f"{method} needs a mask ({mask_convention(method)})")
    if mask is not None:
        if tuple(mask.shape) != (1, 1, H, W):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit the image: need (1, 1, {H}, {W})")
        if not torch.all((mask == 0) | (mask == 1)):
            bad = mask[(mask != 0) & (mask != 1)][0].item()
            raise ValueError(f"mask must be binary (0/1); found value {bad}")


def edit(pipe, method: str, image: Tensor, *, mask: Tensor | None = None, prompt: str | None = None,
         source_prompt: str | None = None, clip=None, seed: int = 0, sampler: str | None = None, steps: int = 20,
         progress: bool = False, **knobs) -> EditResult:
    """Edit one image (1, C, H, W) in [-1, 1] with `method` on the run `pipe` (a `Pipeline`).

    `mask` (1, 1, H, W) in {0, 1} follows the method's convention (`mask_convention`); `knobs` are
    the method's parameters (`METHODS[method].knobs`)."""
    from difflab.core.guidance import cfg as cfg_guidance
    from difflab.core.sampling import SAMPLERS, invert_euler, sample
    from difflab.methods.blended import blended_diffusion
    from difflab.methods.diffedit import diffedit, diffedit_mask
    from difflab.methods.ilvr import ilvr_callback
    from difflab.methods.p2p import P2PController, prompt_to_prompt, refine_mapper
    from difflab.methods.repaint import repaint
    from difflab.core.sampling import slice_sigmas
    from difflab.methods.sdedit import sdedit
    from difflab.pipeline import grid_for

    if method not in METHODS:
        raise ValueError(f"unknown edit method {method!r}; known: {', '.join(METHODS)}")
    spec = METHODS[method]
    k = _knob_values(method, knobs)
    _check_inputs(pipe, method, image, mask)
    if sampler is not None:
        if spec.sampler is None:
            raise ValueError(f"{method} runs its own sampler; --sampler does not apply")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if spec.prompt in ("text", "required") and (prompt is None or not prompt.strip()):
        wanted = "text for the image-text model" if spec.prompt == "text" else "the edit"
        raise ValueError(f"{method} needs --prompt ({wanted})")
    if spec.source_prompt == "required" and source_prompt is None:
        raise ValueError(f"{method} needs --source-prompt (what the input shows)")
    if spec.prompt == "none" and prompt is not None:
        raise ValueError(f"{method} takes no prompt")
    if spec.source_prompt == "none" and source_prompt is not None:
        raise ValueError(f"{method} takes no --source-prompt")

    prompts = _Prompts(pipe)
    D = pipe.denoiser
    device = next(D.parameters()).device
    image = image.to(device)
    mask = mask.to(device) if mask is not None else None
    sigmas = grid_for(D.schedule, steps)
    method_sampler = sampler or spec.sampler
    gen = torch.Generator().manual_seed(seed)
    C = image.shape[1]
    tiles: list[tuple[str, Tensor]] = [("input", image)]
    if mask is not None:
        tiles.append((f"mask: white = {'keep' if spec.mask_keeps == 'white' else 'edit'}", _as_tile(mask, C)))
    info: dict[str, Any] = {"method": method, "steps": steps, "sampler": method_sampler or "own", **k}

    with torch.no_grad():
        if method == "sdedit":
            out = sdedit(D, image, sigmas, strength=k["strength"], edit_mask=mask, method=method_sampler,
                         cond=prompts(prompt, "--prompt"), noise=gen, progress=progress)
        elif method == "ilvr":
            if not 0.0 <= k["stop"] < 1.0:
                raise ValueError(f"ilvr stop is a fraction of the steps in [0, 1), got {k['stop']}")
            n = len(sigmas) - 1
            sigma_stop = float(sigmas[n - round(k["stop"] * n)])
            cb = ilvr_callback(image, k["factor"], sigma_stop, filter=k["filter"],
                               noise=torch.Generator().manual_seed(seed + 1))
            x = torch.randn(image.shape, generator=gen).to(device) * float(sigmas[0])
            out = sample(D, x, sigmas, method=method_sampler, cond=prompts(prompt, "--prompt"), callback=cb,
                         noise=gen, progress=progress)
        elif method == "repaint":
            out = repaint(D, image, mask, sigmas, jump_length=k["jump_length"], jump_n_sample=k["jump_n_sample"],
                          cond=prompts(prompt, "--prompt"), noise=gen, progress=progress)
        elif method == "blended":
            if clip is None:
                raise ValueError("blended needs an image-text model: --clip FOLDER (see difflab.edit.save_clip)")
            cin = getattr(getattr(clip, "config", None), "in_channels", 3)
            if cin != C:
                raise ValueError(f"the image-text model takes {cin}-channel images; this run's are {C}-channel")
            outs, sims = blended_diffusion(
                D, clip, image, mask, prompt, sigmas, scale=k["guidance_scale"], lambda_range=k["lambda_range"],
                n_aug=k["n_aug"], strength=k["strength"], n_candidates=k["candidates"], noise=gen,
                method=method_sampler, aug_generator=torch.Generator().manual_seed(seed + 1),
                cond=prompts.null("blended guides the unconditional model"))
            out = outs[:1]
            info["scores"] = sims.tolist()
            tiles += [(f"{'output' if i == 0 else f'#{i + 1}'} (score {s:.2f})", o[None])
                      for i, (o, s) in enumerate(zip(outs, sims.tolist()))]
        elif method == "diffedit":
            qc, rc = prompts(prompt, "--prompt"), prompts(source_prompt or "", "--source-prompt")
            if _same(qc, rc):
                raise ValueError(f"--prompt {prompt!r} and --source-prompt {source_prompt or ''!r} are the same "
                                 "condition: DiffEdit needs two different ones")
            if mask is None:
                sigma_mask = float(slice_sigmas(sigmas, k["mask_noise"])[0])
                mask = diffedit_mask(D, image, qc, rc, sigma=sigma_mask, n_draws=k["n_draws"],
                                     threshold=k["threshold"], clamp=k["mask_clamp"], generator=gen)
                tiles.append(("mask (automatic): white = edit", _as_tile(mask, C)))
                info["mask_fraction"] = float(mask.mean())
            # the paper: DDIM-encode with the unconditional model (empty prompt / null class), decode
            # with the query under classifier-free guidance (which, given the null condition, is D_u)
            uc = prompts("", "--source-prompt")
            guided = cfg_guidance(k["guidance_scale"], uc)(D) if k["guidance_scale"] != 1.0 else D
            out = diffedit(guided, image, mask, sigmas, qc, uc, strength=k["strength"], progress=progress)
        else:  # p2p
            mapper, reweight = None, None
            if k["edit"] != "swap":
                if not prompts.has_tokens:
                    raise ValueError(f"p2p --edit {k['edit']} works on token maps and needs a text-conditional "
                                     f"model; this run is {prompts.kind}-conditional: use --edit swap")
                if k["edit"] == "refine":
                    mapper = refine_mapper(prompts.token_ids(source_prompt), prompts.token_ids(prompt))
                else:  # reweight
                    n_tokens = len(prompts.token_ids(prompt))
                    j = k["reweight_token"]
                    if j is None or not 0 <= j < n_tokens:
                        raise ValueError(f"p2p --edit reweight needs --reweight-token in 0..{n_tokens - 1} (the "
                                         f"token of --prompt to scale), got {j}")
                    reweight = {j: k["reweight_scale"]}
            src, dst = prompts(source_prompt, "--source-prompt"), prompts(prompt, "--prompt")
            tail = slice_sigmas(sigmas, k["strength"])
            x_T = invert_euler(D, image, tail.flip(0), cond=src, progress=progress)
            ctl = P2PController(2, len(tail) - 1, cross_replace=k["cross_replace"], self_replace=k["self_replace"],
                                self_max_pixels=k["self_max_pixels"], mapper=mapper, reweight=reweight, store=False)
            both = prompt_to_prompt(D, D, x_T, tail, _stack(src, dst), ctl, method=method_sampler, noise=gen,
                                    progress=progress)
            out = both[1:]
            tiles.append(("source (inverted and regenerated)", both[:1]))
            if not prompts.has_tokens:
                info["note"] = ("this run's model has no cross-attention (it is not text-conditional): the edit "
                                "keeps the source's layout through self-attention injection only")
        if method != "blended":
            tiles.append(("output", out))
    check_finite_tensor(f"the {method} output", out, "(the model or a parameter gave NaN/inf)")
    out = out.clamp(-1, 1).cpu()
    tiles = [(caption, t.detach().clamp(-1, 1).cpu()) for caption, t in tiles]
    return EditResult(out, tiles, info)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _strip_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_strip{out.suffix or '.png'}")


def _cmd_edit(args: argparse.Namespace) -> int:
    from difflab.data import save_image_grid
    from difflab.pipeline import Pipeline

    method = args.method
    spec = METHODS[method]
    out = check_output_file(args.out, what="--out")
    strip = check_output_file(args.strip if args.strip else _strip_path(out), what="--strip")
    if out.resolve() == strip.resolve():
        raise ValueError(f"--strip {strip} is the same file as --out")
    pipe = Pipeline.from_pretrained(args.run)
    C, H, _ = pipe.image_shape()
    image = load_edit_image(args.image, C, H, resize=args.resize)
    mask = None
    if getattr(args, "mask", None):
        mask = load_edit_mask(args.mask, H, resize=args.resize)
        if args.invert_mask:
            mask = 1 - mask
    elif getattr(args, "invert_mask", False):
        raise ValueError("--invert-mask given without --mask")
    clip = load_clip(args.clip) if method == "blended" and args.clip else None
    print(spec.title)
    if spec.mask is not None:
        print(mask_convention(method) + (" (--invert-mask: the file was flipped)" if mask is not None and
                                         args.invert_mask else ""))
    knobs = {kn.name: getattr(args, kn.name) for kn in spec.knobs}
    result = edit(pipe, method, image, mask=mask, prompt=getattr(args, "prompt", None),
                  source_prompt=getattr(args, "source_prompt", None), clip=clip, seed=args.seed,
                  sampler=getattr(args, "sampler", None), steps=args.steps, progress=not args.no_progress, **knobs)
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


def add_edit_parser(subparsers) -> argparse.ArgumentParser:
    """Register `difflab edit METHOD ...` on the `difflab` command's subparsers."""
    from difflab.core.sampling import SAMPLERS

    e = subparsers.add_parser(
        "edit", help="training-free image editing with a run: " + ", ".join(METHODS),
        description="Edit one image with a trained run, without training: " + "; ".join(
            f"{name}: {spec.title}" for name, spec in METHODS.items()) + ". Masks are black-and-white images; "
        "RePaint's mask marks what to keep (white = keep), SDEdit's, Blended Diffusion's and DiffEdit's what to "
        "edit (white = edit). Prompts are text (text-conditional runs) or a class name or index (class-conditional "
        "runs); '' is the unconditional model. Writes OUT "
        "(the output alone) and OUT_strip.png (input | mask | output).")
    methods = e.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name, spec in METHODS.items():
        m = methods.add_parser(name, help=spec.title, description=f"{spec.title}. {spec.summary} "
                               + (mask_convention(name) + "." if spec.mask else ""))
        io = m.add_argument_group("input and output")
        io.add_argument("--run", required=True, help="run folder (config.json + model.safetensors)")
        io.add_argument("--image", required=True, help="input image (PNG...) of the model's size and channels")
        io.add_argument("--out", required=True, help="output PNG (the edited image alone)")
        io.add_argument("--strip", help="before/after strip PNG (default: OUT with _strip)")
        io.add_argument("--resize", action="store_true",
                        help="resize (shorter side + centre crop) and convert the image (and mask) to the model's "
                             "size and channels instead of failing")
        if spec.mask is not None:
            keep = mask_convention(name).split(": ", 1)[1]
            io.add_argument("--mask", required=spec.mask == "required",
                            help=f"black-and-white mask of the image's size: {keep}"
                                 + (" (default: DiffEdit's automatic mask)" if name == "diffedit" else ""))
            io.add_argument("--invert-mask", action="store_true", help="flip the mask's colours")
        cond = m.add_argument_group("prompts")
        if spec.prompt == "class":
            cond.add_argument("--prompt", help="text or class (name or index) to condition on "
                                               "(default: the unconditional model)")
        elif spec.prompt == "text":
            cond.add_argument("--prompt", required=True, help="text the edited region should match")
            cond.add_argument("--clip", required=True, metavar="FOLDER",
                              help="image-text model: a SmallCLIP folder (difflab.edit.save_clip) or a "
                                   "transformers CLIP folder")
        else:
            cond.add_argument("--prompt", required=True, help="the edit: text, or a class of the run by name or index")
        if spec.source_prompt != "none":
            cond.add_argument("--source-prompt", required=spec.source_prompt == "required",
                              help="what the input shows: text, or a class of the run"
                                   + (" (default '': the unconditional model)" if spec.source_prompt == "optional"
                                      else ""))
        run = m.add_argument_group("sampling")
        run.add_argument("--seed", type=SEED, default=0, help="seed of every random draw (default 0)")
        run.add_argument("--steps", type=POS_INT, default=20, help="steps of the sigma grid (default 20)")
        if spec.sampler is not None:
            run.add_argument("--sampler", default=spec.sampler, choices=sorted(SAMPLERS), metavar="SAMPLER",
                             help=f"one of {', '.join(sorted(SAMPLERS))} (default {spec.sampler})")
        run.add_argument("--no-progress", action="store_true")
        knobs = m.add_argument_group(f"{name} parameters")
        for kn in spec.knobs:
            knobs.add_argument("--" + kn.name.replace("_", "-"), dest=kn.name, type=_KNOB_TYPES.get(kn.type, kn.type), default=kn.default,
                               choices=kn.choices, metavar=kn.metavar,
                               help=kn.help + ("" if kn.default is None else f" (default {kn.default})"))
        m.set_defaults(func=_cmd_edit)
    return e
