"""FD against sampler steps for a trained model: the DDIM paper's claim that 20-50 deterministic
steps come close to 1000 ancestral steps, measured.

    python bench/fd_vs_steps.py --run checkpoints/zoo/fmnist-unet-s --n 5000 --out bench/results

For each deterministic sampler (difflab's default and plain DDIM = `euler`) at 5, 10, 20, 50, 100
steps, and for ancestral sampling (DDPM-style, `euler_ancestral` with eta = 1) at 1000 steps: FD
under the data set's own classifier against the training set, precision, recall and class
accuracy of n class-balanced samples from the same seed. Writes fd_vs_steps.{md,json,png}.
Runs on the GPU when there is one (`--device`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(
    run_dir: Path,
    n: int,
    steps: list[int],
    samplers: list[str],
    ancestral: int,
    device: str,
    batch_size: int,
    seed: int,
) -> dict:
    from difflab.metrics import default_extractor, feature_extractor, reference_stats, score_samples
    from difflab.metrics.evaluate import _data_kwargs, _run_data
    from difflab.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(run_dir)
    pipe.denoiser.to(device)
    config = pipe.config
    dataset = config["data"]["name"]
    ext = feature_extractor(default_extractor(dataset), device=device)
    ref = reference_stats(
        ext, dataset, "train", images=lambda: _run_data(config, "train").images, data_kwargs=_data_kwargs(config)
    )
    labels = None if pipe.num_classes is None else torch.arange(n) % pipe.num_classes
    plan = [(s, k) for s in samplers for k in steps] + ([("euler_ancestral", ancestral)] if ancestral else [])
    rows = []
    for sampler, k in plan:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = pipe(n, class_labels=labels, sampler=sampler, steps=k, seed=seed, batch_size=batch_size, progress=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        q = score_samples(x, ext, ref, dataset, labels=labels, num_classes=pipe.num_classes, device=device)
        q.pop("domain")
        rows.append({"sampler": sampler, "steps": k, "seconds": dt, **q})
        print(
            f"{sampler:16s} {k:5d} steps  FD {q['fd']:8.3f}  precision {q['precision']:.3f}  "
            f"recall {q['recall']:.3f}  class acc {q['class_accuracy']}  {dt:.1f} s",
            flush=True,
        )
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {
        "run": str(run_dir),
        "n": n,
        "seed": seed,
        "device": dev,
        "fd_name": ext.display_name,
        "rows": rows,
        "torch": torch.__version__,
    }


def render(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    anc = [r for r in rows if r["sampler"] == "euler_ancestral"]
    lines = [
        f"# FD against sampler steps ({result['fd_name']}, n = {result['n']})",
        "",
        f"Model: `{result['run']}`; device {result['device']}, torch {result['torch']}. "
        f"Command: `python bench/fd_vs_steps.py --run {result['run']} --n {result['n']}`.",
        "",
        "| sampler | steps | FD | precision | recall | class accuracy | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = "-" if r["class_accuracy"] is None else f"{r['class_accuracy']:.3f}"
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['fd']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{acc} | {r['seconds']:.1f} |"
        )
    if anc:
        ref = anc[0]["fd"]
        lines += ["", f"Against {anc[0]['steps']} ancestral steps (FD {ref:.3f}):"]
        for s in sorted({r["sampler"] for r in rows} - {"euler_ancestral"}):
            parts = [f"{r['steps']} steps {r['fd'] / ref:.2f}x" for r in rows if r["sampler"] == s]
            lines.append(f"- {s}: " + ", ".join(parts))
    (out / "fd_vs_steps.md").write_text("\n".join(lines) + "\n")
    (out / "fd_vs_steps.json").write_text(json.dumps(result, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in sorted({r["sampler"] for r in rows} - {"euler_ancestral"}):
        pts = [(r["steps"], r["fd"]) for r in rows if r["sampler"] == s]
        ax.plot(*zip(*pts), "o-", label=s)
    for r in anc:
        ax.axhline(r["fd"], color="k", ls="--", label=f"ancestral, {r['steps']} steps")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampler steps")
    ax.set_ylabel(result["fd_name"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fd_vs_steps.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run or zoo folder")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    p.add_argument("--samplers", nargs="+", default=["unipc_auto", "euler"])
    p.add_argument("--ancestral", type=int, default=1000, help="steps of the ancestral reference (0: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result = run(args.run, args.n, args.steps, args.samplers, args.ancestral, args.device, args.batch_size, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    render(result, args.out)
    print((args.out / "fd_vs_steps.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
