"""Denoising Diffusion Probabilistic Models (Ho et al. 2020) trained as published, in small: the
paper's objective on Fashion-MNIST, its Table 2 in the paper's form (the simplified objective
L_simple against the true variational bound; bits/dim by the bound, sample quality), and EMA.

Both models are `difflab train --recipe ddpm`: unet-s (dropout 0.1, as DDPM's CIFAR-10 model) on
Fashion-MNIST padded to 32 x 32, unconditional, eps prediction, linear betas 1e-4..0.02 over
T = 1000, t uniform. One is trained on L_simple, the other on the true bound with the fixed variance
Sigma = beta_t (`weighting "vlb"`: beta_t / (2 alpha_t (1 - abar_t)) ||eps - eps_hat||^2, eq. 8 with
eq. 11). The optimisation is scaled to a CPU budget, the same for both: `minutes` CPU-minutes of one
thread, batch 64, lr 1e-3 with 100 warmup steps, EMA 0.999 (the paper: 800k steps at lr 2e-4, EMA
0.9999).

    python papers/ddpm/run.py            # ~140 CPU-minutes (60 training, 50 the 1000-step FD)
    python papers/ddpm/run.py --quick    # plumbing check, written to _quick/
    python papers/ddpm/run.py --report   # rebuild report.md from results.json

Parts:
  train  the two runs into cache/simple and cache/vlb (an existing finished run of the same
         config is reused).
  eval   per model and weights (EMA, and the raw weights of the L_simple run): FD-FMNIST of n samples
         of DDPM's ancestral sampler (Algorithm 2 with Sigma = beta_t and x0 clipped to [-1, 1], as
         the official sampler) on `sample_steps` evenly spaced timesteps of the chain (Improved
         DDPM's respacing; the paper's 1000 steps cost 1000 network calls per image, about
         `1000 / sample_steps` times this part's CPU time), with a bootstrap standard error; and
         the bound's bits/dim on n_bpd test images (`vlb_bits_per_dim`, variance beta_t, the KL sum
         estimated from `bpd_timesteps` strata), with its standard error over images.
  long   the paper's sampler length: FD of the L_simple model (EMA) on all `long_steps` = 1000 steps
         of the chain, from the same noise as `eval`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

if __package__ in (None, ""):  # run as a file: python papers/ddpm/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from papers.runner import (  # noqa: E402
    Paper,
    Results,
    Run,
    atomic_write_text,
    cpu_seconds,
    exceeds,
    fd_with_se,
    image_rows,
    log,
    main,
    pm,
    report_head,
    train_cached,
)

from difflab.core.sampling import sample_ddpm  # noqa: E402
from difflab.metrics import default_extractor, feature_extractor, reference_stats  # noqa: E402
from difflab.metrics.features import extract  # noqa: E402
from difflab.pipeline import Pipeline  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE
FULL = {
    "minutes": 30,
    "steps": None,
    "n": 200,
    "sample_steps": 100,
    "n_bpd": 200,
    "bpd_timesteps": 50,
    "boot": 200,
    "long_steps": 1000,
}
QUICK = {
    "minutes": None,
    "steps": 4,
    "n": 16,
    "sample_steps": 5,
    "n_bpd": 8,
    "bpd_timesteps": 4,
    "boot": 20,
    "long_steps": 10,
}
OBJECTIVES = {"simple": "simple", "vlb": "vlb"}  # run name -> TrainConfig.weighting
LABEL = {
    "simple": "L_simple (eps MSE, unweighted)",
    "vlb": "true variational bound, Sigma = beta_t",
}


def train_config(weighting: str, st: dict, seed: int):
    from difflab.train import recipe_config

    return recipe_config(
        "ddpm",
        data="fashion_mnist",
        model="unet-s",
        model_overrides={"dropout": 0.1},
        conditioning="none",
        weighting=weighting,
        batch_size=64,
        lr=1e-3,
        warmup=100,
        ema_decay=0.999,
        grad_clip=1.0,
        steps=st["steps"],
        minutes=st["minutes"],
        clock="cpu",
        seed=seed,
        save_every=200,
        log_every=25,
    )


def part_train(run: Run) -> dict:
    torch.set_num_threads(1)
    out = {}
    for name, weighting in OBJECTIVES.items():
        c0 = cpu_seconds()
        out[name] = train_cached(train_config(weighting, run.settings, run.seed), run.out / "cache" / name)
        out[name]["this_call_cpu_min"] = round((cpu_seconds() - c0) / 60, 1)
        log(f"{name}: {out[name]}")
    return out


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def fmnist_reference():
    """(extractor, reference statistics) of FD-FMNIST: difflab's Fashion-MNIST classifier features of
    the training split padded to 32 x 32 (cached), as papers/ddim scores too."""
    from difflab.data import load_dataset

    ext = feature_extractor(default_extractor("fashion_mnist"))
    ref = reference_stats(
        ext,
        "fashion_mnist",
        "train",
        images=lambda: load_dataset("fashion_mnist", "train", pad_to=32).images,
        data_kwargs={"pad_to": 32},
        log=log,
    )
    return ext, ref


def _ancestral(D, n: int, steps: int, seed: int) -> torch.Tensor:
    """n samples of DDPM's ancestral sampler (Sigma = beta_t, x0 clipped) on `steps` respaced steps,
    their noise drawn from `seed`."""
    sched = D.schedule
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, 32, 32, generator=g) * sched.sigma_max
    with torch.no_grad():
        return torch.cat(
            [sample_ddpm(D, zb, sched, variance="large", steps=steps, clip_x0=True, noise=g) for zb in z.split(100)]
        ).clamp(-1, 1)


def part_long(run: Run) -> dict:
    """The paper's own sampler length: FD of the L_simple model's EMA weights on all `long_steps`
    steps of the chain, from the same noise as `eval`."""
    torch.set_num_threads(1)
    st = run.settings
    ext, ref = fmnist_reference()
    D = Pipeline.from_pretrained(run.out / "cache" / "simple").denoiser
    c0 = cpu_seconds()
    x = _ancestral(D, st["n"], st["long_steps"], run.seed)
    minutes = (cpu_seconds() - c0) / 60
    fd, se = fd_with_se(extract(ext, x, 256)[0], ref, st["boot"], run.seed)
    log(f"simple_ema at {st['long_steps']} steps: FD {fd:.2f} +- {se:.2f} ({minutes:.1f} CPU-min)")
    torch.save(x[:16], run.cache("long_grid.pt"))
    return {"fd": fd, "fd_se": se, "steps": st["long_steps"], "n": st["n"], "sample_cpu_min": round(minutes, 1)}


def part_eval(run: Run) -> dict:
    from difflab.data import load_dataset
    from difflab.metrics.bpd import vlb_bits_per_dim

    torch.set_num_threads(1)
    st = run.settings
    ext, ref = fmnist_reference()
    test = load_dataset("fashion_mnist", "test", pad_to=32).images[: st["n_bpd"]]
    rows, grids = {}, {}
    for name, weights in (("simple", "ema"), ("simple", "raw"), ("vlb", "ema")):
        pipe = Pipeline.from_pretrained(run.out / "cache" / name, weights=weights)
        D = pipe.denoiser
        c0 = cpu_seconds()
        x = _ancestral(D, st["n"], st["sample_steps"], run.seed)
        sample_min = (cpu_seconds() - c0) / 60
        feats = extract(ext, x, 256)[0]
        fd, fd_se = fd_with_se(feats, ref, st["boot"], run.seed)
        c0 = cpu_seconds()
        with torch.no_grad():
            bpd = vlb_bits_per_dim(
                D, test, variance="large", timesteps=st["bpd_timesteps"], generator=torch.Generator().manual_seed(1)
            )
        key = f"{name}_{weights}"
        rows[key] = {
            "fd": fd,
            "fd_se": fd_se,
            "bpd": float(bpd.mean()),
            "bpd_se": float(bpd.std() / len(bpd) ** 0.5),
            "sample_cpu_min": round(sample_min, 2),
            "bpd_cpu_min": round((cpu_seconds() - c0) / 60, 2),
        }
        grids[key] = x[:16]
        log(f"{key}: {rows[key]}")
    torch.save(grids, run.out / "cache" / "grids.pt")
    return {"rows": rows, "settings": {k: st[k] for k in ("n", "sample_steps", "n_bpd", "bpd_timesteps", "boot")}}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _pm(v: float, se: float, d: int = 2) -> str:
    return pm(v, se, d)


def _below(a: float, sa: float, b: float, sb: float) -> bool:
    """a is below b by more than 2 standard errors of the difference."""
    return exceeds(b, sb, a, sa)


def write_report(run: Run) -> None:
    res = Results(OUT).load()
    L = report_head("DDPM trained as published, in small (Ho et al. 2020)", "ddpm", __doc__)
    tr, ev = res.get("train"), res.get("eval")
    if tr:
        L.append(
            "Training: "
            + "; ".join(f"{LABEL[k]}: {v['steps']} steps in {v['cpu_min']} CPU-minutes" for k, v in tr.items())
            + ".\n"
        )
    if ev:
        rows, st = ev["rows"], ev["settings"]
        s, r, v = rows["simple_ema"], rows["simple_raw"], rows["vlb_ema"]
        L.append(
            f"FD-FMNIST of n = {st['n']} samples ({st['sample_steps']} respaced ancestral steps), bits/dim on "
            f"{st['n_bpd']} test images ({st['bpd_timesteps']} strata of the KL sum); +- one standard error "
            f"(FD: {st['boot']} bootstrap resamples of the samples; bits/dim: over images).\n"
        )
        L.append("## Claims, measured\n")
        fd_ok = _below(s["fd"], s["fd_se"], v["fd"], v["fd_se"])
        bpd_ok = _below(v["bpd"], v["bpd_se"], s["bpd"], s["bpd_se"])
        verdict = (
            "holds"
            if fd_ok and bpd_ok
            else "holds partly: " + ("the sample-quality half only" if fd_ok else "the bits/dim half only")
            if fd_ok or bpd_ok
            else "does not hold"
        )
        L.append(
            "- **L_simple gives better samples than training on the true variational bound, which gives better "
            f"bits/dim (Table 2).** FD: L_simple {_pm(s['fd'], s['fd_se'])}, true bound {_pm(v['fd'], v['fd_se'])}; "
            f"bits/dim: L_simple {_pm(s['bpd'], s['bpd_se'], 3)}, true bound {_pm(v['bpd'], v['bpd_se'], 3)}. "
            f"{verdict.capitalize()} (each half decided by a gap of 2 standard errors).\n"
        )
        ema_ok = _below(s["fd"], s["fd_se"], r["fd"], r["fd_se"])
        L.append(
            "- **The EMA of the weights samples better than the raw weights.** FD: EMA (decay 0.999) "
            f"{_pm(s['fd'], s['fd_se'])}, raw {_pm(r['fd'], r['fd_se'])}: "
            + ("holds" if ema_ok else "does not hold at 2 standard errors")
            + f"; bits/dim {_pm(s['bpd'], s['bpd_se'], 3)} against {_pm(r['bpd'], r['bpd_se'], 3)}.\n"
        )
        L += [
            "## Table 2, in small\n",
            "| objective | weights | NLL test (bits/dim, bound) | FD-FMNIST | sampling CPU-min |",
            "|---|---|---|---|---|",
        ]
        for key, row in rows.items():
            name, weights = key.rsplit("_", 1)
            L.append(
                f"| {LABEL[name]} | {weights} | <= {_pm(row['bpd'], row['bpd_se'], 3)} | {_pm(row['fd'], row['fd_se'])} | "
                f"{row['sample_cpu_min']} |"
            )
        lg = res.get("long")
        if lg:
            L.append(
                f"\nThe paper's own sampler length, all {lg['steps']} steps of the chain (part `long`, the L_simple "
                f"model's EMA weights, the same n = {lg['n']} noises): FD {_pm(lg['fd'], lg['fd_se'])} against "
                f"{_pm(s['fd'], s['fd_se'])} at {st['sample_steps']} respaced steps, in {lg['sample_cpu_min']} "
                f"CPU-minutes against {s['sample_cpu_min']}.\n"
            )
        else:
            L.append(
                f"\nThe paper's 1000-step FD is part `long` (`python papers/ddpm/run.py --only long`): at "
                f"{st['sample_steps']} steps sampling took {s['sample_cpu_min']} CPU-minutes per model, so 1000 "
                f"steps take about {s['sample_cpu_min'] * 1000 / st['sample_steps']:.0f}.\n"
            )
        L.append(_figure())
    atomic_write_text(OUT / "report.md", "\n".join(L))


def _figure() -> str:
    f = OUT / "cache" / "grids.pt"
    if f.exists():
        grids = torch.load(f, weights_only=True)
        image_rows(
            {k.replace("_", " "): x for k, x in grids.items()},
            OUT / "figures" / "samples.png",
            per_row=16,
            label_width=0.08,
        )
    if not (OUT / "figures" / "samples.png").exists():
        return ""
    return "\n![samples per objective and weights](figures/samples.png)\n"


def configure(run: Run) -> None:
    global OUT
    OUT = run.out


PAPER = Paper(
    "ddpm",
    __doc__,
    title="DDPM (Ho et al. 2020)",
    claim="Trained on the simplified objective L_simple, a diffusion model samples better than one trained on the true variational bound, which gets the better bits/dim; the EMA of the weights samples better.",
    parts={"train": part_train, "eval": part_eval, "long": part_long},
    report=write_report,
    full=FULL,
    quick=QUICK,
    configure=configure,
)


if __name__ == "__main__":
    main(PAPER)
