import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Unit tests use tiny models: intra-op threads only add overhead, and on a busy CPU OpenMP spinning makes
    them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
