"""Fixtures of tests/analysis (helpers live in lahis_helpers.py: several test folders have a conftest.py)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two threads spin-wait badly on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
