"""Tiny training configs, subprocess runners and checkpoint comparisons shared by the train and CLI tests."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from difflab.train import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def tiny_config(**changes) -> TrainConfig:
    """unet-xs at 16 channels on 16x16 digits, batch 16: ~30 ms a step on one core."""
    values = dict(data="digits", model="unet-xs", model_overrides={"channels": 16}, batch_size=16,
                  steps=4, lr=2e-3, warmup=2, save_every=0, log_every=1, ema_decay=0.99)
    values.update(changes)
    return TrainConfig(**values)


def write_config(cfg: TrainConfig, path: Path) -> Path:
    """cfg as a JSON file that `difflab train --config` reads."""
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    return path


def subprocess_env() -> dict[str, str]:
    """One OpenMP thread (as the in-process tests run), no tqdm noise, difflab importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def difflab_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m difflab ARGS` in a subprocess; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "difflab", *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=REPO)


def run_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run: checkpoint.safetensors (model., ema., optim.) and model.safetensors (as final.)."""
    tensors = load_file(str(run / "checkpoint.safetensors"))
    tensors.update({f"final.{k}": v for k, v in load_file(str(run / "model.safetensors")).items()})
    return tensors


def log_rows(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines() if r.strip()]
