"""`difflab eval`: score a run folder's samples and likelihood in one call.

    report = evaluate_run("runs/fmnist", sampler="dpmpp_2m", steps=20, n=10_000)
    report["fd"], report["precision"], report["recall"], report["inception_score"], report["bits_per_dim"]

Steps: (1) reference statistics of the run's training set under the extractor (cached, see
`difflab.metrics.features`); (2) n samples from `Pipeline` (class-balanced for a conditional
model: label i % K for sample i); (3) Frechet distance, precision/recall (k = 3, against the same
number of reference features), the Inception-Score analogue from the data set's own classifier,
and for a conditional model the classifier's accuracy on the conditioning labels; (4) bits/dim
on `bpd_n` test images by the VLB or the probability-flow ODE. A class-conditional model trained
with label dropout is scored unconditionally (null label) for bits/dim, otherwise conditionally on
the true labels; the report says which.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from difflab.metrics.features import (
    ClassifierExtractor,
    default_extractor,
    extract,
    feature_extractor,
    reference_stats,
)
from difflab.metrics.frechet import frechet_distance, mean_cov
from difflab.metrics.inception_score import inception_score
from difflab.metrics.precision_recall import precision_recall

__all__ = ["evaluate_run", "score_samples", "format_report", "BPD_METHODS"]

BPD_METHODS = ("vlb", "ode", "none")


def _run_data(config: dict, split: str):
    """The run's data set split as training saw it (same loader kwargs, e.g. pad_to)."""
    from difflab.data import load_dataset
    from difflab.train.loop import TrainConfig, load_training_data

    cfg = TrainConfig.from_dict(config["train"])
    if split == "train":
        return load_training_data(cfg)
    kw = dict(cfg.data_kwargs)
    if cfg.data == "fashion_mnist":
        kw.setdefault("pad_to", 32)
    return load_dataset(cfg.data, split, **kw)


def _data_kwargs(config: dict) -> dict:
    kw = dict(config.get("train", {}).get("data_kwargs", {}))
    if config["data"]["name"] == "fashion_mnist":
        kw.setdefault("pad_to", 32)
    return kw


def evaluate_run(
    run: str | os.PathLike,
    *,
    sampler: str | None = None,
    steps: int = 20,
    n: int = 10_000,
    seed: int = 0,
    guidance_scale: float = 1.0,
    extractor: str | None = None,
    inception_weights: str | os.PathLike | None = None,
    bpd: str = "vlb",
    bpd_n: int = 256,
    bpd_timesteps: int | None = 100,
    hutchinson: int = 1,
    pr_k: int = 3,
    recompute_stats: bool = False,
    batch_size: int = 256,
    weights: str = "ema",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    clip_model: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Score a run: FD, precision, recall, IS analogue (+ class accuracy) and bits/dim (a dict).

    `dtype` ("fp32", "bf16", "fp16") is the networks' compute dtype for sampling; bits/dim is
    always computed with the run's float32 weights (the report says which dtype sampled).
    `clip_model`: a transformers CLIP folder; adds the CLIP score of each sample against its prompt
    (text runs) or "a photo of a CLASS" (class runs; `difflab.metrics.clip_score`)."""
    from difflab.core.sampling import DEFAULT_SAMPLER
    from difflab.pipeline import DTYPES, Pipeline, resolve_dtype

    dtype_name = "fp32" if dtype is None else next(k for k, v in DTYPES.items() if v == resolve_dtype(dtype))

    sampler = sampler or DEFAULT_SAMPLER
    if bpd not in BPD_METHODS:
        raise ValueError(f"bpd must be one of {BPD_METHODS}, got {bpd!r}")
    for name, v in (("n", n), ("steps", steps), ("batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if n < pr_k + 1:
        raise ValueError(f"n must be at least {pr_k + 1} for precision/recall with k={pr_k}, got {n}")
    if bpd != "none" and bpd_n < 1:
        raise ValueError(f"bpd_n must be >= 1, got {bpd_n}")
    t_start = time.perf_counter()
    timings = {}
    pipe = Pipeline.from_pretrained(run, weights=weights)
    if device is not None:
        from difflab.pipeline import resolve_device

        device = resolve_device(device)  # "auto": CUDA when present; a device that is not here: a ValueError
        pipe.to(device)
    # sampling runs in `dtype`; bits/dim always in float32 weights (its float64 sums need them), so
    # the exact fp32 weights are kept aside before the cast and put back for the bound
    fp32_state = None
    if dtype is not None and resolve_dtype(dtype) != torch.float32:
        fp32_state = {k: v.detach().clone() for k, v in pipe.denoiser.net.state_dict().items()}
        pipe.to(dtype=dtype)
    config = pipe.config
    dataset = config["data"]["name"]
    ext_name = extractor or default_extractor(dataset)
    ext = feature_extractor(ext_name, inception_weights, device)

    # (1) reference statistics of the training split
    t0 = time.perf_counter()
    ref = reference_stats(
        ext,
        dataset,
        "train",
        images=lambda: _run_data(config, "train").images,
        data_kwargs=_data_kwargs(config),
        recompute=recompute_stats,
        batch_size=batch_size,
        progress=progress,
        log=log,
    )
    timings["reference"] = time.perf_counter() - t0

    # (2) samples
    t0 = time.perf_counter()
    text_run = bool(config.get("text_encoder"))
    prompts = None
    if text_run:  # a text model is scored on the captions of held-out images, one per sample
        captions = _run_data(config, "test").captions
        if not captions:
            raise ValueError(f"run {run} is text-conditional but its data set {dataset!r} has no test captions")
        prompts = [captions[i % len(captions)] for i in range(n)]
    samples = pipe(
        n,
        guidance_scale=guidance_scale,
        sampler=sampler,
        steps=steps,
        seed=seed,
        batch_size=min(batch_size, 64),
        progress=progress,
        **({"prompt": prompts} if text_run else {}),
    )
    labels = None if pipe.num_classes is None else torch.arange(n) % pipe.num_classes
    timings["sampling"] = time.perf_counter() - t0

    # (3) sample metrics
    t0 = time.perf_counter()
    scores = score_samples(
        samples,
        ext,
        ref,
        dataset,
        labels=labels,
        num_classes=pipe.num_classes,
        pr_k=pr_k,
        batch_size=batch_size,
        progress=progress,
        device=device,
    )
    fd, is_score, class_acc = scores["fd"], scores["inception_score"], scores["class_accuracy"]
    pr, m, domain = scores, scores["pr_n"], scores["domain"]
    timings["metrics"] = time.perf_counter() - t0

    clip = None
    if clip_model is not None:
        from difflab.metrics.clip_score import clip_score, load_hf_clip

        t0 = time.perf_counter()
        if prompts is not None:
            texts = prompts
        elif labels is not None and pipe.class_names:
            texts = [f"a photo of a {pipe.class_names[int(k)]}" for k in labels]
        else:
            raise ValueError("--clip-model needs prompts: a text run, or a class run with class names")
        model, processor = load_hf_clip(clip_model, device)
        clip = clip_score(samples, texts, model, processor, batch_size=min(batch_size, 64))
        clip = {
            "value": clip["clip_score"],
            "model": str(clip_model),
            "prompts": "run prompts" if prompts else texts[0],
        }
        timings["clip_score"] = time.perf_counter() - t0

    # (4) bits/dim on test images
    bpd_report = None
    if bpd != "none" and config.get("autoencoder"):
        log(
            "bits/dim: skipped -- a latent-diffusion run models autoencoder latents, not pixels, "
            "so its bound is not a pixel likelihood"
        )
        bpd = "none"
    if bpd != "none":
        t0 = time.perf_counter()
        if fp32_state is not None:
            pipe.denoiser.net.to(torch.float32).load_state_dict(fp32_state)
            pipe.dtype = torch.float32
        bpd_report = _bits_per_dim(pipe, config, bpd, bpd_n, bpd_timesteps, hutchinson, seed, batch_size, progress)
        timings["bits_per_dim"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    return {
        "run": str(run),
        "dataset": dataset,
        "sampler": sampler,
        "steps": steps,
        "n": n,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "dtype": dtype_name,
        "prompts": "held-out test captions, one per sample" if prompts else None,
        "weights": weights,
        "extractor": {"name": ext_name, "sha256": ext.weights_sha256, "dim": ext.dim},
        "reference": {
            "dataset": dataset,
            "split": "train",
            "n": ref.n,
            "path": str(ref.path),
            "from_cache": ref.loaded,
        },
        "fd_name": ext.display_name,
        "fd": fd,
        "precision": pr["precision"],
        "recall": pr["recall"],
        "pr_k": pr_k,
        "pr_n": m,
        "inception_score": is_score,
        "is_classifier": domain,
        "class_accuracy": class_acc,
        "bits_per_dim": None if bpd_report is None else bpd_report["value"],
        "clip_score": None if clip is None else clip["value"],
        "clip": clip,
        "bpd": bpd_report,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }


def score_samples(
    samples: torch.Tensor,
    ext,
    ref,
    dataset: str,
    *,
    labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    pr_k: int = 3,
    batch_size: int = 256,
    progress: bool = False,
    device=None,
) -> dict:
    """FD, precision/recall, IS analogue and (with `labels`) class accuracy of `samples` against the
    reference statistics `ref` of `dataset` under the extractor `ext` (see `reference_stats`).

    Precision/recall use as many reference features as samples (k = `pr_k`)."""
    feats, probs = extract(ext, samples, batch_size, progress, desc=f"features ({ext.name})")
    mu, cov = mean_cov(feats)
    fd = frechet_distance(mu, cov, ref.mu, ref.cov)
    m = min(len(samples), len(ref.features))
    pr = precision_recall(ref.features[:m], feats[:m], k=pr_k)
    domain = ext if isinstance(ext, ClassifierExtractor) else None
    if domain is None and dataset in ("fashion_mnist", "digits", "shapes"):
        domain = feature_extractor(default_extractor(dataset), device=device)
    if domain is not None and probs is None:
        probs = extract(domain, samples, batch_size)[1]
    is_score = inception_score(probs) if probs is not None else None
    class_acc = None
    if domain is not None and labels is not None and probs is not None and probs.shape[1] == num_classes:
        class_acc = (probs.argmax(1) == labels).double().mean().item()
    return {
        "fd": fd,
        "precision": pr["precision"],
        "recall": pr["recall"],
        "pr_n": m,
        "inception_score": is_score,
        "class_accuracy": class_acc,
        "domain": None if domain is None else domain.name,
    }


def _bits_per_dim(
    pipe,
    config: dict,
    method: str,
    bpd_n: int,
    timesteps: int | None,
    hutchinson: int,
    seed: int,
    batch_size: int,
    progress: bool,
) -> dict:
    from difflab.metrics.bpd import ode_bits_per_dim, vlb_bits_per_dim

    dataset = config["data"]["name"]
    split = "test" if dataset in ("fashion_mnist", "digits", "shapes") else "train"
    data = _run_data(config, split)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:bpd_n]
    x = data.images[idx]
    device = next(pipe.denoiser.parameters()).device
    cond, conditioning = {}, "none"
    if pipe.num_classes is not None:
        if config.get("train", {}).get("label_dropout", 0) > 0:
            cond, conditioning = {"class_labels": torch.full((len(x),), -1, device=device)}, "null label"
        else:
            cond, conditioning = {"class_labels": data.labels[idx].to(device)}, "true labels"
    values = []
    chunk = max(1, min(batch_size, 64 if method == "ode" else batch_size))
    chunks = range(0, len(x), chunk)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"bits/dim ({method})", leave=False)
    for a in chunks:
        xb = x[a : a + chunk].to(device)
        cb = {k: v[a : a + chunk] for k, v in cond.items()}
        if method == "vlb":
            values.append(
                vlb_bits_per_dim(pipe.denoiser, xb, timesteps=timesteps, generator=g, cond=cb, batch_size=batch_size)
            )
        else:
            values.append(ode_bits_per_dim(pipe.denoiser, xb, hutchinson=hutchinson, generator=g, cond=cb))
    v = torch.cat(values).double()
    out = {
        "method": method,
        "value": v.mean().item(),
        "stderr": (v.std().item() / math.sqrt(len(v))) if len(v) > 1 else None,
        "n": len(v),
        "split": split,
        "conditioning": conditioning,
    }
    if method == "vlb":
        sched = pipe.denoiser.schedule
        from difflab.core.schedules import DiscreteVP

        out["grid"] = "own DiscreteVP schedule" if isinstance(sched, DiscreteVP) else "vp_linear(1000)"
        out["timesteps"] = "all" if timesteps is None else timesteps
    else:
        out["hutchinson"] = hutchinson
    return out


def format_report(r: dict) -> str:
    """The table `difflab eval` prints."""

    def fmt(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    rows = [
        (
            r["fd_name"],
            fmt(r["fd"], ".3f"),
            f"{r['extractor']['name']} features vs {r['reference']['n']} {r['dataset']} train images",
        ),
        ("precision", fmt(r["precision"]), f"k={r['pr_k']}, {r['pr_n']} vs {r['pr_n']}"),
        ("recall", fmt(r["recall"]), ""),
        ("IS (analogue)", fmt(r["inception_score"], ".3f"), f"classifier {r['is_classifier'] or '-'}"),
    ]
    if r.get("class_accuracy") is not None:
        rows.append(("class accuracy", fmt(r["class_accuracy"]), "classifier label == conditioning label"))
    if r.get("clip_score") is not None:
        rows.append(("CLIP score", fmt(r["clip_score"], ".2f"), f"100 cos, {r['clip']['model']}"))
    b = r.get("bpd")
    if b:
        se = f" +- {b['stderr']:.4f}" if b.get("stderr") is not None else ""
        how = (
            f"VLB, {b['timesteps']} timesteps, {b['grid']}"
            if b["method"] == "vlb"
            else f"PF-ODE, Hutchinson {b['hutchinson']}"
            if b["hutchinson"]
            else "PF-ODE, exact divergence"
        )
        rows.append(("bits/dim", f"{b['value']:.4f}{se}", f"{how}; {b['n']} {b['split']} images, {b['conditioning']}"))
    w = max(len(k) for k, _, _ in rows)
    v = max(len(x) for _, x, _ in rows)
    head = (
        f"{r['run']}: {r['n']} samples, {r['sampler']} {r['steps']} steps, seed {r['seed']}"
        + (f", guidance {r['guidance_scale']:g}" if r["guidance_scale"] != 1 else "")
        + (f", sampled in {r['dtype']}" if r.get("dtype", "fp32") != "fp32" else "")
    )
    lines = [head] + [f"  {k:<{w}}  {x:>{v}}  {note}".rstrip() for k, x, note in rows]
    return "\n".join(lines)


def write_report(r: dict, path: str | os.PathLike) -> Path:
    from difflab.runfolder import write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, json.loads(json.dumps(r)))
    return path
