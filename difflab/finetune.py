"""`difflab finetune`: personalise a trained text-to-image model on a few images of a new concept.

    difflab finetune textual-inversion --base shapes-text-ldm --images my_concept/ --token "<S*>" \\
        --init shape --steps 500 --out runs/ti       # then: difflab sample --run runs/ti --prompt "a <S*> on the left"

Textual Inversion (Gal et al. 2023, arXiv 2208.01618): a new pseudo-word whose embedding row is
initialised from a coarse word and is the only weight trained (the denoiser, the rest of the text
encoder and the autoencoder frozen), with the denoising loss on the concept's images captioned by
prompt templates ("a photo of a <S*>", ...). The run folder holds that one row and names its base;
on a diffusers base it also holds learned_embeds.safetensors for diffusers' load_textual_inversion.

DreamBooth (Ruiz et al. 2023, arXiv 2208.12242): the whole denoiser (or LoRA adapters) fine-tuned on
the subject's images captioned "a [identifier] [class]", with class-specific prior preservation: images
the frozen base generates for "a [class]" are trained on too, their loss weighted by lambda (paper: 1).

    difflab finetune dreambooth --base shapes-text-unet --images my_subject/ --identifier sks \\
        --class-noun star --prior-weight 1 --class-images 50 --steps 400 --out runs/db   # --lora: adapters

Everything runs in difflab's one training loop (`TrainConfig(init_from=..., finetune=...)`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.data import ImageData

__all__ = ["TEMPLATES", "concept_data", "textual_inversion", "dreambooth", "add_finetune_parser"]

# prompt templates for the concept's images ({} is the token): the paper's object templates, short
TEMPLATES = (
    "a {}",
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a rendering of a {}",
    "a {} in the picture",
    "a small {}",
    "a large {}",
)


def concept_data(images: torch.Tensor, token: str, templates=TEMPLATES, repeat: int = 1) -> ImageData:
    """Every image paired with every template (and repeated), as captioned training data."""
    if images.ndim != 4 or len(images) < 1:
        raise ValueError(f"need at least one image (N, C, H, W), got shape {tuple(images.shape)}")
    templates = list(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template must hold one {{}} for the token; these do not: {bad}")
    pairs = [(i, t.format(token)) for _ in range(repeat) for i in range(len(images)) for t in templates]
    idx = torch.tensor([i for i, _ in pairs])
    return ImageData(images[idx], captions=[c for _, c in pairs], name="concept")


def load_concept_images(folder: str | Path, size: int, channels: int) -> torch.Tensor:
    """The concept's images of a folder, resized to the base's size, in [-1, 1]."""
    from difflab.data import load_dataset

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images folder {folder} does not exist")
    data = load_dataset(f"folder:{folder}", size=size)
    images = data.images
    if images.shape[1] != channels:
        raise ValueError(f"images in {folder} have {images.shape[1]} channels, the base takes {channels}")
    return images


def textual_inversion(
    base,
    images: torch.Tensor,
    out,
    *,
    token: str = "<S*>",
    init: str,
    steps: int = 500,
    lr: float = 5e-3,
    batch_size: int = 8,
    templates=TEMPLATES,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Learn `token` from `images` (N, C, H, W) in [-1, 1] on the text-to-image run/zoo model/diffusers
    folder `base`; writes the run folder `out` and returns it."""
    from difflab.train import TrainConfig, train

    data = concept_data(images, token, templates)
    repeat = -(-batch_size // len(data))  # the loop draws whole batches: repeat the pairs if they are fewer
    if repeat > 1:
        data = concept_data(images, token, templates, repeat=repeat)
    cfg = TrainConfig(
        data="concept",
        init_from=str(base),
        finetune="embeddings",
        token=token,
        init_token=init,
        steps=steps,
        lr=lr,
        warmup=0,
        batch_size=batch_size,
        caption_dropout=0.0,
        ema_decay=0.0,  # the paper keeps the last embedding
        save_every=max(steps // 4, 1),
        log_every=max(1, min(25, steps)),
        seed=seed,
    )
    return train(cfg, out, data=data, progress=progress)


def dreambooth(
    base,
    images: torch.Tensor,
    out,
    *,
    identifier: str = "sks",
    class_noun: str,
    prior_weight: float = 1.0,
    class_images: int = 50,
    class_steps: int = 20,
    lora: bool = False,
    lora_rank: int = 4,
    steps: int = 400,
    lr: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Fine-tune `base` on the subject `images` captioned "a {identifier} {class_noun}", with
    `class_images` prior images the frozen base samples for "a {class_noun}" (weight
    `prior_weight`; 0 switches prior preservation off). Writes and returns the run folder."""
    from difflab.pipeline import Pipeline
    from difflab.train import TrainConfig, train

    if not 0 <= prior_weight < float("inf"):
        raise ValueError(f"prior_weight must be a finite number >= 0, got {prior_weight}")
    if images.ndim != 4 or len(images) < 1:
        raise ValueError(f"need at least one subject image (N, C, H, W), got shape {tuple(images.shape)}")
    instance = f"a {identifier} {class_noun}"
    items, captions, weights = [images], [instance] * len(images), [1.0] * len(images)
    if prior_weight > 0:
        pipe = Pipeline.from_pretrained(base)
        prior = pipe(class_images, prompt=f"a {class_noun}", steps=class_steps, seed=seed + 1, progress=progress)
        items.append(prior)
        captions += [f"a {class_noun}"] * class_images
        weights += [float(prior_weight)] * class_images
    x = torch.cat(items)
    repeat = max(1, -(-batch_size // len(x)))
    data = ImageData(
        x.repeat(repeat, 1, 1, 1),
        captions=captions * repeat,
        name="dreambooth",
        meta={"loss_weight": torch.tensor(weights * repeat)},
    )
    cfg = TrainConfig(
        data="dreambooth",
        init_from=str(base),
        finetune="lora" if lora else "all",
        lora_rank=lora_rank,
        steps=steps,
        # defaults measured on the zoo's shapes-text-unet (papers/dreambooth, a pilot on seed 100: after 300
        # steps 5e-5 gave the subject in 0.19 of samples, 2e-4 in 0.69, LoRA at 1e-3 in 0.99). The paper's 5e-6
        # is for Stable Diffusion; pass a smaller --lr for a larger base.
        lr=lr if lr is not None else (1e-3 if lora else 2e-4),
        warmup=0,
        batch_size=batch_size,
        caption_dropout=0.0,
        ema_decay=0.0,  # the paper keeps the fine-tuned weights as they end
        save_every=max(steps // 4, 1),
        log_every=max(1, min(25, steps)),
        seed=seed,
    )
    return train(cfg, out, data=data, progress=progress)


def _cmd_dreambooth(args) -> int:
    _, images = _text_base_and_images(args, "DreamBooth binds a word to the subject")
    out = dreambooth(
        _resolve(args.base),
        images,
        args.out,
        identifier=args.identifier,
        class_noun=args.class_noun,
        prior_weight=args.prior_weight,
        class_images=args.class_images,
        lora=args.lora,
        lora_rank=args.lora_rank,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"fine-tuned on {len(images)} image(s) of 'a {args.identifier} {args.class_noun}': {out}")
    return 0


def _cmd_textual_inversion(args) -> int:
    base, images = _text_base_and_images(args, "Textual Inversion learns a word")
    templates = TEMPLATES
    if hasattr(base.text_encoder, "unknown_words"):  # a word-level encoder: templates in its vocabulary only
        templates = tuple(t for t in TEMPLATES if not base.text_encoder.unknown_words([t.format("")]))
        if not templates:
            raise ValueError(f"no prompt template fits the vocabulary of --base {args.base}'s text encoder")
    out = textual_inversion(
        _resolve(args.base),
        images,
        args.out,
        token=args.token,
        init=args.init,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        templates=templates,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"learned {args.token!r} from {len(images)} image(s): {out} (sample with --prompt 'a {args.token} ...')")
    return 0


def _text_base_and_images(args, why: str):
    """The --base pipeline (text-to-image, else a one-line error saying `why`) and the --images folder's
    images at its size and channel count."""
    from difflab.pipeline import Pipeline

    base = Pipeline.from_pretrained(_resolve(args.base))
    if base.conditioning != "text":
        raise ValueError(f"--base {args.base} is not a text-to-image model ({why})")
    c, h, _ = base.image_shape()
    return base, load_concept_images(args.images, h, c)


def _resolve(base: str) -> str:
    from difflab.assets import resolve_run

    return str(resolve_run(base))


def add_finetune_parser(sub) -> None:
    from difflab.core.validation import LR, NONNEG, POS_INT, SEED

    f = sub.add_parser("finetune", help="personalise a text-to-image model: textual-inversion, dreambooth")
    fs = f.add_subparsers(dest="method", required=True, metavar="METHOD")
    ti = fs.add_parser(
        "textual-inversion",
        help="learn a new word for a concept from 3-5 images (Gal et al. 2023)",
        description=__doc__.split("\n\n")[2],
    )
    ti.add_argument("--base", required=True, help="text-to-image run folder, zoo name or diffusers folder")
    ti.add_argument("--images", required=True, help="folder of the concept's images (3-5)")
    ti.add_argument("--token", default="<S*>", help="the new pseudo-word (default <S*>)")
    ti.add_argument("--init", required=True, help="a coarse word for the concept; its embedding is the start")
    ti.add_argument("--steps", type=POS_INT, default=500)
    ti.add_argument("--lr", type=LR, default=5e-3)
    ti.add_argument("--batch-size", type=POS_INT, default=8)
    ti.add_argument("--seed", type=SEED, default=0)
    ti.add_argument("--out", required=True, help="run folder to write")
    ti.add_argument("--no-progress", action="store_true")
    ti.set_defaults(func=_cmd_textual_inversion)

    db = fs.add_parser(
        "dreambooth",
        help="fine-tune on 3-5 images of a subject with class-prior preservation (Ruiz et al. 2023)",
        description=__doc__.split("\n\n")[3],
    )
    db.add_argument("--base", required=True, help="text-to-image run folder or zoo name")
    db.add_argument("--images", required=True, help="folder of the subject's images (3-5)")
    db.add_argument("--identifier", default="sks", help="the rare identifier word (default sks)")
    db.add_argument("--class-noun", required=True, help="the subject's class, e.g. star")
    db.add_argument("--prior-weight", type=NONNEG, default=1.0, help="lambda of the prior loss; 0: off (default 1)")
    db.add_argument("--class-images", type=POS_INT, default=50, help="prior images the base generates (default 50)")
    db.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    db.add_argument("--lora-rank", type=POS_INT, default=4)
    db.add_argument("--steps", type=POS_INT, default=400)
    db.add_argument(
        "--lr", type=LR, help="default 2e-4 (full), 1e-3 (LoRA); smaller for a large base (the paper: 5e-6 on SD)"
    )
    db.add_argument("--batch-size", type=POS_INT, default=8)
    db.add_argument("--seed", type=SEED, default=0)
    db.add_argument("--out", required=True, help="run folder to write")
    db.add_argument("--no-progress", action="store_true")
    db.set_defaults(func=_cmd_dreambooth)
