"""A procedural "shapes" set: one (or two) coloured shapes on a plain background, with captions.

Every image is fixed by a few discrete attributes, so text-to-image, editing and
personalisation can be scored against known ground truth (an attribute classifier, the mask):

    shape       circle, square, triangle, cross, star
    color       red, green, blue, yellow, purple, cyan
    size        small (half-extent 0.13 of the width), large (0.22)
    position    left, right, top, bottom, center   (centres at 1/4, 3/4 or 1/2 of the width)
    background  dark, light

Rendering is exact geometry, antialiased by supersampling: a pixel's coverage is the fraction of
``ss x ss`` sub-pixel centres inside the shape, and the pixel is ``bg * (1 - c) + colour * c``.
The object mask is ``coverage >= 0.5``. Item i of a set is drawn from a counter-based hash of
(seed, i), so it does not depend on the set's length and needs no stored state. With
``objects=2`` the second object sits opposite the first (left/right or top/bottom, never
overlapping) and the caption joins the two phrases with "and".

Usage::

    ds = ShapesDataset(1000, size=32, seed=0)
    item = ds[3]          # {"image": (3,32,32) in [-1,1], "caption": str, "attributes": {...},
                          #  "mask": (1,32,32) in {0,1}}
    batch = make_shapes(10_000, seed=0, size=32)      # batched tensors, ~0.5 s on one core
    x = render({"shape": "star", "color": "red", "size": "large", "position": "left"})
    caption_for({"shape": 0, "color": 2, "size": 1, "position": 4})
    # -> "a large blue circle in the center"
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ._hash import mix

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "POSITIONS",
    "BACKGROUNDS",
    "ATTRIBUTES",
    "COLOR_RGB",
    "BACKGROUND_RGB",
    "TEMPLATES",
    "ShapesDataset",
    "sample_attributes",
    "make_shapes",
    "render",
    "render_batch",
    "caption_for",
    "parse_caption",
    "encode_attributes",
    "make_two_colour",
    "two_colour_score",
]

# --------------------------------------------------------------------------------------------
# Vocabularies and geometry
# --------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "cyan")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("dark", "light")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}

COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUND_RGB: dict[str, tuple[float, float, float]] = {
    "dark": (0.08, 0.08, 0.10),
    "light": (0.92, 0.92, 0.90),
}

# Half-extent of each size and centre of each position, as fractions of the image width.
_RADIUS = {"small": 0.13, "large": 0.22}
_CENTRE = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

TEMPLATES = (
    "{objects}",
    "{objects} against a {background} background",
    "a picture of {objects}",
    "an image of {objects} on a {background} background",
)

_RGB = np.array([COLOR_RGB[c] for c in COLORS], dtype=np.float32)  # (6, 3)
_BG_RGB = np.array([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=np.float32)  # (2, 3)
_OPP_INDEX = np.array([POSITIONS.index(_OPPOSITE.get(p, p)) for p in POSITIONS])
_KEYS_1 = ("shape", "color", "size", "position", "background")
_OBJ_KEYS = ("shape", "color", "size", "position")


def _supersample(size: int) -> int:
    """Sub-pixels per pixel side: 8 up to 32 px, fewer for large images (>= 512 per side total)."""
    return int(min(8, max(2, 256 // size)))


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of points (dx, dy) (offsets from the centre, y down) inside the shape."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":  # half side 0.85 r: area close to the circle's
        a = 0.85 * r
        return (np.abs(dx) <= a) & (np.abs(dy) <= a)
    if shape == "triangle":  # equilateral, apex up, bounding box centred
        h = math.sqrt(3.0) * r
        depth = dy + h / 2  # distance below the apex
        return (depth >= 0) & (depth <= h) & (np.abs(dx) * h <= r * depth)
    if shape == "cross":  # a plus sign: arms 0.95 r long, 0.32 r half-thick
        a, t = 0.95 * r, 0.32 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= a) & (ay <= t)) | ((ax <= t) & (ay <= a))
    if shape == "star":  # five points, one up; inner/outer radius 0.45
        outer, inner = 1.1 * r, 0.45 * 1.1 * r
        phi = np.arctan2(dy, dx) + math.pi / 2  # 0 at the top point
        sector = 2 * math.pi / 5
        a = np.mod(phi, sector)
        a = np.minimum(a, sector - a)  # fold onto [0, 36 deg]
        rho = np.hypot(dx, dy)
        px, py = rho * np.cos(a), rho * np.sin(a)  # folded point
        vx, vy = outer, 0.0  # outer vertex
        wx, wy = inner * math.cos(sector / 2), inner * math.sin(sector / 2)  # inner vertex
        # inside iff on the same side of the edge v->w as the origin
        cross = (wx - vx) * (py - vy) - (wy - vy) * (px - vx)
        origin = (wx - vx) * (0 - vy) - (wy - vy) * (0 - vx)
        return cross * origin >= 0
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _coverage(shape: int, size: int, position: int, res: int, ss: int) -> np.ndarray:
    """Antialiased coverage (res, res) float32 in [0, 1]: mean over ss x ss sub-pixel centres."""
    u = (np.arange(res * ss, dtype=np.float64) + 0.5) / (res * ss)
    cx, cy = _CENTRE[POSITIONS[position]]
    dx = (u - cx)[None, :]
    dy = (u - cy)[:, None]
    inside = _inside(SHAPES[shape], dx, dy, _RADIUS[SIZES[size]])  # (res*ss, res*ss)
    inside = np.broadcast_to(inside, (res * ss, res * ss))
    cov = inside.reshape(res, ss, res, ss).mean(axis=(1, 3))  # (res, res)
    return cov.astype(np.float32)


@lru_cache(maxsize=8)
def _coverage_table(res: int, ss: int) -> np.ndarray:
    """All coverages, (len(SHAPES), len(SIZES), len(POSITIONS), res, res) float32."""
    table = np.empty((len(SHAPES), len(SIZES), len(POSITIONS), res, res), dtype=np.float32)
    for s in range(len(SHAPES)):
        for z in range(len(SIZES)):
            for p in range(len(POSITIONS)):
                table[s, z, p] = _coverage(s, z, p, res, ss)
    table.setflags(write=False)
    return table


def _composite(bg: np.ndarray, layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Paint layers over a background: x <- x * (1 - c) + rgb * c. bg (N,3); c (N,H,W); rgb (N,3).

    Returns (N, 3, H, W) float32 in [0, 1]."""
    cov0 = layers[0][0]
    n, h, w = cov0.shape
    x = np.broadcast_to(bg[:, :, None, None], (n, 3, h, w)).astype(np.float32)
    for cov, rgb in layers:
        c = cov[:, None]  # (N, 1, H, W)
        x = x * (1 - c) + rgb[:, :, None, None] * c
    return x


# --------------------------------------------------------------------------------------------
# Attributes: encoding, sampling, captions
# --------------------------------------------------------------------------------------------


def _encode_one(key: str, value: Any) -> int:
    vocab = ATTRIBUTES[key]
    if isinstance(value, str):
        if value not in vocab:
            raise ValueError(f"unknown {key} {value!r}; known: {vocab}")
        return vocab.index(value)
    i = int(value)
    if not 0 <= i < len(vocab):
        raise ValueError(f"{key} index {i} out of range 0..{len(vocab) - 1} ({vocab})")
    return i


def encode_attributes(attrs: Mapping[str, Any]) -> dict[str, int]:
    """Attribute names or indices -> indices. Keys: shape, color, size, position, background
    (default "dark"), template (default 0), and shape2/color2/size2 for a second object."""
    unknown = set(attrs) - set(_KEYS_1) - {"template", "shape2", "color2", "size2", "position2"}
    if unknown:
        raise ValueError(
            f"unknown attribute keys {sorted(unknown)}; known: {list(_KEYS_1)}, template, shape2, color2, size2"
        )
    missing = [k for k in _OBJ_KEYS if k not in attrs]
    if missing:
        raise ValueError(f"attributes {dict(attrs)} lack {missing}")
    out = {k: _encode_one(k, attrs[k]) for k in _OBJ_KEYS}
    out["background"] = _encode_one("background", attrs.get("background", 0))
    t = int(attrs.get("template", 0))
    if not 0 <= t < len(TEMPLATES):
        raise ValueError(f"template {t} out of range 0..{len(TEMPLATES) - 1}")
    out["template"] = t
    second = [k for k in ("shape2", "color2", "size2") if k in attrs]
    if second:
        if len(second) != 3:
            raise ValueError(f"a second object needs shape2, color2 and size2; got {second}")
        pos = POSITIONS[out["position"]]
        if pos not in _OPPOSITE:
            raise ValueError(f"with two objects the first must be left, right, top or bottom, got {pos!r}")
        for k in second:
            out[k] = _encode_one(k[:-1], attrs[k])
        out["position2"] = POSITIONS.index(_OPPOSITE[pos])
        if "position2" in attrs and _encode_one("position", attrs["position2"]) != out["position2"]:
            raise ValueError(f"position2 must be opposite the first object ({_OPPOSITE[pos]!r})")
    return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(shape: int, color: int, size: int, position: int) -> str:
    s = SIZES[size]
    return f"{_article(s)} {s} {COLORS[color]} {SHAPES[shape]} {_WHERE[POSITIONS[position]]}"


def caption_for(attrs: Mapping[str, Any], template: int | None = None) -> str:
    """The caption of an attribute combination, e.g. "a large red circle on the left".

    `template` (index into TEMPLATES) overrides attrs["template"] (default 0)."""
    a = encode_attributes(attrs)
    objects = _phrase(a["shape"], a["color"], a["size"], a["position"])
    if "shape2" in a:
        objects += " and " + _phrase(a["shape2"], a["color2"], a["size2"], a["position2"])
    t = a["template"] if template is None else int(template)
    return TEMPLATES[t].format(objects=objects, background=BACKGROUNDS[a["background"]])


_WORD_TO = {w: (k, i) for k, vocab in ATTRIBUTES.items() if k != "position" for i, w in enumerate(vocab)}
_WORD_TO.update({w: ("position", i) for i, w in enumerate(POSITIONS)})


def parse_caption(caption: str) -> dict[str, int]:
    """Attributes named in a caption (inverse of `caption_for`; background only if mentioned).

    Raises ValueError if an object phrase lacks a shape, colour, size or position."""
    parts = caption.lower().split(" and ")
    out: dict[str, int] = {}
    for j, part in enumerate(parts):
        found: dict[str, int] = {}
        for word in re.findall(r"[a-z]+", part):
            if word in _WORD_TO:
                key, i = _WORD_TO[word]
                found[key] = i
        missing = [k for k in _OBJ_KEYS if k not in found]
        if missing:
            raise ValueError(f"caption {caption!r}: object {j + 1} names no {missing}")
        suffix = "" if j == 0 else str(j + 1)
        for k in _OBJ_KEYS:
            out[k + suffix] = found[k]
        if "background" in found:
            out["background"] = found["background"]
    return out


def _excluded(attrs: dict[str, np.ndarray], exclude: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Boolean (N,): rows matching any of the partial attribute dicts in `exclude`."""
    n = len(attrs["shape"])
    bad = np.zeros(n, dtype=bool)
    for rule in exclude:
        hit = np.ones(n, dtype=bool)
        for k, v in rule.items():
            base = k[:-1] if k.endswith("2") else k
            if base not in ATTRIBUTES:
                raise ValueError(f"exclude rule {dict(rule)}: unknown key {k!r}")
            if k not in attrs:
                hit[:] = False
                break
            hit &= attrs[k] == _encode_one(base, v)
        bad |= hit
    return bad


def sample_attributes(
    n: int, seed: int = 0, *, start: int = 0, objects: int = 1, exclude: Sequence[Mapping[str, Any]] = ()
) -> dict[str, np.ndarray]:
    """Attributes of items start..start+n-1: int64 arrays keyed like `encode_attributes`.

    Item i depends only on (seed, i, objects): attribute k is hash(seed, i, attempt, k) mod its
    vocabulary size; items matching an `exclude` rule (partial attribute dicts, e.g.
    ``{"shape": "circle", "color": "red"}`` to hold a combination out) are redrawn with the next
    attempt until none matches."""
    if objects not in (1, 2):
        raise ValueError(f"objects must be 1 or 2, got {objects}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    idx = np.arange(start, start + n, dtype=np.int64)
    out = {k: np.zeros(n, dtype=np.int64) for k in _draw_keys(objects)}
    todo = np.arange(n)
    for attempt in range(1000):
        draw = _draw(seed, idx[todo], attempt, objects)
        for k in out:
            out[k][todo] = draw[k]
        if not exclude:
            return out
        bad = _excluded({k: v[todo] for k, v in out.items()}, exclude)
        todo = todo[bad]
        if len(todo) == 0:
            return out
    raise ValueError(f"exclude rules {list(exclude)} leave (almost) no attribute combination")


def _draw_keys(objects: int) -> tuple[str, ...]:
    keys = _KEYS_1 + ("template",)
    return keys + ("shape2", "color2", "size2", "position2") if objects == 2 else keys


def _draw(seed: int, idx: np.ndarray, attempt: int, objects: int) -> dict[str, np.ndarray]:
    key = mix(seed, objects, idx, attempt)  # (N,) uint64
    sizes = {k: len(v) for k, v in ATTRIBUTES.items()}
    sizes["template"] = len(TEMPLATES)
    out = {}
    for salt, k in enumerate(_KEYS_1 + ("template",)):
        out[k] = (mix(key, salt) % np.uint64(sizes[k])).astype(np.int64)
    if objects == 2:
        # the first object on one of the four sides, the second on the opposite side
        out["position"] = (mix(key, 10) % np.uint64(4)).astype(np.int64)
        for salt, k in enumerate(("shape2", "color2", "size2"), start=11):
            out[k] = (mix(key, salt) % np.uint64(sizes[k[:-1]])).astype(np.int64)
        out["position2"] = _OPP_INDEX[out["position"]]
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _to_torch(x01: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x01, dtype=np.float32)).mul_(2).sub_(1)


def render_batch(attrs: Mapping[str, Any], size: int = 32) -> tuple[Tensor, Tensor]:
    """Render attribute arrays (as from `sample_attributes`) -> images (N,3,H,W) in [-1,1] and
    masks (N,1,H,W) in {0,1}; a gather from a cached table of coverages."""
    _check_size(size)
    a = {k: np.asarray(v, dtype=np.int64).reshape(-1) for k, v in attrs.items()}
    table = _coverage_table(size, _supersample(size))
    layers = [(table[a["shape"], a["size"], a["position"]], _RGB[a["color"]])]
    if "shape2" in a:
        layers.append((table[a["shape2"], a["size2"], a["position2"]], _RGB[a["color2"]]))
    x = _composite(_BG_RGB[a["background"]], layers)
    mask = np.zeros_like(layers[0][0], dtype=bool)
    for cov, _ in layers:
        mask |= cov >= 0.5
    return _to_torch(x), torch.from_numpy(mask[:, None].astype(np.float32))


def render(attrs: Mapping[str, Any], size: int = 32, *, return_mask: bool = False):
    """Render one attribute combination (names or indices) -> (3,H,W) in [-1,1] [, mask (1,H,W)].

    Computes the geometry directly (no table), so it checks `render_batch`; use it for
    held-out combinations and edits ("the same layout, another colour")."""
    _check_size(size)
    a = encode_attributes(attrs)
    ss = _supersample(size)
    layers = [(_coverage(a["shape"], a["size"], a["position"], size, ss)[None], _RGB[[a["color"]]])]
    if "shape2" in a:
        layers.append((_coverage(a["shape2"], a["size2"], a["position2"], size, ss)[None], _RGB[[a["color2"]]]))
    x = _to_torch(_composite(_BG_RGB[[a["background"]]], layers))[0]
    if not return_mask:
        return x
    mask = np.zeros((size, size), dtype=bool)
    for cov, _ in layers:
        mask |= cov[0] >= 0.5
    return x, torch.from_numpy(mask[None].astype(np.float32))


# --------------------------------------------------------------------------------------------
# A concept outside the vocabulary: two-colour objects (for personalisation papers)
# --------------------------------------------------------------------------------------------


def make_two_colour(
    n: int, seed: int = 0, size: int = 32, *, shape: str = "star", colors: tuple[str, str] = ("red", "blue")
) -> Tensor:
    """n images of `shape` whose left half (of the object, split at its centre) is colors[0] and right
    half colors[1], at the generator's sizes, positions and backgrounds: an object no caption of the
    dataset names and no image of it shows. (n, 3, H, W) in [-1, 1]."""
    _encode_one("shape", shape)  # a clear error for an unknown shape or colour
    a, b = _encode_one("color", colors[0]), _encode_one("color", colors[1])
    if a == b:
        raise ValueError(f"two_colour needs two different colours, got {colors}")
    attrs = sample_attributes(n, seed, exclude=[{"shape": s} for s in SHAPES if s != shape])
    table = _coverage_table(size, _supersample(size))
    cov = table[attrs["shape"], attrs["size"], attrs["position"]]  # (N, H, W)
    cx = np.array([_CENTRE[POSITIONS[p]][0] for p in attrs["position"]])  # object centres, fractions of W
    u = (np.arange(size) + 0.5) / size
    left = (u[None, :] < cx[:, None])[:, None, :].astype(np.float32)  # (N, 1, W): split between pixel columns
    layers = [(cov * left, np.repeat(_RGB[[a]], n, 0)), (cov * (1 - left), np.repeat(_RGB[[b]], n, 0))]
    return _to_torch(_composite(_BG_RGB[attrs["background"]], layers))


def two_colour_score(x: Tensor, colors: tuple[str, str] = ("red", "blue"), min_share: float = 0.6) -> dict:
    """Which images (N, 3, H, W) in [-1, 1] show one object colored colors[0] on its left half and colors[1]
    on its right: every pixel goes to its nearest palette colour (the six object colours and the two
    backgrounds); the object is the pixels of the six colours; it splits at its column centroid.
    Returns per image bool tensors "split" (colors[0] holds >= min_share of the left half's object
    pixels and colors[1] of the right half's), "either_order" (the same with the halves swapped
    allowed), and "two_colours" (both colours hold >= (1 - min_share) of the object's pixels)."""
    palette = torch.from_numpy(np.concatenate([_RGB, _BG_RGB])).to(x)  # (8, 3)
    rgb = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # (N, H, W, 3)
    label = torch.cdist(rgb.reshape(len(x), -1, 3), palette[None].expand(len(x), -1, -1)).argmin(-1)
    label = label.reshape(rgb.shape[:3])  # (N, H, W): 0..5 colours, 6..7 backgrounds
    obj = label < len(COLORS)
    cols = torch.arange(x.shape[-1], device=x.device, dtype=rgb.dtype)[None, None, :]
    count = obj.sum((1, 2)).clamp(min=1)
    centre = (obj * cols).sum((1, 2)) / count  # (N,) column centroid
    left = obj & (cols < centre[:, None, None])
    right = obj & (cols >= centre[:, None, None])
    a, b = COLORS.index(colors[0]), COLORS.index(colors[1])

    def share(region, c):
        return ((label == c) & region).sum((1, 2)) / region.sum((1, 2)).clamp(min=1)

    present = obj.sum((1, 2)) > 0
    split = present & (share(left, a) >= min_share) & (share(right, b) >= min_share)
    swapped = present & (share(left, b) >= min_share) & (share(right, a) >= min_share)
    both = present & (share(obj, a) >= 1 - min_share) & (share(obj, b) >= 1 - min_share)
    return {"split": split, "either_order": split | swapped, "two_colours": both}


def _check_size(size: int) -> None:
    if int(size) != size or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")


def make_shapes(
    n: int,
    seed: int = 0,
    size: int = 32,
    *,
    start: int = 0,
    objects: int = 1,
    exclude: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """n shapes images at once: {"images": (n,3,H,W), "masks": (n,1,H,W), "captions": [str],
    "attributes": {key: int64 (n,)}}; item i equals ``ShapesDataset(..., seed)[start + i]``."""
    attrs = sample_attributes(n, seed, start=start, objects=objects, exclude=exclude)
    images, masks = render_batch(attrs, size)
    captions = _captions(attrs)
    return {
        "images": images,
        "masks": masks,
        "captions": captions,
        "attributes": {k: torch.from_numpy(v) for k, v in attrs.items()},
    }


def _captions(attrs: Mapping[str, np.ndarray]) -> list[str]:
    """Captions of attribute arrays: one `caption_for` call per distinct combination."""
    keys = _draw_keys(2 if "shape2" in attrs else 1)
    rows = np.stack([np.asarray(attrs[k], dtype=np.int64) for k in keys], axis=1)  # (N, K)
    if len(rows) == 0:
        return []
    combos, inverse = np.unique(rows, axis=0, return_inverse=True)
    texts = [caption_for(dict(zip(keys, map(int, c)))) for c in combos]
    return [texts[j] for j in inverse.reshape(-1)]


class ShapesDataset(torch.utils.data.Dataset):
    """`n` seeded shapes images; item i is a dict: image (3,H,W) in [-1,1], caption, attributes
    (dict of ints), mask (1,H,W) in {0,1}. Items depend on (seed, start + i), not on n."""

    def __init__(
        self,
        n: int,
        size: int = 32,
        seed: int = 0,
        *,
        start: int = 0,
        objects: int = 1,
        exclude: Sequence[Mapping[str, Any]] = (),
    ):
        _check_size(size)
        self.n, self.size, self.seed, self.start = int(n), int(size), int(seed), int(start)
        self.objects = objects
        self.exclude = tuple(exclude)
        self._attrs = sample_attributes(self.n, self.seed, start=self.start, objects=objects, exclude=self.exclude)

    def __len__(self) -> int:
        return self.n

    def attributes(self, i: int) -> dict[str, int]:
        """Attribute indices of item i."""
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} items")
        return {k: int(v[i]) for k, v in self._attrs.items()}

    def __getitem__(self, i: int) -> dict[str, Any]:
        attrs = self.attributes(i)
        image, mask = render_batch({k: [v] for k, v in attrs.items()}, self.size)
        return {"image": image[0], "caption": caption_for(attrs), "attributes": attrs, "mask": mask[0]}
