"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def one_torch_thread():
    """Run the test with one intra-op thread. On a small machine shared with other processes, two threads
    spin-waiting for each other made the tiny models of the tests 10-25x slower (interop tests: 0.05 s per
    test with one thread, 1.2 s with two, measured side by side on the 2-core dev machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
