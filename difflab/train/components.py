"""The models that serve a diffusion model, each trained into a folder (config.json + model.safetensors):
the KL autoencoder of latent diffusion (Rombach et al. 2022) and the noise-aware classifier of
classifier guidance (Dhariwal & Nichol 2021).

    difflab train-autoencoder --data shapes --factor 4 --out runs/ae --minutes 5
    difflab train --data shapes --conditioning text --autoencoder runs/ae --out runs/ldm
    difflab train-classifier --data shapes --run runs/shapes --out runs/clf --minutes 5
    difflab sample --run runs/shapes --classifier runs/clf --classifier-guidance 2

    train_autoencoder_folder("runs/ae", data="shapes", factor=4, steps=3000)   # the same, in Python
    train_classifier_folder("runs/clf", data="shapes", run="runs/shapes", steps=2000)

The autoencoder folder's config.json holds the latent scale factor 1/std(z) (measured on up to
`scale_images` training images); the classifier's holds the preconditioning (prediction,
schedule, sigma_data) whose inputs (c_in x, c_noise) it was trained on, which must be the
guided model's: pass that model's run folder as `run`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from difflab.core.validation import LR, NONNEG, POS_INT, POSITIVE, SEED
from difflab.data import ImageData, load_dataset
from difflab.runfolder import new_folder

__all__ = ["train_autoencoder_folder", "train_classifier_folder", "add_commands"]


def _load_images(name: str, data_kwargs: dict[str, Any] | None, split: str = "train") -> ImageData:
    kw = dict(data_kwargs or {})
    if name == "fashion_mnist":
        kw.setdefault("pad_to", 32)
    return load_dataset(name, split, **kw)


def _data_info(data: ImageData, name: str, data_kwargs: dict | None) -> dict:
    return {
        "name": name,
        "kwargs": dict(data_kwargs or {}),
        "channels": data.channels,
        "size": int(data.images.shape[-1]),
        "class_names": list(data.class_names),
    }


def train_autoencoder_folder(out: str | os.PathLike, *, overwrite: bool = False, **kw) -> Path:
    """Train a KL autoencoder with downsampling `factor`; write config.json (with scale_factor),
    model.safetensors and reconstructions.png (top: images, bottom: reconstructions). A folder
    that already holds an autoencoder is replaced only with `overwrite`; one writer at a time."""
    with new_folder(out, overwrite=overwrite, what="an autoencoder"):
        return _train_autoencoder_folder(out, **kw)


def _train_autoencoder_folder(
    out: str | os.PathLike,
    *,
    data: str = "shapes",
    data_kwargs: dict | None = None,
    factor: int = 4,
    z_channels: int = 4,
    channels: int = 32,
    kl_weight: float = 1e-6,
    steps: int | None = 2000,
    minutes: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    scale_images: int = 2048,
    progress: bool = True,
    device: str | None = None,
) -> Path:
    from difflab.data import save_image_grid
    from difflab.nn.autoencoder import LatentSpace, save_latent_space, scale_factor
    from difflab.train.autoencoder import train_autoencoder
    from difflab.nn.autoencoder import AutoencoderConfig

    images = _load_images(data, data_kwargs)
    h, w = images.images.shape[-2:]
    if h != w:
        raise ValueError(f"the autoencoder takes square images; dataset {data!r} has {h}x{w}")
    if len(images) < batch_size:
        raise ValueError(f"dataset {data!r} has {len(images)} images, fewer than batch_size {batch_size}")
    config = AutoencoderConfig(
        in_channels=images.channels,
        image_size=int(h),
        factor=factor,
        z_channels=z_channels,
        channels=channels,
        kl_weight=kl_weight,
    )
    ae, info = train_autoencoder(
        images.images,
        config,
        steps=steps,
        minutes=minutes,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=progress,
        device=device,
    )
    space = LatentSpace(ae, scale_factor(ae, images.images[:scale_images]))
    with torch.no_grad():
        x = images.images[:256]
        rec = space.decode(space.encode(x))
    info.update(rec_l1=(rec - x).abs().mean().item(), scale_images=min(scale_images, len(images)))
    out = save_latent_space(space, out, info, data=_data_info(images, data, data_kwargs))
    save_image_grid(torch.cat([x[:8], rec[:8]]).clamp(-1, 1), out / "reconstructions.png", nrow=min(8, len(x)))
    return out


def train_classifier_folder(out: str | os.PathLike, *, overwrite: bool = False, **kw) -> Path:
    """Train a noise-aware classifier of the data set's labels on noised images; write config.json
    (classifier config, preconditioning, data, info with test accuracy) and model.safetensors.

    `run`: the diffusion run to be guided, whose preconditioning the classifier's inputs follow
    (default: TrainConfig's, EDM). A folder that already holds a classifier is replaced only with
    `overwrite`; one writer at a time."""
    with new_folder(out, overwrite=overwrite, what="a classifier"):
        return _train_classifier_folder(out, **kw)


def _train_classifier_folder(
    out: str | os.PathLike,
    *,
    data: str = "shapes",
    data_kwargs: dict | None = None,
    run: str | os.PathLike | None = None,
    steps: int | None = 2000,
    minutes: float | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    channels: int = 32,
    progress: bool = True,
) -> Path:
    from difflab.core.denoiser import Preconditioned
    from difflab.core.schedules import schedule_from_config
    from difflab.nn.classifier import preconditioning_of, save_classifier
    from difflab.train.classifier import train_classifier
    from difflab.nn.classifier import ClassifierConfig
    from difflab.models import load_run
    from difflab.train.loop import TrainConfig

    images = _load_images(data, data_kwargs)
    if images.labels is None:
        raise ValueError(f"dataset {data!r} has no labels to classify")
    if len(images) < batch_size:
        raise ValueError(f"dataset {data!r} has {len(images)} images, fewer than batch_size {batch_size}")
    if run is not None:
        denoiser, config = load_run(run)
        if config.get("autoencoder"):
            raise ValueError(f"run {run} samples latents; classifier guidance works on pixel-space runs")
        d = config["data"]
        if (d["channels"], d["size"]) != (images.channels, int(images.images.shape[-1])):
            raise ValueError(
                f"run {run} makes {d['channels']}x{d['size']}x{d['size']} images; dataset {data!r} has "
                f"{tuple(images.images.shape[1:])}"
            )
    else:
        default = TrainConfig()
        denoiser = Preconditioned(torch.nn.Identity(), schedule_from_config(default.schedule), default.prediction)
    k = len(images.class_names) or int(images.labels.max()) + 1
    config = ClassifierConfig(
        image_size=int(images.images.shape[-1]), in_channels=images.channels, num_classes=k, channels=channels
    )
    clf, info = train_classifier(
        images,
        denoiser,
        steps=steps,
        minutes=minutes,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        config=config,
        progress=progress,
    )
    info.update(_test_accuracy(clf, denoiser, data, data_kwargs))
    return save_classifier(
        clf,
        out,
        info,
        preconditioning=preconditioning_of(denoiser),
        data=_data_info(images, data, data_kwargs),
        run=None if run is None else str(run),
    )


@torch.no_grad()
def _test_accuracy(clf, denoiser, data: str, data_kwargs: dict | None, n: int = 512) -> dict:
    """Accuracy on up to n test images at sigma = 0.1 and 1.0 (empty when there is no test split)."""
    try:
        test = _load_images(data, {**(data_kwargs or {}), **({"n": n} if data == "shapes" else {})}, "test")
    except (ValueError, FileNotFoundError):
        return {}
    x0, y = test.images[:n], test.labels[:n]
    g = torch.Generator().manual_seed(0)
    out = {}
    for s in (0.1, 1.0):
        sigma = torch.full((len(x0),), s, dtype=torch.float64)
        x = x0 + s * torch.randn(x0.shape, generator=g)
        _, _, c_in, c_noise = denoiser.coeffs_for(x, sigma)
        out[f"test_accuracy_sigma_{s}"] = (clf(c_in * x, c_noise).argmax(1) == y).float().mean().item()
    return out


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------


def _budget(args: argparse.Namespace) -> tuple[int | None, float | None]:
    if args.steps is None and args.minutes is None:
        return 2000, None
    return args.steps, args.minutes


def _json_arg(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _cmd_train_autoencoder(args: argparse.Namespace) -> int:
    steps, minutes = _budget(args)
    out = train_autoencoder_folder(
        args.out,
        data=args.data,
        data_kwargs=_json_arg(args.data_kwargs, "--data-kwargs"),
        factor=args.factor,
        z_channels=args.z_channels,
        channels=args.channels,
        kl_weight=args.kl_weight,
        steps=steps,
        minutes=minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=not args.no_progress,
        device=args.device,
        overwrite=args.overwrite,
    )
    meta = json.loads((out / "config.json").read_text())
    print(
        f"autoencoder folder: {out} (config.json with scale_factor {meta['scale_factor']:.4f}, model.safetensors, "
        f"reconstructions.png; reconstruction L1 {meta['info']['rec_l1']:.4f})"
    )
    return 0


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    steps, minutes = _budget(args)
    out = train_classifier_folder(
        args.out,
        data=args.data,
        data_kwargs=_json_arg(args.data_kwargs, "--data-kwargs"),
        run=args.run,
        steps=steps,
        minutes=minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        channels=args.channels,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    info = json.loads((out / "config.json").read_text())["info"]
    acc = ", ".join(f"{k[len('test_accuracy_') :]}: {v:.3f}" for k, v in info.items() if k.startswith("test_accuracy"))
    print(f"classifier folder: {out} (config.json, model.safetensors)" + (f"; test accuracy {acc}" if acc else ""))
    return 0


def _common(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--data", default="shapes", help="digits | fashion_mnist | shapes | folder:PATH (default shapes)")
    p.add_argument("--data-kwargs", metavar="JSON", help='loader arguments, e.g. \'{"n": 2000, "size": 32}\'')
    p.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    p.add_argument("--steps", type=POS_INT, help="budget in optimizer steps (default 2000)")
    p.add_argument(
        "--minutes", type=POSITIVE, help="budget in minutes of wall time (with --steps: whichever ends first)"
    )
    p.add_argument("--batch-size", type=POS_INT, default=batch_size)
    p.add_argument("--lr", type=LR, default=1e-3)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the folder --out if it already holds one")
    p.add_argument("--no-progress", action="store_true")


def add_commands(sub) -> None:
    """Register `difflab train-autoencoder` and `difflab train-classifier` on the CLI's subparsers."""
    a = sub.add_parser(
        "train-autoencoder",
        help="train the KL autoencoder of latent diffusion; writes a folder",
        description="Train a KL-regularised autoencoder (LDM's first stage: L1 + kl_weight KL) and "
        "write OUT/config.json (with the latent scale factor 1/std(z)), "
        "OUT/model.safetensors and OUT/reconstructions.png. Use the folder with "
        "`difflab train --autoencoder OUT`.",
    )
    _common(a, 64)
    a.add_argument(
        "--factor", type=POS_INT, default=4, help="spatial downsampling f, a power of 2 (LDM's best: 4 or 8)"
    )
    a.add_argument("--z-channels", type=POS_INT, default=4, help="latent channels (default 4)")
    a.add_argument("--channels", type=POS_INT, default=32, help="base width (default 32)")
    a.add_argument("--kl-weight", type=NONNEG, default=1e-6, help="weight of the KL term (default 1e-6)")
    a.add_argument("--device", help="where to train, e.g. cpu or cuda (default: cuda when available)")
    a.set_defaults(func=_cmd_train_autoencoder)

    c = sub.add_parser(
        "train-classifier",
        help="train a noise-aware classifier for classifier guidance",
        description="Train ADM's noise-aware classifier (the UNet encoder half with attention "
        "pooling) on noised images of a labelled data set; write OUT/config.json and "
        "OUT/model.safetensors. Use it with `difflab sample --classifier OUT "
        "--classifier-guidance SCALE`.",
    )
    _common(c, 128)
    c.add_argument(
        "--run",
        help="the diffusion run to guide: the classifier is fed its preconditioned inputs "
        "(default: difflab train's default, EDM)",
    )
    c.add_argument("--channels", type=POS_INT, default=32, help="base width (default 32)")
    c.set_defaults(func=_cmd_train_classifier)
