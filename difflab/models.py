"""A trained model back from its run folder: the denoiser, its text encoder and its latent space.

What `Pipeline.from_pretrained` and the training loop's resume both use, below train/ and the
pipeline (inference imports no trainer). The folder's files are read and validated by
`difflab.runfolder`; here config.json's pieces become modules and the weights are loaded into them.

    denoiser, config = load_run("runs/fmnist")                 # EMA weights, eval mode
    text_encoder = load_text_encoder("runs/shapes_text", config)
    space = load_run_latent_space("runs/shapes_ldm", config)   # None for a pixel-space run
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from difflab.core.denoiser import Preconditioned
from difflab.core.schedules import schedule_from_config
from difflab.nn import create_model_from_config
from difflab.nn.base import load_weights
from difflab.nn.text import text_encoder_from_config
from difflab.runfolder import read_run, read_safetensors

__all__ = [
    "build_denoiser",
    "load_run",
    "load_text_encoder",
    "load_run_latent_space",
    "TRAINABLE_PREFIX",
    "AUTOENCODER_FOLDER",
]

AUTOENCODER_FOLDER = "autoencoder"  # the run's copy of its autoencoder
TRAINABLE_PREFIX = "text_encoder."  # a jointly trained text encoder's tensors in a run's safetensors


def build_denoiser(
    model_config: dict, schedule: dict, prediction: str, sigma_data: float | None = None
) -> Preconditioned:
    """Rebuild the denoiser from config.json's pieces (weights freshly initialised). A network with
    learn_sigma (2C output channels: the prediction, then the variance interpolation) gets a
    learned-variance denoiser."""
    net = create_model_from_config(model_config)
    learned = bool(getattr(net.config, "learn_sigma", False))
    return Preconditioned(
        net, schedule_from_config(schedule), prediction, sigma_data=sigma_data, learned_variance=learned
    )


def load_run(run: str | os.PathLike, weights: str = "ema") -> tuple[Preconditioned, dict]:
    """(denoiser in eval mode, config.json) of a run folder; weights "ema" or "raw"."""
    config, tensors, path = read_run(run, weights)
    config_path = Path(run) / "config.json"
    try:
        denoiser = build_denoiser(config["model"], config["schedule"], config["prediction"], config.get("sigma_data"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path} does not describe a buildable model: {type(e).__name__}: {e}") from None
    state = (
        tensors if weights == "ema" else {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    )
    if (config.get("text_encoder") or {}).get("kind") == "word":  # its weights: Pipeline.from_pretrained
        state = {k: v for k, v in state.items() if not k.startswith(TRAINABLE_PREFIX)}
    load_weights(denoiser.net, state, path)
    return denoiser.eval().requires_grad_(False), config


def load_text_encoder(run: str | Path, config: dict, weights: str = "ema") -> nn.Module | None:
    """The run's text encoder in eval mode (None for a run without one); a jointly trained one gets
    its "text_encoder.*" weights from model.safetensors (EMA) or checkpoint.safetensors (raw)."""
    spec = config.get("text_encoder")
    if not spec:
        return None
    run = Path(run)
    try:
        encoder = text_encoder_from_config(spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{run / 'config.json'} has a text_encoder section that builds nothing: {e}") from None
    if encoder.trainable:
        path = run / ("model.safetensors" if weights == "ema" else "checkpoint.safetensors")
        prefix = TRAINABLE_PREFIX if weights == "ema" else "model." + TRAINABLE_PREFIX
        tensors, _ = read_safetensors(path)
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            encoder.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path} does not fit the run's text encoder: {e}") from None
    return encoder.eval().requires_grad_(False)


def load_run_latent_space(run: str | Path, config: dict):
    """The LatentSpace a latent-diffusion run decodes with (its copy in run/autoencoder), or None."""
    spec = config.get("autoencoder")
    if not spec:
        return None
    from difflab.nn.autoencoder import load_latent_space

    return load_latent_space(Path(run) / spec.get("folder", AUTOENCODER_FOLDER))
