import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny MLPs and 2-D oracles run fastest on one thread (and 2-core machines are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
