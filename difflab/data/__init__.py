"""Datasets that exist offline here, as in-memory tensors, and a resumable batch iterator.

Images are float32 (N, C, H, W) in [-1, 1]; labels int64 (N,). Every loader is deterministic
given its seed. Names for `load_dataset`:

    "digits"          sklearn digits, 16 x 16 grey (digits.py)
    "fashion_mnist"   Fashion-MNIST, 28 x 28 grey, pad_to=32 optional (fashion_mnist.py)
    "shapes"          procedural coloured shapes with captions and masks, 32 x 32 RGB (shapes.py)
    "folder:PATH"     a folder of images, size= required (folder.py)

2-D toys with exact densities are in `toys.py`; PNG grids and image/mask files in `images.py`.

Batches for training come from `iterate_batches`, whose batch number `step` is
`batch_indices(n, batch_size, seed, step)`: a function of (seed, step) alone, so a resumed run
sees exactly the batches the interrupted one would have.

Usage::

    data = load_dataset("fashion_mnist", pad_to=32)
    for step, batch in zip(range(1000), iterate_batches(data, 128, seed)):
        loss = model.loss(batch.images, batch.labels)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from torch import Tensor

from ._hash import seed_from
from .images import load_image, load_mask, save_image_grid, to_uint8

__all__ = [
    "DATASETS",
    "ImageData",
    "load_dataset",
    "iterate_batches",
    "batch_indices",
    "steps_per_epoch",
    "save_image_grid",
    "to_uint8",
    "load_image",
    "load_mask",
]

DATASETS = ("digits", "fashion_mnist", "shapes", "folder:PATH")
SHAPES_TEST_START = 1 << 40  # shapes test items are indices 2^40.. of the same seed


@dataclass
class ImageData:
    """An image set in memory: images (N,C,H,W) in [-1,1] and optional per-item annotations."""

    images: Tensor
    labels: Tensor | None = None
    class_names: tuple[str, ...] = ()
    captions: list[str] | None = None
    masks: Tensor | None = None
    attributes: dict[str, Tensor] | None = None
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(self.images.shape)}")
        n = len(self.images)
        for what, v in (("labels", self.labels), ("captions", self.captions), ("masks", self.masks)):
            if v is not None and len(v) != n:
                raise ValueError(f"{len(v)} {what} for {n} images")
        for k, v in (self.attributes or {}).items():
            if len(v) != n:
                raise ValueError(f"attribute {k!r} has {len(v)} values for {n} images")
        self.class_names = tuple(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int | tuple[int, int]:
        """Side length (or (H, W) if not square)."""
        h, w = self.images.shape[-2:]
        return int(h) if h == w else (int(h), int(w))

    def subset(self, indices: Tensor) -> "ImageData":
        """The items at `indices` (a LongTensor), annotations included."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return replace(
            self,
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            captions=None if self.captions is None else [self.captions[i] for i in idx.tolist()],
            masks=None if self.masks is None else self.masks[idx],
            attributes=None if self.attributes is None else {k: v[idx] for k, v in self.attributes.items()},
        )


# ---------------------------------------------------------------------------------------------
# Loading by name
# ---------------------------------------------------------------------------------------------


def load_dataset(name: str, split: str = "train", **kw) -> ImageData:
    """Load a dataset by name (see DATASETS); keyword arguments go to the dataset's loader."""
    if name == "digits":
        from .digits import CLASS_NAMES, load_digits

        x, y = load_digits(split, **kw)
        return ImageData(x, y, CLASS_NAMES, name="digits")
    if name == "fashion_mnist":
        from .fashion_mnist import CLASS_NAMES, load_fashion_mnist

        x, y = load_fashion_mnist(split, **kw)
        return ImageData(x, y, CLASS_NAMES, name="fashion_mnist")
    if name == "shapes":
        from .shapes import SHAPES, make_shapes

        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r} for shapes; known: ('train', 'test')")
        n = kw.pop("n", 10_000 if split == "train" else 2_000)
        start = 0 if split == "train" else SHAPES_TEST_START
        b = make_shapes(n, start=start, **kw)
        return ImageData(
            b["images"], b["attributes"]["shape"], SHAPES, b["captions"], b["masks"], b["attributes"], name="shapes"
        )
    if name.startswith("folder:"):
        from .folder import ImageFolder

        path = name[len("folder:") :]
        if split != "train":
            raise ValueError(f"a folder dataset has only split='train', got {split!r}")
        if "size" not in kw:
            raise ValueError(f"load_dataset({name!r}) needs size= (square side in pixels)")
        ds = ImageFolder(path, **kw)
        return ImageData(
            ds.images, ds.labels, tuple(ds.class_names), name=name, meta={"paths": [str(p) for p in ds.paths]}
        )
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Batches, reconstructible from (seed, step)
# ---------------------------------------------------------------------------------------------


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch: floor(n / batch_size) with drop_last, else ceil."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spe = n // batch_size if drop_last else math.ceil(n / batch_size)
    if spe == 0:
        raise ValueError(
            f"{n} items make no batch of {batch_size}" + (" with drop_last=True" if drop_last and n else "")
        )
    return spe


def _epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The permutation of epoch `epoch`: randperm from a generator seeded by hash(seed, epoch)."""
    g = torch.Generator().manual_seed(seed_from(seed, epoch))
    return torch.randperm(n, generator=g)


def batch_indices(n: int, batch_size: int, seed: int, step: int, drop_last: bool = True) -> Tensor:
    """Indices (LongTensor) of batch number `step` (0-based, counted across epochs).

    Epoch e = step // steps_per_epoch shuffles with its own permutation seeded by hash(seed, e)
    (not seed + e, so runs with neighbouring seeds do not share epochs); batch j of the epoch is
    the permutation's slice [j * batch_size, (j + 1) * batch_size)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    spe = steps_per_epoch(n, batch_size, drop_last)
    epoch, j = divmod(int(step), spe)
    return _epoch_permutation(n, seed, epoch)[j * batch_size : (j + 1) * batch_size]


def _flip_mask(seed: int, step: int, size: int) -> Tensor:
    g = torch.Generator().manual_seed(seed_from(seed, step, 0xF11B))
    return torch.rand(size, generator=g) < 0.5


def iterate_batches(
    data: ImageData | Tensor,
    batch_size: int,
    generator: torch.Generator | int,
    drop_last: bool = True,
    flip: bool = False,
    *,
    start_step: int = 0,
    epochs: int | None = None,
) -> Iterator[ImageData | Tensor]:
    """Shuffled batches of `data` (ImageData -> ImageData batches, Tensor -> Tensor batches).

    `generator` is an int seed, or a torch.Generator from which one seed is drawn at the call.
    Batch number s is `batch_indices(len(data), batch_size, seed, s, drop_last)`; iteration
    starts at `start_step` (to resume) and runs forever, or to the end of epoch `epochs` - 1.
    `flip` mirrors each image (and mask) left-right with probability 1/2, decided by
    hash(seed, step); refused for data with captions or attributes, which name positions."""
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    elif isinstance(generator, int):
        seed = generator
    else:
        raise TypeError(f"generator must be a torch.Generator or an int seed, got {generator!r}")
    if flip and isinstance(data, ImageData) and (data.captions is not None or data.attributes is not None):
        raise ValueError(f"flip=True would contradict the positional captions/attributes of {data.name or 'this data'}")
    n = len(data)
    spe = steps_per_epoch(n, batch_size, drop_last)
    return _batches(data, batch_size, seed, drop_last, flip, int(start_step), spe, epochs)


def _batches(data, batch_size, seed, drop_last, flip, step, spe, epochs):
    n = len(data)
    perm_epoch, perm = -1, None
    while epochs is None or step < epochs * spe:
        epoch, j = divmod(step, spe)
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, _epoch_permutation(n, seed, epoch)
        idx = perm[j * batch_size : (j + 1) * batch_size]
        if isinstance(data, ImageData):
            batch = data.subset(idx)
            if flip:
                m = _flip_mask(seed, step, len(idx))
                batch.images = torch.where(m[:, None, None, None], batch.images.flip(-1), batch.images)
                if batch.masks is not None:
                    batch.masks = torch.where(m[:, None, None, None], batch.masks.flip(-1), batch.masks)
        else:
            batch = data[idx]
            if flip:
                m = _flip_mask(seed, step, len(idx)).view(-1, *([1] * (batch.ndim - 1)))
                batch = torch.where(m, batch.flip(-1), batch)
        yield batch
        step += 1
