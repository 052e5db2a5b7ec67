"""`difflab demo`: a tour of the reading list on the model zoo, written to one report.html.

Five sections, each with its pictures and its numbers next to the same numbers for real images
(what a perfect model scores at that sample count):

1. samplers   -- the Fashion-MNIST zoo model (`fmnist-unet-s`), class grids with difflab's
                 default sampler against DDIM (eta = 0, `euler`) at equal steps;
2. guidance   -- classifier-free guidance sweep on the same model (Ho & Salimans 2022);
3. text       -- text-to-image with the latent shapes model (`shapes-text-ldm`, Rombach et al. 2022),
                 a few prompts (add your own with `difflab demo --prompt "..."`) and held-out captions;
4. editing    -- RePaint and SDEdit on the Fashion-MNIST model, DiffEdit and a Prompt-to-Prompt word
                 swap on the pixel shapes model (`shapes-text-unet`), scored against the ground truth;
5. training   -- a from-scratch run of the zoo model's recipe with a budget in optimizer steps (the
                 same on a busy or an idle machine), its loss curve on the zoo run's and its samples
                 next to the zoo model's: what more training buys.

Without the Debian package `dataset-fashion-mnist` sections 1, 2, 4 (RePaint, SDEdit) and 5 use
sklearn's digits (the `digits-unet-s` zoo model, unconditional: no guidance sweep); the first line
printed and the report's header say which data was used.

Numbers: FD under the data set's own classifier ("FD-FMNIST", difflab.metrics; biased upwards at
small n, hence the real-image row of the same n), precision/recall (k = 3), class accuracy of the
asked class, attribute accuracy of the shapes classifier against the prompt.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from difflab.core.sampling import DEFAULT_SAMPLER

__all__ = ["TourBudget", "run_demo", "nearest_neighbour_distance", "DEFAULT_PROMPTS"]

DEFAULT_PROMPTS = (
    "a large red circle on the left",
    "a small green star at the top",
    "a large yellow square on the right",
    "a small purple cross at the bottom",
)
METRICS = ("fd", "precision", "recall", "class_accuracy", "nn_distance")


@dataclass
class TourBudget:
    """Sample counts and steps of each section (the defaults fit <= 8 minutes on 2 cores)."""

    n_eval: int = 300  # samples scored per sampler (section 1) and per guidance scale
    steps: int = 10  # sampler steps in sections 1, 2, 3 and 5
    samplers: tuple = (DEFAULT_SAMPLER, "euler")
    cfg_scales: tuple = (1.0, 2.0, 3.0)
    n_cfg: int = 200
    n_text: int = 200  # held-out captions scored per guidance scale (section 3)
    text_scales: tuple = (1.0, 3.0)
    per_prompt: int = 8
    n_edit: int = 16  # images per editing method (RePaint, SDEdit)
    n_text_edit: int = 8  # shapes edits (DiffEdit, Prompt-to-Prompt)
    edit_steps: int = 20
    repaint_jump: tuple = (5, 5)  # RePaint's (j, r)
    sdedit_strengths: tuple = (0.5, 0.7, 0.9)
    train_steps: int = 250  # section 5: optimizer steps of the from-scratch run
    train_batch: int = 32
    n_per_class: int = 8

    @classmethod
    def tiny(cls) -> "TourBudget":
        """A plumbing run for the test suite (seconds per section)."""
        return cls(
            n_eval=60,
            steps=6,
            n_cfg=60,
            cfg_scales=(1.0, 3.0),
            n_text=40,
            per_prompt=2,
            n_edit=6,
            n_text_edit=3,
            edit_steps=8,
            repaint_jump=(2, 2),
            sdedit_strengths=(0.5,),
            train_steps=3,
            train_batch=16,
            n_per_class=2,
        )


def nearest_neighbour_distance(samples: torch.Tensor, reference: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Per-sample RMS distance (per pixel) to the nearest reference image, (n,)."""
    a = samples.flatten(1).float()
    b = reference.flatten(1).float()
    best = []
    for i in range(0, len(a), chunk):
        d = torch.cdist(a[i : i + chunk], b)  # (chunk, N)
        best.append(d.min(1).values)
    return torch.cat(best) / a.shape[1] ** 0.5


# --------------------------------------------------------------------------------------------
# Scoring against real images
# --------------------------------------------------------------------------------------------


class _Scorer:
    """FD / precision / recall / class accuracy / nearest-train distance against a model's data."""

    def __init__(self, config: dict):
        from difflab.metrics import default_extractor, feature_extractor, reference_stats
        from difflab.metrics.evaluate import _data_kwargs, _run_data

        self.dataset = config["data"]["name"]
        self.ext = feature_extractor(default_extractor(self.dataset))
        self.train = _run_data(config, "train")
        self.test = _run_data(config, "test")
        self.ref = reference_stats(
            self.ext,
            self.dataset,
            "train",
            images=self.train.images,
            data_kwargs=_data_kwargs(config),
            log=lambda s: None,
        )
        self.num_classes = config["data"].get("num_classes") or len(config["data"].get("class_names") or []) or None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        from difflab.metrics import score_samples

        q = score_samples(images, self.ext, self.ref, self.dataset, labels=labels, num_classes=self.num_classes)
        q["nn_distance"] = nearest_neighbour_distance(images, self.train.images).mean().item()
        return {m: q.get(m) for m in METRICS}

    def real(self, n: int, seed: int, balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """n held-out test images (label i % k for item i when `balanced`) and their labels."""
        x, y = self.test.images, self.test.labels
        g = torch.Generator().manual_seed(seed)
        if not balanced or self.num_classes is None or y is None:
            idx = torch.randperm(len(x), generator=g)[:n]
        else:
            k = self.num_classes
            per = -(-n // k)
            idx = torch.stack(
                [
                    torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per]]
                    for c in range(k)
                ]
            )  # (k, per)
            idx = idx.t().flatten()[:n]  # interleaved: label i % k for item i
        return x[idx], (None if y is None else y[idx])


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------


def _section_samplers(pipe, scorer: _Scorer, b: TourBudget, out: Path, seed: int, real: dict) -> dict:
    k = pipe.num_classes
    labels = None if k is None else torch.arange(b.n_eval) % k
    show = torch.arange(min(b.n_eval, b.n_per_class * (k or 10)))
    if k is not None:  # n_per_class per class, classes in order
        show = torch.cat([torch.nonzero(labels == c).flatten()[: b.n_per_class] for c in range(k)])
    rows, figs, cache = [], [], {}
    for sampler in b.samplers:
        t = time.perf_counter()
        x = pipe(b.n_eval, class_labels=labels, sampler=sampler, steps=b.steps, seed=seed, progress=True)
        dt = time.perf_counter() - t
        cache[sampler] = x
        q = scorer(x, labels)
        path = out / f"samplers_{sampler}.png"
        from difflab.data import save_image_grid

        save_image_grid(x[show], path, nrow=b.n_per_class * 2 if k else None)
        rows.append(
            {
                "name": f"{sampler}{' (DDIM, eta = 0)' if sampler == 'euler' else ''}",
                "sampler": sampler,
                "steps": b.steps,
                "seconds": dt,
                **q,
            }
        )
        figs.append((path, f"{sampler}, {b.steps} steps"))
        _log(
            f"  {sampler:16s} {b.steps} steps {dt:6.1f} s  FD {q['fd']:.2f}  class accuracy {_fmt(q['class_accuracy'])}"
            f"  (real: FD {real['fd']:.2f}, {_fmt(real['class_accuracy'])})"
        )
    return {"rows": rows, "figures": figs, "_cache": cache, "labels": labels}


def _section_guidance(pipe, scorer: _Scorer, b: TourBudget, out: Path, seed: int, reuse: dict) -> dict:
    from difflab.data import save_image_grid

    k = pipe.num_classes
    labels = torch.arange(b.n_cfg) % k
    rows, tiles = [], []
    for s in b.cfg_scales:
        x = None
        if s == 1.0 and reuse.get("x") is not None and len(reuse["x"]) >= b.n_cfg:
            x = reuse["x"][: b.n_cfg]  # the samplers section's default-sampler run: same seed, labels, steps
        if x is None:
            x = pipe(b.n_cfg, class_labels=labels, guidance_scale=s, steps=b.steps, seed=seed, progress=True)
        q = scorer(x, labels)
        rows.append({"name": f"s = {s:g} (w = {s - 1:g})", "guidance_scale": s, **q})
        tiles.append(x[:k])  # one sample per class, the same noise at every scale
        _log(
            f"  guidance s = {s:<4g} FD {q['fd']:.2f}  precision {q['precision']:.2f}  recall {q['recall']:.2f}"
            f"  class accuracy {q['class_accuracy']:.2f}"
        )
    path = out / "guidance.png"
    save_image_grid(torch.cat(tiles), path, nrow=k)
    return {
        "rows": rows,
        "figures": [
            (
                path,
                "rows: guidance s = "
                + ", ".join(f"{s:g}" for s in b.cfg_scales)
                + "; columns: the classes; the same noise in each column",
            )
        ],
    }


def _section_text(prompts: list[str], b: TourBudget, out: Path, seed: int) -> dict:
    from difflab import zoo
    from difflab.data import save_image_grid

    pipe = zoo.load("shapes-text-ldm")
    scorer = _Scorer(pipe.config)
    figs = []
    s_show = max(b.text_scales)
    grid_prompts = [p for p in prompts for _ in range(b.per_prompt)]
    x = pipe(len(grid_prompts), prompt=grid_prompts, guidance_scale=s_show, steps=b.steps, seed=seed)
    path = out / "text_prompts.png"
    save_image_grid(
        x, path, nrow=b.per_prompt, labels=[p if i % b.per_prompt == 0 else "" for i, p in enumerate(grid_prompts)]
    )
    figs.append((path, f"shapes-text-ldm, guidance s = {s_show:g}, {b.steps} steps: {b.per_prompt} samples per prompt"))
    per_prompt = []
    for i, p in enumerate(prompts):
        try:  # a prompt naming shape, colour, size and position is scored; any other is only drawn
            acc = zoo.prompt_attribute_accuracy(x[i * b.per_prompt : (i + 1) * b.per_prompt], [p] * b.per_prompt)
        except ValueError:
            acc = None
        per_prompt.append({"prompt": p, "attribute_accuracy": acc})
        _log(f'  "{p}": attribute accuracy {_fmt(acc)} ({b.per_prompt} samples, s = {s_show:g})')
    captions = list(scorer.test.captions[: b.n_text])
    rows = []
    for s in b.text_scales:
        x = pipe(len(captions), prompt=captions, guidance_scale=s, steps=b.steps, seed=seed, progress=True)
        q = scorer(x)
        q["attribute_accuracy"] = zoo.prompt_attribute_accuracy(x, captions)
        rows.append({"name": f"s = {s:g}", "guidance_scale": s, **q})
        _log(f"  text-to-image s = {s:g}: attribute accuracy {q['attribute_accuracy']:.2f}  FD-shapes {q['fd']:.2f}")
    real_x = scorer.test.images[: b.n_text]
    real = scorer(real_x)
    real["attribute_accuracy"] = zoo.prompt_attribute_accuracy(real_x, captions)
    return {
        "rows": rows,
        "real": real,
        "figures": figs,
        "fd_name": scorer.ext.display_name,
        "prompts": per_prompt,
        "prompt_scale": s_show,
    }


def _strokes(x: torch.Tensor, factor: int = 4, levels: int = 3) -> torch.Tensor:
    """SDEdit's guide: a coarse, few-colour version of an image (blocks of `factor` px, `levels` grey levels)."""
    import torch.nn.functional as F

    low = F.avg_pool2d(x, factor)
    q = torch.round((low + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1
    return F.interpolate(q, scale_factor=factor, mode="nearest")


def _edit_scores(scorer: _Scorer, x: torch.Tensor, labels) -> dict:
    """Class accuracy (against the original's label) and nearest-train distance of edited images
    (too few for a Frechet distance)."""
    from difflab.metrics import extract

    probs = extract(scorer.ext, x, 256)[1]
    acc = None if labels is None or probs is None else (probs.argmax(1) == labels).double().mean().item()
    return {"class_accuracy": acc, "nn_distance": nearest_neighbour_distance(x, scorer.train.images).mean().item()}


def _section_edit_images(pipe, scorer: _Scorer, b: TourBudget, out: Path, seed: int) -> dict:
    """RePaint and SDEdit on held-out real images of the zoo model's data set."""
    from difflab.data import save_image_grid
    from difflab.methods.repaint import repaint
    from difflab.methods.sdedit import sdedit
    from difflab.pipeline import grid_for

    D = pipe.denoiser
    images, labels = scorer.real(b.n_edit, seed + 7)
    k = pipe.num_classes
    cond = {} if k is None else {"class_labels": torch.full((len(images),), -1)}  # the unconditional model
    sigmas = grid_for(D.schedule, b.edit_steps)
    H = images.shape[-1]
    keep = torch.ones(len(images), 1, H, H)
    a, z = H // 4, H - H // 4
    keep[:, :, a:z, a:z] = 0  # the centre half is unknown
    rows, figs = {}, []
    real_q = _edit_scores(scorer, images, labels)
    with torch.no_grad():
        j, r = b.repaint_jump
        fills = {}
        for name, (jl, jn) in (("RePaint", (j, r)), ("replacement (no resampling)", (1, 1))):
            x = repaint(
                D,
                images,
                keep,
                sigmas,
                jump_length=jl,
                jump_n_sample=jn,
                cond=cond,
                noise=torch.Generator().manual_seed(seed),
            )
            fills[name] = x
            q = _edit_scores(scorer, x, labels)
            q["known_change"] = (x - images).mul(keep).abs().max().item()
            rows[name] = q
        sd = {}
        guides = _strokes(images)
        for t0 in b.sdedit_strengths:
            x = sdedit(D, guides, sigmas, strength=t0, cond=cond, noise=torch.Generator().manual_seed(seed))
            sd[t0] = x
            q = _edit_scores(scorer, x, labels)
            q["guide_l2"] = (x - guides).pow(2).mean().sqrt().item()
            rows[f"SDEdit t0 = {t0:g}"] = q
    real_q["known_change"] = 0.0
    real_q["guide_l2"] = (images - guides).pow(2).mean().sqrt().item()
    m = min(6, len(images))
    strip = [images[:m], images[:m] * keep[:m] + (1 - keep[:m]) * 0.0, *[v[:m] for v in fills.values()]]
    path = out / "edit_repaint.png"
    save_image_grid(torch.stack(strip, 1).flatten(0, 1), path, nrow=len(strip))
    figs.append((path, "each row: input | centre removed | RePaint (j, r = %d, %d) | plain replacement" % (j, r)))
    strip = [images[:m], guides[:m], *[v[:m] for v in sd.values()]]
    path = out / "edit_sdedit.png"
    save_image_grid(torch.stack(strip, 1).flatten(0, 1), path, nrow=len(strip))
    figs.append(
        (path, "each row: original | stroke guide | SDEdit at t0 = " + ", ".join(f"{t:g}" for t in b.sdedit_strengths))
    )
    for name in rows:
        _log(
            f"  {name:28s} class accuracy {_fmt(rows[name]['class_accuracy'])}  (originals: "
            f"{_fmt(real_q['class_accuracy'])})"
        )
    return {"rows": [{"name": n, **q} for n, q in rows.items()], "real": real_q, "figures": figs}


def _shapes_edits(n: int, seed: int, exclude: list) -> list[dict]:
    """n (source, target) attribute pairs on the shapes set: a colour swap, both trained combinations."""
    from difflab.data.shapes import COLORS, sample_attributes

    banned = {(e.get("shape"), e.get("color")) for e in exclude}
    attrs = sample_attributes(4 * n + 8, seed, start=900_000, exclude=exclude)
    from difflab.data.shapes import ATTRIBUTES

    pairs = []
    for i in range(len(attrs["shape"])):
        src = {k: int(attrs[k][i]) for k in ("shape", "color", "size", "position", "background")}
        shape = ATTRIBUTES["shape"][src["shape"]]
        for step in range(1, len(COLORS)):
            c = (src["color"] + step + i) % len(COLORS)
            if c != src["color"] and (shape, COLORS[c]) not in banned:
                break
        pairs.append({"source": src, "target": {**src, "color": c}})
        if len(pairs) == n:
            break
    return pairs


def _section_edit_text(b: TourBudget, out: Path, seed: int) -> dict:
    """DiffEdit and a Prompt-to-Prompt word swap (a colour) on rendered shapes images."""
    from difflab import zoo
    from difflab.data import save_image_grid
    from difflab.data.shapes import caption_for, render
    from difflab.edit import edit
    from difflab.metrics.classifiers import attribute_accuracy, load_classifier

    pipe = zoo.load("shapes-text-unet")
    exclude = pipe.config["train"].get("data_kwargs", {}).get("exclude", [])
    pairs = _shapes_edits(b.n_text_edit, seed, exclude)
    clf = load_classifier("shapes")
    src, tgt, region = [], [], []
    for p in pairs:
        x, m = render(p["source"], return_mask=True)
        src.append(x)
        region.append(m)
        tgt.append(render(p["target"]))
    src, tgt, region = torch.stack(src), torch.stack(tgt), torch.stack(region)
    attrs = {
        k: torch.tensor([p["target"][k] for p in pairs]) for k in ("shape", "color", "size", "position", "background")
    }
    outs, ious, rows = {"DiffEdit": [], "Prompt-to-Prompt (swap)": []}, [], []
    for i, p in enumerate(pairs):
        s_cap, t_cap = caption_for(p["source"], template=0), caption_for(p["target"], template=0)
        r = edit(
            pipe,
            "diffedit",
            src[i : i + 1],
            prompt=t_cap,
            source_prompt=s_cap,
            steps=b.edit_steps,
            seed=seed,
            strength=0.7,
            guidance_scale=3.0,
        )
        outs["DiffEdit"].append(r.output)
        auto = dict(r.tiles)["mask (automatic): white = edit"][:, :1] > 0
        inter = (auto & (region[i : i + 1] > 0)).sum().item()
        union = (auto | (region[i : i + 1] > 0)).sum().item()
        ious.append(inter / max(union, 1))
        r = edit(pipe, "p2p", src[i : i + 1], prompt=t_cap, source_prompt=s_cap, steps=b.edit_steps, seed=seed)
        outs["Prompt-to-Prompt (swap)"].append(r.output)
    for name, xs in outs.items():
        x = torch.cat(xs)
        acc = attribute_accuracy(clf, x, attrs)
        bg = 1 - region
        rows.append(
            {
                "name": name,
                "edit_success": acc["color"],
                "kept": min(acc["shape"], acc["size"], acc["position"]),
                "all_attributes": acc["all"],
                "background_change": ((x - src).abs() * bg).sum().item() / (bg.sum().item() * 3),
            }
        )
        outs[name] = x
    rows[0]["mask_iou"] = sum(ious) / len(ious)
    acc = attribute_accuracy(clf, tgt, attrs)
    real = {
        "name": "rendered target",
        "edit_success": acc["color"],
        "kept": min(acc["shape"], acc["size"], acc["position"]),
        "all_attributes": acc["all"],
        "background_change": ((tgt - src).abs() * (1 - region)).sum().item() / ((1 - region).sum().item() * 3),
        "mask_iou": 1.0,
    }
    m = min(6, len(src))
    path = out / "edit_text.png"
    save_image_grid(
        torch.stack([src[:m], outs["DiffEdit"][:m], outs["Prompt-to-Prompt (swap)"][:m], tgt[:m]], 1).flatten(0, 1),
        path,
        nrow=4,
        labels=[
            c
            for p in pairs[:m]
            for c in (
                caption_for(p["source"], template=0),
                "DiffEdit: " + caption_for(p["target"], template=0),
                "P2P swap",
                "rendered target",
            )
        ],
    )
    for row in rows:
        _log(
            f"  {row['name']:24s} colour changed {row['edit_success']:.2f}  other attributes kept {row['kept']:.2f}"
            + (f"  mask IoU {row['mask_iou']:.2f}" if "mask_iou" in row else "")
        )
    return {
        "rows": rows,
        "real": real,
        "pairs": [[caption_for(p["source"], template=0), caption_for(p["target"], template=0)] for p in pairs],
        "figures": [(path, "each row: source | DiffEdit | Prompt-to-Prompt word swap | the rendered target")],
    }


def _zoo_card(name: str) -> dict:
    from difflab import zoo

    path = zoo.ZOO_DIR / name / "zoo.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _section_training(
    zoo_name: str, zoo_pipe, scorer: _Scorer, b: TourBudget, out: Path, seed: int, zoo_samples: torch.Tensor, labels
) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflab import zoo
    from difflab.data import save_image_grid
    from difflab.pipeline import Pipeline
    from difflab.train import TrainConfig, train

    zcfg = dict(zoo_pipe.config["train"])
    keep = {
        k: zcfg[k]
        for k in (
            "data",
            "model",
            "conditioning",
            "label_dropout",
            "prediction",
            "lr",
            "ema_decay",
            "p_mean",
            "p_std",
            "data_kwargs",
        )
        if k in zcfg
    }
    cfg = TrainConfig.from_dict(
        {
            **keep,
            "steps": b.train_steps,
            "minutes": None,
            "batch_size": b.train_batch,
            "seed": seed,
            "save_every": max(b.train_steps, 1),
            "log_every": 10,
        }
    )
    run = out / "run"
    _log(
        f"  training {cfg.model} from scratch on {cfg.data}: {cfg.steps} steps of batch {cfg.batch_size} "
        f"(the zoo model: {zcfg.get('batch_size')} per step)"
    )
    t0 = time.process_time()
    w0 = time.perf_counter()
    if run.exists():  # the demo's own scratch run from an earlier tour
        shutil.rmtree(run)
    train(cfg, run, progress=True)
    cpu_s, wall_s = time.process_time() - t0, time.perf_counter() - w0
    pipe = Pipeline.from_pretrained(run)
    n = len(zoo_samples)
    x = pipe(n, class_labels=labels, steps=b.steps, seed=seed, progress=True)
    q = scorer(x, labels)
    show = torch.arange(min(n, 2 * (pipe.num_classes or 10)))
    path = out / "training_samples.png"
    save_image_grid(torch.stack([x[show], zoo_samples[show]], 0).flatten(0, 1), path, nrow=len(show))
    # loss curves on the optimizer-step axis: this run and the zoo run's own log
    own = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines() if r.strip()]
    zoo_log_path = zoo.ZOO_DIR / zoo_name / "train_log.jsonl"
    zoo_log = (
        [json.loads(r) for r in zoo_log_path.read_text().splitlines() if r.strip()] if zoo_log_path.is_file() else []
    )
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    if zoo_log:
        ax.plot(
            [r["step"] for r in zoo_log if "loss" in r],
            [r["loss"] for r in zoo_log if "loss" in r],
            label=f"zoo {zoo_name} (batch {zcfg.get('batch_size')})",
            alpha=0.8,
        )
    ax.plot(
        [r["step"] for r in own if "loss" in r],
        [r["loss"] for r in own if "loss" in r],
        label=f"this demo (batch {cfg.batch_size})",
        lw=2,
    )
    ax.set_xscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    curve = out / "training_loss.png"
    fig.savefig(curve, dpi=100)
    plt.close(fig)
    zoo_steps = zoo_log[-1]["step"] if zoo_log else None
    _log(
        f"  from scratch: {cfg.steps} steps in {cpu_s / 60:.1f} CPU-min ({wall_s / 60:.1f} wall-min): "
        f"FD {q['fd']:.2f}, class accuracy {_fmt(q['class_accuracy'])}"
    )
    return {
        "rows": [
            {
                "name": f"this demo's run ({cfg.steps} steps)",
                "train_steps": cfg.steps,
                "cpu_seconds": cpu_s,
                "wall_seconds": wall_s,
                **q,
            }
        ],
        "zoo_steps": zoo_steps,
        "zoo_batch": zcfg.get("batch_size"),
        "zoo_machine": _zoo_card(zoo_name).get("machine"),
        "final_loss": own[-1]["loss"] if own else None,
        "figures": [
            (curve, "training loss against optimizer steps"),
            (path, f"top: this demo's {cfg.steps}-step model; bottom: the zoo model, the same noise and classes"),
        ],
    }


# --------------------------------------------------------------------------------------------
# The tour
# --------------------------------------------------------------------------------------------


def _pick_data(data: str | None) -> tuple[str, str]:
    from difflab.data.fashion_mnist import INSTALL_COMMAND, fashion_mnist_available

    if data not in (None, "fashion_mnist", "digits"):
        raise ValueError(f"demo data must be fashion_mnist or digits, got {data!r}")
    if data == "fashion_mnist" and not fashion_mnist_available():
        raise FileNotFoundError(f"Fashion-MNIST is not installed: run `{INSTALL_COMMAND}` as root")
    if data is not None:
        return data, ""
    if fashion_mnist_available():
        return "fashion_mnist", ""
    return "digits", (
        f"Fashion-MNIST is not installed (run `{INSTALL_COMMAND}` as root): "
        "the image sections use sklearn's digits and the digits-unet-s zoo model."
    )


def run_demo(
    out: str = "demo_out",
    *,
    data: str | None = None,
    seed: int = 0,
    prompts: list[str] | None = None,
    budget: TourBudget | None = None,
    sections: tuple = ("samplers", "guidance", "text", "editing", "training"),
) -> Path:
    """Run the tour and write `out`/report.html and `out`/summary.json; returns the report's path."""
    from difflab import zoo

    b = budget or TourBudget()
    for name in sections:
        if name not in ("samplers", "guidance", "text", "editing", "training"):
            raise ValueError(f"unknown demo section {name!r}")
    if b.n_eval < 1 or b.steps < 1 or b.train_steps < 1:
        raise ValueError("demo budgets must be positive")
    data, note = _pick_data(data)
    prompts = list(DEFAULT_PROMPTS) + [p for p in (prompts or []) if p not in DEFAULT_PROMPTS]
    _log(
        f"difflab demo: data {'Fashion-MNIST' if data == 'fashion_mnist' else 'sklearn digits'}"
        f"{' -- ' + note if note else ''}"
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if "text" in sections:  # a prompt the tokenizer cannot take fails now, not after minutes of work
        zoo.load("shapes-text-ldm").encode_prompts(prompts)
    t_start = time.perf_counter()
    zoo_name = "fmnist-unet-s" if data == "fashion_mnist" else "digits-unet-s"
    pipe = zoo.load(zoo_name)
    scorer = _Scorer(pipe.config)
    k = pipe.num_classes
    real_x, real_y = scorer.real(b.n_eval, seed)
    real = scorer(real_x, real_y if k else None)
    _log(
        f"  held-out real images ({b.n_eval}): FD {real['fd']:.2f}, precision {real['precision']:.2f}, "
        f"recall {real['recall']:.2f}, class accuracy {_fmt(real['class_accuracy'])}"
    )
    summary = {
        "data": data,
        "note": note,
        "zoo_model": zoo_name,
        "budget": asdict(b),
        "fd_name": scorer.ext.display_name,
        "real": real,
        "sections": {},
    }
    timings = {}
    samples = None
    labels = None if k is None else torch.arange(b.n_eval) % k
    if "samplers" in sections or "training" in sections:
        _log(f"[1/5] samplers: {zoo_name}, {' vs '.join(b.samplers)} at {b.steps} steps")
        t = time.perf_counter()
        sec = _section_samplers(pipe, scorer, b, out, seed, real)
        samples = sec.pop("_cache")[b.samplers[0]]
        sec.pop("labels")
        summary["sections"]["samplers"] = sec
        timings["samplers"] = time.perf_counter() - t
    if "guidance" in sections and k is not None:
        _log(f"[2/5] classifier-free guidance: s = {', '.join(f'{s:g}' for s in b.cfg_scales)}")
        t = time.perf_counter()
        real_g = scorer(*scorer.real(b.n_cfg, seed)) if b.n_cfg != b.n_eval else real
        sec = _section_guidance(
            pipe, scorer, b, out, seed, {"x": samples if b.samplers[0] == DEFAULT_SAMPLER else None}
        )
        sec["real"] = real_g
        summary["sections"]["guidance"] = sec
        timings["guidance"] = time.perf_counter() - t
    elif "guidance" in sections:
        summary["sections"]["guidance"] = {"skipped": f"{zoo_name} is unconditional: no class to guide toward"}
    if "text" in sections:
        _log("[3/5] text-to-image: shapes-text-ldm")
        t = time.perf_counter()
        summary["sections"]["text"] = _section_text(prompts, b, out, seed)
        timings["text"] = time.perf_counter() - t
    if "editing" in sections:
        _log(f"[4/5] editing: RePaint, SDEdit on {zoo_name}; DiffEdit, Prompt-to-Prompt on shapes-text-unet")
        t = time.perf_counter()
        summary["sections"]["editing_images"] = _section_edit_images(pipe, scorer, b, out, seed)
        summary["sections"]["editing_text"] = _section_edit_text(b, out, seed)
        timings["editing"] = time.perf_counter() - t
    if "training" in sections:
        _log(f"[5/5] training from scratch: {b.train_steps} steps")
        t = time.perf_counter()
        sec = _section_training(zoo_name, pipe, scorer, b, out, seed, samples, labels)
        zoo_row = dict(summary["sections"]["samplers"]["rows"][0])
        zoo_row["name"] = f"zoo {zoo_name} ({sec['zoo_steps'] or '?'} steps)"
        sec["rows"].append(zoo_row)
        sec["real"] = real
        summary["sections"]["training"] = sec
        timings["training"] = time.perf_counter() - t
    summary["seconds"] = {**timings, "total": time.perf_counter() - t_start}
    for sec in summary["sections"].values():
        sec["figures"] = [[str(Path(p).name), c] for p, c in sec.get("figures", [])]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_report(out, summary)
    _log(f"wrote {out / 'report.html'} ({summary['seconds']['total'] / 60:.1f} min)")
    return out / "report.html"


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

_COLUMNS = {
    "fd": None,
    "precision": "precision",
    "recall": "recall",
    "class_accuracy": "class accuracy",
    "nn_distance": "nearest-train distance",
    "attribute_accuracy": "attribute accuracy",
    "known_change": "max change of kept pixels",
    "guide_l2": "RMS distance to the guide",
    "edit_success": "colour changed",
    "kept": "shape, size, position kept",
    "all_attributes": "every attribute right",
    "mask_iou": "DiffEdit mask IoU",
    "background_change": "background change (mean abs)",
    "train_steps": "steps",
    "cpu_seconds": "CPU-seconds",
    "seconds": "seconds",
}


def _table(rows: list[dict], real: dict | None, fd_name: str, real_name: str = "held-out real images") -> str:
    cols = [c for c in _COLUMNS if any(r.get(c) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(_COLUMNS[c] or fd_name)}</th>" for c in cols)

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return "<td></td>"
        return (
            f"<td>{v}</td>"
            if isinstance(v, int)
            else f"<td>{v:.{3 if c in ('nn_distance', 'background_change', 'known_change') else 2}f}</td>"
        )

    body = "".join(
        f"<tr><td class=l>{html.escape(r['name'])}</td>{''.join(cell(r, c) for c in cols)}</tr>" for r in rows
    )
    if real is not None:
        body += (
            f"<tr class=real><td class=l>{html.escape(real.get('name', real_name))}</td>"
            f"{''.join(cell(real, c) for c in cols)}</tr>"
        )
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _figs(out: Path, figs) -> str:
    def img(name):
        return "data:image/png;base64," + base64.b64encode((out / name).read_bytes()).decode()

    return "".join(f"<figure><img src='{img(n)}'><figcaption>{html.escape(c)}</figcaption></figure>" for n, c in figs)


def _write_report(out: Path, s: dict) -> None:
    fd = s["fd_name"]
    sec = s["sections"]
    b = s["budget"]
    parts = [
        f"<h1>difflab demo: a tour of the reading list</h1><p class=data>Data: "
        f"{'Fashion-MNIST' if s['data'] == 'fashion_mnist' else 'sklearn digits'} "
        f"(zoo model <code>{s['zoo_model']}</code>). {html.escape(s['note'])}</p>"
        f"<p>Every table ends with the same numbers for real images at the same count: the best a model can "
        f"score there. {html.escape(fd)} is the Frechet distance in the features of difflab's own "
        f"{s['data']} classifier (lower is better, biased upwards at small n); precision/recall are Kynkaanniemi "
        f"et al.'s (k = 3); class accuracy is that classifier's agreement with the asked class. The whole tour "
        f"took {s['seconds']['total'] / 60:.1f} minutes.</p>"
    ]
    if "samplers" in sec:
        parts.append(
            f"<h2>1. Samplers: difflab's default against DDIM</h2><p>{b['n_eval']} class-balanced "
            f"samples per sampler, {b['steps']} steps each, the same starting noise. DDIM with eta = 0 is "
            f"the Euler step of the probability-flow ODE (Song et al. 2021); the default "
            f"(<code>{DEFAULT_SAMPLER}</code>) is a higher-order multistep solver at the same number of "
            f"network calls.</p>"
            + _figs(out, sec["samplers"]["figures"])
            + _table(sec["samplers"]["rows"], s["real"], fd)
        )
    g = sec.get("guidance")
    if g and "skipped" not in g:
        parts.append(
            f"<h2>2. Classifier-free guidance (Ho &amp; Salimans 2022)</h2><p>D_u + s (D_c - D_u), "
            f"s = 1 + w; {b['n_cfg']} samples per scale. Guidance buys class fidelity (accuracy, "
            f"precision) with diversity (recall).</p>" + _figs(out, g["figures"]) + _table(g["rows"], g["real"], fd)
        )
    elif g:
        parts.append(f"<h2>2. Classifier-free guidance</h2><p>Skipped: {html.escape(g['skipped'])}.</p>")
    t = sec.get("text")
    if t:
        parts.append(
            f"<h2>3. Text-to-image: latent diffusion on the shapes set (Rombach et al. 2022)</h2><p>The "
            f"zoo's <code>shapes-text-ldm</code>: a KL autoencoder (f = 2) and a UNet with cross-attention "
            f"on frozen MiniLM token states. Scored on {b['n_text']} held-out test captions: attribute "
            f"accuracy = shape, colour, size and position all as the caption names them (difflab's "
            f'shapes classifier). Your own prompts: <code>difflab demo --prompt "..."</code>.</p>'
            + _figs(out, t["figures"])
            + "<table><tr><th>prompt</th><th>attribute accuracy (%d samples, s = %g)</th></tr>%s</table>"
            % (
                b["per_prompt"],
                t["prompt_scale"],
                "".join(
                    f"<tr><td class=l>{html.escape(r['prompt'])}</td><td>"
                    f"{_fmt(r['attribute_accuracy']) if r['attribute_accuracy'] is not None else 'not scored'}"
                    f"</td></tr>"
                    for r in t["prompts"]
                ),
            )
            + _table(t["rows"], t["real"], t["fd_name"], "held-out real images, their captions")
        )
    e = sec.get("editing_images")
    if e:
        parts.append(
            f"<h2>4. Editing</h2><h3>RePaint (Lugmayr et al. 2022) and SDEdit (Meng et al. 2022) on "
            f"<code>{s['zoo_model']}</code></h3><p>{b['n_edit']} held-out test images, {b['edit_steps']} "
            f"steps, the unconditional model. RePaint fills the centre with jumps back (resampling); plain "
            f"replacement pastes the noised known region without them. SDEdit noises a coarse stroke guide "
            f"(4 px blocks, 3 grey levels) and denoises it; t0 here is the fraction of the {b['edit_steps']}-step "
            f"sigma grid that is re-run. The paper's trade-off: a larger t0 is more realistic (the distance "
            f"to the nearest training image falls) and less faithful (the RMS distance to the guide "
            f"grows). Class accuracy is against the original image's label, so it measures faithfulness "
            f"too.</p>" + _figs(out, e["figures"]) + _table(e["rows"], e["real"], fd, "the original images")
        )
    et = sec.get("editing_text")
    if et:
        parts.append(
            f"<h3>DiffEdit (Couairon et al. 2023) and Prompt-to-Prompt (Hertz et al. 2022) on "
            f"<code>shapes-text-unet</code></h3><p>{b['n_text_edit']} rendered shapes images, each given a "
            f"new colour in the caption. DiffEdit finds the region to edit itself (IoU with the true object "
            f"mask); Prompt-to-Prompt inverts the image and regenerates it under the edited caption with "
            f"the source's attention maps. The reference row is the rendered target image.</p>"
            + _figs(out, et["figures"])
            + _table(et["rows"], et["real"], fd, "rendered target")
        )
    tr = sec.get("training")
    if tr:
        r = tr["rows"][0]
        parts.append(
            f"<h2>5. Training from scratch: what more training buys</h2><p>The zoo model's recipe "
            f"({r['train_steps']} optimizer steps of batch {b['train_batch']} here, {r['cpu_seconds'] / 60:.1f} "
            f"CPU-minutes; a step budget, so the result does not depend on how busy the machine is), "
            f"against the zoo model ({tr['zoo_steps'] or '?'} steps of batch {tr['zoo_batch'] or '?'} on "
            f"{html.escape(tr['zoo_machine'] or 'an unrecorded machine')}). Same sampler, "
            f"steps and noise for both.</p>" + _figs(out, tr["figures"]) + _table(tr["rows"], tr["real"], fd)
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>difflab demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}}
figure{{display:inline-block;margin:6px;vertical-align:top}} figure img{{image-rendering:pixelated;max-width:520px}}
figcaption{{font-size:90%;color:#444;max-width:520px}} table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} td.l{{text-align:left}} tr.real{{background:#eef6ee}}
p.data{{font-size:110%;font-weight:bold}}</style></head><body>{"".join(parts)}</body></html>"""
    (out / "report.html").write_text(page)
