"""The editing registry's types: what an image-editing method takes and how it runs.

Every editor in difflab/methods/ (SDEdit, ILVR, RePaint, Blended Diffusion,
DiffEdit, Prompt-to-Prompt, Imagic, UniTune, DiffusionCLIP, Asyrp) exports one `EDIT`, an `EditMethod`: its title, what it needs (mask,
prompts, sampler), its knobs with their defaults, ranges and help, and `run(ctx, **knobs)`, the
method called on one image. `difflab.methods.editing.EDIT_METHODS` collects them; `difflab edit`
builds its flags from the knobs, `difflab.edit.edit` checks its inputs against the entry and calls
`run`, and a UI builds its widgets from the same fields. A new editor adds its `EDIT` and one line
to the registry; nothing else changes.

    entry = EditMethod("sdedit", "SDEdit (...)", "one line", mask="optional", mask_keeps="black",
                       prompt="class", source_prompt="none", sampler="euler_ancestral",
                       knobs=(Knob("strength", 0.5, "t0", lo=0, hi=1, lo_open=True),), run=_run)
    out = entry.run(ctx, **entry.knob_values({"strength": 0.6}))

The run gets an `EditContext`: the denoiser, the image (1, C, H, W) in [-1, 1], the mask in the
method's own convention, the sigma grid, the sampler, the random generator (seeded), the prompts
and the `Conditioner` that turns a prompt into the network's cond (a class name or index for a
class-conditional model, text for a text-conditional one, "" for the unconditional model). It
returns the output (1, C, H, W) and may add tiles to the strip and entries to `info`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from difflab.core.validation import check_number

__all__ = ["Knob", "EditMethod", "EditContext", "Conditioner", "MASK_KINDS", "PROMPT_KINDS"]

MASK_KINDS = (None, "optional", "required")  # None: the method takes no mask
PROMPT_KINDS = ("class", "text", "required", "none")
SOURCE_PROMPT_KINDS = ("none", "optional", "required")


@dataclass(frozen=True)
class Knob:
    """One method parameter: `edit(..., name=value)`, the flag --name-with-dashes, a UI widget.

    type is float, int or str; numbers lie in [lo, hi] (open ends with lo_open / hi_open);
    choices lists the allowed strings. A default of None means "not set" (the method says what
    that does)."""

    name: str
    default: Any
    help: str
    type: Callable = float
    choices: tuple | None = None
    metavar: str | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def check(self, method: str, value):
        """`value` if it is allowed; else a ValueError naming the method, the knob and the value."""
        if value is None:
            return None
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{method} {self.name} must be one of {list(self.choices)}, got {value!r}")
            return value
        if self.type in (int, float):
            return check_number(
                f"{method} {self.name}",
                value,
                lo=self.lo,
                hi=self.hi,
                lo_open=self.lo_open,
                hi_open=self.hi_open,
                integer=self.type is int,
            )
        return value


class Conditioner(Protocol):
    """A model's prompts -> its network's cond (`difflab.pipeline.Pipeline` is one)."""

    conditioning: str  # "text", "class" or "none"

    def cond(self, prompt: str | None, flag: str = "prompt") -> dict: ...

    def null_cond(self, why: str | None = None) -> dict: ...

    def token_ids(self, prompt: str) -> list[int]: ...


@dataclass
class EditContext:
    """What an editing method's `run` gets (see the module docstring)."""

    denoiser: Callable
    image: Tensor  # (1, C, H, W) in [-1, 1]
    mask: Tensor | None  # (1, 1, H, W) in {0, 1}, in the method's convention
    sigmas: Tensor  # the decreasing sigma grid of `steps` steps, ending in 0
    sampler: str | None  # the sampler to use (None: the method's own)
    seed: int
    generator: torch.Generator  # seeded with `seed`; the method's main random stream
    prompts: Conditioner
    prompt: str | None = None
    source_prompt: str | None = None
    clip: Any = None  # an image-text model, for methods that guide with one
    progress: bool = False
    tiles: list[tuple[str, Tensor]] = field(default_factory=list)  # the strip, after input (and mask)
    output_tiles: list[tuple[str, Tensor]] | None = None  # the strip's last tiles (default: ("output", out))
    info: dict = field(default_factory=dict)
    schedule: Any = None  # the model's noise schedule: the papers' diffusion time t0 -> sigma

    def cond(self, prompt: str | None, flag: str = "--prompt") -> dict:
        return self.prompts.cond(prompt, flag)

    def sigma_at(self, t0: float) -> float:
        """The noise level at the papers' diffusion time t0 in [0, 1] (`Schedule.sigma_at_time`)."""
        if self.schedule is None:
            raise ValueError("this EditContext has no schedule: the papers' t0 needs the model's noise schedule")
        return float(self.schedule.sigma_at_time(t0))

    def tail(self, t0: float) -> Tensor:
        """The grid an edit re-runs from diffusion time t0 (`core.sampling.edit_sigmas`) on `steps`
        steps; recorded in info as sigma_t0 (where the edit starts) and edit_steps."""
        from difflab.core.sampling import edit_sigmas

        self.sigma_at(t0)  # the missing-schedule error first
        if t0 == 1.0:  # a whole generation: the model's own grid (a diffusers folder's scheduler spacing)
            grid = self.sigmas
        else:
            grid = edit_sigmas(self.schedule, t0, len(self.sigmas) - 1).to(self.sigmas.device)
        self.info.setdefault("sigma_t0", float(grid[0]))
        self.info.setdefault("edit_steps", len(grid) - 1)
        return grid

    def clip_decoder(self, method: str):
        """For a method scored by the image-text model `clip`: one-line errors when it is missing or
        takes another channel count than the run's images; returns the decoder from the run's latents to
        pixels (None for a pixel model), through which the image-text losses see a latent edit."""
        if self.clip is None:
            raise ValueError(f"{method} needs an image-text model: --clip FOLDER (see difflab.edit.save_clip)")
        space = getattr(self.prompts, "latent_space", None)
        channels = self.prompts.image_shape()[0] if space is not None else self.image.shape[1]
        cin = getattr(getattr(self.clip, "config", None), "in_channels", 3)
        if cin != channels:
            raise ValueError(f"the image-text model takes {cin}-channel images; this run's are {channels}-channel")
        return None if space is None else space.decode

    def mask_tile(self, mask: Tensor) -> Tensor:
        """A {0, 1} mask (1, 1, H, W) as a black-and-white tile (1, C, H, W) in [-1, 1]."""
        return (mask * 2 - 1).expand(-1, self.image.shape[1], -1, -1)


@dataclass(frozen=True)
class EditMethod:
    """One editing method's entry in the registry.

    mask: None (takes none), "optional" or "required"; mask_keeps: the mask colour that keeps
    the input ("white" or "black"). prompt: "class" (an optional class or text for the model),
    "text" (required text for the image-text model `clip`), "required" (the edit's condition) or
    "none". source_prompt: "none", "optional" or "required". sampler: the default sampler, or None
    when the method runs its own. run(ctx, **knobs) -> output (1, C, H, W)."""

    name: str
    title: str
    summary: str
    mask: str | None
    mask_keeps: str | None
    prompt: str
    source_prompt: str
    sampler: str | None
    knobs: tuple[Knob, ...]
    run: Callable[..., Tensor]

    def __post_init__(self):
        if (
            self.mask not in MASK_KINDS
            or self.prompt not in PROMPT_KINDS
            or self.source_prompt not in SOURCE_PROMPT_KINDS
        ):
            raise ValueError(
                f"edit method {self.name}: mask {self.mask!r}, prompt {self.prompt!r} or source_prompt "
                f"{self.source_prompt!r} is not one of {MASK_KINDS}, {PROMPT_KINDS}, "
                f"{SOURCE_PROMPT_KINDS}"
            )
        if (self.mask is None) != (self.mask_keeps is None):
            raise ValueError(f"edit method {self.name}: mask_keeps goes with a mask")

    def defaults(self) -> dict:
        return {k.name: k.default for k in self.knobs}

    def knob_values(self, given: dict) -> dict:
        """The knobs' values: the defaults updated with `given` (None keeps the default), each checked."""
        names = {k.name for k in self.knobs}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"{self.name} has no parameter(s) {unknown}; it takes {sorted(names)}")
        values = self.defaults()
        values.update({k: v for k, v in given.items() if v is not None})
        return {k.name: k.check(self.name, values[k.name]) for k in self.knobs}

    def mask_convention(self) -> str:
        """The sentence printed on every run: which mask colour keeps the input."""
        if self.mask_keeps == "white":
            return f"{self.name} mask: white = keep (known pixels), black = repaint"
        if self.mask_keeps == "black":
            return f"{self.name} mask: white = edit, black = keep the input"
        return f"{self.name} takes no mask"
