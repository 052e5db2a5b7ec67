"""Shared fixtures for the network tests."""

import pytest
import torch


def _randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add Gaussian noise to every parameter, so zero-initialised layers stop hiding inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return model


@pytest.fixture
def randomize():
    return _randomize


@pytest.fixture(autouse=True)
def _seed():
    """Seed every network test (tests/conftest.py already makes them single-threaded)."""
    torch.manual_seed(0)
