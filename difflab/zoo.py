"""The model zoo: trained checkpoints in `checkpoints/zoo/<name>/`, each with its measured quality.

    pipe = zoo.load("fmnist-unet-s")                      # a Pipeline
    images = pipe(16, class_labels=3)

A zoo folder is a `Pipeline.save_pretrained` folder (config.json + model.safetensors, EMA weights)
plus `zoo.json`: the exact training command, wall and CPU time, machine, training steps, the
evaluation (FD under difflab's own classifier, precision/recall, class accuracy at `n` samples)
and a small `check` -- the same metrics at a few hundred samples and few steps, from a fixed seed,
that CI recomputes (`check(name)`) and compares with the recorded values.

Publishing a trained run folder:

    python -m difflab.zoo publish runs/zoo-fmnist --name fmnist-unet-s --command "difflab train ..."
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from difflab.assets import asset

__all__ = ["ZOO_DIR", "names", "load", "measure", "publish", "check"]

ZOO_DIR = asset("zoo")
CHECK = {"n": 100, "steps": 10, "seed": 0}
# how far CI's recomputation may drift from the recorded check (float differences across
# machines move a few samples; a broken model moves everything)
TOLERANCE = {
    "fd_rel": 0.15,
    "fd_abs": 1.0,
    "precision": 0.08,
    "recall": 0.08,
    "class_accuracy": 0.06,
    "attribute_accuracy": 0.08,
}


def names() -> list[str]:
    return sorted(p.parent.name for p in ZOO_DIR.glob("*/zoo.json"))


def _folder(name: str) -> Path:
    path = ZOO_DIR / name
    if not (path / "zoo.json").is_file():
        raise FileNotFoundError(f"no zoo model {name!r} (known: {', '.join(names()) or 'none'})")
    return path


def load(name: str):
    """The zoo model `name` as a Pipeline."""
    from difflab.pipeline import Pipeline

    return Pipeline.from_pretrained(_folder(name))


def measure(
    pipe,
    *,
    n: int,
    steps: int,
    seed: int = 0,
    sampler: str | None = None,
    guidance_scale: float = 1.0,
    progress: bool = False,
) -> dict:
    """FD (dataset classifier features, against the training set), precision, recall, IS
    analogue and class accuracy of n class-balanced samples."""
    from difflab.core.sampling import DEFAULT_SAMPLER
    from difflab.metrics import default_extractor, feature_extractor, reference_stats, score_samples
    from difflab.metrics.evaluate import _data_kwargs, _run_data

    sampler = sampler or DEFAULT_SAMPLER
    config = pipe.config
    dataset = config["data"]["name"]
    ext = feature_extractor(default_extractor(dataset))
    ref = reference_stats(
        ext,
        dataset,
        "train",
        images=lambda: _run_data(config, "train").images,
        data_kwargs=_data_kwargs(config),
        log=lambda s: None,
    )
    labels = None if pipe.num_classes is None else torch.arange(n) % pipe.num_classes
    extra = {}
    if config.get("text_encoder"):  # a text model: one held-out caption per sample
        captions = _run_data(config, "test").captions
        extra["prompt"] = [captions[i % len(captions)] for i in range(n)]
    t0 = time.perf_counter()
    x = pipe(
        n,
        class_labels=labels,
        sampler=sampler,
        steps=steps,
        seed=seed,
        guidance_scale=guidance_scale,
        progress=progress,
        **extra,
    )
    seconds = time.perf_counter() - t0
    q = score_samples(x, ext, ref, dataset, labels=labels, num_classes=pipe.num_classes)
    out = {
        "n": n,
        "steps": steps,
        "seed": seed,
        "sampler": sampler,
        "guidance_scale": guidance_scale,
        "fd_name": ext.display_name,
        "fd": q["fd"],
        "precision": q["precision"],
        "recall": q["recall"],
        "inception_score": q["inception_score"],
        "class_accuracy": q["class_accuracy"],
        "sample_seconds": round(seconds, 1),
    }
    if extra and dataset == "shapes":  # text-to-image: do the samples show what the prompts name?
        out["attribute_accuracy"] = prompt_attribute_accuracy(x, extra["prompt"])
    return out


def prompt_attribute_accuracy(images: torch.Tensor, prompts: list[str]) -> float:
    """Fraction of shapes images whose shape, colour, size and position (as difflab's shapes
    classifier reads them) all equal what their prompt names."""
    from difflab.data.shapes import parse_caption
    from difflab.metrics.classifiers import attribute_accuracy, load_classifier

    named = [parse_caption(p) for p in prompts]
    attrs = {k: torch.tensor([a[k] for a in named]) for k in ("shape", "color", "size", "position")}
    return attribute_accuracy(load_classifier("shapes"), images, attrs)["all"]


def publish(
    run: str | os.PathLike,
    name: str,
    command: str,
    *,
    n: int = 2000,
    steps: int = 20,
    machine: str | None = None,
    progress: bool = True,
    device: str = "cpu",
    guidance_scale: float = 1.0,
) -> Path:
    """Copy a run's EMA model into checkpoints/zoo/<name>/ and record its training and quality
    (sampled on `device`; on CUDA with TF32 off, so that CI's CPU re-check sees the same numbers),
    at classifier-free guidance `guidance_scale` (the scale the model is meant to be used at)."""
    from difflab.card import model_card
    from difflab.pipeline import Pipeline
    from difflab.runfolder import read_safetensors, write_json

    run = Path(run)
    pipe = Pipeline.from_pretrained(run)
    if device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        pipe.denoiser.to(device)
    log = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines() if r.strip()]
    if (run / "checkpoint.safetensors").exists():
        _, meta = read_safetensors(run / "checkpoint.safetensors")
    else:  # a run folder without its optimizer state: the log's last row
        meta = {"step": log[-1]["step"], "elapsed": log[-1]["time"]}
    train_cfg = pipe.config.get("train", {})
    out = ZOO_DIR / name
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.denoiser.to("cpu")
    pipe.save_pretrained(tmp)
    pipe.denoiser.to(device)
    if (run / "loss.png").exists():
        shutil.copy(run / "loss.png", tmp / "loss.png")
    size_mb = (tmp / "model.safetensors").stat().st_size / 2**20
    if size_mb > 25:
        raise ValueError(f"{name}: model.safetensors is {size_mb:.1f} MB; zoo checkpoints must stay under 25 MB")
    record = {
        "name": name,
        "command": command,
        "train": {
            "steps": int(meta["step"]),
            "elapsed_s": float(meta.get("elapsed", 0)),
            "clock": train_cfg.get("clock", "wall"),
            "final_loss": log[-1]["loss"] if log else None,
            "config": train_cfg,
        },
        "machine": machine or _machine(pipe),
        "size_mb": round(size_mb, 2),
        "eval": measure(pipe, n=n, steps=steps, progress=progress, guidance_scale=guidance_scale),
        "check": measure(pipe, **CHECK, guidance_scale=guidance_scale),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(tmp / "zoo.json", record)
    config = json.loads((tmp / "config.json").read_text())
    (tmp / "README.md").write_text(model_card(config, record, name=name))  # the model card
    # replace the old entry only once the new one is complete
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _machine(pipe) -> str:
    device = next(pipe.denoiser.parameters()).device
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    return f"{where}, torch {torch.__version__}"


def check(name: str) -> tuple[dict, dict]:
    """Recompute the recorded small check of a zoo model: (recorded, measured); raises if off."""
    record = json.loads((_folder(name) / "zoo.json").read_text())
    want = record["check"]
    got = measure(
        load(name),
        n=want["n"],
        steps=want["steps"],
        seed=want["seed"],
        sampler=want["sampler"],
        guidance_scale=want.get("guidance_scale", 1.0),
    )
    problems = []
    if abs(got["fd"] - want["fd"]) > max(TOLERANCE["fd_abs"], TOLERANCE["fd_rel"] * want["fd"]):
        problems.append(f"FD {got['fd']:.3f} vs recorded {want['fd']:.3f}")
    for key in ("precision", "recall", "class_accuracy", "attribute_accuracy"):
        if want.get(key) is not None and abs(got[key] - want[key]) > TOLERANCE[key]:
            problems.append(f"{key} {got[key]:.3f} vs recorded {want[key]:.3f}")
    if problems:
        raise AssertionError(f"zoo model {name}: " + "; ".join(problems))
    return want, got


def table() -> str:
    """The zoo as a Markdown table (for the README)."""
    rows = [
        "| model | data | command | steps | train time | machine | FD (n, steps) | precision / recall | "
        "class acc. (attribute acc.) | MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names():
        r = json.loads((ZOO_DIR / name / "zoo.json").read_text())
        e, t = r["eval"], r["train"]
        clock = "CPU-min" if t["clock"] == "cpu" else "min"
        acc = "-" if e["class_accuracy"] is None else f"{e['class_accuracy']:.3f}"
        if e.get("attribute_accuracy") is not None:
            acc = f"({e['attribute_accuracy']:.3f})"
        if e.get("guidance_scale", 1.0) != 1.0:
            acc += f" at guidance {e['guidance_scale']:g}"
        rows.append(
            f"| `{name}` | {t['config'].get('data', '?')} | `{r['command']}` | {t['steps']} | "
            f"{t['elapsed_s'] / 60:.0f} {clock} | {r['machine']} | {e['fd_name']} {e['fd']:.2f} ({e['n']}, {e['steps']} "
            f"{e['sampler']}) | {e['precision']:.3f} / {e['recall']:.3f} | {acc} | {r['size_mb']} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m difflab.zoo", description="publish, check or list zoo models")
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="copy a run folder into checkpoints/zoo/NAME with its metrics")
    pub.add_argument("run")
    pub.add_argument("--name", required=True)
    pub.add_argument("--command", required=True, help="the exact training command, recorded")
    pub.add_argument("--n", type=int, default=2000)
    pub.add_argument("--steps", type=int, default=20)
    pub.add_argument("--machine")
    pub.add_argument("--device", default="cpu")
    pub.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance s to measure at")
    c = sub.add_parser("check", help="recompute a model's recorded check")
    c.add_argument("name", nargs="?")
    sub.add_parser("table", help="print the zoo table (Markdown)")
    args = p.parse_args(argv)
    if args.cmd == "publish":
        print(
            publish(
                args.run,
                args.name,
                args.command,
                n=args.n,
                steps=args.steps,
                machine=args.machine,
                device=args.device,
                guidance_scale=args.guidance_scale,
            )
        )
    elif args.cmd == "check":
        for name in [args.name] if args.name else names():
            want, got = check(name)
            print(f"{name}: recorded FD {want['fd']:.3f}, now {got['fd']:.3f} -- ok")
    else:
        print(table(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
