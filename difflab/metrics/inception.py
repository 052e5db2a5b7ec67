"""Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision",
arXiv:1512.00567) as the feature network of the standard FID: 2048-d pool3 features.

The layer names are torchvision's (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`,
...), so the state dict of either standard weights file loads as is:

    "fid"          pytorch-fid's port of the TensorFlow FID graph (pt_inception-2015-12-05-*.pth,
                   1008-way fc). Its blocks differ from torchvision's in pooling: average pools
                   exclude the padding (Mixed_5*, 6b-e, 7b) and Mixed_7c's pool branch is a max pool.
    "torchvision"  torchvision's ImageNet weights (inception_v3_google-*.pth, 1000-way fc).

`variant="auto"` picks by the fc layer's size. Only the layers up to pool3 are needed: fc and
AuxLogits weights are ignored when present. Inputs are images in [-1, 1] (the range both weight
sets expect at the first convolution; torchvision's `transform_input` only converts ImageNet-
normalised input into it), grey images are repeated to RGB, and everything is resized to
299 x 299 bilinearly (align_corners=False), as pytorch-fid does.

No Inception weights can be downloaded here; give a local file (`--inception-weights PATH`,
.safetensors, or a .pth state dict read with torch.load(weights_only=True): tensors only, no code).

Usage::

    net = load_inception("pt_inception-2015-12-05-6726825d.pth")
    feats = net(images)          # (B, 2048), images (B, C, H, W) in [-1, 1]
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InceptionV3", "load_inception", "load_state_dict_file", "INCEPTION_HELP", "FEATURE_DIM"]

FEATURE_DIM = 2048
INPUT_SIZE = 299
INCEPTION_HELP = (
    "Inception-v3 features need the standard weights as a local file: pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth (the FID standard) or torchvision's "
    "inception_v3_google-*.pth, given as --inception-weights PATH (.pth or .safetensors). "
    "No weights can be downloaded here; the difflab extractors fmnist/digits/shapes need none."
)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **conv_kw):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_kw)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor, fid: bool) -> Tensor:
    """3x3 stride-1 average pool; the TF graph (fid) averages over the valid pixels only."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not fid)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 (64 + 64 + 96 + pool_features)."""

    def __init__(self, c_in: int, pool_features: int, fid: bool):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x, self.fid))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 (384 + 96 + c_in)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1), 4 x 192 channels out."""

    def __init__(self, c_in: int, c7: int, fid: bool):
        super().__init__()
        self.fid = fid
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg3(x, self.fid))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 (320 + 192 + c_in)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs: 320 + 768 + 768 + 192 = 2048 channels.

    pool: "avg" (torchvision), "avg_valid" (TF graph, Mixed_7b) or "max" (TF graph, Mixed_7c)."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        h = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(h), self.branch3x3_2b(h)], 1)
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = _avg3(x, self.pool == "avg_valid")
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """Inception-v3 up to the 2048-d global average pool ("pool3"); torchvision layer names."""

    def __init__(self, variant: str = "fid"):
        super().__init__()
        if variant not in ("fid", "torchvision"):
            raise ValueError(f"variant must be 'fid' or 'torchvision', got {variant!r}")
        self.variant = variant
        fid = variant == "fid"
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32, fid)
        self.Mixed_5c = InceptionA(256, 64, fid)
        self.Mixed_5d = InceptionA(288, 64, fid)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, fid)
        self.Mixed_6c = InceptionC(768, 160, fid)
        self.Mixed_6d = InceptionC(768, 160, fid)
        self.Mixed_6e = InceptionC(768, 192, fid)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg_valid" if fid else "avg")
        self.Mixed_7c = InceptionE(2048, "max" if fid else "avg")

    @staticmethod
    def preprocess(x: Tensor) -> Tensor:
        """Images (B, 1|3, H, W) in [-1, 1] -> (B, 3, 299, 299)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception needs (B, 1 or 3, H, W) images, got {tuple(x.shape)}")
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """pool3 features (B, 2048) of images in [-1, 1]."""
        x = self.preprocess(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # ... (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

_IGNORED_PREFIXES = ("fc.", "AuxLogits.")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a .safetensors file, or of a .pth/.pt state dict via torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} does not exist. {INCEPTION_HELP}")
    if path.suffix == ".safetensors":
        from difflab.runfolder import read_safetensors

        return read_safetensors(path)[0]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a state dict file"
        raise ValueError(
            f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {e}). {INCEPTION_HELP}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors. {INCEPTION_HELP}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_inception(path: str | os.PathLike, variant: str = "auto") -> InceptionV3:
    """Inception-v3 pool3 network from a local weights file (eval mode, frozen).

    variant "auto": "fid" for a 1008-way fc (pytorch-fid's TF port), "torchvision" for 1000-way,
    "fid" when the file has no fc. Sets `net.weights_sha256`."""
    state = load_state_dict_file(path)
    if variant == "auto":
        fc = state.get("fc.weight")
        variant = "torchvision" if fc is not None and fc.shape[0] == 1000 else "fid"
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        net = InceptionV3(variant)
    net = net.to_empty(device="cpu")
    own = net.state_dict()
    wanted = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    missing = [k for k in own if k not in wanted and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in wanted if k not in own]
    bad_shape = [
        f"{k}: file {tuple(wanted[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in wanted and wanted[k].shape != own[k].shape
    ]
    if missing or unexpected or bad_shape:

        def some(items):
            return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

        parts = [
            f"{len(missing)} missing ({some(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({some(unexpected)})" if unexpected else "",
            f"{len(bad_shape)} of the wrong shape ({some(bad_shape)})" if bad_shape else "",
        ]
        raise ValueError(
            f"{path} does not fit Inception-v3: tensors " + "; ".join(p for p in parts if p) + f". {INCEPTION_HELP}"
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(wanted[k].to(v.dtype) if k in wanted else torch.zeros_like(v))  # zeros: batch counters
    net.eval().requires_grad_(False)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    net.weights_sha256 = h.hexdigest()
    return net
