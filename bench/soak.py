"""Soak: a training that checkpoints every few seconds while another process samples from its
folder in a loop; memory must stay flat and every checkpoint must load.

    .venv/bin/python bench/soak.py --minutes 30 --out bench/runs/soak     # writes results/soak.{md,json}

Two processes, one thread each:
- the trainer: `difflab.train.train` on digits (unet-xs, batch 16), `save_every` steps between
  checkpoints (about every 2-5 s on a 2-core machine), resumed from its own folder when the
  step budget ends, so the run never stops writing until the clock runs out;
- the reader: in a loop, `Pipeline.from_pretrained(run)` and 8 samples at 4 steps; every load
  must succeed (or wait for the writer inside load_run) and every sample be finite.
Each minute the script records both processes' resident memory (RSS, from /proc), the
trainer's step and the reader's load count. At the end every checkpoint file is read back and
the run is loaded once more. The verdict: RSS growth between minute 2 and the end below 10% for
each process, no failed load, no non-finite sample.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _trainer(run: str, deadline: float, save_every: int, status) -> None:
    import torch

    torch.set_num_threads(1)
    from difflab.train import TrainConfig, train

    steps = 0
    while time.time() < deadline:
        steps += 200
        cfg = TrainConfig(
            data="digits",
            model="unet-xs",
            model_overrides={"channels": 16},
            batch_size=16,
            steps=steps,
            lr=1e-3,
            warmup=10,
            save_every=save_every,
            log_every=save_every,
        )
        train(cfg, run, resume=steps > 200, progress=False)
        status["step"] = steps
        status["trains"] = status.get("trains", 0) + 1


def _reader(run: str, deadline: float, status) -> None:
    import torch

    torch.set_num_threads(1)
    from difflab.pipeline import Pipeline

    loads = failures = 0
    while time.time() < deadline:
        if not (Path(run) / "config.json").exists():
            time.sleep(0.5)
            continue
        try:
            pipe = Pipeline.from_pretrained(run)
            x = pipe(8, steps=4, seed=loads)
            if not torch.isfinite(x).all():
                raise FloatingPointError("non-finite sample")
            loads += 1
        except Exception as e:  # noqa: BLE001 -- the soak counts every failure, whatever its kind
            failures += 1
            status["last_error"] = f"{type(e).__name__}: {e}"
        status["loads"], status["failures"] = loads, failures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--save-every", type=int, default=10, help="optimizer steps between checkpoints")
    p.add_argument("--out", default="bench/runs/soak")
    p.add_argument("--results", default="bench/results")
    p.add_argument(
        "--report-from",
        metavar="LOG",
        help="rebuild the report from a finished soak's printed rows "
        "(one JSON object per line) and its run folder --out",
    )
    args = p.parse_args()
    if args.report_from:
        rows = [json.loads(r) for r in Path(args.report_from).read_text().splitlines() if r.startswith("{")]
        return _report(args, Path(args.out), rows, [None, None], {})
    os.environ["OMP_NUM_THREADS"] = "1"
    run = Path(args.out)
    if run.exists():
        import shutil

        shutil.rmtree(run)
    deadline = time.time() + 60 * args.minutes
    manager = mp.Manager()
    tstatus, rstatus = manager.dict(), manager.dict()
    ctx = mp.get_context("spawn")
    trainer = ctx.Process(target=_trainer, args=(str(run), deadline, args.save_every, tstatus))
    reader = ctx.Process(target=_reader, args=(str(run), deadline, rstatus))
    trainer.start()
    reader.start()
    rows, t0 = [], time.time()
    while trainer.is_alive() or reader.is_alive():
        time.sleep(min(60.0, max(1.0, deadline - time.time() + 1)))
        row = {
            "minute": round((time.time() - t0) / 60, 2),
            "trainer_rss_mb": _rss_mb(trainer.pid) if trainer.is_alive() else None,
            "reader_rss_mb": _rss_mb(reader.pid) if reader.is_alive() else None,
            "step": tstatus.get("step"),
            "loads": rstatus.get("loads"),
            "failures": rstatus.get("failures"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    trainer.join()
    reader.join()
    return _report(args, run, rows, [trainer.exitcode, reader.exitcode], dict(rstatus))


def _report(args, run: Path, rows: list[dict], exitcodes: list, rstatus: dict) -> int:
    """Read every checkpoint file back, load the run once more, and write results/soak.{md,json}."""
    from difflab.pipeline import Pipeline
    from difflab.runfolder import read_safetensors

    for name in ("checkpoint.safetensors", "model.safetensors"):
        read_safetensors(run / name)
    Pipeline.from_pretrained(run)(4, steps=4)
    log = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines() if r.strip()]

    def growth(key):
        vals = [r[key] for r in rows if r[key] is not None and r["minute"] >= 2]
        return (vals[-1] - vals[0]) / vals[0] if len(vals) >= 2 else None

    last = rows[-1] if rows else {}
    result = {
        "minutes": args.minutes,
        "save_every": args.save_every,
        "final_step": log[-1]["step"] if log else None,
        "checkpoints_written": (log[-1]["step"] // args.save_every) if log else 0,
        "loads": rstatus.get("loads", last.get("loads")),
        "failures": rstatus.get("failures", last.get("failures")),
        "last_error": rstatus.get("last_error"),
        "trainer_rss_growth": growth("trainer_rss_mb"),
        "reader_rss_growth": growth("reader_rss_mb"),
        "exitcodes": exitcodes,
        "rows": rows,
    }
    ok = (
        result["failures"] == 0
        and all(c in (0, None) for c in exitcodes)
        and all(g is not None and g < 0.10 for g in (result["trainer_rss_growth"], result["reader_rss_growth"]))
    )
    result["verdict"] = "pass" if ok else "fail"
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Soak: {args.minutes:g} minutes, a checkpoint every {args.save_every} steps, a reader in a loop",
        "",
        f"Verdict: **{result['verdict']}**. Final step {result['final_step']} "
        f"({result['checkpoints_written']} checkpoints); reader loads {result['loads']}, failures "
        f"{result['failures']}; RSS growth from minute 2 to the end: trainer "
        f"{(result['trainer_rss_growth'] or 0):+.1%}, reader {(result['reader_rss_growth'] or 0):+.1%}.",
        "",
        "| minute | trainer RSS MB | reader RSS MB | step | loads | failures |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['minute']} | {r['trainer_rss_mb'] or '-'} | {r['reader_rss_mb'] or '-'} | {r['step']} | "
            f"{r['loads']} | {r['failures']} |"
        )
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    print(f"verdict: {result['verdict']} (results in {out / 'soak.md'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
