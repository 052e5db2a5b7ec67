"""Pluggable feature extractors for Frechet distance and precision/recall, and the on-disk cache of
reference statistics.

Extractors (`feature_extractor(name)`):

    "fmnist", "digits", "shapes"   difflab's own domain classifiers (128-d penultimate layer;
                                   they also give p(y|x) for the Inception-Score analogue)
    "inception"                    Inception-v3 pool3 (2048-d): the standard FID; needs
                                   weights=PATH to a local standard weights file

Reference statistics (mean, covariance and a fixed random subset of features for
precision/recall) of a data set split are computed once and cached under
`$DIFFLAB_CACHE/fd_stats/` (default `~/.cache/difflab/fd_stats/`), in a safetensors file named by
data set, split, image geometry, extractor and the first 12 hex digits of the extractor weights'
sha256, so new weights never reuse stale statistics. Loading a cached file says so; computing
one says so; nothing is recomputed unless asked (`recompute=True`, `--recompute-stats`).

Usage::

    ext = feature_extractor("fmnist")
    ref = reference_stats(ext, "fashion_mnist", "train", data_kwargs={"pad_to": 32})
    feats, probs = extract(ext, samples)
    fd = frechet_distance(*mean_cov(feats), ref.mu, ref.cov)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from difflab.metrics.classifiers import (
    CLASSIFIERS,
    DATASET_EXTRACTOR,
    FeatureNet,
    load_classifier,
    prepare_images,
)
from difflab.metrics.frechet import GaussianStats

__all__ = [
    "EXTRACTORS",
    "FeatureExtractor",
    "ClassifierExtractor",
    "InceptionExtractor",
    "feature_extractor",
    "default_extractor",
    "extract",
    "ReferenceStats",
    "reference_stats",
    "stats_cache_dir",
    "STATS_FORMAT",
]

EXTRACTORS = (*CLASSIFIERS, "inception")
STATS_FORMAT = "difflab-fd-stats-1"


class FeatureExtractor:
    """Images (B, C, H, W) in [-1, 1] -> features (B, dim); `probs` only for classifiers."""

    name: str
    dim: int
    weights_sha256: str
    has_probs: bool = False

    @property
    def display_name(self) -> str:
        """What the distance is called with these features: FID, FD-FMNIST, FD-digits, FD-shapes."""
        return {"inception": "FID", "fmnist": "FD-FMNIST"}.get(self.name, f"FD-{self.name}")

    def features_and_probs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.features_and_probs(x)[0]

    def to(self, device) -> "FeatureExtractor":  # pragma: no cover - overridden
        return self


class ClassifierExtractor(FeatureExtractor):
    """A difflab domain classifier: penultimate-layer features and p(label | x)."""

    has_probs = True

    def __init__(self, net: FeatureNet, name: str):
        self.net = net
        self.name = name
        self.dim = net.config.feature_dim
        self.weights_sha256 = getattr(net, "weights_sha256", "")
        self.label_head = CLASSIFIERS[name].label_head if name in CLASSIFIERS else next(iter(net.config.heads))

    @torch.no_grad()
    def features_and_probs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        device = next(self.net.parameters()).device
        x = prepare_images(x, self.net.config.in_channels, self.net.config.image_size).to(device)
        logits, f = self.net.logits_and_features(x)
        return f.float().cpu(), logits[self.label_head].float().softmax(1).cpu()

    def to(self, device) -> "ClassifierExtractor":
        self.net.to(device)
        return self


class InceptionExtractor(FeatureExtractor):
    """Inception-v3 pool3 features by the published FID's conventions (`difflab.metrics.standard`):
    images quantised to uint8, TensorFlow 1 bilinear resize to 299, (x - 128) / 128."""

    cache_tag = "inception-uint8-tf1"  # reference statistics computed the older way are not reused

    def __init__(self, net):
        self.net = net
        self.name = "inception"
        self.dim = 2048
        self.weights_sha256 = net.weights_sha256

    @torch.no_grad()
    def features_and_probs(self, x: Tensor) -> tuple[Tensor, None]:
        from difflab.metrics.standard import inception_features_uint8

        return inception_features_uint8(self.net, x, batch_size=max(len(x), 1)).float(), None

    def to(self, device) -> "InceptionExtractor":
        self.net.to(device)
        return self


def feature_extractor(
    name: str, weights: str | os.PathLike | None = None, device: str | torch.device | None = None
) -> FeatureExtractor:
    """An extractor by name: "fmnist" | "digits" | "shapes" (committed weights, or `weights` =
    another classifier .safetensors) | "inception" (`weights` = the standard Inception-v3 file)."""
    if name == "inception":
        from difflab.metrics.inception import INCEPTION_HELP, load_inception

        if weights is None:
            raise ValueError(f"the inception extractor needs a weights file. {INCEPTION_HELP}")
        ext: FeatureExtractor = InceptionExtractor(load_inception(weights))
    elif name in CLASSIFIERS:
        ext = ClassifierExtractor(load_classifier(weights or name), name)
    else:
        raise ValueError(f"unknown feature extractor {name!r}; known: {', '.join(EXTRACTORS)}")
    return ext.to(device) if device is not None else ext


def default_extractor(dataset: str) -> str:
    """The domain classifier of a data set ("fashion_mnist" -> "fmnist", ...)."""
    if dataset not in DATASET_EXTRACTOR:
        raise ValueError(
            f"no difflab feature classifier for data set {dataset!r} (have: "
            f"{', '.join(DATASET_EXTRACTOR)}); pass --extractor inception "
            f"--inception-weights PATH"
        )
    return DATASET_EXTRACTOR[dataset]


def extract(
    extractor: FeatureExtractor, images: Tensor, batch_size: int = 256, progress: bool = False, desc: str = "features"
) -> tuple[Tensor, Tensor | None]:
    """(features (N, dim) float32, probs (N, classes) or None) in batches."""
    feats, probs = [], []
    chunks = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=desc, leave=False)
    for a in chunks:
        f, p = extractor.features_and_probs(images[a : a + batch_size])
        feats.append(f)
        if p is not None:
            probs.append(p)
    return torch.cat(feats), (torch.cat(probs) if probs else None)


# --------------------------------------------------------------------------------------------
# Reference statistics, cached
# --------------------------------------------------------------------------------------------


def stats_cache_dir() -> Path:
    """$DIFFLAB_CACHE/fd_stats, default ~/.cache/difflab/fd_stats."""
    root = os.environ.get("DIFFLAB_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "difflab") / "fd_stats"


@dataclass
class ReferenceStats:
    mu: np.ndarray
    cov: np.ndarray
    features: Tensor  # a fixed random subset (for precision/recall)
    n: int
    path: Path
    loaded: bool  # True: read from the cache; False: computed now
    meta: dict = field(default_factory=dict)


def _cache_name(
    dataset: str, split: str, shape: tuple[int, ...], extractor: FeatureExtractor, data_kwargs: dict
) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_")
    if dataset.startswith("folder:"):  # different folders must not share a name
        safe += "-" + hashlib.sha256(dataset.encode()).hexdigest()[:8]
    geometry = "x".join(str(s) for s in shape)
    kw = ""
    if data_kwargs:
        kw = "-kw" + hashlib.sha256(json.dumps(data_kwargs, sort_keys=True, default=str).encode()).hexdigest()[:8]
    tag = getattr(extractor, "cache_tag", extractor.name)
    return f"{safe}-{split}-{geometry}{kw}-{tag}-{extractor.weights_sha256[:12]}.safetensors"


def reference_stats(
    extractor: FeatureExtractor,
    dataset: str,
    split: str = "train",
    *,
    images: Tensor | Callable[[], Tensor] | None = None,
    data_kwargs: dict | None = None,
    recompute: bool = False,
    keep: int = 10_000,
    batch_size: int = 256,
    progress: bool = False,
    log: Callable[[str], None] = print,
    cache_dir: str | os.PathLike | None = None,
) -> ReferenceStats:
    """Mean/covariance (and `keep` random features) of a data set split under `extractor`,
    read from the cache or computed and cached. `images` (a tensor or a function returning one)
    replaces `load_dataset(dataset, split, **data_kwargs)`; its geometry is part of the key."""
    from difflab.runfolder import atomic_save_safetensors, read_safetensors

    data_kwargs = dict(data_kwargs or {})
    if images is None:
        from difflab.data import load_dataset

        def images():
            return load_dataset(dataset, split, **data_kwargs).images

    get = images if callable(images) else (lambda: images)
    shape = _geometry(dataset, split, data_kwargs, get)
    folder = Path(cache_dir) if cache_dir is not None else stats_cache_dir()
    path = folder / _cache_name(dataset, split, shape, extractor, data_kwargs)
    if path.exists() and not recompute:
        tensors, meta = read_safetensors(path)
        if (
            meta.get("format") != STATS_FORMAT
            or meta.get("extractor_sha256") != extractor.weights_sha256
            or meta.get("dataset") != dataset
            or meta.get("split") != split
        ):
            raise ValueError(
                f"cached statistics {path} do not match ({meta.get('dataset')}/"
                f"{meta.get('split')}, extractor sha {meta.get('extractor_sha256', '')[:12]}); "
                f"delete the file or pass --recompute-stats"
            )
        n = int(meta["n"])
        log(
            f"reference statistics: loaded {path} ({n} {dataset}/{split} images, {extractor.name}, "
            f"computed {meta.get('created', '?')}; --recompute-stats rebuilds them)"
        )
        return ReferenceStats(tensors["mu"].numpy(), tensors["cov"].numpy(), tensors["features"], n, path, True, meta)
    x = get()
    n = len(x)
    verb = "recomputing" if path.exists() else "computing"
    log(f"reference statistics: {verb} {dataset}/{split} ({n} images, {extractor.name}) -> {path}")
    stats = GaussianStats()
    g = torch.Generator().manual_seed(0)
    keep_idx = torch.randperm(n, generator=g)[:keep].sort().values
    kept = []
    chunks = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"reference features ({dataset}/{split})", leave=False)
    for a in chunks:
        f = extractor(x[a : a + batch_size])
        stats.update(f)
        sel = keep_idx[(keep_idx >= a) & (keep_idx < a + len(f))] - a
        kept.append(f[sel])
    mu, cov = stats.mean_cov()
    features = torch.cat(kept).float()
    # the subset in random (not index) order, so a prefix of it is itself a random subset
    features = features[torch.randperm(len(features), generator=g)]
    meta = {
        "format": STATS_FORMAT,
        "dataset": dataset,
        "split": split,
        "n": str(n),
        "shape": json.dumps(list(shape)),
        "data_kwargs": json.dumps(data_kwargs, default=str),
        "extractor": extractor.name,
        "extractor_sha256": extractor.weights_sha256,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(
        {"mu": torch.from_numpy(mu), "cov": torch.from_numpy(cov), "features": features}, path, metadata=meta
    )
    return ReferenceStats(mu, cov, features, n, path, False, meta)


def _geometry(dataset: str, split: str, data_kwargs: dict, get: Callable[[], Tensor]) -> tuple[int, ...]:
    """(C, H, W) of the split's images, without loading them when it is known."""
    if dataset == "fashion_mnist" and set(data_kwargs) <= {"pad_to"}:
        s = data_kwargs.get("pad_to") or 28
        return (1, s, s)
    if dataset == "digits" and set(data_kwargs) <= {"size"}:
        s = data_kwargs.get("size", 16)
        return (1, s, s)
    if dataset == "shapes" and set(data_kwargs) <= {"n"}:
        return (3, 32, 32)
    return tuple(get().shape[1:])
