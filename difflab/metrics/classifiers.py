"""Small domain classifiers that difflab trains itself: features for Frechet distance, p(y|x) for
the Inception-Score analogue, and attribute accuracy on the shapes set.

One architecture for all three data sets (`FeatureNet`): four 3x3 conv-BN-ReLU blocks with 2x2
max-pooling between them (16-32-64-128 channels; 32-64-128-128 for Fashion-MNIST), global
average pooling, a 128-d fully connected feature layer (ReLU), and one linear head per predicted
attribute. The 128-d feature layer is the penultimate layer:
it is what Frechet distance and precision/recall see (as Inception's 2048-d pool3 is for FID).

    fmnist   Fashion-MNIST padded to 32 x 32 (grey)  head "label" (10 classes)
    digits   sklearn digits at 16 x 16 (grey)        head "label" (10 classes)
    shapes   shapes at 32 x 32 (RGB)                 heads "shape" (the label), "color", "size",
                                                      "position", "background"

Weights live in `difflab/checkpoints/classifiers/NAME.safetensors` (package data, found through
`difflab.assets`; the repository's `checkpoints/` links there), the architecture config in the
safetensors metadata, next to `NAME.json`, a card with the training command and test accuracies.
`python -m difflab.metrics.train_classifiers NAME` retrains one (see that module).

Usage::

    net = load_classifier("fmnist")                  # eval mode, frozen
    feats = net.features(images)                     # (B, 128)
    probs = net.probs(images)                        # p(label | x), (B, 10): the first head
    acc = attribute_accuracy(load_classifier("shapes"), data.images, data.attributes)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.assets import asset

__all__ = [
    "CLASSIFIERS",
    "CLASSIFIER_DIR",
    "ClassifierSpec",
    "FeatureNet",
    "FeatureNetConfig",
    "classifier_path",
    "load_classifier",
    "save_classifier",
    "file_sha256",
    "prepare_images",
    "attribute_accuracy",
]

CLASSIFIER_DIR = asset("classifiers")
CLASSIFIER_FORMAT = "difflab-classifier-1"


@dataclass(frozen=True)
class ClassifierSpec:
    """What a named domain classifier sees: its data set, input geometry and heads."""

    dataset: str
    channels: int
    image_size: int
    heads: tuple[tuple[str, int], ...]
    label_head: str = "label"
    data_kwargs: tuple[tuple[str, object], ...] = ()


CLASSIFIERS: dict[str, ClassifierSpec] = {
    "fmnist": ClassifierSpec("fashion_mnist", 1, 32, (("label", 10),), data_kwargs=(("pad_to", 32),)),
    "digits": ClassifierSpec("digits", 1, 16, (("label", 10),)),
    "shapes": ClassifierSpec(
        "shapes",
        3,
        32,
        (("shape", 5), ("color", 6), ("size", 2), ("position", 5), ("background", 2)),
        label_head="shape",
    ),
}
# the extractor a data set gets by default
DATASET_EXTRACTOR = {spec.dataset: name for name, spec in CLASSIFIERS.items()}


@dataclass
class FeatureNetConfig:
    in_channels: int = 1
    image_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64, 128)
    feature_dim: int = 128
    heads: dict[str, int] = field(default_factory=lambda: {"label": 10})

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        self.heads = {str(k): int(v) for k, v in dict(self.heads).items()}
        if not self.heads:
            raise ValueError("a FeatureNet needs at least one head")


class FeatureNet(nn.Module):
    """conv-BN-ReLU x 4 (max-pool 2 between) -> global mean -> fc 128 + ReLU -> linear heads."""

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = config.in_channels
        for i, c_out in enumerate(config.widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.trunk = nn.Sequential(*layers)
        self.feature = nn.Linear(c_in, config.feature_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(config.feature_dim, n) for k, n in config.heads.items()})

    def features(self, x: Tensor) -> Tensor:
        """The penultimate (feature) layer, (B, feature_dim)."""
        h = self.trunk(x).mean(dim=(2, 3))  # (B, C, h, w) -> (B, C)
        return F.relu(self.feature(h))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits per head."""
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}

    def probs(self, x: Tensor, head: str | None = None) -> Tensor:
        """Softmax of one head's logits (the first head by default), (B, classes)."""
        head = head or next(iter(self.config.heads))
        return self(x)[head].softmax(1)

    def logits_and_features(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}, f

    def config_dict(self) -> dict:
        return asdict(self.config)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def classifier_path(name: str, root: str | os.PathLike | None = None) -> Path:
    """checkpoints/classifiers/NAME.safetensors (or under `root`)."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS)}")
    return Path(root or CLASSIFIER_DIR) / f"{name}.safetensors"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_classifier(net: FeatureNet, path: str | os.PathLike, name: str) -> Path:
    from difflab.runfolder import atomic_save_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": CLASSIFIER_FORMAT, "name": name, "config": json.dumps(net.config_dict())}
    atomic_save_safetensors(net.state_dict(), path, metadata=meta)
    return path


def load_classifier(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None) -> FeatureNet:
    """A committed classifier by name ("fmnist", "digits", "shapes") or a .safetensors path;
    eval mode, gradients off. `net.weights_sha256` and `net.name` are set."""
    from difflab.runfolder import read_safetensors

    if str(name_or_path) in CLASSIFIERS:
        path = classifier_path(str(name_or_path), root)
        if not path.is_file():
            raise FileNotFoundError(
                f"classifier weights {path} are missing; train them with "
                f"`python -m difflab.metrics.train_classifiers {name_or_path}`"
            )
    else:
        path = Path(name_or_path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != CLASSIFIER_FORMAT or "config" not in meta:
        raise ValueError(f"{path} is not a difflab classifier (format {meta.get('format')!r})")
    net = FeatureNet(FeatureNetConfig(**json.loads(meta["config"])))
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"weights in {path} do not fit their config: {e}") from None
    net.eval().requires_grad_(False)
    net.name = meta.get("name", path.stem)
    net.weights_sha256 = file_sha256(path)
    return net


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def prepare_images(x: Tensor, channels: int, size: int) -> Tensor:
    """Fit images in [-1, 1] to a network's input: grey <-> RGB by repetition / luminance mean,
    a smaller image is padded with the background value -1 when the gap is even and at most
    8 px (Fashion-MNIST 28 -> 32), otherwise bilinearly resized."""
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(x.shape)}")
    x = x.float()
    c = x.shape[1]
    if c != channels:
        if c == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1 and c == 3:
            x = x.mean(1, keepdim=True)
        else:
            raise ValueError(f"cannot feed {c}-channel images to a {channels}-channel network")
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        gap_h, gap_w = size - h, size - w
        if 0 < gap_h == gap_w <= 8 and gap_h % 2 == 0:
            p = gap_h // 2
            x = F.pad(x, (p, p, p, p), value=-1.0)
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=h > size)
    return x


@torch.no_grad()
def attribute_accuracy(
    net: FeatureNet, images: Tensor, attributes: dict[str, Tensor], batch_size: int = 500
) -> dict[str, float]:
    """Fraction of images whose predicted attribute equals the given one, per head present in both
    (e.g. the shapes set's shape, color, size, position, background); "all" = every head right."""
    heads = [k for k in net.config.heads if k in attributes]
    if not heads:
        raise ValueError(
            f"no attribute of {sorted(attributes)} is predicted by this classifier (heads {sorted(net.config.heads)})"
        )
    correct = {k: 0 for k in heads}
    all_right = 0
    for a in range(0, len(images), batch_size):
        x = prepare_images(images[a : a + batch_size], net.config.in_channels, net.config.image_size)
        logits = net(x)
        ok = None
        for k in heads:
            hit = logits[k].argmax(1).cpu() == attributes[k][a : a + batch_size].cpu()
            correct[k] += int(hit.sum())
            ok = hit if ok is None else ok & hit
        all_right += int(ok.sum())
    n = len(images)
    out = {k: correct[k] / n for k in heads}
    out["all"] = all_right / n
    return out
