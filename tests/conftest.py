"""Test-wide settings.

The models under test are small: one torch thread is the fastest for them and keeps the results
independent of the machine's core count (thread count can change the order of float reductions).
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
