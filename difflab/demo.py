"""`difflab demo`: train a small class-conditional model on real data, sample, write report.html.

Fashion-MNIST (28x28 padded to 32x32) when the Debian package `dataset-fashion-mnist` is
installed, sklearn's digits otherwise (said in the report). The report has the loss curve, a
grid of samples per class for several samplers and step counts, and a table of time and a
quality check per sampler: the distance of each sample to its nearest training image (small
values everywhere would mean memorisation, large ones noise), next to the same statistic for
held-out real images, which is the target.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import torch

from difflab.data import load_dataset, save_image_grid
from difflab.pipeline import Pipeline
from difflab.train import TrainConfig, train

__all__ = ["run_demo", "nearest_neighbour_distance"]

SAMPLER_RUNS = [("euler", 10), ("dpmpp_2m", 10), ("unipc", 10), ("heun", 10), ("dpmpp_2m", 25),
                ("euler_ancestral", 50)]


def nearest_neighbour_distance(samples: torch.Tensor, reference: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Per-sample RMS distance (per pixel) to the nearest reference image, (n,)."""
    a = samples.flatten(1).float()
    b = reference.flatten(1).float()
    best = []
    for i in range(0, len(a), chunk):
        d = torch.cdist(a[i:i + chunk], b)  # (chunk, N)
        best.append(d.min(1).values)
    return torch.cat(best) / a.shape[1] ** 0.5


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _pick_data(data: str | None) -> tuple[str, str]:
    if data is not None:
        return data, ""
    try:
        load_dataset("fashion_mnist", "test")
        return "fashion_mnist", ""
    except FileNotFoundError as e:
        note = f"Fashion-MNIST is not installed ({e}); the demo uses sklearn's digits instead."
        print(note)
        return "digits", note


def run_demo(out: str = "demo_out", minutes: float | None = 5.0, steps: int | None = None, seed: int = 0,
             data: str | None = None, n_per_class: int = 8) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data, note = _pick_data(data)
    model = "unet-s"
    cfg = TrainConfig(data=data, model=model, steps=steps, minutes=None if steps else minutes, seed=seed,
                      batch_size=64, save_every=200, class_conditional=True)
    print(f"difflab demo: training {model} on {data} for "
          f"{f'{steps} steps' if steps else f'{minutes} minutes'} (run folder {out / 'run'})")
    t0 = time.perf_counter()
    train(cfg, out / "run")
    train_s = time.perf_counter() - t0
    pipe = Pipeline.from_pretrained(out / "run")
    kw = {"pad_to": 32} if data == "fashion_mnist" else {}
    train_images = load_dataset(data, "train", **kw).images
    test_images = load_dataset(data, "test", **kw).images
    k = pipe.num_classes
    labels = torch.arange(k).repeat_interleave(n_per_class)
    real_nn = nearest_neighbour_distance(test_images[: len(labels)], train_images).mean().item()

    rows = []
    grids = []
    for sampler, n_steps in SAMPLER_RUNS:
        t = time.perf_counter()
        images = pipe(len(labels), class_labels=labels, sampler=sampler, steps=n_steps, seed=seed)
        dt = time.perf_counter() - t
        nn_d = nearest_neighbour_distance(images, train_images)
        path = out / f"samples_{sampler}_{n_steps}.png"
        save_image_grid(images, path, nrow=n_per_class * 2)
        rows.append({"sampler": sampler, "steps": n_steps, "seconds": dt, "nn_distance": nn_d.mean().item(),
                     "ms_per_image": 1000 * dt / len(labels)})
        grids.append((sampler, n_steps, path))
        print(f"  {sampler:16s} {n_steps:3d} steps  {dt:6.1f} s  nearest-train distance {nn_d.mean():.3f} "
              f"(held-out real images: {real_nn:.3f})")
    log = [json.loads(r) for r in (out / "run" / "log.jsonl").read_text().splitlines() if r.strip()]
    summary = {"data": data, "model": model, "train_seconds": train_s, "train_steps": log[-1]["step"] if log else 0,
               "final_loss": log[-1]["loss"] if log else None, "real_nn_distance": real_nn, "samplers": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_report(out, summary, grids, pipe.class_names, note, n_per_class)
    print(f"wrote {out / 'report.html'}")
    return out / "report.html"


def _write_report(out: Path, summary: dict, grids, class_names, note: str, n_per_class: int) -> None:
    rows = "".join(
        f"<tr><td>{r['sampler']}</td><td>{r['steps']}</td><td>{r['seconds']:.1f}</td>"
        f"<td>{r['ms_per_image']:.1f}</td><td>{r['nn_distance']:.3f}</td></tr>" for r in summary["samplers"])
    pairs = [class_names[i] for i in range(0, len(class_names), 2)]
    legend = ", ".join(f"row {j + 1}: {a} | {b}" for j, (a, b) in
                       enumerate(zip(pairs, [class_names[i] for i in range(1, len(class_names), 2)])))
    figs = "".join(f"<figure><img src='{_img(p)}' width=520><figcaption>{s}, {n} steps</figcaption></figure>"
                   for s, n, p in grids)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>difflab demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} figure{{display:inline-block;margin:6px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}</style></head><body>
<h1>difflab demo: {html.escape(summary['data'])}, {summary['model']}</h1>
<p>{html.escape(note)}</p>
<p>Trained {summary['train_steps']} steps in {summary['train_seconds'] / 60:.1f} min (class-conditional,
EDM preconditioning, EMA); final training loss {summary['final_loss']:.4f}.</p>
<h2>Samples</h2><p>{n_per_class} samples per class, two classes per row ({html.escape(legend)}).</p>{figs}
<h2>Samplers</h2><table><tr><th>sampler</th><th>steps</th><th>seconds</th><th>ms / image</th>
<th>nearest-train distance</th></tr>{rows}</table>
<p>Nearest-train distance: per-pixel RMS distance of each sample to its nearest training image, averaged.
Held-out real images score {summary['real_nn_distance']:.3f}: samples near that value look like new data;
far above it they are noisy; far below it they copy training images.</p>
<h2>Training loss</h2><img src="{_img(out / 'run' / 'loss.png')}">
</body></html>"""
    (out / "report.html").write_text(page)
