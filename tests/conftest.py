"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test decodes folders into its own cache, never the user's ~/.cache/vitlab (the suite used to leave
    about a hundred small files there), and no test reads another's cache."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path_factory.mktemp("vitlab-cache")))


@pytest.fixture()
def one_thread():
    """Run the test with one intra-op thread. On a small machine shared with other processes, two threads
    spin-waiting for each other made the tiny models of the tests 10-25x slower (interop tests: 0.05 s per
    test with one thread, 1.2 s with two, measured side by side on the 2-core dev machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter, norms and biases included, so a swapped or transposed tensor in a
    converter changes the logits; returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()
