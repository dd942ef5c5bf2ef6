"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# The device of the tests marked `device`: the CPU here and in CI; benchmarks/gpu_check.sh runs them again with
# VITLAB_TEST_DEVICE=cuda on a machine with a GPU.
TEST_DEVICE = os.environ.get("VITLAB_TEST_DEVICE", "cpu")
if TEST_DEVICE.startswith("cuda"):  # the bit-for-bit tests need deterministic kernels there (cuDNN, cuBLAS, SDPA)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test decodes folders into its own cache, never the user's ~/.cache/vitlab (the suite used to leave
    about a hundred small files there), and no test reads another's cache."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path_factory.mktemp("vitlab-cache")))


@pytest.fixture()
def device() -> torch.device:
    """``VITLAB_TEST_DEVICE`` (default cpu) as a torch.device; the test is skipped when it names a GPU that this
    machine lacks."""
    dev = torch.device(TEST_DEVICE)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"VITLAB_TEST_DEVICE={TEST_DEVICE}, but torch sees no CUDA device")
    return dev


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
