"""What the training loop conditions on besides the noise level: captions and latents.

Text-to-image (Ho & Salimans 2022 for the dropout; Rombach et al. 2022 for cross-attention):
every distinct caption of the data set is encoded once, in a fixed order, into a table; a batch
gathers its rows, and a caption dropped for classifier-free guidance takes the row of the empty
prompt "" -- the same null condition sampling uses. A frozen encoder (MiniLM) stores its token
states (the cache); a jointly trained one (WordEncoder) stores token ids and runs inside the
loss, so its gradients flow and DDP averages them.

Latent diffusion (Rombach et al. 2022): the data set is encoded once by an autoencoder folder
(`difflab train-autoencoder`) into latents `scale * E(x).mode()`; the folder is copied into the
run (`run/autoencoder`) so that sampling decodes with exactly the weights training encoded with.

    table = CaptionTable(encoder, data.captions)
    cond = table.batch(idx, drop)      # {"context" or "token_ids": (B, T, ...), "context_mask": (B, T)}
    space = LatentSpace(...); latents = encode_latents(space, data)
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from difflab.data import ImageData
from difflab.nn.text import TEXT_ENCODERS, MiniLMEncoder, create_text_encoder

__all__ = [
    "CONDITIONINGS",
    "CaptionTable",
    "build_text_encoder",
    "encode_latents",
    "open_autoencoder",
]

CONDITIONINGS = ("class", "text", "none")


@lru_cache(maxsize=2)
def _frozen_minilm(max_length: int) -> MiniLMEncoder:
    """The loop's MiniLM (loads in ~2 s): shared across runs in a process, used only to fill caption
    tables and never mutated. Pipelines load their own (Textual Inversion adds tokens to it)."""
    return MiniLMEncoder(max_length=max_length)


def build_text_encoder(kind: str, captions: Sequence[str], kwargs: dict[str, Any]) -> nn.Module:
    """The training loop's text encoder: "minilm" (frozen) or "word" (vocabulary from `captions`)."""
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"unknown text_encoder {kind!r}; known: {', '.join(TEXT_ENCODERS)}")
    try:
        if kind == "minilm":
            unknown = sorted(set(kwargs) - {"max_length"})
            if unknown:
                raise TypeError(f"unexpected keyword(s) {unknown}")
            return _frozen_minilm(int(kwargs.get("max_length", 77)))
        return create_text_encoder(kind, captions, **kwargs)
    except TypeError as e:
        raise ValueError(f"text_encoder_kwargs {kwargs} do not fit text encoder {kind!r}: {e}") from None


class CaptionTable:
    """Every distinct caption (+ the empty prompt, the null condition) encoded once, in sorted order."""

    def __init__(self, encoder: nn.Module, captions: Sequence[str], chunk: int = 256, ids: bool | None = None):
        unique = sorted(set(captions))
        where = {c: i for i, c in enumerate(unique)}
        self.rows = torch.tensor([where[c] for c in captions], dtype=torch.long)  # (N,) caption of each item
        self.null = len(unique)  # the row of ""
        prompts = [*unique, ""]
        # token ids (the encoder runs in the loss) for a jointly trained encoder, or when `ids` asks
        # for them (Textual Inversion trains a row of a pretrained encoder's embedding table)
        self.trainable = bool(getattr(encoder, "trainable", False)) if ids is None else ids
        self.key = "token_ids" if self.trainable else "context"
        if self.trainable:
            self.values, self.mask = encoder.token_ids(prompts)
            return
        parts = [encoder(prompts[i : i + chunk]) for i in range(0, len(prompts), chunk)]  # fixed chunks: exact resume
        T = max(m.shape[1] for _, m in parts)
        self.values = torch.zeros(len(prompts), T, parts[0][0].shape[-1])  # (U + 1, T, dim)
        self.mask = torch.zeros(len(prompts), T, dtype=torch.bool)
        a = 0
        for states, mask in parts:
            self.values[a : a + len(states), : states.shape[1]] = states.float().cpu()
            self.mask[a : a + len(states), : mask.shape[1]] = mask.cpu()
            a += len(states)

    def __len__(self) -> int:
        return self.null + 1

    def batch(self, idx: Tensor, drop: Tensor) -> dict[str, Tensor]:
        """The cond of items `idx`, those with `drop` True given the empty prompt; trimmed to the longest."""
        rows = self.rows[idx].masked_fill(drop, self.null)
        mask = self.mask[rows]
        T = int(mask.sum(1).max())  # real tokens come first in every row
        return {self.key: self.values[rows, :T], "context_mask": mask[:, :T]}


def open_autoencoder(source: str | Path, data: ImageData):
    """The LatentSpace of an autoencoder folder, checked against the images it is to encode."""
    from difflab.nn.autoencoder import load_latent_space

    space = load_latent_space(source)
    c = space.autoencoder.config
    have = tuple(data.images.shape[1:])
    if have != (c.in_channels, c.image_size, c.image_size):
        raise ValueError(
            f"autoencoder {source} takes ({c.in_channels}, {c.image_size}, {c.image_size}) images; "
            f"dataset {data.name!r} has {have}"
        )
    return space


def encode_latents(space, data: ImageData, batch_size: int = 256) -> ImageData:
    """The data set as scaled latents `scale * E(x).mode()`, its labels and captions kept (masks dropped)."""
    latents = space.encode(data.images, batch_size=batch_size)
    return dataclasses.replace(data, images=latents, masks=None)
