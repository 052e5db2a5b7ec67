"""Image files in and out: [-1, 1] tensors <-> PNG grids, single images and binary masks.

Geometry of `load_image(path, size)` and `load_mask(path, size)` is the same (shorter side
resized to `size` with an antialiased filter, then a centred square crop), so a mask drawn on a
photograph lines up with that photograph after loading.

Usage::

    save_image_grid(x, "samples.png", nrow=8, labels=captions)   # x: (N, C, H, W) in [-1, 1]
    img = load_image("cat.jpg", size=64)                          # (3, 64, 64) in [-1, 1]
    m = load_mask("cat_mask.png", size=64)                        # (1, 64, 64) in {0, 1}
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch import Tensor

__all__ = ["IMAGE_EXTENSIONS", "to_uint8", "grid_size", "save_image_grid", "load_image", "load_mask"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 0..255 (same shape), rounding to nearest and clamping."""
    return images.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------


def _font(px: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, ValueError, OSError):  # no FreeType: the bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with '...' until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap into at most `max_lines` lines of `width` px; the last is shortened."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(line + " " + words[0], font=font) <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if words:
        lines[-1] = lines[-1] + " " + " ".join(words)
    return [_fit(draw, line, font, width) for line in lines] or [""]


def grid_size(
    n: int, height: int, width: int, nrow: int | None = None, padding: int = 2, scale: int = 1, label_height: int = 0
) -> tuple[int, int]:
    """(width, height) in pixels of the PNG that `save_image_grid` writes."""
    ncol = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / ncol)
    return (ncol * (width * scale + padding) + padding, rows * (height * scale + label_height + padding) + padding)


def save_image_grid(
    images: Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    labels: Sequence[str] | None = None,
    *,
    padding: int = 2,
    scale: int | None = None,
    pad_value: int = 255,
    label_lines: int = 3,
) -> Image.Image:
    """Write images (N, C, H, W) in [-1, 1] (C = 1 or 3) as one grid and return it; the file type
    follows the suffix (.png, .jpg, .webp, ...; another is a ValueError).

    `nrow` is the number of images per row (default ceil(sqrt(N))). With `labels` (one string per
    image) a caption in PIL's default font goes under each image, word-wrapped to at most
    `label_lines` lines (the last shortened with '...'); images are then upscaled (nearest) by
    `scale`, default the smallest integer making them at least 64 px wide. Size: `grid_size`
    with label_height = lines used * line height + 2."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("no images to save")
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images")
    if scale is None:
        scale = max(1, math.ceil(64 / w)) if labels is not None else 1
    if nrow is not None and nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    ncol = nrow or math.ceil(math.sqrt(n))
    font = _font(10) if labels is not None else None
    label_h, line_h, wrapped = 0, 0, []
    if labels is not None:
        probe = ImageDraw.Draw(Image.new("L", (1, 1)))
        box = probe.textbbox((0, 0), "Ag", font=font)
        line_h = box[3] - min(box[1], 0) + 1
        wrapped = [_wrap(probe, str(t), font, w * scale, max(1, label_lines)) for t in labels]
        label_h = max(len(lines) for lines in wrapped) * line_h + 2
    gw, gh = grid_size(n, h, w, ncol, padding, scale, label_h)
    mode = "L" if c == 1 else "RGB"
    fill = pad_value if c == 1 else (pad_value,) * 3
    canvas = Image.new(mode, (gw, gh), fill)
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    draw = ImageDraw.Draw(canvas)
    ink = 0 if pad_value >= 128 else 255
    for i in range(n):
        r, q = divmod(i, ncol)
        x0 = padding + q * (w * scale + padding)
        y0 = padding + r * (h * scale + label_h + padding)
        tile = Image.fromarray(pixels[i, :, :, 0] if c == 1 else pixels[i], mode)
        if scale != 1:
            tile = tile.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        canvas.paste(tile, (x0, y0))
        for k, line in enumerate(wrapped[i] if labels is not None else ()):
            draw.text((x0, y0 + h * scale + 1 + k * line_h), line, fill=ink if c == 1 else (ink,) * 3, font=font)
    from difflab.core.validation import IMAGE_SUFFIXES

    path = Path(path)
    fmt = IMAGE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unknown image file type {path.suffix or '(no extension)'!r}; use one of "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return canvas


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


# the largest image read: 4096 x 4096 (difflab's models take tens to hundreds of pixels a side); a
# small file that claims more is a decompression bomb and is refused before it is decoded
MAX_IMAGE_PIXELS = 4096 * 4096


def _too_large(path, w: int | None = None, h: int | None = None) -> ValueError:
    size = f"{w} x {h} = {w * h:,} pixels" if w else f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
    return ValueError(
        f"image {path} is {size}, more than difflab reads ({MAX_IMAGE_PIXELS:,}): a decompression "
        "bomb or a photo to resize first"
    )


def image_header(path: str | os.PathLike) -> tuple[int, int, str]:
    """(width, height, mode) of an image file from its header, without decoding it; a ValueError
    for unreadable files and for images of more than MAX_IMAGE_PIXELS."""
    try:
        with Image.open(path) as im:
            w, h, mode = im.size[0], im.size[1], im.mode
    except Image.DecompressionBombError:
        raise _too_large(path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise _too_large(path, w, h)
    return w, h, mode


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image; clear errors naming the file."""
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    image_header(path)  # refuses a bomb before decoding it
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy() if im.mode != "P" else im.convert("RGBA")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _resize_crop(
    im: Image.Image, size: int | None, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """Shorter side -> size (antialiased `resample`), then the centred size x size crop."""
    if size is None:
        return im
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer or None, got {size!r}")
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _flatten_alpha(im: Image.Image) -> Image.Image:
    """Composite transparent images over white."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im


def load_image(path: str | os.PathLike, size: int | None = None, channels: int = 3) -> Tensor:
    """An image file -> (channels, H, W) float32 in [-1, 1]; `size`: shorter side + centre crop.

    Transparent pixels are composited over white. channels is 1 (grey) or 3 (RGB)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    im = _flatten_alpha(_open(path))
    im = im.convert("L" if channels == 1 else "RGB")
    im = _resize_crop(im, size)
    a = np.asarray(im, dtype=np.float32)
    if channels == 1:
        a = a[:, :, None]
    x = torch.from_numpy(a.copy()).permute(2, 0, 1)  # (C, H, W)
    return x.div_(127.5).sub_(1.0).contiguous()


def load_mask(
    path: str | os.PathLike, size: int | None = None, *, strict: bool = False, threshold: int = 128
) -> Tensor:
    """A mask image -> (1, H, W) float32 in {0, 1}: 1 where the (grey) value >= threshold.

    Resized like `load_image` (bilinear on grey values, then thresholded). `strict`: raise if
    more than 1% of the file's pixels are neither near-black (< 32) nor near-white (> 223)."""
    path = Path(path)
    im = _open(path)
    grey = im.convert("L")  # alpha is ignored
    if strict:
        g = np.asarray(grey)
        grey_frac = float(((g >= 32) & (g <= 223)).mean())
        if grey_frac > 0.01:
            raise ValueError(
                f"mask {path} is not binary: {grey_frac:.1%} of its pixels are "
                "grey (32..223); use strict=False to threshold it at "
                f"{threshold}"
            )
    grey = _resize_crop(grey, size, Image.Resampling.BILINEAR)
    m = np.asarray(grey) >= threshold
    return torch.from_numpy(m[None].astype(np.float32))
