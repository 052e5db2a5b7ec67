"""A folder of images as one in-memory tensor, with labels from class subfolders.

Layout: either image files directly in `root` (unlabelled), or one subfolder per class
(``root/cat/*.png``, ``root/dog/*.jpg``, searched recursively inside each class folder; labels
follow the sorted folder names). Files: png, jpg, jpeg, bmp, webp (any case); hidden files are
skipped. Each image: shorter side resized to `size`, centre crop, [-1, 1] (see `load_image`).

Usage::

    ds = ImageFolder("photos/", size=64)          # ds.images (N, 3, 64, 64), ds.labels or None
    ds.class_names, ds.paths
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from .images import IMAGE_EXTENSIONS, load_image

__all__ = ["ImageFolder", "list_images"]


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: str | os.PathLike) -> tuple[list[Path], list[int] | None, list[str]]:
    """(paths, labels or None, class_names) of the images under root, in sorted order."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    top = sorted(p for p in root.iterdir() if _is_image(p))
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [(d, sorted(p for p in d.rglob("*") if _is_image(p))) for d in subdirs]
    classes = [(d, files) for d, files in classes if files]
    if top and classes:
        raise ValueError(
            f"{root} holds images both directly ({top[0].name}, ...) and in class "
            f"subfolders ({classes[0][0].name}/, ...); use one layout"
        )
    if top:
        return top, None, []
    if classes:
        paths = [p for _, files in classes for p in files]
        labels = [k for k, (_, files) in enumerate(classes) for _ in files]
        return paths, labels, [d.name for d, _ in classes]
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root} or its subfolders")


class ImageFolder(torch.utils.data.Dataset):
    """All images of a folder, loaded eagerly: `images` (N, channels, size, size) in [-1, 1],
    `labels` (N,) int64 or None, `class_names`, `paths`. Item i: (image, label or -1)."""

    def __init__(self, root: str | os.PathLike, size: int, channels: int = 3):
        self.root = Path(root)
        self.size, self.channels = int(size), int(channels)
        self.paths, labels, self.class_names = list_images(self.root)
        # load_image raises ValueError / FileNotFoundError naming the offending file
        self.images: Tensor = torch.stack([load_image(p, size, channels) for p in self.paths])
        self.labels: Tensor | None = None if labels is None else torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], (-1 if self.labels is None else int(self.labels[i]))
