"""Project 7's tests run torch on one thread: their tensors are tiny, and on a busy 2-core machine a second
OpenMP thread made a tiny model's training step 30x slower (6 ms -> 200 ms), not faster. Restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
