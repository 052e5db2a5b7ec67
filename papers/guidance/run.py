"""Guidance on Fashion-MNIST: classifier-free guidance (Ho & Salimans 2022) and ADM classifier
guidance (Dhariwal & Nichol 2021) on the zoo model `fmnist-unet-s`.

Measures FD-FMNIST, precision, recall, the IS analogue and class accuracy (all under difflab's
own Fashion-MNIST classifier) of n class-balanced samples per setting, and writes
papers/guidance/results.json, PNG figures and papers/guidance/report.md.

    python papers/guidance/run.py                   # everything (~35 CPU-minutes, one thread)
    python papers/guidance/run.py --quick           # tiny settings, to check the plumbing (_quick/)
    python papers/guidance/run.py --only cfg        # one part; results merge into results.json
    python papers/guidance/run.py --report          # rebuild report.md and figures from results.json

Parts: `real` (held-out test images scored the same way: the metrics' ceiling and noise),
`cfg` (sweep over the paper's w; difflab's guidance_scale is s = 1 + w), `classifier` (train the
noise-aware guide with `difflab train-classifier` and measure its accuracy against sigma), `adm`
(classifier-scale sweep on the conditional model) and `adm_uncond` (the same on the model's
unconditional branch, the null class). Every setting starts from the same seed, so sample i has
the same initial noise and label (i % 10) in every row of every sweep.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

if __package__ in (None, ""):  # run as a file: python papers/guidance/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from papers.runner import (
    load_pipeline,
    Paper,
    Results,
    Run,
    atomic_write_text,
    cache_path,
    cpu_seconds,
    key,
    log,  # noqa: E402
    main,
    prop_se,
    save_figure,
    save_tensor,
    trend,
)

from difflab import zoo  # noqa: E402
from difflab.core.sampling import DEFAULT_SAMPLER  # noqa: E402
from difflab.metrics import default_extractor, feature_extractor, reference_stats, score_samples  # noqa: E402
from difflab.metrics.evaluate import _data_kwargs, _run_data  # noqa: E402
from difflab.pipeline import Pipeline  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = HERE  # --out moves results.json, cache/, figures/ and report.md (quick runs go to _quick/)
SORT = True  # results.json keys sorted
MODEL = "fmnist-unet-s"
METRICS = ("fd", "precision", "recall", "class_accuracy", "inception_score")
# the null-class sweep is the optional one: fewer samples and scales keep the run near 35 CPU-minutes
FULL = {
    "n": 1000,
    "steps": 10,
    "w": (0.0, 0.5, 1.0, 2.0, 4.0),
    "scales": (0.0, 1.0, 2.0, 4.0, 8.0),
    "uncond_n": 500,
    "uncond_scales": (0.0, 2.0, 8.0),
    "clf_steps": 3000,
    "clf_eval_n": 2000,
    "real_sets": 10,
    "keep": 20,
    "diag_sampler": "euler",
    "diag_scales": (0.0, 4.0),
}
QUICK = {
    "n": 30,
    "steps": 4,
    "w": (0.0, 1.0, 4.0),
    "scales": (0.0, 8.0),
    "uncond_n": 30,
    "uncond_scales": (0.0, 8.0),
    "clf_steps": 20,
    "clf_eval_n": 200,
    "real_sets": 3,
    "keep": 20,
    "diag_sampler": "euler",
    "diag_scales": (0.0, 8.0),
}
CLF_SIGMAS = (0.002, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0)  # 0.002 = sigma_min: "clean"


# --------------------------------------------------------------------------------------------
# Plumbing
# --------------------------------------------------------------------------------------------


def unconditional_view(pipe: Pipeline) -> Pipeline:
    """The same network as an unconditional Pipeline: no labels reach it, so it sees the null class
    (the branch label dropout trained); labels given to it go to a guiding classifier only."""
    config = {**pipe.config, "model": {**pipe.config["model"], "num_classes": None}}
    return Pipeline(pipe.denoiser, config)


class Scorer:
    """FD-FMNIST, precision/recall (k = 3), IS analogue and class accuracy under difflab's
    Fashion-MNIST classifier, against the training set's cached reference statistics."""

    def __init__(self, pipe: Pipeline):
        self.config = pipe.config
        self.dataset = pipe.config["data"]["name"]
        self.num_classes = pipe.num_classes
        self.ext = feature_extractor(default_extractor(self.dataset))
        self.ref = reference_stats(
            self.ext,
            self.dataset,
            "train",
            images=lambda: _run_data(self.config, "train").images,
            data_kwargs=_data_kwargs(self.config),
            log=log,
        )

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        q = score_samples(x, self.ext, self.ref, self.dataset, labels=labels, num_classes=self.num_classes)
        return {k: q[k] for k in METRICS}


def sweep(
    pipe: Pipeline,
    settings: dict[str, dict],
    labels: torch.Tensor,
    *,
    steps: int,
    seed: int,
    score: Callable[[torch.Tensor, torch.Tensor], dict],
    sampler: str = DEFAULT_SAMPLER,
    keep: int = 20,
    batch_size: int = 32,
) -> tuple[dict, dict]:
    """Sample len(labels) images per setting (pipe keyword arguments; `class_labels` defaults to
    `labels`, None drops it) from the same seed, and score each set against `labels`.

    Returns ({setting: metrics + seconds}, {setting: the first `keep` samples})."""
    rows, grids = {}, {}
    for name, kwargs in settings.items():
        kw = {"class_labels": labels, **kwargs}
        if kw["class_labels"] is None:
            del kw["class_labels"]
        t0, c0 = time.perf_counter(), time.process_time()
        x = pipe(len(labels), sampler=sampler, steps=steps, seed=seed, batch_size=batch_size, **kw)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows[name] = {**score(x, labels), "sample_seconds": round(seconds, 1), "sample_cpu_seconds": round(cpu, 1)}
        grids[name] = x[:keep].clone()
        log(
            f"  {name}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in rows[name].items() if k in METRICS)
            + f" ({seconds:.0f} s, {cpu:.0f} CPU-s)"
        )
    return rows, grids


def _settings_meta(p: dict, sampler: str, seed: int) -> dict:
    return {
        "model": MODEL,
        "n": p["n"],
        "steps": p["steps"],
        "sampler": sampler,
        "seed": seed,
        "labels": "i % 10 (class-balanced)",
        "batch_size": p["batch_size"],
    }


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


def run_real(pipe: Pipeline, score: Scorer, p: dict, sampler: str, seed: int) -> None:
    """Held-out test images in disjoint sets of n, scored like samples: the ceiling and the noise
    (for every sample count a sweep uses; results["real"][str(n)])."""
    test = _run_data(pipe.config, "test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(test), generator=g)
    res = {}
    for n in sorted({p["n"], p["uncond_n"]}):
        sets = min(p["real_sets"], len(test) // n)
        rows = []
        for i in range(sets):
            j = idx[i * n : (i + 1) * n]
            rows.append(score(test.images[j], test.labels[j]))
        out = {
            "n": n,
            "sets": sets,
            "rows": rows,
            "mean": {k: sum(r[k] for r in rows) / sets for k in METRICS},
            "sd": {
                k: (sum((r[k] - sum(q[k] for q in rows) / sets) ** 2 for r in rows) / max(1, sets - 1)) ** 0.5
                for k in METRICS
            },
        }
        res[str(n)] = out
        log(f"real, sets of {n}: " + ", ".join(f"{k} {out['mean'][k]:.4f} ± {out['sd'][k]:.4f}" for k in METRICS))
    Results(OUT, SORT).save("real", res)


def run_cfg(pipe: Pipeline, score: Scorer, p: dict, sampler: str, seed: int) -> None:
    """Classifier-free guidance over the paper's w (guidance_scale s = 1 + w)."""
    labels = torch.arange(p["n"]) % pipe.num_classes  # class-balanced
    settings = {key(w): {"guidance_scale": 1.0 + w} for w in p["w"]}
    log(f"cfg: w in {list(p['w'])}, n {p['n']}, {p['steps']} steps {sampler}")
    rows, grids = sweep(
        pipe,
        settings,
        labels,
        steps=p["steps"],
        seed=seed,
        score=score,
        sampler=sampler,
        keep=p["keep"],
        batch_size=p["batch_size"],
    )
    save_tensor(OUT, "grid_cfg", grids)
    Results(OUT, SORT).save(
        "cfg", {**_settings_meta(p, sampler, seed), "convention": "w (paper); guidance_scale = 1 + w", "rows": rows}
    )


def run_classifier(pipe: Pipeline, p: dict, seed: int) -> None:
    """Train the noise-aware guide with `difflab train-classifier`; its test accuracy against sigma."""
    from difflab.nn.classifier import load_classifier

    folder = cache_path(OUT, "classifier")
    args = [
        "train-classifier",
        "--data",
        "fashion_mnist",
        "--run",
        str(zoo.ZOO_DIR / MODEL),
        "--out",
        str(folder),
        "--steps",
        str(p["clf_steps"]),
        "--seed",
        str(seed),
        "--no-progress",
    ]
    shown = "difflab " + " ".join(os.path.relpath(a, REPO) if a.startswith("/") else a for a in args)
    log(f"classifier: {shown}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0, c0 = time.perf_counter(), cpu_seconds()
    subprocess.run([sys.executable, "-m", "difflab", *args], check=True, env=env, cwd=REPO)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    meta = json.loads((folder / "config.json").read_text())
    clf = load_classifier(folder)
    # accuracy on a class-balanced set of test images, noised to each sigma, fed like guidance does
    test = _run_data(pipe.config, "test")
    per = p["clf_eval_n"] // 10
    idx = torch.cat([torch.nonzero(test.labels == c)[:per, 0] for c in range(10)])
    x0, y = test.images[idx], test.labels[idx]
    g = torch.Generator().manual_seed(seed)
    acc = {}
    with torch.no_grad():
        for s in CLF_SIGMAS:
            x = x0 + s * torch.randn(x0.shape, generator=g)
            sigma = torch.full((len(x),), s, dtype=torch.float64)
            _, _, c_in, c_noise = pipe.denoiser.coeffs_for(x, sigma)
            logits = torch.cat(
                [clf(c_in[a : a + 250] * x[a : a + 250], c_noise[a : a + 250]) for a in range(0, len(x), 250)]
            )
            acc[key(s)] = (logits.argmax(1) == y).double().mean().item()
    out = {
        "command": shown,
        "folder": os.path.relpath(folder, REPO),
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu, 1),
        "info": meta["info"],
        "params": sum(q.numel() for q in clf.parameters()),
        "eval_n": len(idx),
        "accuracy_by_sigma": acc,
    }
    Results(OUT, SORT).save("classifier", out)
    log(f"classifier: {seconds:.0f} s ({cpu:.0f} CPU-s), accuracy by sigma {acc}")


def _classifier_folder() -> Path:
    folder = OUT / "cache" / "classifier"
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no guide classifier in {folder}: run the `classifier` part first "
            f"(python papers/guidance/run.py --only classifier)"
        )
    return folder


def run_adm(pipe: Pipeline, score: Scorer, p: dict, sampler: str, seed: int, unconditional: bool = False) -> None:
    """ADM classifier guidance over the classifier scale, on the conditional or the null-class model."""
    folder = _classifier_folder()
    if unconditional:
        p = {**p, "n": p["uncond_n"], "scales": p["uncond_scales"]}
    labels = torch.arange(p["n"]) % pipe.num_classes  # class-balanced
    target = unconditional_view(pipe) if unconditional else pipe
    part = "adm_uncond" if unconditional else "adm"
    # scale 0 on the conditional model is the CFG sweep's w = 0 (same n, steps, sampler, seed): reuse it
    done = Results(OUT, SORT).load().get("cfg", {})
    reuse = (
        not unconditional
        and 0.0 in p["scales"]
        and "0" in done.get("rows", {})
        and (OUT / "cache" / "grid_cfg.pt").exists()
        and all(
            done.get(k, 256 if k == "batch_size" else None) == v  # 256: Pipeline's default
            for k, v in _settings_meta(p, sampler, seed).items()
        )
    )
    settings = {}
    for s in p["scales"]:
        if s == 0 and reuse:
            continue
        if s == 0:
            # no guidance: the unconditional model gets no labels at all (they are only scored)
            settings[key(s)] = {"class_labels": None} if unconditional else {}
        else:
            settings[key(s)] = {"classifier": folder, "classifier_scale": s}
    log(
        f"{part}: scales {list(p['scales'])}, n {p['n']}, {p['steps']} steps {sampler}"
        + (" (scale 0 = the CFG sweep's w = 0 row)" if reuse else "")
    )
    rows, grids = sweep(
        target,
        settings,
        labels,
        steps=p["steps"],
        seed=seed,
        score=score,
        sampler=sampler,
        keep=p["keep"],
        batch_size=p["batch_size"],
    )
    if reuse:
        rows = {"0": {**done["rows"]["0"], "reused": "cfg w = 0"}, **rows}
        grids = {"0": torch.load(OUT / "cache" / "grid_cfg.pt", weights_only=True)["0"], **grids}
    save_tensor(OUT, f"grid_{part}", grids)
    Results(OUT, SORT).save(
        part,
        {
            **_settings_meta(p, sampler, seed),
            "model_branch": "null class" if unconditional else "conditional",
            "guidance": "D + s sigma^2 grad log p(y | x, sigma) (ADM eq. 14, eps form)",
            "rows": rows,
        },
    )


def run_adm_sampler(pipe: Pipeline, score: Scorer, p: dict, sampler: str, seed: int) -> None:
    """The conditional ADM sweep's ends again with a first-order sampler (Euler = DDIM, ADM's own
    setting for eq. 14), n = uncond_n, also scoring the guide's own accuracy on the samples: is a
    failure the classifier's or the high-order sampler's?"""
    from difflab.methods.adm import classifier_log_prob
    from difflab.nn.classifier import load_classifier

    folder = _classifier_folder()
    guide = classifier_log_prob(load_classifier(folder), pipe.denoiser)
    q = {**p, "n": p["uncond_n"]}
    labels = torch.arange(q["n"]) % pipe.num_classes

    def score_with_guide(x, y):
        sigma = torch.full((len(x),), pipe.denoiser.schedule.sigma_min, dtype=torch.float64)
        lp = torch.cat(
            [guide(x[a : a + 250], sigma[a : a + 250], class_labels=y[a : a + 250]) for a in range(0, len(x), 250)]
        )
        # log p(y) > log 1/2 means y is the guide's top class for sure; report the mean log p too
        return {**score(x, y), "guide_log_p": lp.mean().item()}

    rows = {}
    for smp in (sampler, p["diag_sampler"]):
        settings = {key(s): ({"classifier": folder, "classifier_scale": s} if s else {}) for s in p["diag_scales"]}
        log(f"adm_sampler: {smp}, scales {list(p['diag_scales'])}, n {q['n']}, {q['steps']} steps")
        rows[smp], _ = sweep(
            pipe,
            settings,
            labels,
            steps=q["steps"],
            seed=seed,
            score=score_with_guide,
            sampler=smp,
            keep=1,
            batch_size=q["batch_size"],
        )
    Results(OUT, SORT).save("adm_sampler", {**_settings_meta(q, sampler, seed), "samplers": rows})


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def figure_grid(part: str, title: str, row_label: str) -> Path | None:
    """One row per sweep value, the same initial noise in every column (labels 0..9, 0..9)."""
    path = OUT / "cache" / f"grid_{part}.pt"
    if not path.exists():
        return None
    grids = torch.load(path, weights_only=True)
    rows = []
    for name, x in grids.items():
        x = (x.clamp(-1, 1) + 1) / 2  # (k, 1, H, W) in [0, 1]
        k, _, h, w = x.shape
        pad = torch.ones(k, 1, h, 2)
        strip = torch.cat([torch.cat([x, pad], 3)[i, 0] for i in range(k)], 1)  # (H, k (W + 2))
        rows.append((name, strip))
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.5 * rows[0][1].shape[1] / 34 + 0.8, 0.62 * len(rows) + 0.5))
    axes = [axes] if len(rows) == 1 else axes
    for ax, (name, strip) in zip(axes, rows):
        ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{row_label} = {name}", rotation=0, ha="right", va="center", fontsize=8)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    (OUT / "figures").mkdir(parents=True, exist_ok=True)
    out = OUT / "figures" / f"{part}_grid.png"
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def figure_curves(res: dict) -> Path | None:
    """FD, precision, recall, class accuracy, IS analogue against w (CFG) and scale (ADM)."""
    panels = [
        ("fd", "FD-FMNIST (lower is better)"),
        ("precision", "precision"),
        ("recall", "recall"),
        ("class_accuracy", "class accuracy"),
        ("inception_score", "IS analogue"),
    ]
    u = res.get("adm_uncond", {}).get("n")
    lines = [
        ("cfg", 0, "CFG, conditional model", "C0"),
        ("adm", 1, "ADM, conditional model", "C1"),
        ("adm_uncond", 1, "ADM, null-class model" + (f" (n = {u})" if u != res.get("cfg", {}).get("n") else ""), "C2"),
    ]
    if not any(part in res for part, *_ in lines):
        return None
    fig, axes = plt.subplots(2, len(panels), figsize=(3.1 * len(panels), 5.6))
    for j, (m, label) in enumerate(panels):
        for part, r, name, color in lines:
            rows = res.get(part, {}).get("rows")
            if not rows:
                continue
            xs = sorted(rows, key=float)
            axes[r, j].plot([float(x) for x in xs], [rows[x][m] for x in xs], "o-", color=color, label=name)
        for r in range(2):
            real = real_for(res, res.get("cfg", res.get("adm", {})).get("n"))
            if real:
                mean, sd = real["mean"][m], real["sd"][m]
                axes[r, j].axhline(mean, color="k", ls="--", lw=1, label="test images")
                axes[r, j].axhspan(mean - sd, mean + sd, color="k", alpha=0.08)
            axes[r, j].set_title(label, fontsize=9)
            axes[r, j].set_xlabel("w (guidance_scale = 1 + w)" if r == 0 else "classifier scale", fontsize=8)
            axes[r, j].tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="best")
    axes[1, 0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    (OUT / "figures").mkdir(parents=True, exist_ok=True)
    out = OUT / "figures" / "curves.png"
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def real_for(res: dict, n: int | None) -> dict | None:
    """The test-image row for sets of n (None if that n was not measured)."""
    return res.get("real", {}).get(str(n)) if n else None


def _row_values(rows: dict, metric: str) -> tuple[list[str], list[float]]:
    xs = sorted(rows, key=float)
    return xs, [rows[x][metric] for x in xs]


def _series(xs: list[str], vals: list[float], digits: int = 3) -> str:
    return ", ".join(f"{x}: {v:.{digits}f}" for x, v in zip(xs, vals))


def _turn(xs: list[str], vals: list[float], direction: int, noise: float, what: str) -> str:
    """' (peaks at w = 0.5, then ...)' when the extreme in `direction` is inside the range."""
    best = max(range(len(vals)), key=lambda i: direction * vals[i])
    if 0 < best < len(vals) - 1 and direction * (vals[best] - vals[-1]) > noise:
        word = "peaks" if direction > 0 else "bottoms out"
        return (
            f"; it {word} at {what} = {xs[best]} ({vals[best]:.3f}) and comes back to {vals[-1]:.3f} at "
            f"{what} = {xs[-1]}"
        )
    return ""


def claims(res: dict) -> list[str]:
    """The issue's claims, each with its measured numbers and verdict (from results.json)."""
    L = ["## Claims, measured\n"]
    real = real_for(res, res.get("cfg", {}).get("n"))
    fd_noise = real["sd"]["fd"] if real and real["sets"] > 1 else None
    c = res.get("cfg")
    if c:
        rows, n = c["rows"], c["n"]
        xs, fd = _row_values(rows, "fd")
        best = xs[fd.index(min(fd))]
        small = 0 < float(best) <= 1
        noise_txt = f" (FD of real test sets of the same size varies by sd {fd_noise:.2f})" if fd_noise else ""
        L.append(
            f"- **CFG: the best FD is at a small w.** FD-FMNIST by w: {_series(xs, fd, 2)}{noise_txt}. Best at "
            f"w = {best}: "
            + (
                "holds."
                if small
                else "does not hold ("
                + ("unguided sampling is best)." if float(best) == 0 else "the best w is not small).")
            )
        )
        for metric, direction, label in (
            ("precision", 1, "precision rises"),
            ("class_accuracy", 1, "class accuracy rises"),
            ("recall", -1, "recall falls"),
        ):
            xs, v = _row_values(rows, metric)
            noise = 2 * math.sqrt(2) * max(prop_se(x, n) for x in v)
            ok, how = trend(v, direction, noise)
            L.append(
                f"- **CFG: {label} with w.** {metric.replace('_', ' ')} by w: {_series(xs, v)}; {how}"
                f"{_turn(xs, v, direction, noise, 'w')} (noise = 2 se of a difference at n = {n}: {noise:.3f})."
            )
    k = res.get("classifier")
    if k:
        a = k["accuracy_by_sigma"]
        L.append(
            f"- **The noise-aware classifier.** `{k['command']}` ({k['info']['steps']} steps, "
            f"{k['train_cpu_seconds'] / 60:.1f} CPU-min): test accuracy {a[key(CLF_SIGMAS[0])]:.3f} on clean "
            f"images (sigma {CLF_SIGMAS[0]:g}), {a['0.5']:.3f} at sigma 0.5, {a['1']:.3f} at 1, "
            f"{a['5']:.3f} at 5, "
            f"{a['80']:.3f} at 80 (chance 0.1) on {k['eval_n']} class-balanced test images (section 2)."
        )
    for part, what in (("adm", "conditional model"), ("adm_uncond", "null-class (unconditional) model")):
        r = res.get(part)
        if not r:
            continue
        rows, n = r["rows"], r["n"]
        verdicts = []
        for metric, direction, label in (
            ("class_accuracy", 1, "class accuracy rises"),
            ("precision", 1, "precision rises"),
            ("recall", -1, "recall falls"),
        ):
            xs, v = _row_values(rows, metric)
            noise = 2 * math.sqrt(2) * max(prop_se(x, n) for x in v)
            ok, how = trend(v, direction, noise)
            verdicts.append(f"{label}: {_series(xs, v)} -- {how}{_turn(xs, v, direction, noise, 'scale')}")
        xs, fd = _row_values(rows, "fd")
        L.append(
            f"- **ADM on the {what} (n = {n}): guidance trades recall for fidelity.** By classifier scale: "
            + "; ".join(verdicts)
            + f". (FD: {_series(xs, fd, 2)}.)"
        )
    L.append("")
    return L


def table(rows: dict, first: str, real: dict | None, extra: Callable[[str], str] | None = None) -> list[str]:
    head = f"| {first} | FD-FMNIST | precision | recall | class accuracy | IS analogue | sampling CPU-s |"
    L = [head, "|---|---|---|---|---|---|---|"]
    for x in sorted(rows, key=float):
        r = rows[x]
        label = extra(x) if extra else x
        L.append(
            f"| {label} | {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.3f} | "
            f"{r['inception_score']:.2f} | {r['sample_cpu_seconds']:.0f} |"
        )
    if real:
        m, s = real["mean"], real["sd"]
        L.append(
            f"| test images ({real['sets']} sets) | {m['fd']:.2f} ± {s['fd']:.2f} | {m['precision']:.3f} ± "
            f"{s['precision']:.3f} | {m['recall']:.3f} ± {s['recall']:.3f} | {m['class_accuracy']:.3f} ± "
            f"{s['class_accuracy']:.3f} | {m['inception_score']:.2f} ± {s['inception_score']:.2f} | - |"
        )
    return L


def notes(res: dict) -> list[str]:
    """Observations beyond the claims (each quotes its numbers from results.json)."""
    L = ["## 5. Notes\n"]
    c, a, u, k, d = (res.get(p) for p in ("cfg", "adm", "adm_uncond", "classifier", "adm_sampler"))
    real = real_for(res, c and c["n"])
    if c and real:
        rows = c["rows"]
        xs, fd = _row_values(rows, "fd")
        best = xs[fd.index(min(fd))]
        r0, rb, rh = rows["0"], rows[best], rows[xs[-1]]
        m = real["mean"]
        L.append(
            f"- **CFG behaves as in the paper, and overshoots the data on 'classifiability'.** FD falls from "
            f"{r0['fd']:.2f} (w = 0) to {rb['fd']:.2f} at w = {best} (real test sets of {c['n']}: "
            f"{m['fd']:.2f} ± {real['sd']['fd']:.2f}, the floor at this n) and rises to {rh['fd']:.2f} at w = "
            f"{xs[-1]}. Class accuracy passes that of real test images ({m['class_accuracy']:.3f}) already at "
            f"w = {next(x for x in xs if rows[x]['class_accuracy'] > m['class_accuracy'])} and reaches "
            f"{rh['class_accuracy']:.3f}; the IS analogue goes {r0['inception_score']:.2f} -> "
            f"{rh['inception_score']:.2f} (real {m['inception_score']:.2f}): guided samples are more "
            "prototypical than the data. Precision is the one that does not follow: it gains "
            f"{rb['precision'] - r0['precision']:+.3f} by w = {best} and loses it again at w = {xs[-1]} "
            f"({rh['precision']:.3f}). In the grid the garments at w = {xs[-1]} are flatter and higher in "
            "contrast than the data; the precision drop says some leave the data's feature manifold while "
            "the classifier still names their class."
        )
    if a and k:
        xs, acc = _row_values(a["rows"], "class_accuracy")
        _, fd = _row_values(a["rows"], "fd")
        ka = k["accuracy_by_sigma"]
        best = max(range(len(acc)), key=acc.__getitem__)
        _, prec = _row_values(a["rows"], "precision")
        after = (
            f"; beyond it FD and precision turn (scale {xs[-1]}: class accuracy {acc[-1]:.3f}, FD "
            f"{fd[-1]:.2f}, precision {prec[-1]:.3f} against {prec[best]:.3f} at the peak)"
            if best < len(xs) - 1 and acc[-1] < acc[best]
            else ""
        )
        L.append(
            f"- **Classifier guidance, guide trained {k['info']['steps']} steps "
            f"({k['train_cpu_seconds'] / 60:.1f} CPU-min).** Class accuracy by scale: "
            + ", ".join(f"{x}: {v:.3f}" for x, v in zip(xs, acc))
            + "; FD: "
            + ", ".join(f"{x}: {v:.2f}" for x, v in zip(xs, fd))
            + f". Class accuracy peaks at scale {xs[best]} ({acc[best]:.3f}){after}. The guide is "
            f"{ka[key(CLF_SIGMAS[0])]:.3f} accurate on clean images, {ka['5']:.3f} at sigma 5 and "
            f"{ka['20']:.3f} at sigma 20 (chance 0.1). The shift guidance adds, s sigma^2 grad log p, is "
            "largest at large sigma, where the guide is weakest, so large scales push the coarse layout "
            "with an unreliable gradient. (The previous guide, 300 steps, was 0.775 accurate on clean "
            "images and 0.360 at sigma 5; with it, class accuracy rose only at scale 1, from 0.877 to "
            "0.904, and fell from scale 2 on.)"
        )
    if d:
        sm = d["samplers"]
        parts = []
        for smp, rows in sm.items():
            xs = sorted(rows, key=float)
            r0, r1 = rows[xs[0]], rows[xs[-1]]
            parts.append(
                f"{smp}: class accuracy {r0['class_accuracy']:.3f} -> {r1['class_accuracy']:.3f}, guide log p "
                f"{r0['guide_log_p']:.2f} -> {r1['guide_log_p']:.2f}"
            )
        rises = [
            rows[max(rows, key=float)]["class_accuracy"] > rows[min(rows, key=float)]["class_accuracy"]
            and rows[max(rows, key=float)]["guide_log_p"] > rows[min(rows, key=float)]["guide_log_p"]
            for rows in sm.values()
        ]
        L.append(
            f"- **The sampler is not what decides it.** Scale {xs[0]} -> {xs[-1]} at n = {d['n']}: "
            + "; ".join(parts)
            + ". "
            + (
                "With both the first-order Euler (DDIM, the sampler ADM's eq. 14 was written for) and the "
                "default high-order sampler, guidance raises class accuracy and the guide's own log p of the "
                "requested label in the final samples."
                if all(rises)
                else "Guidance does not raise both class accuracy and the guide's own log p of the requested label "
                "with every sampler: it changes the coarse layout without making the outcome more "
                "recognisable, even to the guide."
            )
            + " (`tests/papers/` runs the same machinery on a tiny model with a guide whose task "
            "(brightness) survives much more noise, and there the guide's confidence rises with the scale.) "
            "ADM trained its classifiers for hundreds of thousands of steps; this one had "
            f"{k['info']['steps'] if k else '?'}."
        )
    if u:
        xs, acc = _row_values(u["rows"], "class_accuracy")
        _, prec = _row_values(u["rows"], "precision")
        _, fd = _row_values(u["rows"], "fd")
        ru = real_for(res, u["n"])
        L.append(
            f"- **On the null-class model guidance does steer the class, at a price.** Class accuracy "
            f"{_series(xs, acc)} (chance 0.1) while precision goes {prec[0]:.3f} -> {prec[-1]:.3f} and FD "
            f"{fd[0]:.2f} -> {fd[-1]:.2f}. The unguided null-class branch is itself far worse than the "
            f"conditional model (FD {fd[0]:.2f} at n = {u['n']} against "
            + (f"{ru['mean']['fd']:.2f} for real sets of that size" if ru else "?")
            + "): it saw labels dropped in only 10% of training, which is also why CFG, extrapolating away "
            "from it, helps."
        )
    if a and c and "reused" not in a["rows"]["0"]:
        same = all(abs(a["rows"]["0"][m] - c["rows"]["0"][m]) < 1e-9 for m in METRICS)
        L.append(
            f"- **Batch size does not change the samples' metrics.** The unguided conditional model was sampled "
            f"twice with the same seed, in batches of {c.get('batch_size', 256)} (CFG, w = 0) and "
            f"{a.get('batch_size')} (ADM, scale 0): FD {c['rows']['0']['fd']:.4f} and {a['rows']['0']['fd']:.4f}, "
            f"class accuracy {c['rows']['0']['class_accuracy']:.3f} and {a['rows']['0']['class_accuracy']:.3f}"
            + (" (identical)." if same else ".")
        )
    runs = res.get("runs", {})
    if c and a and "cfg" in runs:
        w_hi = sorted(c["rows"], key=float)[-1]
        s_hi = sorted(a["rows"], key=float)[-1]
        L.append(
            f"- **Cost, and a CPU pitfall.** On one thread, {c['n']} samples at {c['steps']} steps: "
            f"{a['rows']['0']['sample_cpu_seconds']:.0f} CPU-s unguided, "
            f"{a['rows'][s_hi]['sample_cpu_seconds']:.0f} with classifier guidance (one network call plus the "
            f"guide's forward and backward per step), and with CFG (two calls per step) "
            f"{c['rows'][w_hi]['sample_cpu_seconds']:.0f}. That CFG figure was measured in batches of "
            f"{c.get('batch_size', 256)} (`Pipeline`'s default), where about half the CPU time was system "
            "time (page faults on the large activation buffers, which a batch of 16-32 avoids; "
            f"{c['rows']['0']['sample_cpu_seconds']:.0f} CPU-s for the same unguided samples as above); the "
            "later parts sample in batches of 32 (`--batch-size`) and spend almost none there."
        )
    L.append("")
    return L


def write_report() -> None:
    res = Results(OUT, SORT).load()
    if not res:
        raise FileNotFoundError(f"no results in {OUT / 'results.json'}: run the parts first")
    figs = {
        p: figure_grid(p, t, lab)
        for p, t, lab in (
            ("cfg", "Classifier-free guidance: one row per w (guidance_scale 1 + w); labels 0..9, 0..9", "w"),
            ("adm", "Classifier guidance on the conditional model: one row per classifier scale", "scale"),
            ("adm_uncond", "Classifier guidance on the null-class model: one row per classifier scale", "scale"),
        )
    }
    curves = figure_curves(res)
    meta = next((res[p] for p in ("cfg", "adm", "adm_uncond") if p in res), {})
    L = [
        "# Guidance on Fashion-MNIST: classifier-free (Ho & Salimans 2022) and classifier (ADM, Dhariwal & "
        "Nichol 2021)\n",
        f"Produced by `python papers/guidance/run.py` (all numbers below come from `results.json`, written by that "
        f"run; `--report` rebuilds this page). Model: the zoo's `{MODEL}` (class-conditional UNet trained with label "
        f"dropout 0.1). Every setting: n = {meta.get('n')} class-balanced samples (label i % 10; the optional "
        "null-class sweep of section 3 uses fewer), "
        f"{meta.get('steps')} steps of `{meta.get('sampler')}` (difflab's default sampler, one network call per "
        f"step), seed {meta.get('seed')}, so sample i starts from the same noise in every setting. Metrics "
        "(`difflab.metrics.score_samples`): FD-FMNIST (Frechet distance in the 128-d features of difflab's own "
        "Fashion-MNIST classifier, against the 60,000 training images), improved precision and recall (k = 3, "
        "against as many training features as samples), the Inception-Score analogue (same classifier) and class "
        f"accuracy (that classifier's label = the requested label). A proportion at n = {meta.get('n')} has a "
        f"standard error of at most {prop_se(0.5, meta.get('n', 1)):.3f}; 'test images' rows score disjoint sets of "
        "real held-out images of the same size the same way (mean ± sd over sets): the ceiling of each metric and "
        "its sampling noise.\n",
    ]
    L += claims(res)
    c = res.get("cfg")
    if c:
        L.append("## 1. Classifier-free guidance\n")
        L.append(
            "D = D_u + s (D_c - D_u) with s = 1 + w (the paper's (1 + w) eps_c - w eps_u); w = 0 is the plain "
            "conditional model, one network call per step; w > 0 costs two. D_u is the null class.\n"
        )
        L += table(c["rows"], "w (s = 1 + w)", real_for(res, c["n"]), lambda x: f"{x} ({1 + float(x):g})")
        if figs["cfg"]:
            L.append(f"\n![cfg grid](figures/{figs['cfg'].name})\n")
    k = res.get("classifier")
    if k:
        L.append("## 2. The noise-aware classifier\n")
        L.append(
            f"`{k['command']}`: ADM's classifier (the UNet encoder half with attention pooling, "
            f"{k['params'] / 1e6:.2f} M parameters) fed the zoo model's preconditioned inputs (c_in x, c_noise), "
            f"trained {k['info']['steps']} steps of batch {k['info']['batch_size']} (half the batch at "
            f"EDM-training noise levels, half log-uniform over the schedule) in {k['train_seconds']:.0f} s wall "
            f"/ {k['train_cpu_seconds']:.0f} CPU-s; final training loss {k['info']['final_loss']:.3f}. "
            "Accuracy on "
            f"{k['eval_n']} class-balanced test images noised to each sigma (sigma {CLF_SIGMAS[0]:g} = the "
            "schedule's sigma_min, i.e. clean):\n"
        )
        sig = sorted(k["accuracy_by_sigma"], key=float)
        L.append("| sigma | " + " | ".join(sig) + " |")
        L.append("|---|" + "---|" * len(sig))
        L.append("| accuracy | " + " | ".join(f"{k['accuracy_by_sigma'][s]:.3f}" for s in sig) + " |")
        cli = {kk: v for kk, v in k["info"].items() if kk.startswith("test_accuracy")}
        if cli:
            L.append(
                "\n(`difflab train-classifier`'s own check on 512 test images: "
                + ", ".join(f"{kk[len('test_accuracy_') :].replace('_', ' ')}: {v:.3f}" for kk, v in cli.items())
                + ".)\n"
            )
    for part, title, fig in (
        ("adm", "## 3. Classifier guidance on the conditional model\n", "adm"),
        ("adm_uncond", "### Classifier guidance on the null-class (unconditional) model\n", "adm_uncond"),
    ):
        r = res.get(part)
        if not r:
            continue
        L.append(title)
        if part == "adm":
            L.append(
                "D + s sigma^2 grad_x log p(y | x, sigma) (ADM's eps-form guidance, eq. 14, in VE coordinates; "
                "`Pipeline(..., classifier=, classifier_scale=s)`), the guide being the classifier of section 2. "
                "Scale 0 is the unguided model. Class accuracy is measured by difflab's metrics classifier, "
                "a different network from the guide.\n"
            )
        else:
            fewer = r["n"] != res.get("adm", {}).get("n", r["n"])
            L.append(
                (
                    f"n = {r['n']} per setting (fewer than above: this sweep is the optional one, so FD here "
                    "compares with the test-image row of the same n, not with the tables above). "
                    if fewer
                    else ""
                )
                + "The same network "
                "with no label (its null-class branch) as an unconditional Pipeline; the requested labels i % 10 "
                "go to the guide only. At scale 0 no label reaches anything, so class accuracy is the chance "
                "that an unconditional sample falls in class i % 10.\n"
            )
        L += table(
            r["rows"],
            "classifier scale",
            real_for(res, r["n"]),
            lambda x: x + (" (the CFG w = 0 run)" if r["rows"][x].get("reused") else ""),
        )
        if figs[fig]:
            L.append(f"\n![{fig} grid](figures/{figs[fig].name})\n")
    d = res.get("adm_sampler")
    if d:
        L.append("### Is it the sampler? The same guide with a first-order sampler\n")
        L.append(
            f"The conditional sweep's ends again at n = {d['n']}, {d['steps']} steps, with the default sampler "
            "(UniPC, order 2-3) and with Euler (first order: DDIM, the sampler ADM's eq. 14 was written for). "
            "'guide log p' is the guide's own mean log p(y | x) of the requested label on the final samples "
            "(at sigma_min), the quantity guidance ascends.\n"
        )
        L.append("| sampler | scale | FD-FMNIST | precision | recall | class accuracy | guide log p |")
        L.append("|---|---|---|---|---|---|---|")
        for smp, rows in d["samplers"].items():
            for x in sorted(rows, key=float):
                r = rows[x]
                L.append(
                    f"| {smp} | {x} | {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                    f"{r['class_accuracy']:.3f} | {r['guide_log_p']:.3f} |"
                )
        L.append("")
    if curves:
        L.append("## 4. Metric curves\n")
        L.append(
            "Top: CFG against w; bottom: classifier guidance against scale. Dashed: real test images (band: "
            "± one sd over sets of the same size).\n"
        )
        L.append(f"![curves](figures/{curves.name})\n")
    L += notes(res)
    runs = res.get("runs", {})
    if runs:
        c, a = res.get("cfg", {}), res.get("adm", {})
        L.append(
            "Parts may be run separately (`--only`); here CFG sampled in batches of "
            f"{c.get('batch_size', 256)} and the ADM parts in batches of {a.get('batch_size', '?')}. "
            "Run time per part (this machine: "
            + runs.get("machine", "?")
            + "): "
            + ", ".join(
                f"{p} {v['wall_s'] / 60:.1f} min wall / {v['cpu_s'] / 60:.1f} CPU-min"
                for p, v in sorted(
                    runs.items(), key=lambda kv: list(PAPER.parts).index(kv[0]) if kv[0] in PAPER.parts else 99
                )
                if isinstance(v, dict)
            )
            + ".\n"
        )
    atomic_write_text(OUT / "report.md", "\n".join(L) + "\n")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def options(ap) -> None:
    ap.add_argument("--n", type=int, help="samples per setting (default 1000; quick 30)")
    ap.add_argument("--steps", type=int, help="sampler steps (default 10; quick 4)")
    ap.add_argument("--sampler", default=DEFAULT_SAMPLER)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="sampling batch (default 32: on a small CPU, big batches spend as much time in page faults as in compute)",
    )


def configure(run: Run) -> None:
    global OUT
    OUT = run.out
    p = run.settings
    for name in ("n", "steps"):
        if getattr(run.args, name) is not None:
            p[name] = getattr(run.args, name)
    p["uncond_n"] = min(p["uncond_n"], p["n"])
    p["batch_size"] = run.args.batch_size
    if p["uncond_n"] < 10 or p["n"] % 10 or p["uncond_n"] % 10:
        raise ValueError(f"n must be a positive multiple of 10 (class-balanced), got {p['n']}")


def setup(run: Run) -> tuple:
    pipe = load_pipeline(MODEL)
    return pipe, Scorer(pipe)


def _part(fn, *, scored: bool = True, **kw):
    def part(run: Run) -> None:
        pipe, score = run.state
        if scored:
            fn(pipe, score, run.settings, run.args.sampler, run.seed, **kw)
        else:
            fn(pipe, run.settings, run.seed, **kw)

    return part


PAPER = Paper(
    "guidance",
    __doc__,
    title="Classifier-free guidance (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021)",
    claim="Guidance trades diversity for fidelity: class accuracy and precision rise and recall falls with the guidance scale, with the best FD at a small scale.",
    parts={
        "real": _part(run_real),
        "cfg": _part(run_cfg),
        "classifier": _part(run_classifier, scored=False),
        "adm": _part(run_adm),
        "adm_uncond": _part(run_adm, unconditional=True),
        "adm_sampler": _part(run_adm_sampler),
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
