"""Shared fixtures for the training tests: one thread, and a tiny trained run folder."""

import pytest
import torch

from difflab.train import train
from tests.train.helpers import tiny_config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 3-step class-conditional run folder (config.json, model.safetensors, checkpoint.safetensors).

    Treat it as read-only; copy it (`shutil.copytree`) to damage it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(tiny_config(steps=3), tmp_path_factory.mktemp("tiny") / "run", progress=False)
    finally:
        torch.set_num_threads(threads)
