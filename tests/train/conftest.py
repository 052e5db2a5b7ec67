"""Shared fixtures for the training tests: one thread, and a tiny trained run folder."""

import pytest
import torch

from difflab.train import train
from tests.train.helpers import tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded, as the subprocesses run: bitwise comparisons need the same reduction order,
    and on a shared 2-core machine a busy core stalls every OpenMP barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
