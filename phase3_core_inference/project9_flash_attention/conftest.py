"""Project 9's tests run torch on one thread: their tensors are small, and on a busy 2-core machine a second
OpenMP thread made small operations many times slower, not faster (project 7's measurement). Restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
