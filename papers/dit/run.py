"""Scalable Diffusion Models with Transformers (Peebles & Xie 2023): FD against GFLOPs across tiny
DiTs on Fashion-MNIST latents -- the paper's claim that sample quality improves monotonically with
the transformer's compute per forward pass (more depth/width, or smaller patches), at a fixed
number of training steps.

    python papers/dit/run.py                      # all parts (or python -m papers.dit.run) (see FULL for the sizes; ~60 CPU-minutes)
    python papers/dit/run.py --only train eval    # some parts; trained runs are reused (cache/)
    python papers/dit/run.py --quick              # plumbing check, written to _quick/
    python papers/dit/run.py --report             # rebuild report.md from results.json

Parts:
  ae     `difflab train-autoencoder --data fashion_mnist --data-kwargs '{"pad_to": 32}' --factor 4`:
         the first stage (32x32x1 -> 8x8x4 latents, scale factor from data), shared by every DiT.
  train  `difflab train --model DiT-<size>/<patch> --autoencoder AE --steps S` for each model,
         class-conditional (label dropout 0.1), the same steps, batch, learning rate and seed.
  eval   GFLOPs of one forward pass at batch 1 (`torch.utils.flop_counter`, the paper's x-axis),
         parameters, and FD-FMNIST / precision / recall / class accuracy of n class-balanced
         decoded samples (difflab's default sampler, fixed seed, no guidance).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

if __package__ in (None, ""):  # run as a file: python papers/dit/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from papers.runner import Paper, Results, Run, atomic_write_text, cpu_seconds, log, main, save_figure  # noqa: E402

from difflab.metrics.evaluate import evaluate_run  # noqa: E402
from difflab.pipeline import Pipeline  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = HERE
FULL = {
    "ae_steps": 1500,
    "models": ("DiT-T/4", "DiT-T/2", "DiT-XS/4", "DiT-XS/2", "DiT-M/4", "DiT-M/2"),
    "steps": 3000,
    "batch_size": 64,
    "lr": 3e-4,
    "n": 1000,
    "sample_steps": 20,
}
QUICK = {
    "ae_steps": 20,
    "models": ("DiT-T/4", "DiT-T/2", "DiT-XS/2"),
    "steps": 20,
    "batch_size": 32,
    "lr": 3e-4,
    "n": 40,
    "sample_steps": 4,
}


def difflab(*args: str) -> float:
    """Run a difflab command in a subprocess (one thread); returns its CPU seconds."""
    cmd = [sys.executable, "-m", "difflab", *args, "--no-progress"]
    log("$ difflab " + " ".join(args))
    c0 = cpu_seconds()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return cpu_seconds() - c0


def run_dir(model: str) -> Path:
    return OUT / "cache" / model.replace("/", "_")


def part_ae(p: dict) -> dict:
    ae = OUT / "cache" / "ae-fmnist-f4"
    if (ae / "model.safetensors").exists():
        log(f"ae: reusing {ae}")
        cpu = None
    else:
        cpu = difflab(
            "train-autoencoder",
            "--data",
            "fashion_mnist",
            "--data-kwargs",
            '{"pad_to": 32}',
            "--factor",
            "4",
            "--steps",
            str(p["ae_steps"]),
            "--seed",
            "0",
            "--out",
            str(ae),
        )
    cfg = json.loads((ae / "config.json").read_text())
    return {
        "folder": str(ae.relative_to(OUT)),
        "steps": p["ae_steps"],
        "cpu_s": cpu,
        "scale_factor": cfg.get("scale_factor"),
        "rec_l1": cfg.get("info", {}).get("rec_l1"),
    }


def part_train(p: dict) -> dict:
    ae = OUT / "cache" / "ae-fmnist-f4"
    if not (ae / "model.safetensors").exists():
        raise FileNotFoundError(f"no autoencoder at {ae}: run the 'ae' part first")
    out = {}
    for m in p["models"]:
        d = run_dir(m)
        if (d / "model.safetensors").exists() and json.loads((d / "config.json").read_text())["train"]["steps"] == p[
            "steps"
        ]:
            log(f"train: reusing {d}")
            out[m] = Results(OUT).load().get("train", {}).get(m, {"cpu_s": None})
            continue
        cpu = difflab(
            "train",
            "--data",
            "fashion_mnist",
            "--model",
            m,
            "--autoencoder",
            str(ae),
            "--steps",
            str(p["steps"]),
            "--batch-size",
            str(p["batch_size"]),
            "--lr",
            str(p["lr"]),
            "--seed",
            "0",
            "--save-every",
            str(max(p["steps"], 1)),
            "--out",
            str(d),
        )
        out[m] = {"cpu_s": round(cpu, 1), "steps": p["steps"]}
    return out


def gflops(pipe: Pipeline) -> tuple[float, float]:
    """GFLOPs of one forward pass at batch 1 and parameters (M) of a run's network."""
    net = pipe.denoiser
    x = torch.randn(1, *pipe.sample_shape())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, torch.tensor([1.0]), class_labels=torch.tensor([0]))
    return fc.get_total_flops() / 1e9, sum(t.numel() for t in net.parameters()) / 1e6


def part_eval(p: dict, seed: int) -> dict:
    out = {}
    for m in p["models"]:
        d = run_dir(m)
        if not (d / "model.safetensors").exists():
            raise FileNotFoundError(f"no trained run at {d}: run the 'train' part first")
        g, params = gflops(Pipeline.from_pretrained(d))
        r = evaluate_run(
            d, steps=p["sample_steps"], n=p["n"], seed=seed, bpd="none", batch_size=64, progress=False, log=log
        )
        out[m] = {
            "gflops": g,
            "params_m": params,
            "fd": r["fd"],
            "precision": r["precision"],
            "recall": r["recall"],
            "class_accuracy": r["class_accuracy"],
            "sample_seconds": r["seconds"]["sampling"],
        }
        log(
            f"  {m}: {g:.4f} GFLOPs, {params:.2f} M params, FD-FMNIST {r['fd']:.2f}, class acc {r['class_accuracy']:.3f}"
        )
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def write_report(run: Run) -> None:
    res = Results(OUT).load()
    ev = res.get("eval")
    L = [
        "# DiT: FD against GFLOPs across tiny sizes (Peebles & Xie 2023)\n",
        "Produced by `python papers/dit/run.py` (numbers from `results.json`; `--report` rebuilds this page).\n",
        __doc__.split("\n\n", 2)[2].strip() + "\n",
    ]
    ae, tr = res.get("ae"), res.get("train", {})
    if ae:
        L.append(
            f"First stage: {ae['steps']} steps, reconstruction L1 {ae['rec_l1']}, latent scale factor "
            f"{ae['scale_factor']}.\n"
        )
    st = res.get("settings")
    if st:
        L.append(
            f"Settings of this run: {st['steps']} training steps per model at batch {st['batch_size']}, lr "
            f"{st['lr']}; n = {st['n']} samples per model, {st['sample_steps']} sampler steps.\n"
        )
    if ev:
        models = sorted(ev, key=lambda m: ev[m]["gflops"])
        g = [ev[m]["gflops"] for m in models]
        fd = [ev[m]["fd"] for m in models]
        rho = spearman(g, fd) if len(models) > 2 else float("nan")
        mono = all(b < a for a, b in zip(fd, fd[1:]))
        L += [
            "## Claim, measured\n",
            "- **FD falls as GFLOPs rise.** FD-FMNIST by GFLOPs: "
            + ", ".join(f"{m} ({x:.4f}): {y:.2f}" for m, x, y in zip(models, g, fd))
            + f". Spearman correlation {rho:+.2f}; "
            + (
                "holds, monotonically."
                if mono
                else (
                    "holds as a trend (negative rank correlation) but not monotonically."
                    if rho < -0.5
                    else "does not hold."
                )
            )
            + "\n",
        ]
        pairs = [(m, m[:-1] + "2") for m in models if m.endswith("/4") and m[:-1] + "2" in ev]
        if pairs:
            L.append(
                "- **Patch size at a fixed model size (4 -> 2: 4x the tokens, about 3.5x the GFLOPs).** "
                + "; ".join(f"{a.split('/')[0]}: FD {ev[a]['fd']:.2f} -> {ev[b]['fd']:.2f}" for a, b in pairs)
                + ". "
                + (
                    "Smaller patches are better at every size, as in the paper."
                    if all(ev[b]["fd"] < ev[a]["fd"] for a, b in pairs)
                    else "Not at every size: patch 2 helps only for "
                    + (", ".join(a.split("/")[0] for a, b in pairs if ev[b]["fd"] < ev[a]["fd"]) or "none")
                    + "; at this training length width and depth matter more than the token count, "
                    "and FD at this n and first stage (reconstruction L1 above) is a coarse judge of "
                    "gaps of a few points."
                )
                + "\n"
            )
        L += [
            "| model | GFLOPs / forward | params (M) | FD-FMNIST | precision | recall | class accuracy | train CPU-s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in models:
            r = ev[m]
            cpu = tr.get(m, {}).get("cpu_s")
            L.append(
                f"| {m} | {r['gflops']:.4f} | {r['params_m']:.2f} | {r['fd']:.2f} | {r['precision']:.3f} | "
                f"{r['recall']:.3f} | {r['class_accuracy']:.3f} | {cpu if cpu is not None else '-'} |"
            )
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for patch, mk in (("/2", "o"), ("/4", "s"), ("/8", "^")):
            sel = [m for m in models if m.endswith(patch)]
            if sel:
                ax.plot(
                    [ev[m]["gflops"] for m in sel], [ev[m]["fd"] for m in sel], mk + "-", label=f"patch {patch[1:]}"
                )
                for m in sel:
                    ax.annotate(m.split("-")[1], (ev[m]["gflops"], ev[m]["fd"]), fontsize=7)
        ax.set(xscale="log", xlabel="GFLOPs per forward pass", ylabel="FD-FMNIST", title="DiT on FMNIST latents")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, OUT / "figures" / "fd_vs_gflops.png", dpi=130)
        L.append("\n![FD vs GFLOPs](figures/fd_vs_gflops.png)\n")
    atomic_write_text(OUT / "report.md", "\n".join(L))


def options(ap) -> None:
    ap.add_argument("--steps", type=int, help="training steps per model")
    ap.add_argument("--n", type=int, help="samples per model for FD")


def configure(run: Run) -> None:
    global OUT
    OUT = run.out
    for name in ("steps", "n"):
        if getattr(run.args, name) is not None:
            run.settings[name] = getattr(run.args, name)


def eval_part(run: Run) -> dict:
    value = part_eval(run.settings, run.seed)
    run.results.save("settings", {k: run.settings[k] for k in ("steps", "batch_size", "lr", "n", "sample_steps")})
    return value


PAPER = Paper(
    "dit",
    __doc__,
    title="DiT: Scalable Diffusion Models with Transformers (Peebles & Xie 2023)",
    claim="Sample quality improves with the transformer's compute per forward pass (depth, width, smaller patches) at a fixed number of training steps.",
    parts={"ae": lambda run: part_ae(run.settings), "train": lambda run: part_train(run.settings), "eval": eval_part},
    report=write_report,
    full=FULL,
    quick=QUICK,
    options=options,
    configure=configure,
    merge=("train",),
)


if __name__ == "__main__":
    main(PAPER)
