"""The memory-mapped decode cache: what it maps, how it is built (atomically, once per machine), how a damaged
file or a full disk is handled, and the prefetching loader that reads batches from it."""

from __future__ import annotations

import errno
import inspect
import json
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import BatchLoader, channel_mean_std, load_data
from vitlab.data import cache as cache_module
from vitlab.data.cache import cache_files
from vitlab.data.loader import ArrayDataset, prefetched
from vitlab.data.sources import folder as folder_source
from vitlab.errors import DataError


def write_folder(root, classes=("cat", "dog", "fox"), per_class=6, size=(14, 12), split=None):
    rng = np.random.default_rng(len(str(root)))
    base = root / split if split else root
    for c in classes:
        (base / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(base / c / f"{i:03d}.png")
    return root


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds ``tensor``'s first byte in this process, from /proc/self/maps (None: none)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else None
    return None


def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def test_a_folder_is_read_through_a_memory_map_of_its_cache_file(tmp_path):
    root = write_folder(tmp_path / "photos")
    d = load_data(f"folder:{root}", image_size=8, cache_dir=tmp_path / "cache", val_fraction=0.34)
    path = d.train.cache_file
    assert path is not None and path == d.val.cache_file and path.endswith(".npy")
    assert mapped_file(d.train.storage) == path  # the pixels are the file's pages, not a copy
    stored = np.load(path, mmap_mode="r")  # a plain .npy: NumPy reads it too
    assert stored.shape == (18, 3, 8, 8) and stored.dtype == np.uint8
    # the held-out split selects rows of the same storage, and reads the same pixels
    assert d.val.storage is d.train.storage and len(d.train) + len(d.val) == 18
    np.testing.assert_array_equal(d.val.images.numpy(), stored[d.val.rows.numpy()])
    assert d.val.take([1, 0]).shape == (2, 3, 8, 8)


def test_the_mean_and_std_from_the_cache_sums_equal_the_histogram_of_the_pixels(tmp_path):
    root = write_folder(tmp_path / "photos", per_class=9)
    d = load_data(f"folder:{root}", image_size=8, cache_dir=tmp_path / "cache", val_fraction=0.3)
    assert d.train.moments is not None
    assert (d.mean, d.std) == d.train.mean_std() == channel_mean_std(d.train.images)
    # a slice at a time, over a selection of rows: the same numbers
    plain = ArrayDataset(d.train.storage, d.train.labels, d.train.classes, rows=d.train.rows)
    assert channel_mean_std(plain) == channel_mean_std(d.train.images)


def test_iterating_a_memory_mapped_dataset_adds_no_anonymous_memory(tmp_path):
    """An epoch over 144 MiB of mapped pixels: the process's anonymous (not file-backed) memory grows by a few
    batches (the prefetched ones, the allocator's and the thread's own), not by the pixels, so a dataset larger
    than memory trains."""
    n = 3000
    images = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(n, 3, 128, 128))
    images[:] = 7
    images.flush()
    del images
    storage = torch.from_numpy(np.load(tmp_path / "big.npy", mmap_mode="c"))
    ds = ArrayDataset(storage, torch.zeros(n, dtype=torch.int64), ["a"], cache_file=str(tmp_path / "big.npy"))
    loader = BatchLoader(ds, batch_size=50, shuffle=True, drop_last=False)
    before = rss_anon_kib()
    total = 0
    for x, _ in loader:
        total += int(x[:, 0, 0, 0].sum())
    grown_mib = (rss_anon_kib() - before) / 1024
    assert total == 7 * n
    assert grown_mib < 40, f"anonymous memory grew by {grown_mib:.1f} MiB for 144 MiB of mapped pixels"


def test_a_build_that_fails_midway_leaves_no_cache_that_looks_complete(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "photos", per_class=200, size=(6, 6))  # 600 files: three chunks
    cache = tmp_path / "cache"
    real = folder_source._decode_chunk
    calls = []

    def dies_on_the_second_chunk(paths, **kw):
        calls.append(len(paths))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C, a kill: whatever ends the build
        return real(paths, **kw)

    monkeypatch.setattr(folder_source, "_decode_chunk", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        load_data(f"folder:{root}", image_size=4, cache_dir=cache, workers=1)
    left = sorted(p.name for p in (cache / "images").iterdir() if not p.name.endswith(".lock"))
    assert left == []  # no .npy, no record, no temporary file
    monkeypatch.setattr(folder_source, "_decode_chunk", real)
    d = load_data(f"folder:{root}", image_size=4, cache_dir=cache, workers=1)
    assert len(d.train) + len(d.val) == 600 and len(cache_files(cache)) == 1


def test_a_disk_that_fills_up_mid_build_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "photos", per_class=200, size=(6, 6))
    cache = tmp_path / "cache"
    real, writes = cache_module.os.pwrite, []

    def full_after_two_chunks(fd, data, offset):
        writes.append(offset)
        if len(writes) > 3:  # the header, two chunks, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(cache_module.os, "pwrite", full_after_two_chunks)
    with pytest.raises(DataError, match=r"cache/images: no space left for the image cache \(0\.00 GiB needed, .* "
                                        r"GiB free\); free space there or set cache_dir") as caught:
        load_data(f"folder:{root}", image_size=4, cache_dir=cache, workers=1)
    assert "\n" not in str(caught.value)
    assert [p for p in (cache / "images").iterdir() if not p.name.endswith(".lock")] == []


def test_no_room_for_the_whole_cache_fails_before_decoding(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "photos")

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.os, "posix_fallocate", no_room)
    monkeypatch.setattr(folder_source, "_decode_chunk", lambda *a, **k: pytest.fail("decoded with no room"))
    with pytest.raises(DataError, match="no space left for the image cache"):
        load_data(f"folder:{root}", image_size=8, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("damage", ["truncate", "header", "record"])
def test_a_damaged_cache_file_is_found_and_rebuilt_with_one_log_line(tmp_path, caplog, damage):
    root = write_folder(tmp_path / "photos")
    cache = tmp_path / "cache"
    first = load_data(f"folder:{root}", image_size=8, cache_dir=cache)
    expected = first.train.images.clone()
    path = first.train.cache_file
    del first
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(200)
    elif damage == "header":
        with open(path, "r+b") as f:
            f.write(b"\x93NUMPY garbage")
    else:
        with open(path.replace(".npy", ".json"), "w") as f:
            f.write("{not json")
    with caplog.at_level(logging.INFO, logger="vitlab.data.cache"):
        again = load_data(f"folder:{root}", image_size=8, cache_dir=cache)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    reason = {"truncate": "truncated or damaged", "header": "header is corrupt", "record": "unreadable cache record"}
    assert len(warnings) == 1 and reason[damage] in warnings[0] and "decoding again" in warnings[0]
    assert torch.equal(again.train.images, expected)


def test_an_unwritable_cache_folder_decodes_into_a_temporary_map(tmp_path, caplog):
    root = write_folder(tmp_path / "photos")
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")  # the cache folder cannot be made under a file
    with caplog.at_level(logging.WARNING):
        d = load_data(f"folder:{root}", image_size=8, cache_dir=blocked)
    assert "cannot write the image cache" in caplog.text
    assert d.train.cache_file is None and len(d.train) + len(d.test) == 18
    reference = load_data(f"folder:{root}", image_size=8, cache_dir=tmp_path / "ok")
    assert torch.equal(d.train.images, reference.train.images)


_RANK = """
import json, logging, sys, time
from pathlib import Path
import torch
from vitlab.data import load_data

{mapped_file}

root, cache, me, other = (Path(a) for a in sys.argv[1:5])
records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())

logging.getLogger("vitlab.data.cache").addHandler(Keep())
logging.getLogger("vitlab.data.cache").setLevel(logging.INFO)
me.touch()
deadline = time.monotonic() + 60
while not other.exists() and time.monotonic() < deadline:  # both start loading at the same moment
    time.sleep(0.01)
d = load_data(f"folder:{{root}}", image_size=8, cache_dir=cache, workers=2)
print(json.dumps([sum("decoding" in r for r in records), str(d.train.cache_file), mapped_file(d.train.storage),
                  int(d.train.images.sum())]))
"""


def test_two_processes_of_one_machine_build_the_cache_once_and_map_the_same_file(tmp_path):
    """Two fresh interpreters (as torchrun starts its ranks) load one folder at the same moment: one decodes it
    into the cache under the lock, the other waits and maps the same file."""
    root = write_folder(tmp_path / "photos", per_class=300, size=(10, 10))  # 900 files: a pool, several chunks
    script = _RANK.format(mapped_file=inspect.getsource(mapped_file))
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(root), str(tmp_path / "cache"), str(ready[i]),
                               str(ready[1 - i])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(r[0] for r in results) == [0, 1]  # one built it, the other waited and mapped it
    assert results[0][1] == results[1][1] == results[0][2] == results[1][2]  # both map the one file
    assert results[0][3] == results[1][3]
    assert len(cache_files(tmp_path / "cache")) == 1


def test_prefetch_gives_the_batches_in_order_stops_with_the_consumer_and_raises_its_errors():
    images = torch.arange(40 * 3, dtype=torch.int64).reshape(40, 3) % 256
    ds = ArrayDataset(images.to(torch.uint8).reshape(40, 3, 1, 1), torch.arange(40), ["a"])
    loader = BatchLoader(ds, batch_size=6, shuffle=True, seed=5, drop_last=False)
    loader.set_epoch(3)
    direct = [(ds.take(b), ds.labels[b]) for b in loader._batch_indices()]
    got = list(loader)
    assert len(got) == len(direct) == 7
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, direct))
    before = threading.active_count()
    it = iter(loader)
    next(it)
    it.close()  # the consumer stops early (a time limit inside an epoch)
    assert threading.active_count() == before

    def fails_at_three(i):
        if i == 3:
            raise DataError("item 3 cannot be read")
        return i

    seen = []
    with pytest.raises(DataError, match="item 3 cannot be read"):
        for value in prefetched(fails_at_three, range(10)):
            seen.append(value)
    assert seen == [0, 1, 2] and threading.active_count() == before


def test_a_resized_idx_dataset_is_mapped_from_the_cache_with_the_pixels_of_the_in_memory_resize(tmp_path):
    from test_data_sources import write_mnist

    from vitlab.data.transforms import resize_uint8

    write_mnist(tmp_path / "mnist")
    native = load_data(f"mnist:{tmp_path / 'mnist'}")
    assert native.train.cache_file is None  # at its native size: in memory, as the files hold it
    big = load_data(f"mnist:{tmp_path / 'mnist'}", image_size=40, channels=3, cache_dir=tmp_path / "cache")
    assert big.train.cache_file is not None and mapped_file(big.train.storage) == big.train.cache_file
    expected = resize_uint8(native.train.images.expand(-1, 3, -1, -1), (40, 40))
    assert torch.equal(big.train.images, expected)
    again = load_data(f"mnist:{tmp_path / 'mnist'}", image_size=40, channels=3, cache_dir=tmp_path / "cache")
    assert again.train.cache_file == big.train.cache_file
