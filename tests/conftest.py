"""Project-wide test settings.

Every test runs with one torch thread: the models here are tiny, and on a shared 2-core
machine two threads per process oversubscribe the cores (a 1-second oracle test measured
187 s under load with 2 threads). Tests that need more threads set them themselves.

Tests marked `needs_fashion_mnist` are skipped, with the command that installs the data in
pytest's summary, when the Debian package `dataset-fashion-mnist` is absent (`make test`
installs it where it can; see the Makefile's `data` target).
"""

import pytest
import torch

from difflab.data.fashion_mnist import ENV_VAR, INSTALL_COMMAND, fashion_mnist_available

FASHION_MNIST_MISSING = (
    f"Fashion-MNIST is not installed: run `{INSTALL_COMMAND}` as root (or point ${ENV_VAR} at the four idx files)"
)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_fashion_mnist: skipped when the Fashion-MNIST files are absent")


def pytest_collection_modifyitems(config, items):
    if fashion_mnist_available():
        return
    skip = pytest.mark.skip(reason=FASHION_MNIST_MISSING)
    for item in items:
        if "needs_fashion_mnist" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
