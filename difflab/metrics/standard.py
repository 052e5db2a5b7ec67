"""FID and KID by the conventions published numbers use, on Inception weights the user has:

1. images are quantised to uint8 (generated images in [-1, 1] become round((x + 1) * 127.5)), as
   every published FID scores saved PNGs;
2. resized to 299 x 299 by TensorFlow 1's bilinear resize (`resize="tf1"`, the default:
   align_corners=False, the source of output pixel i is i * in / out, no half-pixel offset), the
   resize of the original TF FID code and of torch-fidelity; or by antialiased bilinear
   (`resize="antialias"`, half-pixel centres: torchmetrics' default since 1.x); grey images are
   repeated to RGB;
3. scaled by (x - 128) / 128 into the network, whose 2048-d pool3 features give
4. FID = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (`difflab.metrics.frechet`), and
   KID = the unbiased MMD^2 under the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged
   over `subsets` random subsets of `subset_size` per side (mean and standard deviation; 100 x 1000
   is the usual setting, as in torch-fidelity and torchmetrics).

`tests/metrics/test_standard_fid.py` checks FID and KID against torchmetrics (its torch-fidelity
Inception, fed the same random weights file), with either resize, within 1%.

    python -m difflab fid real_pngs/ generated_pngs/ --inception-weights pt_inception-2015-12-05-6726825d.pth
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from difflab.metrics.frechet import frechet_distance, mean_cov

__all__ = [
    "to_uint8",
    "resize_tf1_bilinear",
    "inception_features_uint8",
    "kid",
    "fid_kid",
    "load_image_folder",
    "fid_folders",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] (float) -> uint8 0..255, as a saved PNG holds them."""
    if x.dtype == torch.uint8:
        return x
    if not torch.isfinite(x).all():
        raise ValueError("images hold NaN or infinite values")
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _resize_axis(x: Tensor, out: int, dim: int) -> Tensor:
    """TF1 bilinear (align_corners=False) along one axis: output i reads input i * n / out."""
    n = x.shape[dim]
    if n == out:
        return x
    pos = torch.arange(out, dtype=torch.float32, device=x.device) * (n / out)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.float()).to(x.dtype)
    shape = [1] * x.ndim
    shape[dim] = out
    frac = frac.reshape(shape)
    return x.index_select(dim, lo) * (1 - frac) + x.index_select(dim, hi) * frac


def resize_tf1_bilinear(x: Tensor, size: int = 299) -> Tensor:
    """(B, C, H, W) float -> (B, C, size, size) by TensorFlow 1's bilinear resize (rows, then columns)."""
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"resize needs a float (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    return _resize_axis(_resize_axis(x, size, 2), size, 3)


RESIZES = ("tf1", "antialias")


def _resize(x: Tensor, kind: str) -> Tensor:
    if kind == "tf1":
        return resize_tf1_bilinear(x, 299)
    if kind == "antialias":
        return torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
    raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {kind!r}")


@torch.no_grad()
def inception_features_uint8(
    net, images: Tensor, batch_size: int = 64, progress: bool = False, resize: str = "tf1"
) -> Tensor:
    """pool3 features (N, 2048) float64 of images (N, 1|3, H, W), uint8 or float in [-1, 1] (quantised
    first), by the conventions above. `net`: `difflab.metrics.inception.InceptionV3` ("fid" weights)."""
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    device = next(net.parameters()).device
    chunks = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="Inception features", leave=False)
    out = []
    for a in chunks:
        x = to_uint8(images[a : a + batch_size]).to(device).float()  # 0..255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = (_resize(x, resize) - 128) / 128
        out.append(net(x).double().cpu())
    return torch.cat(out)


def kid(
    feats_a,
    feats_b,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): (mean, std) over subsets of the unbiased MMD^2
    with k(x, y) = (x.y / d + coef)^degree. A subset_size above either set's size is cut to it."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"KID needs two (N, d) feature sets of one d, got {a.shape} and {b.shape}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per side, got {len(a)} and {len(b)}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + coef) ** degree
        kyy = (y @ y.T / d + coef) ** degree
        kxy = (x @ y.T / d + coef) ** degree
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    values = np.asarray(values)
    return float(values.mean()), float(values.std())


def fid_kid(feats_a: Tensor, feats_b: Tensor, kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """{"fid", "kid", "kid_std", "n_a", "n_b"} of two feature sets."""
    mu_a, cov_a = mean_cov(feats_a)
    mu_b, cov_b = mean_cov(feats_b)
    k, k_std = kid(feats_a, feats_b, kid_subsets, kid_subset_size)
    return {
        "fid": frechet_distance(mu_a, cov_a, mu_b, cov_b),
        "kid": k,
        "kid_std": k_std,
        "n_a": len(feats_a),
        "n_b": len(feats_b),
    }


def load_image_folder(folder: str | os.PathLike) -> Tensor:
    """Every image file of a folder (sorted; not recursive) as uint8 (N, 3, H, W); one size required."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images, size = [], None
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        if size is None:
            size = arr.shape
        elif arr.shape != size:
            raise ValueError(
                f"{path} is {arr.shape[1]} x {arr.shape[0]}, the folder's first image {size[1]} x {size[0]}"
            )
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(images)


def fid_folders(
    dir_a,
    dir_b,
    inception_weights,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    batch_size: int = 64,
    resize: str = "tf1",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """FID and KID between two folders of images, by the conventions above."""
    from difflab.metrics.inception import load_inception

    net = load_inception(inception_weights, variant="fid")
    if device is not None:
        from difflab.pipeline import resolve_device

        net.to(resolve_device(device))
    feats = [inception_features_uint8(net, load_image_folder(d), batch_size, progress, resize) for d in (dir_a, dir_b)]
    report = fid_kid(*feats, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    report.update({"dir_a": str(dir_a), "dir_b": str(dir_b), "resize": resize, "inception_sha256": net.weights_sha256})
    return report
