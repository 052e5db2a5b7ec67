"""Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747) from the Debian package's idx files.

Install with ``apt-get install dataset-fashion-mnist``: the four files live in
``/usr/share/datasets/fashion-mnist/``. Debian re-compressed them, so the upstream MD5 sums do not
apply; instead every file's idx header is checked (magic number, rank, dimensions) and its
length must match the header exactly; the images and labels of a split must agree in count, and
the counts must be 60000 (train) and 10000 (test) of 28 x 28.

The directory is, in order: the ``root=`` argument, ``$DIFFLAB_FASHION_MNIST``, the Debian path.
Plain (un-gzipped) idx files are read too.

No on-disk cache, by measurement (2-core machine, warm page cache): a whole train load with
padding takes ~0.22 s from the gzip files and would take ~0.07 s from a .npy cache; a tenth of a
second or so is not material next to any training run, so no files are written. The decoded
uint8 arrays are memoised in-process instead (keyed by path, size and mtime).

Usage::

    images, labels = load_fashion_mnist("train", pad_to=32)   # (60000,1,32,32) in [-1,1], int64
    CLASS_NAMES[labels[0]]
"""

from __future__ import annotations

import gzip
import os
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_ROOT",
    "ENV_VAR",
    "FILES",
    "INSTALL_COMMAND",
    "read_idx",
    "fashion_mnist_root",
    "fashion_mnist_available",
    "load_fashion_mnist",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "DIFFLAB_FASHION_MNIST"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
COUNTS = {"train": 60000, "test": 10000}
INSTALL_COMMAND = "apt-get update && apt-get install -y dataset-fashion-mnist"

# idx type codes (third byte of the magic number) -> numpy big-endian dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzipped) -> numpy array of its declared dtype and shape.

    Raises ValueError naming the file if it is truncated, corrupt or not idx."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (magic bytes {raw[:4].hex() or 'missing'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: bad idx magic {raw[:4].hex()} (type 0x{code:02x}, rank {ndim})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes, rank {ndim})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: idx header declares shape {shape} ({expected} bytes) but the "
            f"file holds {len(raw)} bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


@lru_cache(maxsize=4)
def _read_idx_cached(path: str, size: int, mtime_ns: int) -> np.ndarray:
    return read_idx(path)


def _read(path: Path) -> np.ndarray:
    st = path.stat()
    return _read_idx_cached(str(path), st.st_size, st.st_mtime_ns)


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The data directory: `root`, else $DIFFLAB_FASHION_MNIST, else the Debian path."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / (stem + '.gz')} not found. Install the Debian package with "
        f"`{INSTALL_COMMAND}` (files go to {DEFAULT_ROOT}), or point root= or ${ENV_VAR} at a folder "
        f"holding {stem}.gz"
    )


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    """Whether all four idx files are present (their contents are checked when loaded)."""
    folder = fashion_mnist_root(root)
    try:
        for pair in FILES.values():
            for stem in pair:
                _find(folder, stem)
    except FileNotFoundError:
        return False
    return True


def load_fashion_mnist(
    split: str = "train", *, root: str | os.PathLike | None = None, pad_to: int | None = None, check_counts: bool = True
) -> tuple[Tensor, Tensor]:
    """Images (N,1,S,S) float32 in [-1,1] (S = 28, or `pad_to` with background -1) and labels
    (N,) int64 in 0..9. `check_counts=False` accepts other counts (for small test files)."""
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}; known: {tuple(FILES)}")
    folder = fashion_mnist_root(root)
    img_path, lbl_path = (_find(folder, stem) for stem in FILES[split])
    images, labels = _read(img_path), _read(lbl_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{lbl_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels")
    if check_counts and len(images) != COUNTS[split]:
        raise ValueError(f"{img_path}: expected {COUNTS[split]} {split} images, found {len(images)}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lbl_path}: label {int(labels.max())} outside 0..9")
    if pad_to is not None:
        if pad_to < 28:
            raise ValueError(f"pad_to must be >= 28, got {pad_to}")
        before = (pad_to - 28) // 2
        after = pad_to - 28 - before
        images = np.pad(images, ((0, 0), (before, after), (before, after)))  # 0 -> -1 below
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # (N, 1, S, S)
    x = x.div_(127.5).sub_(1.0)
    return x, torch.from_numpy(labels.astype(np.int64))
