"""Semantic Diffusion Guidance (SDG, Liu et al. 2023, arXiv 2112.05744) on shapes: language, image
content and image style guidance of an unconditional model by a small CLIP, without retraining it.

The claim: each kind of guidance raises its own matching score against unguided samples. The
unconditional model is the empty-prompt branch of a text-conditional shapes UNet (trained with
caption dropout 0.1); the guide is `difflab train-clip`'s SmallCLIP (its noise-aware image tower
E'_I steers, the clean tower E_I scores the final samples). Writes papers/sdg/results.json, PNG
figures and papers/sdg/report.md.

    python papers/sdg/run.py                          # everything (FULL: ~10 CPU-minutes, one thread)
    python papers/sdg/run.py --quick                  # tiny settings, to check the plumbing (_quick/)
    python papers/sdg/run.py --only language          # one part; results merge into results.json
    python papers/sdg/run.py --report                 # rebuild report.md and figures from results.json
    python papers/sdg/run.py --run checkpoints/zoo/shapes-text-unet   # another run folder

Parts, one per kind of guidance, each a sweep over the guidance scale s (0 = unguided) of
D + s sigma^2 grad_x F(x, sigma) (`difflab.methods.sdg.sdg`):

    language  F = cos(E'_I(x_t), E_T(prompt)); scored by cos(E_I(x0), E_T(prompt)) and by the
              attribute accuracy (shapes classifier) of the prompt's shape, colour, size, position
    content   F = cos(E'_I(x_t), E'_I(ref_t)); scored by cos(E_I(x0), E_I(ref)) and the attribute
              agreement with the reference
    style     F = -sum_l ||G(f_l(x_t)) - G(f_l(ref_t))||^2 (Gram matrices of E'_I's blocks); scored by
              the same distance with E_I's blocks on x0 (lower = closer) and the attribute agreement

Each part has `targets` prompts (or reference test images) and n / targets samples per target,
one batch per target from the seed (seed + 1000 k), so sample i starts from the same noise at every
scale; the noise estimate of a difference from the unguided row is the standard error of the paired
per-sample differences.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

if __package__ in (None, ""):  # run as a file: python papers/sdg/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from papers.runner import (
    load_pipeline,
    Paper,
    Results,
    Run,
    atomic_write_text,
    key,
    log,
    main,  # noqa: E402
    save_figure,
    save_tensor,
)

from difflab.core import sample  # noqa: E402
from difflab.core.sampling import DEFAULT_SAMPLER, SAMPLERS  # noqa: E402
from difflab.data import load_dataset  # noqa: E402
from difflab.data.shapes import ATTRIBUTES, parse_caption, render  # noqa: E402
from difflab.methods.sdg import _gram, content_score, language_score, sdg, style_score  # noqa: E402
from difflab.metrics.classifiers import attribute_accuracy, load_classifier, prepare_images  # noqa: E402
from difflab.pipeline import grid_for  # noqa: E402
from difflab.train.clip import load_clip  # noqa: E402

HERE = Path(__file__).resolve().parent
SORT = True  # results.json keys sorted
REPO = HERE.parents[1]
OUT = HERE  # --out moves results.json, cache/, figures/ and report.md (quick runs go to _quick/)
RUN = "checkpoints/zoo/shapes-text-unet"  # relative paths are tried from the repository too
CLIP = "checkpoints/clip/shapes"
KINDS = ("language", "content", "style")
SAMPLER = "euler_ancestral"  # = DDPM's ancestral sampler (eta 1): the paper guides its mean mu + s Sigma grad F
OBJECT_HEADS = ("shape", "color", "size", "position")
# scales per kind: F is a cosine (language, content) or a sum of squared Gram distances (style), so
# their useful ranges differ. s sigma^2 grad_x F = s sigma grad_u F on the unit-scale input u the
# tower sees; measured |sigma^2 grad_x F| per image (|x0| ~ 45): about 1.5 at sigma 5 and 0.1 at
# sigma 1 for the cosines, 10-40x less for the Gram distance. A 16-sample pilot on the run's first
# checkpoint (step 500) raised the cosines up to s ~ 100-300 and the Gram score up to s ~ 3000.
FULL = {
    "n": 128,
    "steps": 20,
    "targets": 8,
    "keep": 2,
    "scales": {
        "language": (0.0, 10.0, 40.0, 160.0, 640.0),
        "content": (0.0, 10.0, 40.0, 160.0, 640.0),
        "style": (0.0, 100.0, 300.0, 1000.0, 3000.0),
    },
}
QUICK = {
    "n": 8,
    "steps": 4,
    "targets": 2,
    "keep": 2,
    "scales": {"language": (0.0, 160.0), "content": (0.0, 160.0), "style": (0.0, 1000.0)},
}
# the language targets: one per shape, colour and position at least; template-0 captions (the
# form every other template contains)
PROMPTS = (
    "a large red circle on the left",
    "a small green square at the top",
    "a large blue triangle in the center",
    "a small yellow cross on the right",
    "a large purple star at the bottom",
    "a small cyan circle in the center",
    "a large blue circle on the right",
    "a large yellow triangle at the top",
)


# --------------------------------------------------------------------------------------------
# Plumbing
# --------------------------------------------------------------------------------------------


def rel(path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (sd / sqrt(n)) of per-sample values."""
    v = v.double()
    return v.mean().item(), (v.std().item() / math.sqrt(len(v))) if len(v) > 1 else float("nan")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _in_repo(path: str) -> Path:
    """A path as given, or from the repository when it is relative and not found from here."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


class Models:
    """The unconditional model (a text run's empty prompt), the CLIP towers, the attribute classifier."""

    def __init__(self, run: str, clip: str):
        self.run, self.clip_dir = run, clip
        run, clip = _in_repo(run), _in_repo(clip)
        self.pipe = load_pipeline(run)
        if self.pipe.latent_space is not None:
            raise ValueError(f"run {run} samples latents; SDG here guides a pixel-space model")
        if self.pipe.conditioning != "text":
            raise ValueError(
                f"run {run} is {self.pipe.conditioning}-conditional; this script takes a text run, "
                "whose empty prompt is the unconditional model"
            )
        self.clean = load_clip(clip)  # E_I, E_T: scores the final samples
        self.noisy = load_clip(clip, noise_aware=True)  # E'_I (same E_T): guides
        c = self.clean.config
        if (c.in_channels, c.image_size, c.image_size) != self.pipe.image_shape():
            raise ValueError(
                f"CLIP {clip} takes {(c.in_channels, c.image_size, c.image_size)} images; run {run} "
                f"makes {self.pipe.image_shape()}"
            )
        self.classifier = load_classifier("shapes")
        self.exclude = self.pipe.config.get("train", {}).get("data_kwargs", {}).get("exclude", [])
        self.clip_info = json.loads((Path(clip) / "config.json").read_text()).get("info", {})
        self.run_step = _run_step(run)

    def unconditional(self, n: int) -> dict:
        """The empty prompt's conditioning: the branch caption dropout trained."""
        states, mask = self.pipe.encode_prompts([""] * n)
        return {"context": states, "context_mask": mask}


def _run_step(run: str) -> int | None:
    """The training step of the run's model.safetensors (its metadata; a zoo folder's zoo.json)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(run) / "model.safetensors"), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
        if step is None and (Path(run) / "zoo.json").is_file():
            step = json.loads((Path(run) / "zoo.json").read_text()).get("train", {}).get("steps")
        return None if step is None else int(step)
    except (OSError, ValueError, json.JSONDecodeError):
        return None


def generate(models: Models, score_fn, scale: float, n: int, *, steps: int, sampler: str, seed: int) -> torch.Tensor:
    """n samples of the unconditional model, SDG-guided by score_fn at `scale`, from `seed`."""
    pipe = models.pipe
    D = sdg(pipe.denoiser, score_fn, scale)
    sig = grid_for(pipe.denoiser.schedule, steps)
    g, noise_g = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    x = torch.randn((n, *pipe.sample_shape()), generator=g) * float(sig[0])
    with torch.no_grad():  # the guide's gradient is taken inside sdg (enable_grad); the UNet needs none
        x = sample(D, x, sig, method=sampler, cond=models.unconditional(n), noise=noise_g)
    return x.clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# Targets and scores
# --------------------------------------------------------------------------------------------


def targets_for(kind: str, k: int) -> tuple[list, list[dict[str, int]]]:
    """k prompts (language) or reference test images (content, style), and the attributes a sample
    should share with each: the prompt's shape, colour, size, position, or all of the reference's."""
    if kind == "language":
        if k > len(PROMPTS):
            raise ValueError(f"at most {len(PROMPTS)} language targets, asked for {k}")
        prompts = list(PROMPTS[:k])
        return prompts, [{h: v for h, v in parse_caption(t).items() if h in OBJECT_HEADS} for t in prompts]
    test = load_dataset("shapes", "test", n=k)
    refs = [test.images[i : i + 1] for i in range(k)]  # (1, 3, 32, 32) each
    return refs, [{h: int(test.attributes[h][i]) for h in ATTRIBUTES} for i in range(k)]


def guide_score(kind: str, models: Models, target, seed: int):
    """F(x, sigma) of the kind, on the noise-aware tower."""
    g = torch.Generator().manual_seed(seed + 2)  # the reference's noise ref + sigma n
    if kind == "language":
        return language_score(models.noisy, target)
    if kind == "content":
        return content_score(models.noisy, target, g)
    return style_score(models.noisy, target, g)


@torch.no_grad()
def own_score(kind: str, clip, x: torch.Tensor, target) -> torch.Tensor:
    """The kind's score of clean samples by the clean tower, (B,): cosines (higher = closer) for
    language and content, the Gram distance over the blocks (lower = closer) for style."""
    if kind == "language":
        return (clip.encode_image(x) * clip.encode_text([target])).sum(-1)
    if kind == "content":
        return (clip.encode_image(x) * clip.encode_image(target)).sum(-1)
    feats, ref = clip.features(x), clip.features(target)
    return sum(((_gram(f) - _gram(r)) ** 2).flatten(1).sum(1) for f, r in zip(feats, ref))


@torch.no_grad()
def attribute_hits(net, x: torch.Tensor, want: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per sample and head: does the shapes classifier see the wanted attribute? (B,) bools; "all"."""
    logits = net(prepare_images(x, 3, 32))
    hits = {h: logits[h].argmax(1) == v for h, v in want.items()}
    hits["all"] = torch.stack(list(hits.values())).all(0)
    return hits


DIRECTION = {"language": 1, "content": 1, "style": -1}  # +1: the score rises toward the target
SCORE_NAME = {
    "language": "cos(E_I(x0), E_T(prompt))",
    "content": "cos(E_I(x0), E_I(ref))",
    "style": "Gram distance to ref (E_I blocks)",
}


# --------------------------------------------------------------------------------------------
# A part: one kind's sweep
# --------------------------------------------------------------------------------------------


def run_kind(kind: str, models: Models, p: dict, sampler: str, seed: int) -> None:
    k, n = p["targets"], p["n"]
    per = n // k
    targets, wants = targets_for(kind, k)
    scales = p["scales"][kind]
    if scales[0] != 0:
        raise ValueError(f"{kind}: the first scale must be 0 (unguided), got {scales}")
    log(f"{kind}: scales {list(scales)}, {k} targets x {per} samples, {p['steps']} steps {sampler}")
    rows, grids, per_sample = {}, {}, {}
    for s in scales:
        t0, c0 = time.perf_counter(), time.process_time()
        xs, scores, hits = [], [], []
        for j, target in enumerate(targets):
            sj = seed + 1000 * j
            x = generate(
                models, guide_score(kind, models, target, sj), s, per, steps=p["steps"], sampler=sampler, seed=sj
            )
            xs.append(x)
            scores.append(own_score(kind, models.clean, x, target))
            hits.append(attribute_hits(models.classifier, x, wants[j]))
        score = torch.cat(scores)
        heads = list(hits[0])
        hit = {h: torch.cat([hh[h] for hh in hits]) for h in heads}
        # the library's aggregate (per target, then pooled) must agree with the per-sample hits
        acc = {h: 0.0 for h in heads}
        for j in range(k):
            want = {h: torch.full((per,), v) for h, v in wants[j].items()}
            a = attribute_accuracy(models.classifier, xs[j], want)
            for h in heads:
                acc[h] += a[h] / k  # equal batches
        assert all(abs(acc[h] - hit[h].double().mean().item()) < 1e-9 for h in heads), (acc, hit)
        m, se = mean_se(score)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows[key(s)] = {
            "score": m,
            "score_se": se,
            "attributes": acc,
            "attributes_se": {h: math.sqrt(max(v * (1 - v), 1e-12) / len(score)) for h, v in acc.items()},
            "sample_seconds": round(seconds, 1),
            "sample_cpu_seconds": round(cpu, 1),
        }
        per_sample[key(s)] = {"score": score, **{f"hit_{h}": v for h, v in hit.items()}}
        grids[key(s)] = torch.stack([xj[: p["keep"]] for xj in xs], 0)  # (k, keep, 3, H, W)
        log(
            f"  s = {key(s)}: {SCORE_NAME[kind]} {m:.4f} ± {se:.4f}; attributes "
            + ", ".join(f"{h} {v:.3f}" for h, v in acc.items())
            + f" ({seconds:.0f} s, {cpu:.0f} CPU-s)"
        )
    base = per_sample[key(scales[0])]
    for s in scales[1:]:  # paired differences from the unguided samples (same noise)
        cur, r = per_sample[key(s)], rows[key(s)]
        d_mean, d_se = mean_se(DIRECTION[kind] * (cur["score"] - base["score"]))
        r["gain"], r["gain_se"] = d_mean, d_se
        r["attributes_gain"], r["attributes_gain_se"] = {}, {}
        for h in r["attributes"]:
            dm, ds = mean_se(cur[f"hit_{h}"].double() - base[f"hit_{h}"].double())
            r["attributes_gain"][h], r["attributes_gain_se"][h] = dm, ds
    tiles = [t if kind != "language" else _rendered(t) for t in targets]
    save_tensor(OUT, f"grid_{kind}", {"grids": grids, "targets": torch.cat(tiles)})
    per_target = {}
    if kind == "language":
        for j, t in enumerate(targets):
            per_target[t] = {
                key(s): per_sample[key(s)]["hit_all"][j * per : (j + 1) * per].double().mean().item() for s in scales
            }
    Results(OUT, SORT).save(
        kind,
        {
            "n": n,
            "targets": k,
            "per_target": per,
            "steps": p["steps"],
            "sampler": sampler,
            "seed": seed,
            "scales": [key(s) for s in scales],
            "rows": rows,
            "target_list": targets if kind == "language" else f"the first {k} shapes test images",
            "target_attributes": wants,
            "unseen": [_unseen(w, models.exclude) for w in wants],
            "all_accuracy_by_target": per_target,
            "run": rel(models.run),
            "run_step": models.run_step,
            "clip": rel(models.clip_dir),
            "command": p["command"],
        },
    )


def _rendered(prompt: str) -> torch.Tensor:
    """A real image of a prompt's attributes (dark background), as the language row's target tile."""
    return render(parse_caption(prompt))[None]


def _unseen(want: dict, exclude: list[dict]) -> bool:
    """Whether the target's (shape, colour) was excluded from the diffusion model's training data."""
    from difflab.data.shapes import COLORS, SHAPES

    names = {"shape": SHAPES, "color": COLORS}
    for rule in exclude:
        if all(names[a][want[a]] == v if a in names and a in want else False for a, v in rule.items()):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def figure_grid(kind: str) -> Path | None:
    """Top row: the targets; then one row per scale; `keep` columns per target, the same noise down a column."""
    path = OUT / "cache" / f"grid_{kind}.pt"
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=True)
    grids, targets = saved["grids"], saved["targets"]
    k, keep = next(iter(grids.values())).shape[:2]
    rows = [
        ("target" if kind != "language" else "prompt (a real image)", targets[:, None].expand(-1, keep, -1, -1, -1))
    ]
    rows += [(f"s = {name}", x) for name, x in grids.items()]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(0.55 * k * keep + 1.6, 6.0), 0.7 * len(rows) + 0.5))
    axes = [axes] if len(rows) == 1 else axes
    for ax, (name, x) in zip(axes, rows):
        x = ((x.clamp(-1, 1) + 1) / 2).reshape(k * keep, *x.shape[2:])  # (k, keep, 3, H, W) -> (k keep, 3, H, W)
        h, w = x.shape[-2:]
        gap = torch.ones(k * keep, 3, h, 2)
        gap[keep - 1 :: keep] = 0.5  # a grey bar between targets
        strip = torch.cat([torch.cat([x, gap], 3)[i] for i in range(k * keep)], 2)  # (3, H, k keep (W + 2))
        ax.imshow(strip.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    axes[0].set_title(f"SDG {kind} guidance: {keep} samples per target, one row per scale s", fontsize=9)
    fig.tight_layout()
    (OUT / "figures").mkdir(parents=True, exist_ok=True)
    out = OUT / "figures" / f"{kind}_grid.png"
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def verdict(r: dict, kind: str) -> tuple[bool, str]:
    """The claim for one kind: some guided scale beats the unguided samples on the kind's own
    score by more than 2 standard errors of the paired difference."""
    guided = [s for s in r["scales"][1:]]
    if not guided:
        return False, "no guided scale measured"
    gains = [(s, r["rows"][s]["gain"], r["rows"][s]["gain_se"]) for s in guided]
    best = max(gains, key=lambda g: g[1] / g[2] if g[2] > 0 else g[1])
    s, gain, se = best
    up = [g for g in gains if g[1] > 2 * g[2]]
    mono = all(b[1] > a[1] for a, b in zip(gains, gains[1:]))
    if not up:
        return False, (f"does not hold: no scale gains more than 2 se (best s = {s}: {gain:+.4f} ± {se:.4f})")
    return True, (
        f"holds at s = {', '.join(g[0] for g in up)} (largest gain at s = {max(gains, key=lambda g: g[1])[0]}"
        f"; {'monotone' if mono else 'not monotone'} in s)"
    )


def _fmt(v: float, se: float, digits: int = 3) -> str:
    return f"{v:.{digits}f} ± {se:.{digits}f}"


def kind_table(kind: str, r: dict) -> list[str]:
    have = next(iter(r["rows"].values()))["attributes"]
    heads = [h for h in (*ATTRIBUTES, "all") if h in have]
    d = DIRECTION[kind]
    score_col = SCORE_NAME[kind] + (" (higher = closer)" if d > 0 else " (lower = closer)")
    L = [
        f"| s | {score_col} | gain over s = 0 (paired) | " + " | ".join(heads) + " | CPU-s |",
        "|---|---|---|" + "---|" * len(heads) + "---|",
    ]
    for s in r["scales"]:
        row = r["rows"][s]
        gain = "-" if "gain" not in row else _fmt(row["gain"], row["gain_se"], 4)
        attrs = []
        for h in heads:
            cell = f"{row['attributes'][h]:.3f}"
            if "attributes_gain" in row:
                cell += f" ({row['attributes_gain'][h]:+.3f} ± {row['attributes_gain_se'][h]:.3f})"
            attrs.append(cell)
        L.append(
            f"| {s} | {_fmt(row['score'], row['score_se'], 4)} | {gain} | "
            + " | ".join(attrs)
            + f" | {row['sample_cpu_seconds']:.0f} |"
        )
    return L


def clip_summary(info: dict) -> str:
    m = info.get("metrics")
    if not m:
        return "(no metrics recorded in the CLIP folder)"
    r = m["retrieval"]
    parts = [
        f"text->image retrieval top-1 in batches of {m['retrieval_batch']}: {r['exact']:.3f} exact (chance "
        f"{r['exact_chance']:.2f})" + (f", {r['consistent']:.3f} consistent" if "consistent" in r else "")
    ]
    if "zero_shot" in m:
        parts.append(
            "zero-shot attribute accuracy "
            + ", ".join(f"{k} {v:.2f}" for k, v in m["zero_shot"].items() if k != "mean")
        )
    noisy = m.get("noisy_retrieval", {})
    if noisy:
        col = "consistent" if "consistent" in next(iter(noisy.values()))["noise_aware"] else "exact"
        parts.append(
            f"{col} retrieval of noisy images by E'_I / by E_I: "
            + ", ".join(
                f"sigma {s}: {v['noise_aware'][col]:.3f} / {v['clean_tower'][col]:.3f}" for s, v in noisy.items()
            )
            + (
                " (E'_I at sigma 0 exactly is off its training range: `clip_c_noise` clamps sigma to 1e-5; samplers "
                "never call it there)"
                if "0" in noisy
                else ""
            )
        )
    return "; ".join(parts)


def _classifier_card() -> str:
    """The shapes classifier's test accuracy per head, from its card."""
    from difflab.metrics.classifiers import CLASSIFIER_DIR

    try:
        card = json.loads((CLASSIFIER_DIR / "shapes.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "accuracy card missing"
    acc = card.get("test_accuracy_per_head", {})
    return f"test accuracy on {card.get('n_test')} real images: " + ", ".join(f"{h} {v:.3f}" for h, v in acc.items())


def write_report() -> None:
    res = Results(OUT, SORT).load()
    if not any(k in res for k in KINDS):
        raise FileNotFoundError(f"no results in {OUT / 'results.json'}: run the parts first")
    figs = {k: figure_grid(k) for k in KINDS}
    meta = next(res[k] for k in KINDS if k in res)
    commands = list(dict.fromkeys(res[k].get("command", "python papers/sdg/run.py") for k in KINDS if k in res))
    clip_info = res.get("clip_info", {})
    L = [
        "# Semantic Diffusion Guidance on shapes (Liu et al. 2023, arXiv 2112.05744)\n",
        "Produced by " + " and ".join(f"`{c}`" for c in commands) + " (all numbers below come from `results.json`; "
        "`--report` rebuilds this page).\n",
        f'Unconditional model: the empty prompt "" of the text-conditional shapes UNet `{meta["run"]}` (step '
        f"{meta.get('run_step')}; caption dropout 0.1 trained that branch). Guide and judge: the SmallCLIP of "
        f"`{meta['clip']}` (`difflab train-clip`, {clip_info.get('steps')} contrastive + "
        f"{clip_info.get('noise_steps')} noise-aware steps; {clip_summary(clip_info)}). Its noise-aware image tower "
        "E'_I computes F on x_t; the clean tower E_I (the fine-tune's frozen teacher) scores the final samples, so "
        "the judge is related to, but not the same network as, the guide. Attribute accuracy is measured by "
        "difflab's shapes classifier (`difflab.metrics.classifiers`; " + _classifier_card() + "), independent of "
        f"both. Every setting: n = {meta['n']} samples ({meta['targets']} targets x {meta['per_target']}), "
        f"{meta['steps']} steps of `{meta['sampler']}`, seed {meta['seed']}: sample i starts from the same noise at "
        "every scale, so differences from s = 0 are paired; ± is one standard error (of the mean, or of the "
        "paired difference).\n",
        "Guidance: D + s sigma^2 grad_x F(x_t, sigma) (`difflab.methods.sdg.sdg`, the paper's mu + s Sigma grad F "
        "in VE coordinates), s = 0 being the unguided model.\n",
        "## Claims, measured\n",
    ]
    for kind in KINDS:
        r = res.get(kind)
        if not r:
            continue
        ok, how = verdict(r, kind)
        s0 = r["rows"]["0"]
        series = ", ".join(f"s = {s}: {r['rows'][s]['score']:.4f}" for s in r["scales"])
        line = (
            f"- **{kind.capitalize()} guidance moves its own score toward the target: "
            f"{'holds' if ok else 'does not hold'}.** "
            f"{SCORE_NAME[kind]} ({'higher' if DIRECTION[kind] > 0 else 'lower'} = closer) by scale: {series} "
            f"(unguided ± {s0['score_se']:.4f}); {how}."
        )
        top = max(r["scales"][1:], key=lambda s: r["rows"][s]["gain"]) if len(r["scales"]) > 1 else None
        if top:
            a, g = r["rows"][top]["attributes"], r["rows"][top]
            what = "the prompt's attributes" if kind == "language" else "agreement with the reference's attributes"
            line += (
                f" Independent check, {what} by the shapes classifier, all at once: {s0['attributes']['all']:.3f} "
                f"unguided -> {a['all']:.3f} at s = {top} ({g['attributes_gain']['all']:+.3f} ± "
                f"{g['attributes_gain_se']['all']:.3f})."
            )
        L.append(line)
    L.append("")
    for i, kind in enumerate(KINDS, 1):
        r = res.get(kind)
        if not r:
            continue
        L.append(f"## {i}. {kind.capitalize()} guidance\n")
        if kind == "language":
            unseen = [t for t, u in zip(r["target_list"], r["unseen"]) if u]
            L.append(
                "F = cos(E'_I(x_t), E_T(prompt)). Prompts (one batch each): "
                + "; ".join(f'"{t}"' for t in r["target_list"])
                + ". Attribute columns: the classifier's shape, colour, size, "
                "position of the samples against the prompt's (chance about 0.2, 0.17, 0.5, 0.2), and all four at "
                "once; in brackets the paired change from s = 0."
                + (
                    f" The diffusion model never saw {', '.join(unseen)} (excluded (shape, colour) pairs of its "
                    "training set)."
                    if unseen
                    else ""
                )
                + "\n"
            )
        elif kind == "content":
            L.append(
                "F = cos(E'_I(x_t), E'_I(ref + sigma n)), the reference noised to the same level. References: "
                f"{r['target_list']}. Attribute columns: agreement of each sample's attributes with its "
                "reference's true ones (the test set's attributes; the shapes classifier on the samples).\n"
            )
        else:
            L.append(
                "F = -sum over E'_I's three blocks of ||G(f(x_t)) - G(f(ref + sigma n))||_F^2 (G: Gram matrix "
                "over positions, normalised by C H W). Scored by the same sum with E_I's blocks on the clean "
                f"samples (lower = closer). References: {r['target_list']}. Attribute columns: agreement with "
                "the reference's attributes (style should move colour and background more than shape or "
                "position).\n"
            )
        unseen_refs = [str(j + 1) for j, u in enumerate(r["unseen"]) if u] if kind != "language" else []
        if unseen_refs:
            L.append(
                f"(References {', '.join(unseen_refs)} show (shape, colour) pairs the diffusion model never saw.)\n"
            )
        L += kind_table(kind, r)
        if kind == "language" and r.get("all_accuracy_by_target"):
            L.append(
                "\nAll four attributes right, per prompt (n = " + str(r["per_target"]) + " each; * = unseen by "
                "the diffusion model):\n"
            )
            L.append("| prompt | " + " | ".join(f"s = {s}" for s in r["scales"]) + " |")
            L.append("|---|" + "---|" * len(r["scales"]))
            for t, u in zip(r["target_list"], r["unseen"]):
                v = r["all_accuracy_by_target"][t]
                L.append(f"| {t}{' *' if u else ''} | " + " | ".join(f"{v[s]:.2f}" for s in r["scales"]) + " |")
        if figs[kind]:
            L.append(f"\n![{kind} grid](figures/{figs[kind].name})\n")
        L.append("")
    runs = res.get("runs", {})
    if runs:
        L.append(
            "Run time per part ("
            + runs.get("machine", "?")
            + "): "
            + ", ".join(
                f"{p} {v['wall_s'] / 60:.1f} min wall / {v['cpu_s'] / 60:.1f} CPU-min"
                for p, v in runs.items()
                if isinstance(v, dict)
            )
            + ".\n"
        )
    atomic_write_text(OUT / "report.md", "\n".join(L) + "\n")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def options(ap) -> None:
    ap.add_argument("--run", default=RUN, help=f"text-conditional pixel run folder (default {RUN})")
    ap.add_argument("--clip", default=CLIP, help=f"difflab train-clip folder (default {CLIP})")
    ap.add_argument("--n", type=int, help=f"samples per setting (default {FULL['n']}; quick {QUICK['n']})")
    ap.add_argument("--targets", type=int, help=f"prompts / references per kind (default {FULL['targets']})")
    ap.add_argument("--steps", type=int, help=f"sampler steps (default {FULL['steps']}; quick {QUICK['steps']})")
    ap.add_argument("--scales", type=float, nargs="+", help="guidance scales for the parts run (first must be 0)")
    ap.add_argument(
        "--sampler",
        default=SAMPLER,
        choices=sorted(SAMPLERS),
        help=f"default {SAMPLER}: DDPM's ancestral step, whose mean SDG shifts (library default: {DEFAULT_SAMPLER})",
    )


def configure(run: Run) -> None:
    global OUT
    OUT = run.out
    args, p = run.args, run.settings
    p["scales"] = dict(p["scales"])
    for name in ("n", "steps", "targets"):
        if getattr(args, name) is not None:
            p[name] = getattr(args, name)
    if args.scales:
        p["scales"].update({k: tuple(args.scales) for k in args.only or KINDS})
    if p["n"] % p["targets"] or p["n"] < p["targets"]:
        raise ValueError(f"n ({p['n']}) must be a positive multiple of targets ({p['targets']})")
    p["command"] = "python " + " ".join(
        [rel(sys.argv[0]) if sys.argv[0].endswith("run.py") else "papers/sdg/run.py", *sys.argv[1:]]
    )


def setup(run: Run):
    models = Models(run.args.run, run.args.clip)
    Results(OUT, SORT).save("clip_info", models.clip_info)
    return models


PAPER = Paper(
    "sdg",
    __doc__,
    title="Semantic Diffusion Guidance (Liu et al. 2023)",
    claim="An unconditional model is steered by language, image content or image style through a noise-aware CLIP, without retraining, each guidance moving its own similarity score toward the target.",
    parts={
        kind: (lambda run, kind=kind: run_kind(kind, run.state, run.settings, run.args.sampler, run.seed))
        for kind in KINDS
    },
    report=lambda run: write_report(),
    full=FULL,
    quick=QUICK,
    options=options,
    configure=configure,
    setup=setup,
)


if __name__ == "__main__":
    main(PAPER)
