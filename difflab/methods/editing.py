"""The registry of editing methods: name -> the `EditMethod` its module exports. Training-free ones
(SDEdit ... Prompt-to-Prompt) and those that optimise on the one image (Imagic, UniTune, DiffusionCLIP,
Asyrp: an embedding, a copy of the model or an h-space shift; the run itself is never changed).

`difflab edit` builds one subcommand per entry, with flags from its knobs; `difflab.edit.edit`
runs an entry on one image; a UI reads the same titles, knobs, defaults and ranges. A new editor
exports `EDIT` (a `difflab.core.editing.EditMethod`) from its module and is listed here.
"""

from __future__ import annotations

from difflab.core.editing import EditMethod
from difflab.methods import asyrp, blended, diffedit, diffusionclip, ilvr, imagic, p2p, repaint, sdedit, unitune

__all__ = ["EDIT_METHODS", "edit_method"]

EDIT_METHODS: dict[str, EditMethod] = {
    m.name: m
    for m in (
        sdedit.EDIT,
        ilvr.EDIT,
        repaint.EDIT,
        blended.EDIT,
        diffedit.EDIT,
        p2p.EDIT,
        imagic.EDIT,
        unitune.EDIT,
        diffusionclip.EDIT,
        asyrp.EDIT,
    )
}


def edit_method(name: str) -> EditMethod:
    """The registry's entry for `name`; a ValueError listing the known ones otherwise."""
    if name not in EDIT_METHODS:
        raise ValueError(f"unknown edit method {name!r}; known: {', '.join(EDIT_METHODS)}")
    return EDIT_METHODS[name]
