"""Quality per CPU-minute: difflab's training recipe against the diffusers recipe on Fashion-MNIST.

Same data (Fashion-MNIST 28x28 padded to 32x32, class-conditional), same batch (64), same
architecture blueprint (our `unet-s` and the UNet2DModel twin from bench/train_throughput.py),
same CPU budget, same evaluation (FD-FMNIST under difflab's own Fashion-MNIST classifier, 20
sampler steps, class-balanced samples from the same seed):

  difflab            EDM preconditioning + lognormal sigmas, lr 1e-3 (warm-up 100), EMA 0.999,
                     label dropout 0.1; sampled with difflab's default sampler (unipc_auto)
  diffusers-default  UNet2DModel + DDPMScheduler (linear, 1000), epsilon MSE, AdamW lr 1e-4
                     (betas 0.95/0.999, weight decay 1e-6), cosine decay with 500 warm-up steps,
                     EMAModel max decay 0.9999 with its warm-up (inv_gamma 1, power 3/4), random
                     flips, grad clip 1 -- the defaults of diffusers' train_unconditional.py
  diffusers-tuned    the same with lr 5e-4, warm-up 100, EMA max decay 0.999
                     The diffusers models are sampled with diffusers' DDIMScheduler and
                     DPMSolverMultistepScheduler (20 steps each); the better FD is theirs.

The budget is CPU time of the training process (`time.process_time`, one thread), so that runs on
a shared machine are charged only for the work they did: "10 minutes on 2 cores" is 20
CPU-minutes. Each run is its own process:

  python bench/quality_per_minute.py train --recipe difflab --cpu-minutes 20 --out bench/runs/qpm/difflab-20
  python bench/quality_per_minute.py eval bench/runs/qpm/difflab-20 --n 2000
  python bench/quality_per_minute.py report bench/runs/qpm --out bench/results

(`difflab` runs are ordinary difflab run folders: `difflab train ... --minutes 20 --clock cpu`.)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RECIPES = {
    "difflab": {},
    "diffusers-default": {"lr": 1e-4, "warmup": 500, "ema_max_decay": 0.9999},
    "diffusers-tuned": {"lr": 5e-4, "warmup": 100, "ema_max_decay": 0.999},
}
MODEL = "unet-s"
BATCH = 64


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def train_difflab(out: Path, cpu_minutes: float, seed: int) -> None:
    from difflab.train import TrainConfig, train

    cfg = TrainConfig(
        data="fashion_mnist",
        model=MODEL,
        batch_size=BATCH,
        minutes=cpu_minutes,
        clock="cpu",
        steps=None,
        seed=seed,
        save_every=250,
        class_conditional=True,
    )
    train(cfg, out, progress=False)


def _diffusers_model():
    from train_throughput import diffusers_twin

    # class conditioning as diffusers does it: a label embedding added to the time embedding
    return diffusers_twin(MODEL, 32, 1, num_class_embeds=10)


def train_diffusers(out: Path, recipe: str, cpu_minutes: float, seed: int) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file

    from difflab.data import load_dataset

    hp = RECIPES[recipe]
    torch.manual_seed(seed)
    data = load_dataset("fashion_mnist", "train", pad_to=32)
    x_all, y_all = data.images, data.labels
    net = _diffusers_model()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(net.parameters(), lr=0.0, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(net.parameters(), decay=hp["ema_max_decay"], use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    budget = cpu_minutes * 60
    g = torch.Generator().manual_seed(seed)
    perm, pos, step, total = torch.randperm(len(x_all), generator=g), 0, 0, None
    t0 = time.process_time()
    log = []
    while time.process_time() - t0 < budget:
        if pos + BATCH > len(perm):
            perm, pos = torch.randperm(len(x_all), generator=g), 0
        idx = perm[pos : pos + BATCH]
        pos += BATCH
        x0, y = x_all[idx], y_all[idx]
        flip = torch.rand(BATCH, generator=g) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        loss = torch.nn.functional.mse_loss(net(sched.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        if step == 20:  # the cosine decay needs a length: the steps this budget buys at this pace
            total = max(hp["warmup"] + 1, int(budget / ((time.process_time() - t0) / 20)))
        for group in opt.param_groups:  # diffusers' get_cosine_schedule_with_warmup, as a formula
            if step < hp["warmup"]:
                group["lr"] = hp["lr"] * step / hp["warmup"]
            else:
                frac = min(1.0, (step - hp["warmup"]) / max(1, total - hp["warmup"])) if total else 0.0
                group["lr"] = hp["lr"] * 0.5 * (1 + math.cos(math.pi * frac))
        ema.step(net.parameters())
        if step % 25 == 0:
            log.append({"step": step, "loss": loss.item(), "cpu_s": time.process_time() - t0})
    ema.copy_to(net.parameters())
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "ema.safetensors"))
    (out / "diffusers_config.json").write_text(json.dumps(dict(net.config), indent=1, default=str))
    (out / "bench.json").write_text(
        json.dumps(
            {
                "recipe": recipe,
                "steps": step,
                "cpu_minutes": cpu_minutes,
                "cpu_s": time.process_time() - t0,
                "hp": hp,
                "seed": seed,
                "log": log,
            },
            indent=1,
        )
    )


# --------------------------------------------------------------------------------------------
# sampling and scoring
# --------------------------------------------------------------------------------------------


def sample_difflab(run: Path, n: int, steps: int, seed: int) -> dict[str, torch.Tensor]:
    from difflab.core.sampling import DEFAULT_SAMPLER
    from difflab.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(run)
    labels = torch.arange(n) % 10
    return {DEFAULT_SAMPLER: pipe(n, class_labels=labels, steps=steps, seed=seed, batch_size=250, progress=True)}


@torch.no_grad()
def sample_diffusers(run: Path, n: int, steps: int, seed: int) -> dict[str, torch.Tensor]:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    net = UNet2DModel.from_config(json.loads((run / "diffusers_config.json").read_text()))
    net.load_state_dict(load_file(str(run / "ema.safetensors")))
    net.eval()
    out = {}
    for name, cls in (("ddim", DDIMScheduler), ("dpmsolver++2m", DPMSolverMultistepScheduler)):
        images = []
        g = torch.Generator().manual_seed(seed)
        for a in tqdm(range(0, n, 250), desc=name, leave=False):
            b = min(n, a + 250)
            sch = cls(num_train_timesteps=1000, beta_schedule="linear")
            sch.set_timesteps(steps)
            x = torch.randn((b - a, 1, 32, 32), generator=g)
            y = torch.arange(a, b) % 10
            for t in sch.timesteps:
                x = sch.step(net(x, t, class_labels=y).sample, t, x).prev_sample
            images.append(x.clamp(-1, 1))
        out[name] = torch.cat(images)
    return out


def evaluate(run: Path, n: int, steps: int, seed: int) -> dict:
    from difflab.data import save_image_grid
    from difflab.metrics import feature_extractor, reference_stats, score_samples
    from difflab.train.loop import load_training_data, TrainConfig

    kind = "diffusers" if (run / "ema.safetensors").exists() else "difflab"
    t0 = time.perf_counter()
    samples = (sample_diffusers if kind == "diffusers" else sample_difflab)(run, n, steps, seed)
    sample_s = time.perf_counter() - t0
    ext = feature_extractor("fmnist")
    train_images = load_training_data(TrainConfig(data="fashion_mnist")).images
    ref = reference_stats(ext, "fashion_mnist", "train", images=train_images, data_kwargs={"pad_to": 32})
    labels = torch.arange(n) % 10
    result = {"run": str(run), "kind": kind, "n": n, "steps": steps, "seed": seed, "sample_s": sample_s, "samplers": {}}
    for name, x in samples.items():
        q = score_samples(x, ext, ref, "fashion_mnist", labels=labels, num_classes=10)
        q.pop("domain")
        result["samplers"][name] = q
        show = torch.cat([torch.nonzero(labels == c).flatten()[:8] for c in range(10)])
        save_image_grid(x[show], run / f"samples_{name}.png", nrow=16)
        print(
            f"{run.name}: {name:14s} FD-FMNIST {q['fd']:.2f} precision {q['precision']:.3f} "
            f"recall {q['recall']:.3f} class accuracy {q['class_accuracy']:.3f}"
        )
    if kind == "difflab":
        meta = json.loads((run / "config.json").read_text())
        from difflab.runfolder import read_safetensors

        result["train_steps"] = int(read_safetensors(run / "checkpoint.safetensors")[1]["step"])
        result["train"] = {"cpu_minutes": meta["train"]["minutes"]}
    else:
        b = json.loads((run / "bench.json").read_text())
        result["train_steps"] = b["steps"]
        result["train"] = {"cpu_minutes": b["cpu_minutes"], "cpu_s": b["cpu_s"]}
    (run / "eval.json").write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def report(root: Path, out: Path) -> str:
    rows = []
    for ev in sorted(root.glob("*/eval.json")):
        r = json.loads(ev.read_text())
        best = min(r["samplers"].items(), key=lambda kv: kv[1]["fd"])
        recipe = ev.parent.name.rsplit("-", 1)[0]
        rows.append(
            {
                "recipe": recipe,
                "budget": r["train"]["cpu_minutes"],
                "steps": r["train_steps"],
                "sampler": best[0],
                **best[1],
                "all": r["samplers"],
                "n": r["n"],
                "dir": ev.parent,
            }
        )
    lines = [
        "# Quality per CPU-minute: difflab vs the diffusers training recipe (Fashion-MNIST)",
        "",
        "Command: see the docstring of `bench/quality_per_minute.py` (train each recipe, eval, report).",
        "",
        "| budget (CPU-min) | recipe | train steps | sampler (20 steps) | FD-FMNIST | precision | recall | "
        "class accuracy | FD ratio difflab / this |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for budget in sorted({r["budget"] for r in rows}):
        group = [r for r in rows if r["budget"] == budget]
        ours = next((r for r in group if r["recipe"] == "difflab"), None)
        for r in sorted(group, key=lambda r: r["recipe"]):
            ratio = "" if ours is None or r is ours else f"{ours['fd'] / r['fd']:.2f}"
            others = ", ".join(f"{k} {v['fd']:.2f}" for k, v in r["all"].items() if k != r["sampler"])
            lines.append(
                f"| {budget:g} | {r['recipe']} | {r['steps']} | {r['sampler']}"
                f"{f' ({others})' if others else ''} | {r['fd']:.2f} | {r['precision']:.3f} | "
                f"{r['recall']:.3f} | {r['class_accuracy']:.3f} | {ratio} |"
            )
    lines += ["", f"n = {rows[0]['n'] if rows else '?'} class-balanced samples per model.", ""]
    out.mkdir(parents=True, exist_ok=True)
    figs = out / "quality_per_minute"
    figs.mkdir(exist_ok=True)
    for r in rows:  # every sampler's grid (first 8 samples of each class), copied beside the table
        for png in sorted(r["dir"].glob("samples_*.png")):
            name = f"{r['dir'].name}_{png.stem[len('samples_') :]}.png"
            shutil.copy(png, figs / name)
            lines.append(
                f"{r['recipe']}, {r['budget']:g} CPU-min, {png.stem[len('samples_') :]}:\n\n"
                f"![{name}](quality_per_minute/{name})\n"
            )
    text = "\n".join(lines) + "\n"
    (out / "quality_per_minute.md").write_text(text)
    (out / "quality_per_minute.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "dir"} for r in rows], indent=1)
    )
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    t.add_argument("--cpu-minutes", type=float, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval")
    e.add_argument("runs", type=Path, nargs="+")
    e.add_argument("--n", type=int, default=10_000)
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report")
    r.add_argument("root", type=Path)
    r.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    for q in (t, e):
        q.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.cmd == "report":
        print(report(args.root, args.out))
        return 0
    torch.set_num_threads(args.threads)
    if args.cmd == "train":
        if args.recipe == "difflab":
            train_difflab(args.out, args.cpu_minutes, args.seed)
        else:
            train_diffusers(args.out, args.recipe, args.cpu_minutes, args.seed)
        return 0
    for run in args.runs:
        evaluate(run, args.n, args.steps, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
