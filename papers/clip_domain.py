"""The shared setting of papers/diffusionclip and papers/asyrp: a source domain (red circles of every
size, position and background), a direction in the image-text model ("a red circle" -> "a green
circle"), training images and unseen test images, and the shapes classifier's scores of an edit.

The diffusion model is the zoo's shapes-text-unet conditioned on the domain's text ("a red circle":
its DDIM inversion then reconstructs the inputs, see papers/diffusionclip's part recon); the
image-text model is the shipped SmallCLIP (difflab/checkpoints/clip/shapes). The scores are
papers/imagic's: success (the colour reads green), kept (shape, size, position, background read as
the input's), right (both) and the MSE to the ideal edit (the renderer's green circle in the input's
place).
"""

from __future__ import annotations

import torch

from difflab.data.shapes import ATTRIBUTES, render

BASE = "shapes-text-unet"
SOURCE_TEXT, TARGET_TEXT = "a red circle", "a green circle"
SOURCE, TARGET = {"shape": "circle", "color": "red"}, {"shape": "circle", "color": "green"}


def domain_cases(n: int, seed: int, exclude: list[dict] = ()) -> list[dict]:
    """n distinct red circles (size, position, background drawn from `seed`; none of `exclude`'s), as
    papers/imagic's cases. There are 20 in all."""
    if n + len(exclude) > 20:
        raise ValueError(f"only 20 red circles exist; asked for {n} beside {len(exclude)} excluded")
    g = torch.Generator().manual_seed(seed)
    seen = {tuple(c["src"][k] for k in ("size", "position", "background")) for c in exclude}
    cases = []
    while len(cases) < n:
        free = {
            k: ATTRIBUTES[k][int(torch.randint(len(ATTRIBUTES[k]), (1,), generator=g))]
            for k in ("size", "position", "background")
        }
        sig = tuple(free.values())
        if sig in seen:
            continue
        seen.add(sig)
        cases.append({"src": {**SOURCE, **free}, "tgt": {**TARGET, **free}, "edit": "color", "text": TARGET_TEXT})
    return cases


def images_of(cases: list[dict]) -> torch.Tensor:
    return torch.stack([render(c["src"]) for c in cases])
