"""Train the domain classifiers whose features Frechet distance uses (the recipe of the weights in
checkpoints/classifiers/).

    python -m difflab.metrics.train_classifiers fmnist            # ~12 min on one busy core
    python -m difflab.metrics.train_classifiers digits shapes     # ~20 s and ~3 min
    python -m difflab.metrics.train_classifiers all --out checkpoints/classifiers

Recipe (same for all three, hyper-parameters per set in RECIPES; Fashion-MNIST gets wider layers,
32-64-128-128 channels against 16-32-64-128): AdamW, linear warm-up then
cosine decay to zero, batch 128, cross-entropy summed over the heads; light augmentation where
it cannot change a label (random translation by up to `shift` px with edge padding, and a
left-right flip for Fashion-MNIST; none for shapes, whose position and layout are labels).
Every random draw comes from generators seeded by `seed`, and training runs on one thread by
default (`--threads`), so a rerun on the same kind of machine gives the same weights. Writes
NAME.safetensors and NAME.json (the card: command, recipe, test accuracy per head, sha256 of the
weights, training time).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.metrics.classifiers import (
    CLASSIFIER_DIR,
    CLASSIFIERS,
    FeatureNet,
    FeatureNetConfig,
    file_sha256,
    save_classifier,
)

__all__ = ["Recipe", "RECIPES", "train_classifier", "evaluate_classifier", "load_split"]


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float = 3e-3
    weight_decay: float = 5e-4
    batch_size: int = 128
    warmup: int = 100
    shift: int = 0
    flip: bool = False
    n_train: int | None = None  # shapes: how many training items to generate
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64, 128)


RECIPES: dict[str, Recipe] = {
    "fmnist": Recipe(epochs=8, shift=1, flip=True, widths=(32, 64, 128, 128)),
    "digits": Recipe(epochs=30, shift=1),
    "shapes": Recipe(epochs=4, n_train=20_000),
}


def load_split(name: str, split: str, n: int | None = None):
    """The classifier's data set split as ImageData (labels per head in `attributes`)."""
    from difflab.data import load_dataset

    spec = CLASSIFIERS[name]
    kw = dict(spec.data_kwargs)
    if n is not None:
        kw["n"] = n
    return load_dataset(spec.dataset, split, **kw)


def _targets(name: str, data) -> dict[str, Tensor]:
    spec = CLASSIFIERS[name]
    if data.attributes is not None:
        return {k: data.attributes[k] for k, _ in spec.heads}
    return {"label": data.labels}


def _augment(x: Tensor, recipe: Recipe, g: torch.Generator) -> Tensor:
    """Random translation by up to `shift` px (replicate padding + crop), optional flips."""
    B, _, H, W = x.shape
    if recipe.shift:
        s = recipe.shift
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        dy = torch.randint(0, 2 * s + 1, (B,), generator=g)
        dx = torch.randint(0, 2 * s + 1, (B,), generator=g)
        rows = dy[:, None] + torch.arange(H)[None]  # (B, H)
        cols = dx[:, None] + torch.arange(W)[None]  # (B, W)
        idx_b = torch.arange(B)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if recipe.flip:
        m = torch.rand(B, generator=g) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


@torch.no_grad()
def evaluate_classifier(
    net: FeatureNet, images: Tensor, targets: dict[str, Tensor], batch_size: int = 1000
) -> dict[str, float]:
    """Test accuracy per head."""
    net.eval()
    correct = {k: 0 for k in targets}
    for a in range(0, len(images), batch_size):
        logits = net(images[a : a + batch_size])
        for k, y in targets.items():
            correct[k] += int((logits[k].argmax(1) == y[a : a + batch_size]).sum())
    return {k: c / len(images) for k, c in correct.items()}


def train_classifier(name: str, recipe: Recipe | None = None, progress: bool = True) -> tuple[FeatureNet, dict]:
    """Train classifier `name` by its recipe; returns (net in eval mode, report)."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS)}")
    recipe = recipe or RECIPES[name]
    spec = CLASSIFIERS[name]
    train = load_split(name, "train", recipe.n_train)
    test = load_split(name, "test")
    x_train, y_train = train.images, _targets(name, train)
    x_test, y_test = test.images, _targets(name, test)
    if tuple(x_train.shape[1:]) != (spec.channels, spec.image_size, spec.image_size):
        raise ValueError(
            f"{name}: data shape {tuple(x_train.shape[1:])} != the spec's "
            f"{(spec.channels, spec.image_size, spec.image_size)}"
        )

    torch.manual_seed(recipe.seed)
    net = FeatureNet(FeatureNetConfig(spec.channels, spec.image_size, widths=recipe.widths, heads=dict(spec.heads)))
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    n = len(x_train)
    steps_per_epoch = n // recipe.batch_size
    total = steps_per_epoch * recipe.epochs

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(1, total - recipe.warmup)))

    g = torch.Generator().manual_seed(recipe.seed)
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total, desc=f"train {name}", dynamic_ncols=True)
    t0 = time.perf_counter()
    step = 0
    history = []
    for epoch in range(recipe.epochs):
        net.train()
        perm = torch.randperm(n, generator=g)
        running = 0.0
        for j in range(steps_per_epoch):
            idx = perm[j * recipe.batch_size : (j + 1) * recipe.batch_size]
            x = _augment(x_train[idx], recipe, g)
            logits = net(x)
            loss = sum(F.cross_entropy(logits[k], y[idx]) for k, y in y_train.items())
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running += loss.item()
            if pbar is not None:
                pbar.update(1)
                if step % 20 == 0:
                    pbar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        acc = evaluate_classifier(net, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": running / steps_per_epoch, "test_accuracy": acc})
        if pbar is not None:
            pbar.write(f"{name} epoch {epoch + 1}: loss {running / steps_per_epoch:.4f}, test accuracy {acc}")
    if pbar is not None:
        pbar.close()
    seconds = time.perf_counter() - t0
    net.eval().requires_grad_(False)
    acc = evaluate_classifier(net, x_test, y_test)
    report = {
        "name": name,
        "dataset": spec.dataset,
        "data_kwargs": dict(spec.data_kwargs),
        "label_head": spec.label_head,
        "n_train": n,
        "n_test": len(x_test),
        "test_accuracy": acc[spec.label_head],
        "test_accuracy_per_head": acc,
        "recipe": asdict(recipe),
        "history": history,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    return net, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m difflab.metrics.train_classifiers",
        description="Train the FD feature classifiers (fmnist, digits, shapes).",
    )
    p.add_argument("names", nargs="+", help="fmnist | digits | shapes | all")
    p.add_argument("--out", default=str(CLASSIFIER_DIR), help="folder for NAME.safetensors + NAME.json")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: bit-reproducible, and on a shared 2-core machine faster)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    names = list(CLASSIFIERS) if args.names == ["all"] else args.names
    for name in names:
        if name not in CLASSIFIERS:
            p.error(f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS)}, all")
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    for name in names:
        recipe = RECIPES[name]
        if args.epochs is not None:
            recipe = Recipe(**{**asdict(recipe), "epochs": args.epochs})
        net, report = train_classifier(name, recipe, progress=not args.no_progress)
        path = save_classifier(net, out / f"{name}.safetensors", name)
        command = f"python -m difflab.metrics.train_classifiers {name}"
        if args.epochs is not None:
            command += f" --epochs {args.epochs}"
        if args.threads != 1:
            command += f" --threads {args.threads}"
        report = {
            "command": command,
            **report,
            "weights": path.name,
            "sha256": file_sha256(path),
            "bytes": path.stat().st_size,
            "features": "penultimate layer (fc 128 + ReLU)",
        }
        (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        heads = ", ".join(f"{k} {v:.4f}" for k, v in report["test_accuracy_per_head"].items())
        print(f"{name}: test accuracy {heads}; {report['train_seconds']} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
