"""Text-to-image on the shapes set: classifier-free guidance over w, prompts for shape-colour pairs
that never appeared in training, and latent against pixel diffusion compute (issue 5: the CFG and
LDM claims).

    python papers/text2image/run.py                               # all parts (~25 CPU-minutes, 1 thread)
    python papers/text2image/run.py --only cfg heldout            # some parts; results merged by part
    python papers/text2image/run.py --quick                       # plumbing check, written to _quick/
    python papers/text2image/run.py --report                      # rebuild report.md from results.json
    python papers/text2image/run.py --run R --latent-run L        # other models (run or zoo folders)

The pixel model (`--run`, default the zoo's shapes-text-unet) and the latent one (`--latent-run`,
the zoo's shapes-text-ldm when present) were trained with the shape-colour pairs of their
config's `data_kwargs.exclude` held out of every training caption. Samples are scored with
difflab's shapes classifier: FD-shapes (its 128-d features, against the training split's cached
statistics), precision/recall (k = 3), and attribute accuracy -- the classifier's reading of each
attribute the prompt names (shape, colour, size, position; background where named) equals the
prompt's. Seeds are fixed, so sample i starts from the same noise in every setting; one thread.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

if __package__ in (None, ""):  # run as a file: python papers/text2image/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from papers.runner import (
    load_pipeline,
    SKIPPED,
    Paper,
    Results,
    Run,
    atomic_write_text,
    key,
    log,
    main,  # noqa: E402
    prop_se,
    save_figure,
    save_tensor,
    sign_test,
    trend,
)

from difflab import zoo  # noqa: E402
from difflab.core.sampling import DEFAULT_SAMPLER  # noqa: E402
from difflab.data import SHAPES_TEST_START  # noqa: E402
from difflab.data.shapes import ATTRIBUTES, caption_for, parse_caption, sample_attributes  # noqa: E402
from difflab.data.shapes import render_batch  # noqa: E402
from difflab.metrics import feature_extractor, reference_stats, score_samples  # noqa: E402
from difflab.metrics.classifiers import load_classifier, prepare_images  # noqa: E402
from difflab.metrics.evaluate import _data_kwargs, _run_data  # noqa: E402
from difflab.pipeline import Pipeline  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE
SORT = True  # results.json keys sorted
FULL = {
    "n": 500,
    "steps": 10,
    "w": (0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
    "heldout_n": 250,
    "heldout_w": (0.0, 2.0),
    "ldm_w": 2.0,
    "real_sets": 4,
    "keep": 12,
}
QUICK = {
    "n": 20,
    "steps": 4,
    "w": (0.0, 2.0),
    "heldout_n": 10,
    "heldout_w": (0.0, 2.0),
    "ldm_w": 2.0,
    "real_sets": 2,
    "keep": 6,
}
HEADS = ("shape", "color", "size", "position", "background")
MODELS = {"": "pixel", "_latent": "latent"}  # part suffix -> which model (--run, --latent-run)


def model_folder(name: str) -> Path:
    """A zoo name (checkpoints/zoo/NAME) or a run folder."""
    return zoo.ZOO_DIR / name if (zoo.ZOO_DIR / name).is_dir() else Path(name)


def open_model(name: str) -> Pipeline:
    return load_pipeline(model_folder(name))


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


class Scorer:
    """FD-shapes and precision/recall against the run's training split, and attribute accuracy of
    the prompts' attributes by the shapes classifier."""

    def __init__(self, pipe: Pipeline):
        self.config = pipe.config
        self.ext = feature_extractor("shapes")
        self.ref = reference_stats(
            self.ext,
            "shapes",
            "train",
            images=lambda: _run_data(self.config, "train").images,
            data_kwargs=_data_kwargs(self.config),
            log=log,
        )
        self.clf = load_classifier("shapes")

    @torch.no_grad()
    def attributes(self, x: torch.Tensor, named: list[dict[str, int]]) -> dict:
        """Per head: fraction right among prompts that name it; 'all': every named attribute right;
        'shape+color': both right (the pair a held-out prompt recombines)."""
        preds = {h: [] for h in HEADS}
        for a in range(0, len(x), 256):
            logits = self.clf(prepare_images(x[a : a + 256], self.clf.config.in_channels, self.clf.config.image_size))
            for h in HEADS:
                preds[h].append(logits[h].argmax(1))
        preds = {h: torch.cat(v).tolist() for h, v in preds.items()}
        hits = {h: [] for h in HEADS}
        every, pair = [], []
        for i, want in enumerate(named):
            ok = [preds[h][i] == want[h] for h in HEADS if h in want]
            for h in HEADS:
                if h in want:
                    hits[h].append(preds[h][i] == want[h])
            every.append(all(ok))
            pair.append(preds["shape"][i] == want["shape"] and preds["color"][i] == want["color"])
        self.last_every = every  # per sample: every named attribute right (for paired tests)
        out = {f"acc_{h}": float(np.mean(v)) for h, v in hits.items() if v}
        out["acc_all"], out["acc_shape_color"] = float(np.mean(every)), float(np.mean(pair))
        return out

    def __call__(self, x: torch.Tensor, prompts: list[str], fd: bool = True) -> dict:
        named = [parse_caption(p) for p in prompts]
        out = self.attributes(x, named)
        if fd:
            q = score_samples(x, self.ext, self.ref, "shapes")
            out.update(fd=q["fd"], precision=q["precision"], recall=q["recall"])
        return out


def generate(pipe: Pipeline, prompts: list[str], w: float, p: dict, seed: int) -> tuple[torch.Tensor, float]:
    c0 = time.process_time()
    x = pipe(
        len(prompts),
        prompt=prompts,
        guidance_scale=1.0 + w,
        steps=p["steps"],
        seed=seed,
        sampler=p["sampler"],
        batch_size=p["batch_size"],
    )
    return x, time.process_time() - c0


def fmt(row: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


def test_prompts(pipe: Pipeline, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n held-out test images and captions (the run's data kwargs: seen pairs only)."""
    test = _run_data(pipe.config, "test")
    if len(test.captions) < n:
        raise ValueError(f"the test split has {len(test.captions)} captions, fewer than n = {n}")
    return test.images[:n], list(test.captions[:n])


def run_real(pipe, score: Scorer, p: dict, seed: int) -> dict:
    """Disjoint sets of n real test images scored like samples: the ceiling and the noise."""
    test = _run_data(pipe.config, "test")
    n, rows = p["n"], []
    for s in range(min(p["real_sets"], len(test.captions) // n)):
        x, caps = test.images[s * n : (s + 1) * n], list(test.captions[s * n : (s + 1) * n])
        rows.append(score(x, caps))
        log(f"  real set {s}: {fmt(rows[-1])}")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    sd = {k: float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0 for k in rows[0]}
    return {"n": n, "sets": len(rows), "mean": mean, "sd": sd}


def run_cfg(pipe, score: Scorer, p: dict, seed: int, tag: str = "cfg") -> dict:
    _, prompts = test_prompts(pipe, p["n"])
    rows, grid = {}, {}
    for w in p["w"]:
        x, cpu = generate(pipe, prompts, w, p, seed)
        rows[key(w)] = {**score(x, prompts), "sample_cpu_s": round(cpu, 1)}
        grid[key(w)] = x[: p["keep"]]
        log(f"  w = {w:g}: {fmt(rows[key(w)])} ({cpu:.0f} CPU-s)")
    save_tensor(OUT, f"{tag}_grid", {"grid": grid, "prompts": prompts[: p["keep"]]})
    return {
        "n": p["n"],
        "steps": p["steps"],
        "sampler": p["sampler"],
        "seed": seed,
        "rows": rows,
        "prompts": "the first n test captions (held-in shape-colour pairs)",
    }


def run_paired(models: dict[str, Pipeline], score: Scorer, p: dict, seed: int, ws=(0.0, 2.0)) -> dict:
    """Attribute accuracy at w = 0 and w = 2 for the same prompts and noise, sample by sample: the
    paired sign test that the independent-samples noise band of the cfg part is too blunt for."""
    out = {"n": p["n"], "w": list(ws), "models": {}}
    for name, pipe in models.items():
        _, prompts = test_prompts(pipe, p["n"])
        every = []
        for w in ws:
            x, _ = generate(pipe, prompts, w, p, seed)
            score.attributes(x, [parse_caption(q) for q in prompts])
            every.append(list(score.last_every))
        up, down, pv = sign_test(every[0], every[1])
        out["models"][name] = {"acc": [float(np.mean(e)) for e in every], "gained": up, "lost": down, "p": pv}
        log(
            f"  {name}: all-attributes accuracy {np.mean(every[0]):.3f} -> {np.mean(every[1]):.3f}; "
            f"right only at w = {ws[1]:g}: {up}, only at w = {ws[0]:g}: {down}, sign test p = {pv:.2g}"
        )
    return out


def _held_rules(config: dict) -> list[dict[str, int]]:
    rules = config["train"].get("data_kwargs", {}).get("exclude", [])
    return [{k: ATTRIBUTES[k].index(v) if isinstance(v, str) else int(v) for k, v in r.items()} for r in rules]


def heldout_sets(config: dict, n: int, seed: int = 7) -> dict[str, dict[str, np.ndarray]]:
    """Attribute sets for prompts whose shape-colour pair was held out of training, and for seen
    pairs drawn the same way (test indices, so no training image has them)."""
    rules = _held_rules(config)
    if not rules:
        raise ValueError("this model's training data held nothing out (no data_kwargs.exclude)")
    attrs = sample_attributes(40 * n * 6, seed, start=SHAPES_TEST_START)
    held = np.zeros(len(attrs["shape"]), dtype=bool)
    for r in rules:
        held |= np.all([attrs[k] == v for k, v in r.items()], axis=0)
    out = {}
    for name, rows in (("held-out", np.flatnonzero(held)[:n]), ("seen", np.flatnonzero(~held)[:n])):
        if len(rows) < n:
            raise ValueError(f"only {len(rows)} {name} combinations drawn, need {n}")
        out[name] = {k: v[rows] for k, v in attrs.items()}
    return out


def run_heldout(pipe, score: Scorer, p: dict, seed: int, tag: str = "heldout") -> dict:
    sets = heldout_sets(pipe.config, p["heldout_n"])
    res, grid = {"rules": pipe.config["train"]["data_kwargs"]["exclude"], "n": p["heldout_n"], "rows": {}}, {}
    for name, attrs in sets.items():
        prompts = [caption_for({k: int(v[i]) for k, v in attrs.items()}) for i in range(len(attrs["shape"]))]
        real, _ = render_batch(attrs)
        res["rows"][f"{name} / real images"] = score(real, prompts, fd=False)
        for w in p["heldout_w"]:
            x, cpu = generate(pipe, prompts, w, p, seed)
            res["rows"][f"{name} / w = {w:g}"] = {**score(x, prompts, fd=False), "sample_cpu_s": round(cpu, 1)}
            grid[f"{name} w={w:g}"] = (x[: p["keep"]], prompts[: p["keep"]])
            log(f"  {name}, w = {w:g}: {fmt(res['rows'][f'{name} / w = {w:g}'])}")
    save_tensor(OUT, f"{tag}_grid", grid)
    return res


def _count_flops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def compute_profile(pipe: Pipeline, run: str) -> dict:
    """Parameters, GFLOPs of one network call and one decode per sample, and of a training step
    (forward + backward at the run's batch size), and training throughput from the run's log."""
    D = pipe.denoiser
    shape = pipe.sample_shape()
    states, mask = pipe.encode_prompts(["a large red circle on the left"])
    cond = {"context": states, "context_mask": mask}
    x = torch.randn(1, *shape)
    with torch.no_grad():
        nfe = _count_flops(lambda: D(x, torch.tensor([1.0]), **cond))
        dec = 0.0
        if pipe.latent_space is not None:
            dec = _count_flops(lambda: pipe.latent_space.decode(x))
    batch = int(pipe.config["train"]["batch_size"])
    b = 4
    xb = torch.randn(b, *shape)
    cb = {"context": states.expand(b, -1, -1), "context_mask": mask.expand(b, -1)}

    def step():
        D.loss(xb, torch.full((b,), 1.0), **cb).mean().backward()

    was = [t.requires_grad for t in D.parameters()]
    for t in D.parameters():
        t.requires_grad_(True)
    with torch.enable_grad():
        train = _count_flops(step) * batch / b
    for t, r in zip(D.parameters(), was):
        t.requires_grad_(r)
        t.grad = None
    params = sum(t.numel() for t in D.parameters())
    logf = Path(run) / "log.jsonl"
    thr = None
    zoo_json = Path(run) / "zoo.json"
    if logf.exists():
        last = json.loads(logf.read_text().strip().splitlines()[-1])
        thr = {"steps": last["step"], "seconds": last["time"], "clock": last.get("clock", "wall")}
    elif zoo_json.exists():
        t = json.loads(zoo_json.read_text())["train"]
        thr = {"steps": t["steps"], "seconds": t["elapsed_s"], "clock": t.get("clock", "wall")}
    return {
        "params_m": params / 1e6,
        "gflops_nfe": nfe / 1e9,
        "gflops_decode": dec / 1e9,
        "gflops_train_step": train / 1e9,
        "gflops_train_image": train / batch / 1e9,
        "sample_shape": list(shape),
        "batch_size": batch,
        "train": thr,
        "latent": pipe.latent_space is not None,
    }


def run_ldm(pipe, score: Scorer, p: dict, seed: int, runs: dict[str, str]) -> dict:
    _, prompts = test_prompts(pipe, p["n"])
    out = {"w": p["ldm_w"], "n": p["n"], "steps": p["steps"], "models": {}}
    grid = {}
    for name, run in runs.items():
        m = open_model(run)
        prof = compute_profile(m, model_folder(run))
        x, cpu = generate(m, prompts, p["ldm_w"], p, seed)
        prof.update(score(x, prompts), sample_cpu_s_per_image=cpu / len(prompts), run=str(run))
        out["models"][name] = prof
        grid[name] = (x[: p["keep"]], prompts[: p["keep"]])
        log(f"  {name}: {fmt(prof)}")
    save_tensor(OUT, "ldm_grid", grid)
    return out


# --------------------------------------------------------------------------------------------
# Figures and report
# --------------------------------------------------------------------------------------------


def _img(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def figure_rows(rows: dict[str, tuple[torch.Tensor, list[str]]], path: Path, title: str) -> Path | None:
    if not rows:
        return None
    k = max(len(v[0]) for v in rows.values())
    fig, axes = plt.subplots(len(rows), k, figsize=(1.3 * k, 1.45 * len(rows) + 0.6), squeeze=False)
    for r, (name, (x, prompts)) in enumerate(rows.items()):
        for c in range(k):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(x):
                ax.imshow(_img(x[c]), interpolation="nearest")
                if r == 0 or len(rows) <= 2 or name.startswith("held") and c == 0:
                    ax.set_title("\n".join(_wrap(prompts[c])), fontsize=4.5)
        axes[r, 0].text(-0.15, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)
    return path


def _wrap(s: str, width: int = 22) -> list[str]:
    words, lines, cur = s.split(), [], ""
    for wd in words:
        if len(cur) + len(wd) + 1 > width and cur:
            lines.append(cur)
            cur = wd
        else:
            cur = f"{cur} {wd}".strip()
    return lines + [cur]


def figure_curves(cfg: dict, real: dict | None, path: Path) -> Path:
    ws = sorted(cfg["rows"], key=float)
    xs = [float(w) for w in ws]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].plot(xs, [cfg["rows"][w]["fd"] for w in ws], "o-")
    axes[0].set(xlabel="w (s = 1 + w)", ylabel="FD-shapes", title="FD (lower is better)")
    for m in ("precision", "recall"):
        axes[1].plot(xs, [cfg["rows"][w][m] for w in ws], "o-", label=m)
    axes[1].set(xlabel="w", title="precision / recall")
    for h in ("acc_all", "acc_shape", "acc_color", "acc_position", "acc_size"):
        axes[2].plot(xs, [cfg["rows"][w][h] for w in ws], "o-", label=h[4:])
    axes[2].set(xlabel="w", title="attribute accuracy")
    if real:
        axes[0].axhline(real["mean"]["fd"], ls="--", c="gray", label="real test images")
        axes[1].axhline(real["mean"]["recall"], ls="--", c="gray")
        axes[2].axhline(real["mean"]["acc_all"], ls="--", c="gray")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)
    return path


def _series(rows: dict, metric: str, digits: int = 3) -> tuple[list[float], str]:
    ws = sorted(rows, key=float)
    vals = [rows[w][metric] for w in ws]
    return vals, ", ".join(f"{w}: {v:.{digits}f}" for w, v in zip(ws, vals))


def claims(res: dict) -> list[str]:
    L = ["## Claims, measured\n"]
    real = res.get("real")
    for sfx, which in MODELS.items():
        L += _cfg_claims(res.get("cfg" + sfx), real, which)
    for sfx, which in MODELS.items():
        L += _heldout_claims(res.get("heldout" + sfx), which)
    pr = res.get("paired")
    if pr:
        for name, m in pr["models"].items():
            w0, w1 = pr["w"]
            ok = m["gained"] > m["lost"] and m["p"] < 0.05
            L.append(
                f"- **CFG ({name} model): attribute accuracy rises from w = {w0:g} to w = {w1:g}, paired.** The "
                f"same {pr['n']} prompts and noises: every named attribute right {m['acc'][0]:.3f} -> "
                f"{m['acc'][1]:.3f}; right only with guidance {m['gained']}, only without {m['lost']} (sign "
                f"test p = {m['p']:.2g}) -> {'**holds**' if ok else '**does not hold**'}."
            )
    L += _ldm_claims(res.get("ldm"), res.get("cfg"), res.get("cfg_latent"))
    return L + [""]


def _cfg_claims(cfg: dict | None, real: dict | None, which: str) -> list[str]:
    L = []
    if cfg:
        n = cfg["n"]
        rows = cfg["rows"]
        fds, s = _series(rows, "fd", 2)
        ws = sorted(rows, key=float)
        best = ws[int(np.argmin(fds))]
        noise = f" (FD of real test sets of the same size varies by sd {real['sd']['fd']:.2f})" if real else ""
        small = 0 < float(best) <= 2.0
        why = (
            ""
            if small
            else (" (w = 0: guidance never improves FD here)" if float(best) == 0 else " (the best w is not small)")
        )
        L.append(
            f"- **CFG ({which} model): the best FD is at a small w.** FD-shapes by w: {s}{noise}. Best at w = {best}: "
            f"{'holds' if small else 'does not hold'}{why}."
        )
        for metric, direction, what in (
            ("acc_all", 1, "attribute accuracy (every named attribute right) rises"),
            ("acc_shape_color", 1, "shape-and-colour accuracy rises"),
            ("recall", -1, "recall falls"),
            ("precision", 1, "precision rises"),
        ):
            vals, s = _series(rows, metric)
            se2 = 2 * np.sqrt(2) * max(prop_se(v, n) for v in vals)
            _, how = trend(vals, direction, se2)
            low = [rows[w][metric] for w in sorted(rows, key=float) if float(w) <= 2]  # the usual range of w
            _, how_low = trend(low, direction, se2)
            gain = low[-1] - low[0]
            L.append(
                f"- **CFG ({which} model): {what} with w.** {s}; over all w: {how}; over w <= 2: {how_low} "
                f"(w = 0 -> 2: {gain:+.3f}) (noise = 2 se of a difference at n = {n}: {se2:.3f})."
            )
    return L


def _heldout_claims(ho: dict | None, which: str) -> list[str]:
    L = []
    if ho:
        n = ho["n"]
        for w in sorted({k.split("w = ")[1] for k in ho["rows"] if "w = " in k}, key=float):
            h, sn = ho["rows"].get(f"held-out / w = {w}"), ho["rows"].get(f"seen / w = {w}")
            if not (h and sn):
                continue
            gap = sn["acc_shape_color"] - h["acc_shape_color"]
            se = np.sqrt(prop_se(h["acc_shape_color"], n) ** 2 + prop_se(sn["acc_shape_color"], n) ** 2)
            L.append(
                f"- **LDM / text-to-image ({which} model): prompts with held-out shape-colour pairs (w = {w}).** Shape-and-colour "
                f"accuracy {h['acc_shape_color']:.3f} on held-out pairs vs {sn['acc_shape_color']:.3f} on seen "
                f"pairs (gap {gap:+.3f}, se {se:.3f}); every named attribute right: {h['acc_all']:.3f} vs "
                f"{sn['acc_all']:.3f}; shape {h['acc_shape']:.3f} vs {sn['acc_shape']:.3f}, colour "
                f"{h['acc_color']:.3f} vs {sn['acc_color']:.3f}, position {h['acc_position']:.3f} vs "
                f"{sn['acc_position']:.3f}. "
                + (
                    "The model composes unseen pairs about as well as seen ones."
                    if gap < 2 * se
                    else "Composition of unseen pairs falls short of seen pairs."
                )
            )
    return L


def _ldm_claims(ldm: dict | None, cfg_px: dict | None = None, cfg_lt: dict | None = None) -> list[str]:
    """The cost claim; quality is compared at matched guidance: w = 0 of both CFG sweeps when they ran
    (guidance at w = 2 already costs the pixel model FD while the latent one barely moves, so the
    quality at w = 2 alone would favour the latent model for a reason that is not latent diffusion)."""
    L = []
    if ldm and len(ldm["models"]) >= 2 and "pixel" in ldm["models"] and "latent" in ldm["models"]:
        px, lt = ldm["models"]["pixel"], ldm["models"]["latent"]
        w0 = None
        if cfg_px and cfg_lt and "0" in cfg_px.get("rows", {}) and "0" in cfg_lt.get("rows", {}):
            w0 = (cfg_px["rows"]["0"], cfg_lt["rows"]["0"])
            px, lt = (
                {**px, "fd": w0[0]["fd"], "acc_all": w0[0]["acc_all"]},
                {
                    **lt,
                    "fd": w0[1]["fd"],
                    "acc_all": w0[1]["acc_all"],
                },
            )
            at_w2 = (ldm["models"]["pixel"], ldm["models"]["latent"])
        r_nfe = (lt["gflops_nfe"] + lt["gflops_decode"] / ldm["steps"]) / px["gflops_nfe"]
        for m in (px, lt):  # results written before the per-image figure was recorded
            m.setdefault("gflops_train_image", m["gflops_train_step"] / m["batch_size"])
        r_train = lt["gflops_train_image"] / px["gflops_train_image"]
        matched = lt["fd"] <= 1.25 * px["fd"] and lt["acc_all"] >= px["acc_all"] - 0.05  # matched or better
        L.append(
            f"- **LDM: latent diffusion costs less per sample and per training step.** Per sample "
            f"({ldm['steps']} steps + one decode): latent {lt['gflops_nfe'] * ldm['steps'] + lt['gflops_decode']:.3f} "
            f"GFLOPs vs pixel {px['gflops_nfe'] * ldm['steps']:.3f} ({r_nfe:.2f}x); per training image "
            f"{lt['gflops_train_image']:.3f} vs {px['gflops_train_image']:.3f} GFLOPs ({r_train:.2f}x; per step "
            f"at each run's batch: {lt['gflops_train_step']:.2f} at {lt['batch_size']} vs "
            f"{px['gflops_train_step']:.2f} at {px['batch_size']}); sampling CPU "
            f"{lt['sample_cpu_s_per_image'] * 1000:.0f} vs {px['sample_cpu_s_per_image'] * 1000:.0f} ms per image. "
            + (
                f"Quality at matched guidance, w = 0 (the CFG sweeps, n = {cfg_px.get('n', '?')}): FD-shapes "
                f"{lt['fd']:.2f} vs {px['fd']:.2f}, attribute accuracy {lt['acc_all']:.3f} vs {px['acc_all']:.3f} "
                f"(at w = {ldm['w']:g}, where guidance already degrades the pixel model: FD {at_w2[1]['fd']:.1f} vs "
                f"{at_w2[0]['fd']:.1f}) -- "
                if w0
                else f"Quality at w = {ldm['w']:g}: FD-shapes {lt['fd']:.1f} vs {px['fd']:.1f}, attribute accuracy "
                f"{lt['acc_all']:.3f} vs {px['acc_all']:.3f} -- "
            )
            + (
                "matched or better (FD at most 25 % above the pixel model's, accuracy no more than 0.05 below): holds."
                if matched
                else "not matched: the compute saving is real but the latent model's quality is not the pixel "
                "model's, so the claim 'at matched quality' is not shown here."
            )
        )
    return L


def write_report() -> None:
    res = Results(OUT).load()
    fig = OUT / "figures"
    fig.mkdir(exist_ok=True)
    L = [
        "# Text-to-image on shapes: classifier-free guidance (Ho & Salimans 2022), held-out compositions and "
        "latent vs pixel diffusion (Rombach et al. 2022)\n",
        "Produced by `python papers/text2image/run.py` (numbers from `results.json`; `--report` rebuilds this "
        "page). " + __doc__.split("\n\n", 2)[2].strip().replace("\n", " ") + "\n",
    ]
    L += claims(res)
    real = res.get("real")
    for sec, (sfx, which) in enumerate(MODELS.items()):
        cfg = res.get("cfg" + sfx)
        if cfg:
            L += [
                f"## 1{'ab'[sec]}. Classifier-free guidance over w, {which} model (`{cfg.get('run', '-')}`)\n",
                f"n = {cfg['n']} samples per w, prompts = {cfg['prompts']}, {cfg['steps']} steps of `{cfg['sampler']}`, "
                f"seed {cfg['seed']}. D = D_u + s (D_c - D_u) with s = 1 + w (`--guidance-scale s`); D_u is the empty "
                "prompt, the condition caption dropout trained.\n",
                "| w (s = 1 + w) | FD-shapes | precision | recall | all attributes | shape+colour | shape | colour | size | position | sampling CPU-s |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for w in sorted(cfg["rows"], key=float):
                r = cfg["rows"][w]
                L.append(
                    f"| {w} ({1 + float(w):g}) | {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                    f"{r['acc_all']:.3f} | {r['acc_shape_color']:.3f} | {r['acc_shape']:.3f} | {r['acc_color']:.3f} | "
                    f"{r['acc_size']:.3f} | {r['acc_position']:.3f} | {r['sample_cpu_s']:.0f} |"
                )
            if real:
                m, s = real["mean"], real["sd"]
                L.append(
                    f"| test images ({real['sets']} sets of {real['n']}) | {m['fd']:.2f} ± {s['fd']:.2f} | "
                    f"{m['precision']:.3f} | {m['recall']:.3f} | {m['acc_all']:.3f} | {m['acc_shape_color']:.3f} | "
                    f"{m['acc_shape']:.3f} | {m['acc_color']:.3f} | {m['acc_size']:.3f} | {m['acc_position']:.3f} | - |"
                )
            L.append("")
            figure_curves(cfg, real, fig / f"cfg{sfx}_curves.png")
            L.append(f"![cfg curves](figures/cfg{sfx}_curves.png)\n")
            g = OUT / "cache" / f"cfg{sfx}_grid.pt"
            if g.exists():
                d = torch.load(g, weights_only=True)
                figure_rows(
                    {f"w={w}": (x, d["prompts"]) for w, x in d["grid"].items()},
                    fig / f"cfg{sfx}_grid.png",
                    f"{which} model: same prompts and noise, by guidance weight w",
                )
            if (fig / f"cfg{sfx}_grid.png").exists():  # drawn now, or committed by the run that had the cache
                L.append(f"![cfg grid](figures/cfg{sfx}_grid.png)\n")
    for sfx, which in MODELS.items():
        ho = res.get("heldout" + sfx)
        if ho:
            rules = ", ".join(f"{r['color']} {r['shape']}" for r in ho["rules"])
            L += [
                f"## 2. Shape-colour pairs held out of training, {which} model\n",
                f"Training captions never contained these pairs: {rules}. Prompts: n = {ho['n']} test-index "
                "attribute draws whose pair is held out, and n drawn the same way whose pair was seen "
                "(the same template, size, position and background distributions). 'real images' renders each "
                "prompt's exact image: the classifier's own ceiling on that set.\n",
                "| prompts / setting | all attributes | shape+colour | shape | colour | size | position |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, r in ho["rows"].items():
                L.append(
                    f"| {name} | {r['acc_all']:.3f} | {r['acc_shape_color']:.3f} | {r['acc_shape']:.3f} | "
                    f"{r['acc_color']:.3f} | {r['acc_size']:.3f} | {r['acc_position']:.3f} |"
                )
            L.append("")
            g = OUT / "cache" / f"heldout{sfx}_grid.pt"
            if g.exists():
                figure_rows(
                    torch.load(g, weights_only=True),
                    fig / f"heldout{sfx}_grid.png",
                    f"{which} model: held-out and seen shape-colour pairs",
                )
            if (fig / f"heldout{sfx}_grid.png").exists():
                L.append(f"![held-out grid](figures/heldout{sfx}_grid.png)\n")
    ldm = res.get("ldm")
    if ldm:
        L += [
            "## 3. Latent against pixel diffusion\n",
            f"Each model sampled for the same n = {ldm['n']} held-in test prompts at w = {ldm['w']:g}, "
            f"{ldm['steps']} steps. GFLOPs counted by `torch.utils.flop_counter` (one network call at batch 1; "
            "a training step = forward + backward of the loss at the run's batch size; the decoder once per "
            "sample). Training CPU: the run's own log.\n",
            "| model | params (M) | sample shape | GFLOPs / call | GFLOPs decode | GFLOPs / train step (batch) | "
            "GFLOPs / train image | train steps | train seconds (clock) | FD-shapes | all attributes | position | "
            "sampling CPU ms / image |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in ldm["models"].items():
            t = m.get("train") or {}
            L.append(
                f"| {name} (`{m['run']}`) | {m['params_m']:.2f} | {'x'.join(map(str, m['sample_shape']))} | "
                f"{m['gflops_nfe']:.3f} | {m['gflops_decode']:.3f} | {m['gflops_train_step']:.2f} ({m['batch_size']}) | "
                f"{m.get('gflops_train_image', m['gflops_train_step'] / m['batch_size']):.3f} | "
                f"{t.get('steps', '-')} | {t.get('seconds', 0):.0f} ({t.get('clock', '-')}) | {m['fd']:.2f} | "
                f"{m['acc_all']:.3f} | {m['acc_position']:.3f} | {m['sample_cpu_s_per_image'] * 1000:.0f} |"
            )
        L.append("")
        g = OUT / "cache" / "ldm_grid.pt"
        if g.exists():
            figure_rows(torch.load(g, weights_only=True), fig / "ldm_grid.png", "pixel vs latent, same prompts")
        if (fig / "ldm_grid.png").exists():
            L.append("![ldm grid](figures/ldm_grid.png)\n")
    runs = res.get("runs", {})
    if runs:
        L.append(
            "Run times: "
            + ", ".join(f"{k} {v['cpu_s']:.0f} CPU-s" for k, v in runs.items() if isinstance(v, dict))
            + f" ({runs.get('machine', '')}).\n"
        )
    atomic_write_text(OUT / "report.md", "\n".join(L))


def options(ap) -> None:
    ap.add_argument("--run", default="shapes-text-unet", help="pixel text model: zoo name or run folder")
    ap.add_argument("--latent-run", default="shapes-text-ldm", help="latent text model for the ldm part")
    ap.add_argument("--more-latent-runs", nargs="*", help="further latent models compared in the ldm part")
    ap.add_argument("--n", type=int, help="samples per setting (default 500; quick 20)")
    ap.add_argument("--steps", type=int, help="sampler steps (default 10; quick 4)")
    ap.add_argument("--sampler", default=DEFAULT_SAMPLER)
    ap.add_argument("--batch-size", type=int, default=50)


def configure(run: Run) -> None:
    global OUT
    OUT = run.out
    (OUT / "cache").mkdir(parents=True, exist_ok=True)
    p = run.settings
    for name in ("n", "steps"):
        if getattr(run.args, name) is not None:
            p[name] = getattr(run.args, name)
    p.update(sampler=run.args.sampler, batch_size=run.args.batch_size)


def setup(run: Run) -> tuple:
    pipe = open_model(run.args.run)
    return pipe, Scorer(pipe)


def part_real(run: Run):
    pipe, score = run.state
    return run_real(pipe, score, run.settings, run.seed)


def part_pixel(fn):
    def part(run: Run):
        pipe, score = run.state
        return {**fn(pipe, score, run.settings, run.seed), "run": run.args.run}

    return part


def part_latent(fn, tag: str):
    def part(run: Run):
        if not model_folder(run.args.latent_run).is_dir():
            log(f"{tag}: skipped, no latent model {run.args.latent_run!r}")
            return SKIPPED
        lat = open_model(run.args.latent_run)
        return {**fn(lat, run.state[1], run.settings, run.seed, tag=tag), "run": run.args.latent_run}

    return part


def part_paired(run: Run):
    pipe, score = run.state
    models = {"pixel": pipe}
    if model_folder(run.args.latent_run).is_dir():
        models["latent"] = open_model(run.args.latent_run)
    return run_paired(models, score, run.settings, run.seed)


def part_ldm(run: Run):
    if not model_folder(run.args.latent_run).is_dir():
        log(f"ldm: skipped, no latent model {run.args.latent_run!r}")
        return SKIPPED
    pipe, score = run.state
    models = {"pixel": run.args.run, "latent": run.args.latent_run}
    models.update({f"latent {i + 2}": r for i, r in enumerate(run.args.more_latent_runs or [])})
    return run_ldm(pipe, score, run.settings, run.seed, models)


PAPER = Paper(
    "text2image",
    __doc__,
    title="Text-to-image: classifier-free guidance (Ho & Salimans 2022) and latent diffusion (Rombach et al. 2022)",
    claim="Guidance raises prompt fidelity at a small cost in FD, held-out shape-colour pairs compose, and latent diffusion reaches the pixel model's quality for less compute.",
    parts={
        "real": part_real,
        "cfg": part_pixel(run_cfg),
        "heldout": part_pixel(run_heldout),
        "ldm": part_ldm,
        "cfg_latent": part_latent(run_cfg, "cfg_latent"),
        "heldout_latent": part_latent(run_heldout, "heldout_latent"),
        "paired": part_paired,
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
