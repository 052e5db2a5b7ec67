"""Training: the loop (EMA, checkpoints, exact resume, DDP, bf16 autocast, progress) and run folders."""

from difflab.models import build_denoiser, load_run
from difflab.train.loop import RECIPES, TrainConfig, load_training_data, plot_loss, recipe_config, train

__all__ = [
    "RECIPES",
    "TrainConfig",
    "recipe_config",
    "train",
    "build_denoiser",
    "load_run",
    "load_training_data",
    "plot_loss",
]
