"""Project-wide test settings.

Every test runs with one torch thread: the models here are tiny, and on a shared 2-core
machine two threads per process oversubscribe the cores (a 1-second oracle test measured
187 s under load with 2 threads). Tests that need more threads set them themselves.

Tests marked `needs_fashion_mnist` are skipped, with the command that installs the data in
pytest's summary, when the Debian package `dataset-fashion-mnist` is absent (`make test`
installs it where it can; see the Makefile's `data` target). Tests marked `needs_browser` (the
`difflab ui` browser test) are skipped the same way without Debian's chromium and chromium-driver.
"""

import shutil

import pytest
import torch

from difflab.data.fashion_mnist import ENV_VAR, INSTALL_COMMAND, fashion_mnist_available

FASHION_MNIST_MISSING = (
    f"Fashion-MNIST is not installed: run `{INSTALL_COMMAND}` as root (or point ${ENV_VAR} at the four idx files)"
)


BROWSER_MISSING = (
    "no headless browser: run `apt-get update && apt-get install -y chromium chromium-driver` as root "
    "(make test does where it can)"
)


def browser_available() -> bool:
    return shutil.which("chromium") is not None and shutil.which("chromedriver") is not None


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_fashion_mnist: skipped when the Fashion-MNIST files are absent")
    config.addinivalue_line("markers", "needs_browser: skipped when Debian's chromium and chromium-driver are absent")


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not fashion_mnist_available():
        skips["needs_fashion_mnist"] = pytest.mark.skip(reason=FASHION_MNIST_MISSING)
    if not browser_available():
        skips["needs_browser"] = pytest.mark.skip(reason=BROWSER_MISSING)
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
