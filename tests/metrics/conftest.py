import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run each metrics test on one torch thread. On a shared 2-core machine, two intra-op threads
    spin against each other and the other jobs: measured 4-6 CPU-seconds for one unet-xs training
    step on 2 threads against 0.1 on one, and ~3x the wall time of this folder."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
