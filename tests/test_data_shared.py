"""The real MNIST in ../shared/data (skipped when absent): it loads, and the downloader's md5s are its md5s."""

from pathlib import Path

import pytest

from vitlab.data import load_data
from vitlab.data.download import DATASETS

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
pytestmark = [pytest.mark.shared_data,
              pytest.mark.skipif(not (MNIST / "MD5SUMS").is_file(), reason=f"{MNIST} is absent (a fresh clone)")]


def test_real_mnist_loads_and_matches_official_md5s():
    sums = dict(reversed(line.split()) for line in (MNIST / "MD5SUMS").read_text().splitlines() if line.strip())
    assert {f.name: f.md5 for f in DATASETS["mnist"][1]} == sums
    d = load_data(f"mnist:{MNIST}")
    assert (len(d.train), len(d.test)) == (60000, 10000)
    assert d.train.class_counts()[1] == 6742 and d.train.images.shape[1:] == (1, 28, 28)
