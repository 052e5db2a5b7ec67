"""Checks for numbers where they enter: the Python API and the command line.

    check_number("guidance_scale", s)                      # finite, else ValueError naming it
    check_number("lr", lr, lo=0, lo_open=True)             # finite and > 0
    check_number("steps", steps, lo=1, integer=True)       # an int >= 1
    p.add_argument("--lr", type=number_arg(lo=0, lo_open=True))   # argparse: exit 2 with one line

NaN and infinity are refused everywhere (a NaN guidance scale otherwise samples a black grid,
an infinite learning rate trains NaN weights, `minutes=nan` never stops); bools are not numbers.
"""

from __future__ import annotations

import argparse
import math
import numbers

__all__ = [
    "add_device_arguments",
    "check_number",
    "check_budget",
    "check_training_state",
    "number_arg",
    "check_finite_tensor",
    "POS_INT",
    "NONNEG_INT",
    "SEED",
    "POSITIVE",
    "NONNEG",
    "FINITE",
    "UNIT",
    "LR",
    "MAX_LR",
    "IMAGE_SUFFIXES",
    "check_output_file",
    "check_output_folder",
    "check_mask",
]


def _describe(lo, hi, lo_open: bool, hi_open: bool, integer: bool) -> str:
    kind = "an integer" if integer else "a finite number"
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi:g}"
    return kind


def check_number(
    name: str,
    value,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
):
    """`value` if it is a finite real number (an int when `integer`) within the bounds; else a
    ValueError that names `name`, the value and what is allowed."""
    want = _describe(lo, hi, lo_open, hi_open, integer)
    ok_type = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return value


def number_arg(
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
):
    """An argparse `type=`: parses an int or float and applies `check_number`'s bounds; a bad
    value makes argparse print one error line and exit 2."""
    want = _describe(lo, hi, lo_open, hi_open, integer)

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        try:
            return check_number("value", value, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, integer=integer)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None

    parse.__name__ = "integer" if integer else "number"  # argparse names the type in its messages
    return parse


def check_finite_tensor(name: str, x, where: str = "") -> None:
    """FloatingPointError naming `name` and how many entries are NaN/inf, if any are."""
    import torch

    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise FloatingPointError(f"{name} has {bad} NaN/inf value(s) of {x.numel()}{' ' + where if where else ''}")


# argparse types shared by every command: a bad value (nan, inf, out of range, not a number) is
# one line and exit 2
POS_INT = number_arg(lo=1, integer=True)
NONNEG_INT = number_arg(lo=0, integer=True)
SEED = number_arg(lo=0, hi=2**63 - 1, integer=True)
POSITIVE = number_arg(lo=0, lo_open=True)
NONNEG = number_arg(lo=0)
FINITE = number_arg()
# Adam(W) moves every weight by about lr per step: above 1 that is larger than the weights themselves
# (and near 1e38 torch's optimizer overflows with a traceback)
MAX_LR = 1.0
LR = number_arg(lo=0, lo_open=True, hi=MAX_LR)
UNIT = number_arg(lo=0, hi=1)


def check_budget(steps, minutes) -> None:
    """A training budget: optimizer steps (an int >= 1), minutes (finite, > 0), or both."""
    if steps is None and minutes is None:
        raise ValueError("give a budget: steps or minutes")
    if steps is not None:
        check_number("steps", steps, lo=1, integer=True)
    if minutes is not None:
        check_number("minutes", minutes, lo=0, lo_open=True)


def check_training_state(step: int, loss: float, params, hint: str = "") -> None:
    """After optimizer step `step` (1-based): a FloatingPointError naming the step if the loss or
    any trained tensor is NaN/inf (one fused norm per tensor list; an overflowing norm counts too,
    as weights that large are lost anyway). The caller has not saved the bad state yet, so the last
    checkpoint on disk is the last good one."""
    import torch

    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}{'; ' + hint if hint else ''}")
    params = [p for p in params if p.dtype.is_floating_point]
    if not params:
        return
    norms = torch._foreach_norm([p.detach() for p in params])
    if not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        bad = next(i for i, n in enumerate(norms) if not torch.isfinite(n))
        raise FloatingPointError(
            f"the weights became NaN/inf after the optimizer step {step} (tensor {bad} of "
            f"{len(params)}, shape {tuple(params[bad].shape)}){'; ' + hint if hint else ''}"
        )


# --------------------------------------------------------------------------------------------
# Output paths, checked before the work that fills them
# --------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}


def _nearest_existing(path):
    from pathlib import Path

    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder, shown) -> None:
    """Create and delete a file in `folder`: the only check that sees read-only mounts, quotas and
    permissions alike (root passes os.access everywhere)."""
    import os
    import tempfile

    if not folder.is_dir():
        raise ValueError(f"cannot write {shown}: {folder} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".difflab-probe-", dir=folder)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"cannot write {shown}: {folder} is not writable ({e.strerror or e})") from None


def check_output_file(path, suffixes=IMAGE_SUFFIXES, what: str = "output"):
    """Before any work: `path` has one of `suffixes`, is not a folder, and its folder (or the
    nearest one that exists, which the writer will fill) takes a new file. Returns it as a Path."""
    from pathlib import Path

    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(
            f"{what} {path}: unknown file type {path.suffix or '(no extension)'!r}; use one of "
            f"{', '.join(sorted(suffixes))}"
        )
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    _probe_writable(_nearest_existing(path.parent), f"{what} {path}")
    return path


def check_output_folder(path, what: str = "output folder"):
    """Before any work: `path` is a folder (or can be made one) that takes new files."""
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    _probe_writable(_nearest_existing(path), f"{what} {path}")
    return path


def check_mask(mask, x, name: str):
    """A binary mask (N|1, 1|C, H, W) that fits images x (N, C, H, W), in x's dtype; a ValueError
    naming `name` and what is wrong otherwise."""
    import torch

    if (
        mask.ndim != x.ndim
        or mask.shape[-2:] != x.shape[-2:]
        or mask.shape[0] not in (1, x.shape[0])
        or mask.shape[1] not in (1, x.shape[1])
    ):
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not fit images of shape {tuple(x.shape)}: "
            f"expected (N|1, 1|C, H, W)"
        )
    if not torch.all((mask == 0) | (mask == 1)):
        bad = mask[(mask != 0) & (mask != 1)][0].item()
        raise ValueError(f"{name} must be binary (0/1); found value {bad}")
    return mask.to(x.dtype)


def add_device_arguments(parser) -> None:
    """--device and --dtype, as every command that runs a model takes them (Pipeline.to checks them)."""
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto: CUDA when present, else CPU (default auto)"
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="compute dtype of the networks: weights cast, run under autocast (default fp32)",
    )


def add_memory_argument(parser) -> None:
    """--low-memory: the memory switches of `Pipeline.enable_low_memory` (same images, less peak memory)."""
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="attention in slices of 1024 queries, VAE decoding one image at a time (tiled for diffusers VAEs), "
        "the text encoder kept on the CPU: the same images with less peak memory",
    )
