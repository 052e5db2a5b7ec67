"""`difflab demo`: train a small class-conditional model on real data, sample, write report.html.

Fashion-MNIST (28x28 padded to 32x32) when the Debian package `dataset-fashion-mnist` is
installed, sklearn's digits otherwise (said in the report). The report has the loss curve, a
grid of samples per class for several samplers and step counts, and a table of time and sample
quality per sampler: Frechet distance, precision and recall under the data set's own classifier
(difflab.metrics, "FD-FMNIST"), the classifier's accuracy on the asked classes, and the distance
of each sample to its nearest training image (small values everywhere would mean memorisation,
large ones noise). Every number is also given for held-out real images of the same count, which
is what a perfect model would score at that sample size.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import torch

from difflab.core.sampling import DEFAULT_SAMPLER
from difflab.data import load_dataset, save_image_grid
from difflab.pipeline import Pipeline
from difflab.train import TrainConfig, train

__all__ = ["run_demo", "nearest_neighbour_distance"]

# (sampler, steps): difflab's default, two classic deterministic ones and DDPM-style ancestral sampling
SAMPLER_RUNS = [(DEFAULT_SAMPLER, 10), ("dpmpp_2m", 10), ("euler", 10), ("euler_ancestral", 20)]


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


def run_demo(out: str = "demo_out", minutes: float | None = 4.0, steps: int | None = None, seed: int = 0,
             data: str | None = None, n_per_class: int = 8, n_eval: int = 300,
             samplers: list[tuple[str, int]] | None = None) -> Path:
    """Train, sample with each (sampler, steps) in `samplers` (default SAMPLER_RUNS), score
    `n_eval` class-balanced samples per sampler, write `out`/report.html and summary.json."""
    from difflab.metrics import default_extractor, feature_extractor, reference_stats, score_samples
    from difflab.train.loop import load_training_data

    samplers = list(samplers or SAMPLER_RUNS)
    if n_eval < n_per_class * 10:
        raise ValueError(f"n_eval must be at least n_per_class * 10 = {n_per_class * 10}, got {n_eval}")
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
    train_images = load_training_data(cfg).images
    kw = {"pad_to": 32} if data == "fashion_mnist" else {}
    test_images = load_dataset(data, "test", **kw).images
    k = pipe.num_classes
    extractor = feature_extractor(default_extractor(data))
    ref = reference_stats(extractor, data, "train", images=train_images, data_kwargs=kw)

    def quality(images: torch.Tensor, labels: torch.Tensor) -> dict:
        q = score_samples(images, extractor, ref, data, labels=labels, num_classes=k)
        q["nn_distance"] = nearest_neighbour_distance(images, train_images).mean().item()
        return q

    # held-out real images, class-balanced like the samples: the score of a perfect model at this n
    g = torch.Generator().manual_seed(seed)
    test_labels = load_dataset(data, "test", **kw).labels
    per_class = -(-n_eval // k)
    idx = torch.cat([torch.nonzero(test_labels == c).flatten()[torch.randperm(int((test_labels == c).sum()),
                     generator=g)[:per_class]] for c in range(k)])
    idx = idx.reshape(k, -1).t().flatten()[:n_eval]  # interleave: label i % k for item i, as sampled
    real = quality(test_images[idx], test_labels[idx])
    print(f"  held-out real images ({n_eval}): FD {real['fd']:.2f}, precision {real['precision']:.2f}, "
          f"recall {real['recall']:.2f}, class accuracy {real['class_accuracy']:.2f}")

    labels = torch.arange(n_eval) % k
    show = torch.cat([torch.nonzero(labels == c).flatten()[:n_per_class] for c in range(k)])
    rows, grids = [], []
    for sampler, n_steps in samplers:
        t = time.perf_counter()
        images = pipe(n_eval, class_labels=labels, sampler=sampler, steps=n_steps, seed=seed, progress=True)
        dt = time.perf_counter() - t
        q = quality(images, labels)
        path = out / f"samples_{sampler}_{n_steps}.png"
        save_image_grid(images[show], path, nrow=n_per_class * 2)
        rows.append({"sampler": sampler, "steps": n_steps, "seconds": dt, "ms_per_image": 1000 * dt / n_eval,
                     **{m: q[m] for m in ("fd", "precision", "recall", "class_accuracy", "nn_distance")}})
        grids.append((sampler, n_steps, path))
        print(f"  {sampler:16s} {n_steps:3d} steps  {dt:6.1f} s  FD {q['fd']:7.2f}  precision {q['precision']:.2f}  "
              f"recall {q['recall']:.2f}  class accuracy {q['class_accuracy']:.2f}  nearest-train {q['nn_distance']:.3f}")
    log = [json.loads(r) for r in (out / "run" / "log.jsonl").read_text().splitlines() if r.strip()]
    summary = {"data": data, "model": model, "train_seconds": train_s, "train_steps": log[-1]["step"] if log else 0,
               "final_loss": log[-1]["loss"] if log else None, "n_eval": n_eval, "fd_name": extractor.display_name,
               "real": {m: real[m] for m in ("fd", "precision", "recall", "class_accuracy", "nn_distance")},
               "samplers": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_report(out, summary, grids, pipe.class_names, note, n_per_class)
    print(f"wrote {out / 'report.html'}")
    return out / "report.html"


def _write_report(out: Path, summary: dict, grids, class_names, note: str, n_per_class: int) -> None:
    def cells(r):
        return (f"<td>{r['fd']:.2f}</td><td>{r['precision']:.2f}</td><td>{r['recall']:.2f}</td>"
                f"<td>{r['class_accuracy']:.2f}</td><td>{r['nn_distance']:.3f}</td>")

    rows = "".join(
        f"<tr><td>{r['sampler']}</td><td>{r['steps']}</td><td>{r['seconds']:.1f}</td>"
        f"<td>{r['ms_per_image']:.1f}</td>{cells(r)}</tr>" for r in summary["samplers"])
    rows += f"<tr><th>held-out real images</th><td></td><td></td><td></td>{cells(summary['real'])}</tr>"
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
<h2>Samplers</h2><p>{summary['n_eval']} class-balanced samples per sampler, the same starting noise for each.</p>
<table><tr><th>sampler</th><th>steps</th><th>seconds</th><th>ms / image</th><th>{html.escape(summary['fd_name'])}</th>
<th>precision</th><th>recall</th><th>class accuracy</th><th>nearest-train distance</th></tr>{rows}</table>
<p>{html.escape(summary['fd_name'])}: Frechet distance between the classifier features of the samples and of
the whole training set (lower is better; at {summary['n_eval']} samples it is biased upwards, so compare with
the held-out real images of the same count, the best a model can score here). Precision / recall
(Kynkaanniemi et al., k = 3): the share of samples inside the real data's feature manifold and of real
images inside the samples'. Class accuracy: the classifier's agreement with the asked class.
Nearest-train distance: per-pixel RMS distance of each sample to its nearest training image; near the
real images' value samples look like new data, far above it they are noisy, far below they copy.</p>
<h2>Training loss</h2><img src="{_img(out / 'run' / 'loss.png')}">
</body></html>"""
    (out / "report.html").write_text(page)
