"""`difflab train-clip`: the small image-text model that Semantic Diffusion Guidance steers with
(Liu et al. 2023, https://arxiv.org/abs/2112.05744), trained into a folder.

    difflab train-clip --data shapes --out checkpoints/clip/shapes --steps 2000 --noise-steps 1000

    clip = load_clip("checkpoints/clip/shapes")                      # E_I, E_T, for clean images
    noisy = load_clip("checkpoints/clip/shapes", noise_aware=True)   # E'_I (and the same E_T), for sdg()
    train_clip_folder("runs/clip", data="shapes", steps=2000, noise_steps=1000)   # the command, in Python

Two stages (difflab.methods.sdg): CLIP's contrastive objective on clean image-caption pairs
(`train_clip`), then SDG's fine-tune of a copy of the image tower so that E'_I(x0 + sigma n, sigma)
matches the frozen clean E_I(x0) (`finetune_noise_aware`). The folder:

    config.json        {"kind": "clip", "model": SmallCLIP config, "data": ..., "info": budget, seconds,
                        seed and the test metrics below}
    model.safetensors  the clean model; the noise-aware image tower under "noise_aware." (the text
                       tower is shared: the fine-tune leaves it frozen)

Test metrics, on held-out images and captions (`clip_metrics`): text->image retrieval top-1 within
batches of 100 (chance 1%), counted two ways: `exact` (the caption's own image) and `consistent`
(an image the caption describes; on shapes, identical attribute sets are common within 100 images,
so `exact` has a ceiling below 1); attribute-level zero-shot accuracy on shapes (for each attribute,
the captions that differ from the true one only there: shape, chance 1/5, ...); and retrieval of
noisy images x0 + sigma n, by the noise-aware tower and, for comparison, by the clean one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from difflab.core.sampling import progress_range
from difflab.core.validation import (
    LR,
    MAX_LR,
    NONNEG_INT,
    POS_INT,
    SEED,
    check_budget,
    check_number,
    check_training_state,
)
from difflab.data import ImageData, batch_indices
from difflab.data._hash import seed_from
from difflab.methods.sdg import clip_c_noise, clip_input
from difflab.nn.clip import SmallCLIP, SmallCLIPConfig
from difflab.nn.text import WordEncoder

__all__ = [
    "save_clip",
    "load_clip",
    "clip_metrics",
    "train_clip_folder",
    "add_command",
    "train_clip",
    "finetune_noise_aware",
    "caption_vocabulary",
]

NOISE_AWARE_PREFIX = "noise_aware."
_TEXT_TOWER = ("text.", "text_proj.", "logit_scale")  # shared by the clean and the noise-aware model
RETRIEVAL_BATCH = 100
NOISY_SIGMAS = (0.0, 0.5, 2.0)


# --------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------


def _image_tower(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(_TEXT_TOWER)}


def save_clip(clip, folder: str | os.PathLike, noise_aware=None, info: dict | None = None, **meta) -> Path:
    """config.json (kind, SmallCLIP config, info, `meta`) + model.safetensors (the clean model and,
    if given, the noise-aware image tower under "noise_aware."), each written atomically."""
    from difflab.runfolder import CHECKPOINT_FORMAT, atomic_save_safetensors, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(clip.state_dict())
    if noise_aware is not None:
        if noise_aware.config_dict() != clip.config_dict():
            raise ValueError("the noise-aware model's config differs from the clean model's")
        theirs = noise_aware.state_dict()
        changed = [k for k in state if k.startswith(_TEXT_TOWER) and not torch.equal(state[k], theirs[k])]
        if changed:
            raise ValueError(
                f"the noise-aware model's text tower differs from the clean one's ({changed[:3]}): "
                "the folder stores one text tower"
            )
        state.update({NOISE_AWARE_PREFIX + k: v for k, v in _image_tower(theirs).items()})
    atomic_save_safetensors(state, folder / "model.safetensors", metadata={"format": CHECKPOINT_FORMAT})
    write_json(folder / "config.json", {"kind": "clip", "model": clip.config_dict(), "info": info or {}, **meta})
    return folder


def load_clip(folder: str | os.PathLike, noise_aware: bool = False):
    """The SmallCLIP of a `difflab train-clip` folder (or of `difflab.edit.save_clip`'s older flat
    layout), eval mode and frozen; `noise_aware=True`: with SDG's fine-tuned image tower E'_I."""
    from difflab.nn.clip import SmallCLIP
    from difflab.runfolder import read_json, read_safetensors

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CLIP folder {folder} does not exist (train one with `difflab train-clip --out {folder}`)"
        )
    meta = read_json(folder / "config.json")
    model = meta.get("model") if isinstance(meta, dict) and meta.get("kind") == "clip" else meta
    if not isinstance(model, dict) or model.get("arch") != SmallCLIP.arch:
        raise ValueError(
            f"{folder / 'config.json'} does not describe a difflab SmallCLIP (kind 'clip', "
            f"model arch {SmallCLIP.arch!r})"
        )
    try:
        clip = SmallCLIP.from_config_dict(model)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / 'config.json'} does not describe a SmallCLIP: {e}") from None
    state, _ = read_safetensors(folder / "model.safetensors")
    tower = {k[len(NOISE_AWARE_PREFIX) :]: v for k, v in state.items() if k.startswith(NOISE_AWARE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(NOISE_AWARE_PREFIX)}
    if noise_aware:
        if not tower:
            raise ValueError(
                f"{folder / 'model.safetensors'} holds no noise-aware image tower (train one with "
                "`difflab train-clip`, whose --noise-steps fine-tunes it)"
            )
        unknown = sorted(set(tower) - set(_image_tower(state)))
        if unknown:
            raise ValueError(
                f"{folder / 'model.safetensors'}: noise-aware weights {unknown[:3]} are not image-tower "
                "weights of the model"
            )
        state.update(tower)
    try:
        clip.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{folder / 'model.safetensors'} does not fit its config.json: {e}") from None
    return clip.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Test metrics
# --------------------------------------------------------------------------------------------


def _encode_images(clip, images: Tensor, sigma: float = 0.0, noise_aware: bool = False, batch: int = 250) -> Tensor:
    """E_I(x) (clean tower: c_noise 0) or E'_I(x, sigma), in chunks; x already noised."""

    out = []
    for a in range(0, len(images), batch):
        x = images[a : a + batch]
        if noise_aware:
            out.append(clip.encode_image(clip_input(x, sigma), clip_c_noise(sigma, x)))
        else:
            out.append(clip.encode_image(clip_input(x, sigma)))
    return torch.cat(out)


def _encode_texts(clip, captions: list[str]) -> Tensor:
    """E_T of each caption, each distinct caption encoded once."""
    unique = list(dict.fromkeys(captions))
    emb = torch.cat([clip.encode_text(unique[a : a + 500]) for a in range(0, len(unique), 500)])
    row = {c: i for i, c in enumerate(unique)}
    return emb[torch.tensor([row[c] for c in captions])]


def _describes(captions: list[str], attributes: dict[str, Tensor]) -> Tensor | None:
    """(N, N) bool: caption i describes image j (shapes: every attribute the caption names agrees)."""
    from difflab.data.shapes import parse_caption

    try:
        parsed = [parse_caption(c) for c in captions]
    except ValueError:
        return None
    n = len(captions)
    match = torch.ones(n, n, dtype=torch.bool)
    for key in ("shape", "color", "size", "position", "background"):
        want = torch.tensor([p.get(key, -1) for p in parsed])  # -1: the caption does not say
        match &= (want[:, None] == -1) | (want[:, None] == attributes[key][None, :])
    return match


def _retrieval(txt: Tensor, img: Tensor, describes: Tensor | None, batch: int = RETRIEVAL_BATCH) -> dict:
    """Text->image top-1 within consecutive batches of `batch` pairs."""
    exact = consistent = chance = 0.0
    n = (len(txt) // batch) * batch
    for a in range(0, n, batch):
        sim = txt[a : a + batch] @ img[a : a + batch].T  # (B texts, B images)
        top = sim.argmax(1)
        exact += (top == torch.arange(batch)).sum().item()
        if describes is not None:
            d = describes[a : a + batch, a : a + batch]
            consistent += d[torch.arange(batch), top].sum().item()
            chance += d.float().mean(1).sum().item()
    out = {"exact": exact / n, "exact_chance": 1 / batch}
    if describes is not None:
        out.update(consistent=consistent / n, consistent_chance=chance / n)
    return out


def _zero_shot(clip, img: Tensor, attributes: dict[str, Tensor]) -> dict:
    """Shapes: per attribute, argmax over the captions that differ from the truth only in it."""
    from difflab.data.shapes import ATTRIBUTES, caption_for

    n = len(img)
    base = [{k: int(attributes[k][i]) for k in ("shape", "color", "size", "position", "background")} for i in range(n)]
    out = {}
    for key, values in ATTRIBUTES.items():
        template = 1 if key == "background" else 0  # template 1 names the background, 0 does not
        captions = [caption_for({**b, key: v}, template=template) for b in base for v in range(len(values))]
        txt = _encode_texts(clip, captions).reshape(n, len(values), -1)  # (N * K, d) -> (N, K, d)
        pred = (txt * img[:, None]).sum(-1).argmax(1)
        out[key] = (pred == attributes[key][:n]).float().mean().item()
    out["mean"] = sum(out.values()) / len(out)
    return out


@torch.no_grad()
def clip_metrics(clip, noise_aware, test: ImageData, sigmas=NOISY_SIGMAS, seed: int = 0) -> dict:
    """Retrieval (clean; noisy by both towers) and shapes zero-shot accuracy on a held-out split."""
    if test.captions is None:
        raise ValueError(f"dataset {test.name!r} has no captions to score against")
    if len(test) < RETRIEVAL_BATCH:
        raise ValueError(f"{len(test)} test images, fewer than one retrieval batch of {RETRIEVAL_BATCH}")
    n = (len(test) // RETRIEVAL_BATCH) * RETRIEVAL_BATCH
    x0, captions = test.images[:n], test.captions[:n]
    attributes = None if test.attributes is None else {k: v[:n] for k, v in test.attributes.items()}
    describes = None if attributes is None else _describes(captions, attributes)
    txt = _encode_texts(clip, captions)
    img = _encode_images(clip, x0)
    out = {"n": n, "retrieval_batch": RETRIEVAL_BATCH, "retrieval": _retrieval(txt, img, describes)}
    if attributes is not None and describes is not None:
        out["zero_shot"] = _zero_shot(clip, img, attributes)
    if noise_aware is not None:
        g = torch.Generator().manual_seed(seed)
        noisy = {}
        for s in sigmas:
            x = x0 + s * torch.randn(x0.shape, generator=g)
            noisy[f"{s:g}"] = {
                "noise_aware": _retrieval(txt, _encode_images(noise_aware, x, s, noise_aware=True), describes),
                "clean_tower": _retrieval(txt, _encode_images(clip, x, s), describes),
            }
        out["noisy_retrieval"] = noisy
    return out


def format_metrics(m: dict) -> str:
    """The metrics of `clip_metrics` as a few lines of text."""
    r = m["retrieval"]
    first = (
        f"text->image retrieval top-1 in batches of {m['retrieval_batch']} ({m['n']} test pairs): exact "
        f"{r['exact']:.3f} (chance {r['exact_chance']:.3f})"
    )
    if "consistent" in r:
        first += f", consistent {r['consistent']:.3f} (chance {r['consistent_chance']:.3f})"
    lines = [first]
    if "zero_shot" in m:
        lines.append("zero-shot attribute accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in m["zero_shot"].items()))
    for s, row in m.get("noisy_retrieval", {}).items():
        key = "consistent" if "consistent" in row["noise_aware"] else "exact"
        lines.append(
            f"noisy retrieval ({key}) at sigma {s}: noise-aware tower {row['noise_aware'][key]:.3f}, "
            f"clean tower {row['clean_tower'][key]:.3f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Training into a folder
# --------------------------------------------------------------------------------------------


def train_clip_folder(out: str | os.PathLike, *, overwrite: bool = False, **kw) -> Path:
    """Train SmallCLIP contrastively (`steps`), fine-tune its noise-aware image tower
    (`noise_steps`; 0 = none), measure it on the test split, and write the folder (replacing one
    that holds a model only with `overwrite`; one writer at a time)."""
    from difflab.runfolder import new_folder

    with new_folder(out, overwrite=overwrite, what="a CLIP model"):
        return _train_clip_folder(out, **kw)


def _train_clip_folder(
    out: str | os.PathLike,
    *,
    data: str = "shapes",
    data_kwargs: dict | None = None,
    steps: int = 2000,
    noise_steps: int = 1000,
    batch_size: int = 128,
    lr: float = 2e-3,
    noise_lr: float = 1e-3,
    seed: int = 0,
    eval_n: int = 2000,
    progress: bool = True,
) -> Path:
    from difflab.train.components import _data_info, _load_images

    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_n", eval_n)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if noise_steps < 0:
        raise ValueError(f"noise_steps must be >= 0, got {noise_steps}")
    images = _load_images(data, data_kwargs)
    if images.captions is None:
        raise ValueError(f"dataset {data!r} has no captions: train-clip needs image-caption pairs (shapes has them)")
    if len(images) < batch_size:
        raise ValueError(f"dataset {data!r} has {len(images)} images, fewer than batch_size {batch_size}")
    t0, c0 = time.perf_counter(), time.process_time()
    clip = train_clip(images, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    t1, c1 = time.perf_counter(), time.process_time()
    noisy = None
    if noise_steps:
        noisy = finetune_noise_aware(
            clip, images, steps=noise_steps, batch_size=batch_size, lr=noise_lr, seed=seed, progress=progress
        )
    t2, c2 = time.perf_counter(), time.process_time()
    info = {
        "steps": steps,
        "noise_steps": noise_steps,
        "batch_size": batch_size,
        "lr": lr,
        "noise_lr": noise_lr,
        "seed": seed,
        "seconds": round(t1 - t0, 1),
        "cpu_seconds": round(c1 - c0, 1),
        "noise_seconds": round(t2 - t1, 1),
        "noise_cpu_seconds": round(c2 - c1, 1),
        "params": sum(p.numel() for p in clip.parameters()),
    }
    test = _test_split(data, data_kwargs, eval_n)
    if test is not None:
        info["metrics"] = clip_metrics(clip, noisy, test, seed=seed)
        info["metrics_seconds"] = round(time.perf_counter() - t2, 1)
    return save_clip(clip, out, noisy, info, data=_data_info(images, data, data_kwargs))


def _test_split(data: str, data_kwargs: dict | None, n: int) -> ImageData | None:
    """Up to n held-out captioned images, or None when the data set has no test split."""
    from difflab.train.components import _load_images

    kw = {**(data_kwargs or {}), **({"n": n} if data == "shapes" else {})}
    try:
        test = _load_images(data, kw, "test")
    except (ValueError, FileNotFoundError):
        return None
    return test.subset(torch.arange(min(n, len(test)))) if test.captions is not None else None


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _cmd_train_clip(args: argparse.Namespace) -> int:
    from difflab.train.components import _json_arg

    out = train_clip_folder(
        args.out,
        data=args.data,
        data_kwargs=_json_arg(args.data_kwargs, "--data-kwargs"),
        steps=args.steps,
        noise_steps=args.noise_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        noise_lr=args.noise_lr,
        seed=args.seed,
        eval_n=args.eval_n,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    info = json.loads((out / "config.json").read_text())["info"]
    print(
        f"CLIP folder: {out} (config.json, model.safetensors); {info['steps']} + {info['noise_steps']} steps in "
        f"{info['seconds'] + info['noise_seconds']:.0f} s"
    )
    if "metrics" in info:
        print(format_metrics(info["metrics"]))
    return 0


def add_command(sub) -> None:
    """Register `difflab train-clip` on the CLI's subparsers."""
    c = sub.add_parser(
        "train-clip",
        help="train the small image-text model (CLIP) of Semantic Diffusion Guidance",
        description="Train a small image-text model (SmallCLIP: CNN image tower, word-level "
        "transformer text tower) with CLIP's contrastive loss on a captioned data set, "
        "then fine-tune a noise-aware copy of its image tower (SDG's E'_I: "
        "E'_I(x0 + sigma n, sigma) matches E_I(x0)). Writes OUT/config.json (config, "
        "training info and test metrics: text->image retrieval top-1 in batches of 100, "
        "zero-shot attribute accuracy, noisy retrieval) and OUT/model.safetensors. Load "
        "it with difflab.train.clip.load_clip(OUT[, noise_aware=True]).",
    )
    c.add_argument("--data", default="shapes", help="a captioned data set (default shapes)")
    c.add_argument("--data-kwargs", metavar="JSON", help='loader arguments, e.g. \'{"n": 2000, "size": 32}\'')
    c.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    c.add_argument("--steps", type=POS_INT, default=2000, help="contrastive training steps (default 2000)")
    c.add_argument(
        "--noise-steps",
        type=NONNEG_INT,
        default=1000,
        help="noise-aware fine-tuning steps of the image tower (default 1000; 0 = none)",
    )
    c.add_argument("--batch-size", type=POS_INT, default=128, help="image-caption pairs per step (default 128)")
    c.add_argument("--lr", type=LR, default=2e-3, help="contrastive learning rate (default 2e-3)")
    c.add_argument("--noise-lr", type=LR, default=1e-3, help="fine-tuning learning rate (default 1e-3)")
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--eval-n", type=POS_INT, default=2000, help="held-out test pairs for the metrics (default 2000)")
    c.add_argument("--overwrite", action="store_true", help="replace the folder --out if it already holds one")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=_cmd_train_clip)


# --------------------------------------------------------------------------------------------
# The trainers: CLIP's contrastive loss, then SDG's noise-aware image tower E'_I
# --------------------------------------------------------------------------------------------


def caption_vocabulary(captions) -> list[str]:
    return sorted({w for c in captions for w in WordEncoder.words(c)})


def train_clip(
    data: ImageData,
    *,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    config: SmallCLIPConfig | None = None,
    progress: bool = True,
) -> SmallCLIP:
    """Contrastive image-caption training on clean images (CLIP's objective)."""
    if data.captions is None:
        raise ValueError(f"dataset {data.name!r} has no captions")
    check_budget(steps, None)
    check_number("lr", lr, lo=0, lo_open=True, hi=MAX_LR)
    config = config or SmallCLIPConfig(
        vocab=caption_vocabulary(data.captions), in_channels=data.images.shape[1], image_size=data.images.shape[-1]
    )
    torch.manual_seed(seed)
    model = SmallCLIP(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    for step in progress_range(steps, progress, "train-clip"):
        idx = batch_indices(len(data.images), batch_size, seed, step)
        loss = model.contrastive_loss(data.images[idx], [data.captions[i] for i in idx.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        check_training_state(step + 1, loss.item(), model.parameters(), f"lower lr (now {lr})")
    return model.eval()


def finetune_noise_aware(
    clip: SmallCLIP,
    data: ImageData,
    *,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    sigma_min: float = 0.01,
    sigma_max: float = 80.0,
    seed: int = 0,
    progress: bool = True,
) -> SmallCLIP:
    """SDG's E'_I: fine-tune the image tower so E'_I(x_t, sigma) matches the frozen E_I(x_0)."""
    teacher = copy.deepcopy(clip).eval().requires_grad_(False)
    student = copy.deepcopy(clip).train()
    params = [p for n, p in student.named_parameters() if not n.startswith(("text", "text_proj"))]
    opt = torch.optim.AdamW(params, lr=lr)
    for step in progress_range(steps, progress, "finetune-noise-aware"):
        g = torch.Generator().manual_seed(seed_from(seed, step, 11))
        x0 = data.images[batch_indices(len(data.images), batch_size, seed, step)]
        u = torch.rand(len(x0), generator=g, dtype=torch.float64)
        sigma = (math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min))).exp()
        x = x0 + sigma.float().reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            target = teacher.encode_image(x0)
        pred = student.encode_image(clip_input(x, sigma), clip_c_noise(sigma, x))
        loss = (1 - (pred * target).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return student.eval().requires_grad_(False)
