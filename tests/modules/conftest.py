import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small modules: one intra-op thread (OpenMP threads spin against each other on a shared,
    loaded machine and make these tests 10-20x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
