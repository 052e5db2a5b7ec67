"""The one runner of papers/: parts, `--quick`, results merged by part, caches, figures and reports,
all written atomically. Each paper's run.py holds only its experiment and declares it:

    PAPER = Paper("dit", __doc__, parts={"ae": part_ae, "train": part_train, "eval": part_eval},
                  full=FULL, quick=QUICK, report=write_report, options=add_options, setup=setup)
    if __name__ == "__main__":
        main(PAPER)

    python -m papers.dit.run [--only PART ...] [--quick] [--report] [--no-report] [--out DIR] [--seed S]
                             [--device auto|cpu|cuda] [--dtype fp32|bf16|fp16]

A part is `fn(run) -> value`; the value is stored as results.json[part] (a part that returns None
stored its own entries; one that returns SKIPPED could not run here and leaves no trace), and the
part's wall and CPU seconds as results.json["runs"][part]. The
report is `report(run)`: it reads results.json only, so `--report` rebuilds report.md and the
figures without rerunning anything. `--quick` uses the paper's QUICK settings and writes to
_quick/ beside run.py (or --out), never over the committed full results.

The statistics claims are stated with live here too: binomial standard errors, trends against
noise, the paired sign test.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "load_pipeline",
    "Paper",
    "Run",
    "Results",
    "main",
    "log",
    "cpu_seconds",
    "prop_se",
    "trend",
    "key",
    "sign_test",
    "pm",
    "exceeds",
    "fd_with_se",
    "image_rows",
    "atomic_write_text",
    "atomic_write_bytes",
    "save_tensor",
    "load_tensor",
    "save_figure",
    "cache_path",
    "timing",
    "PAPERS_DIR",
    "SKIPPED",
]

PAPERS_DIR = Path(__file__).resolve().parent
SKIPPED = object()  # what a part returns when it cannot run here (a model missing): nothing is stored


# --------------------------------------------------------------------------------------------
# Files, written atomically (a crash keeps the old file whole)
# --------------------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def save_tensor(out: Path, name: str, obj) -> Path:
    """torch.save(obj) as out/cache/NAME.pt (tensors are detached and moved to the CPU)."""
    import torch

    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(Path(out) / "cache" / f"{name}.pt", buf.getvalue())


def load_tensor(out: Path, name: str):
    """out/cache/NAME.pt (weights_only), or None when it is not there."""
    import torch

    path = Path(out) / "cache" / f"{name}.pt"
    return torch.load(path, weights_only=True) if path.exists() else None


def save_figure(fig, path: Path, **savefig_kw) -> Path:
    """A matplotlib figure as a PNG, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kw)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


class Results:
    """results.json in `out`, merged by part. Every write happens under a file lock (out/.lock), so
    parts may run in parallel processes (one per core) without losing each other's entries.
    `sort_keys` is the paper's choice of key order (its report may walk the file in insertion order)."""

    def __init__(self, out: Path, sort_keys: bool = True):
        self.path = Path(out) / "results.json"
        self.sort_keys = sort_keys

    def load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def update(self, change: Callable[[dict], None]) -> dict:
        """Load, change in place and write back, all under the lock; returns the new contents."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            res = self.load()
            change(res)
            atomic_write_text(self.path, json.dumps(res, indent=1, sort_keys=self.sort_keys))
        return res

    def save(self, part: str, value) -> None:
        self.update(lambda res: res.__setitem__(part, value))

    def save_entry(self, part: str, name: str, value: dict, merge: bool = False) -> None:
        """results[part][name] = value (merge: updated key by key, for entries written piecewise)."""

        def change(res: dict) -> None:
            if merge:
                res.setdefault(part, {}).setdefault(name, {}).update(value)
            else:
                res.setdefault(part, {})[name] = value

        self.update(change)


# --------------------------------------------------------------------------------------------
# A paper and one run of it
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One invocation of a paper: where it writes, its settings and its parsed flags."""

    paper: Paper
    out: Path
    quick: bool
    seed: int
    settings: dict
    args: argparse.Namespace
    state: Any = None  # what `setup` returned (models loaded once for all parts)

    @property
    def results(self) -> Results:
        return Results(self.out, self.paper.sort_keys)

    def cache(self, name: str) -> Path:
        (self.out / "cache").mkdir(parents=True, exist_ok=True)
        return self.out / "cache" / name

    def figure(self, name: str) -> Path:
        (self.out / "figures").mkdir(parents=True, exist_ok=True)
        return self.out / "figures" / name


@dataclass
class Paper:
    """A paper's experiment: its parts (name -> fn(run) -> value), settings (FULL and QUICK),
    report (fn(run), from results.json alone) and optional hooks:

    options(parser): extra flags; configure(run): settings from those flags (after FULL/QUICK are
    chosen; may raise ValueError); setup(run) -> state: models loaded once before the parts run;
    merge: parts whose dict value is merged into the stored one instead of replacing it."""

    name: str
    doc: str
    parts: dict[str, Callable[[Run], Any]]
    report: Callable[[Run], None]
    full: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    options: Callable[[argparse.ArgumentParser], None] | None = None
    configure: Callable[[Run], None] | None = None
    setup: Callable[[Run], Any] | None = None
    merge: tuple[str, ...] = ()
    sort_keys: bool = True
    title: str = ""  # the papers reproduced, in a line (the site's heading)
    claim: str = ""  # what they claim, in one sentence (the site's index)

    @property
    def folder(self) -> Path:
        return PAPERS_DIR / self.name

    def parser(self) -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser(
            prog=f"python -m papers.{self.name}.run",
            description=self.doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        ap.add_argument("--only", nargs="*", choices=list(self.parts), help="parts to run (default: all)")
        ap.add_argument(
            "--quick",
            action="store_true",
            help="tiny settings, to check the plumbing (written to _quick/, not over the full results)",
        )
        ap.add_argument("--report", action="store_true", help="only rebuild report.md and the figures")
        ap.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
        ap.add_argument(
            "--out",
            type=Path,
            default=None,
            help="output folder (default: the paper's folder; _quick/ in it with --quick)",
        )
        ap.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
        ap.add_argument(
            "--device",
            default="auto",
            help="device of the pretrained pipelines the paper loads: cpu, cuda, cuda:N or auto (CUDA when "
            "present; default). Trainings inside a paper run on the CPU",
        )
        ap.add_argument(
            "--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="their compute dtype (default fp32)"
        )
        if self.options is not None:
            self.options(ap)
        return ap


# where the pretrained pipelines a paper loads run (--device, --dtype; set by `main`)
DEVICE: Any = "cpu"
DTYPE: Any = "fp32"


def load_pipeline(source):
    """A zoo model (by name) or a run / diffusers folder as a Pipeline on the run's --device and
    --dtype. Paper code may keep its tensors on the CPU: the denoiser moves its inputs to the
    network and back (`Preconditioned`)."""
    from difflab import zoo
    from difflab.pipeline import Pipeline

    if (zoo.ZOO_DIR / str(source) / "zoo.json").is_file():
        pipe = zoo.load(str(source))
    else:
        pipe = Pipeline.from_pretrained(source)
    return pipe.to(DEVICE, DTYPE)


def main(paper: Paper, argv: list[str] | None = None) -> Run:
    """Parse the flags, run the chosen parts (each stored as it finishes), write the report."""
    import torch

    global DEVICE, DTYPE

    args = paper.parser().parse_args(argv)
    from difflab.pipeline import resolve_device, resolve_dtype

    DEVICE, DTYPE = resolve_device(args.device), resolve_dtype(args.dtype)  # a bad one: an error before any work
    out = Path(args.out) if args.out is not None else (paper.folder / "_quick" if args.quick else paper.folder)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    run = Run(paper, out, args.quick, args.seed, dict(paper.quick if args.quick else paper.full), args)
    if paper.configure is not None:
        paper.configure(run)
    if not args.report:
        run.state = paper.setup(run) if paper.setup is not None else None
        for part in args.only or list(paper.parts):
            t0, c0 = time.perf_counter(), cpu_seconds()
            value = paper.parts[part](run)
            if value is SKIPPED:
                continue
            results = run.results
            if value is not None:
                if part in paper.merge:
                    results.update(lambda res: res.__setitem__(part, {**res.get(part, {}), **value}))
                else:
                    results.save(part, value)
            took = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu_seconds() - c0, 1)}

            def record(res: dict) -> None:
                runs = res.setdefault("runs", {})
                runs[part] = took
                runs["machine"] = f"{os.cpu_count()} cores, torch {torch.__version__}, 1 thread" + (
                    "" if DEVICE.type == "cpu" and DTYPE == torch.float32 else f"; pipelines on {DEVICE} in {DTYPE}"
                )

            results.update(record)
            log(f"{part} done in {took['wall_s']:.0f} s ({took['cpu_s']:.0f} CPU-s)")
    if not args.no_report:
        paper.report(run)
        log(f"wrote {out / 'report.md'}")
    return run


# --------------------------------------------------------------------------------------------
# Clocks, logging and the statistics claims are stated with
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True, file=sys.stdout)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def report_head(title: str, name: str, doc: str) -> list[str]:
    """A page's first lines: its title, the command that produced it, and the module docstring's
    description (its second paragraph up to the command block)."""
    return [
        f"# {title}\n",
        f"Produced by `python papers/{name}/run.py` (numbers from `results.json`; `--report` rebuilds this page).\n",
        doc.split("\n\n", 1)[1].split("\n\n    python")[0].strip() + "\n",
    ]


def train_cached(cfg, folder: Path) -> dict:
    """Train run config `cfg` into `folder`: reuse a finished run of exactly cfg, resume an unfinished
    one from its checkpoint, else start; then the run summarised (steps, CPU- or wall-minutes by the
    run's clock, the last logged loss)."""
    from dataclasses import asdict

    from difflab.train import train

    folder = Path(folder)
    if not _finished_run(folder, json.loads(json.dumps(asdict(cfg))), cfg.steps, cfg.minutes):
        train(cfg, folder, resume=(folder / "checkpoint.safetensors").is_file(), progress=False)
    step, seconds, loss = _progress(folder)
    return {"steps": step, "cpu_min": round(seconds / 60, 1), "final_loss": loss}


def _progress(folder: Path) -> tuple[int, float, float | None]:
    """(steps, seconds, last logged loss) of a run folder: the checkpoint's step and time where there
    is one (the log is written every log_every steps only), else the log's last row."""
    rows = [json.loads(r) for r in (folder / "log.jsonl").read_text().splitlines() if r.strip()]
    step, seconds = (rows[-1]["step"], rows[-1]["time"]) if rows else (0, 0.0)
    if (folder / "checkpoint.safetensors").is_file():
        from difflab.runfolder import read_safetensors

        _, meta = read_safetensors(folder / "checkpoint.safetensors")
        step, seconds = int(meta.get("step", step)), float(meta.get("elapsed", seconds))
    return step, seconds, rows[-1]["loss"] if rows else None


def _finished_run(folder: Path, cfg: dict, steps, minutes) -> bool:
    """folder holds a run of exactly the train config `cfg` whose budget is spent."""
    try:
        saved = json.loads((folder / "config.json").read_text())["train"]
        step, seconds, _ = _progress(folder)
    except (OSError, KeyError, ValueError):
        return False
    if saved != cfg or not (folder / "model.safetensors").is_file():
        return False
    return step >= steps if steps is not None else seconds >= 60 * minutes


def key(v: float) -> str:
    """A sweep value as a results.json key: 0.5 -> '0.5', 2.0 -> '2'."""
    return f"{v:g}"


def prop_se(p: float, n: int) -> float:
    """Binomial standard error of a proportion p measured on n points."""
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def trend(values: list[float], direction: int, noise: float) -> tuple[bool, str]:
    """Whether `values` move in `direction` (+1 rise, -1 fall): (holds, how), with steps against
    the direction smaller than `noise` counted as flat."""
    d = [direction * (b - a) for a, b in zip(values, values[1:])]
    total = direction * (values[-1] - values[0])
    if total <= noise:
        return False, "does not hold" + (" (moves the other way)" if total < -noise else " (no change beyond noise)")
    if all(x > 0 for x in d):
        return True, "holds, monotonically"
    against = [x for x in d if x <= 0]
    if all(-x < noise for x in against):
        return True, f"holds within noise (largest step against it {max(-x for x in against):.3f} < {noise:.3f})"
    return True, f"holds overall but not monotonically (a step of {max(-x for x in against):.3f} against it)"


def pm(v: float, se: float, digits: int = 3) -> str:
    """'v +- se' with `digits` decimals."""
    return f"{v:.{digits}f} +- {se:.{digits}f}"


def exceeds(a: float, sa: float, b: float, sb: float) -> bool:
    """a is above b by more than 2 standard errors of the difference (independent estimates)."""
    return a - b > 2 * (sa**2 + sb**2) ** 0.5


def fd_with_se(feats, ref, boot: int, seed: int) -> tuple[float, float]:
    """Frechet distance of features (N, D) to reference statistics `ref` (.mu, .cov), and its standard
    error from `boot` bootstrap resamples of the features (0 when boot < 2)."""
    import torch

    from difflab.metrics.frechet import frechet_distance, mean_cov

    mu, cov = mean_cov(feats)
    fd = float(frechet_distance(mu, cov, ref.mu, ref.cov))
    g = torch.Generator().manual_seed(seed)
    reps = []
    for _ in range(boot):
        idx = torch.randint(len(feats), (len(feats),), generator=g)
        m, c = mean_cov(feats[idx])
        reps.append(float(frechet_distance(m, c, ref.mu, ref.cov)))
    return fd, float(torch.tensor(reps).std()) if boot > 1 else 0.0


def image_rows(rows: dict, path: Path, title: str = "", per_row: int = 8, label_width: float = 0.2) -> Path:
    """A figure of labelled rows of images in [-1, 1] ({label: (N, C, H, W)}, grey or RGB), saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row, 1.1 * len(rows) + 0.3), squeeze=False)
    for r, (label, x) in enumerate(rows.items()):
        for j in range(per_row):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(x):
                im = ((x[j].float().permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
                ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=label_width, wspace=0.05, hspace=0.1)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=110)


def sign_test(a: list, b: list) -> tuple[int, int, float]:
    """(b right where a wrong, a right where b wrong, two-sided exact sign-test p) on paired 0/1 outcomes."""
    bw = sum(1 for x, y in zip(a, b) if y and not x)
    aw = sum(1 for x, y in zip(a, b) if x and not y)
    m = bw + aw
    if m == 0:
        return bw, aw, 1.0
    tail = sum(math.comb(m, i) for i in range(0, min(bw, aw) + 1)) / 2**m
    return bw, aw, min(1.0, 2 * tail)


def cache_path(out: Path, name: str) -> Path:
    """out/cache/NAME, the folder created."""
    (Path(out) / "cache").mkdir(parents=True, exist_ok=True)
    return Path(out) / "cache" / name


def timing(res: dict, parts) -> dict:
    """results.json's "meta" with the parts' times ("runs", in the order of `parts`) and their
    totals in minutes (wall_min, cpu_min); {} for a file with neither."""
    runs = res.get("runs", {})
    done = {k: runs[k] for k in parts if isinstance(runs.get(k), dict)}
    if not done and "meta" not in res:
        return {}
    return {
        **res.get("meta", {}),
        "parts": done,
        "wall_min": sum(v["wall_s"] for v in done.values()) / 60,
        "cpu_min": sum(v["cpu_s"] for v in done.values()) / 60,
    }
