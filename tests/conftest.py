"""Project-wide test settings.

Every test runs with one torch thread: the models here are tiny, and on a shared 2-core
machine two threads per process oversubscribe the cores (a 1-second oracle test measured
187 s under load with 2 threads). Tests that need more threads set them themselves.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
