"""The decoded-image cache: one uint8 ``.npy`` file per split, read back as a memory map.

A split decoded at one size is ``CACHE/images/KEY.npy`` (``(N, C, H, W)`` uint8, a plain NumPy file:
``numpy.load(path, mmap_mode="r")`` reads it too) beside ``KEY.json``, which records what the build found (bad
files, per-image channel sums for the mean and std) and the file's size and header checksum. The images are
written while they are decoded, chunk by chunk, by worker processes into a preallocated temporary file that is
renamed into place when complete, and ``KEY.json`` is written last: a build that crashes or runs out of disk
leaves no cache that looks complete. A file whose size or header no longer matches its ``KEY.json`` is rebuilt,
with one log line saying so.

Processes of one machine (``torchrun``, ``devices=N``) build a key once: the first takes ``KEY.lock``, the
others wait on it and then map the same file, so the page cache holds one copy of the pixels.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from vitlab._files import atomic_write_text
from vitlab.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when decoding or the file layout changes: old caches then miss
CHUNK = 256  # images per task sent to a worker process
INLINE_BELOW = 512  # fewer images than this decode in this process: starting workers costs more
# decode(items) -> (images (len(items), C, H, W) uint8, [(i, error message), ...]) for a chunk of the source's
# items (file paths, row numbers); it runs in a worker process, so it is a picklable module-level function.
DecodeChunk = Callable[[Sequence], tuple[np.ndarray, list[tuple[int, str]]]]


def default_cache_dir() -> Path:
    """``$VITLAB_CACHE`` if set, else ``~/.cache/vitlab``."""
    env = os.environ.get("VITLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitlab"


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The folder of the cache files: ``cache_dir`` (default :func:`default_cache_dir`) / ``images``."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "images"


def cache_key(*parts) -> str:
    """A short key for the JSON-serialisable ``parts`` (with :data:`CACHE_VERSION`)."""
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], default=str).encode()).hexdigest()[:32]


@dataclass
class CachedImages:
    """A split read from the cache: the images as a memory-mapped tensor, which images failed to decode, the
    per-image channel sums and sums of squares ``(N, C, 2)`` int64, and the file."""

    images: torch.Tensor
    ok: np.ndarray
    errors: list[str]
    moments: torch.Tensor
    path: Path | None


def cached_images(key: str, shape: tuple[int, int, int, int], decode: DecodeChunk, items: Sequence, *,
                  cache_dir=None, workers: int | None = None, what: str = "images") -> CachedImages:
    """The images of ``key`` from the cache, decoding them first (``decode(items[i:j])`` for each chunk, in up to
    ``workers`` processes) when the cache has no complete file for it. ``what`` names the source in messages.

    When the cache folder cannot be written (a read-only home), the images are decoded into a temporary file
    that is deleted when the process ends; a disk that fills up mid-build raises :class:`DataError`.
    """
    root = cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f"{key}.lock", "a+b")  # noqa: SIM115 - held for the build, closed below
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _no_space(root, shape) from None
        log.warning("%s: cannot write the image cache (%s); decoding %s into a temporary file", root,
                    e.strerror or e, what)
        return _build_temporary(shape, decode, items, workers)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes: one build per key on this machine
        path = root / f"{key}.npy"
        found = _read_meta(path, shape)
        if found is None:
            log.info("%s: decoding %d images to %dx%d, %d channel(s) into %s", what, shape[0], shape[2], shape[3],
                     shape[1], path)
            found = _build(path, shape, decode, items, workers)
        else:
            log.info("%s: %d images mapped from the cache %s", what, shape[0], path)
    return _open(path, shape, found)


def _no_space(where: Path, shape) -> DataError:
    need = int(np.prod(shape))
    free = shutil.disk_usage(where if where.exists() else where.parent).free if where.parent.exists() else 0
    return DataError(f"{where}: no space left for the image cache ({need / 2**30:.2f} GiB needed, "
                     f"{free / 2**30:.2f} GiB free); free space there or set cache_dir (--cache-dir, $VITLAB_CACHE) "
                     "to a larger disk")


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _header(shape) -> bytes:
    """The .npy header of a C-ordered uint8 array of ``shape`` (NumPy's own format, version 1.0)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _read_meta(path: Path, shape) -> dict | None:
    """The build record of a complete cache file for ``shape``, else None (a damaged file is logged once)."""
    meta_path = _meta_path(path)
    if not meta_path.is_file():
        return None
    header = _header(shape)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        size = path.stat().st_size
        with open(path, "rb") as f:
            found = f.read(len(header))
    except FileNotFoundError:
        log.warning("%s: the cache file is missing beside its record; decoding again", path)
        return None
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable cache record (%s); decoding again", meta_path, e)
        return None
    problem = None
    if meta.get("version") != CACHE_VERSION or list(meta.get("shape", ())) != list(shape):
        problem = "it was written for another version or size"
    elif size != meta.get("bytes"):
        problem = f"it is truncated or damaged ({size:,} bytes, {meta.get('bytes'):,} written)"
    elif hashlib.sha256(found).hexdigest() != meta.get("header_sha256"):
        problem = "its header is corrupt"
    if problem:
        log.warning("%s: cache file not usable (%s); decoding again", path, problem)
        return None
    return meta


def _open(path: Path, shape, meta: dict) -> CachedImages:
    """Map a complete cache file (copy-on-write: the pages stay the page cache's, the tensor is writable)."""
    array = np.load(path, mmap_mode="c", allow_pickle=False)
    return _result(torch.from_numpy(array), meta, path)


def _result(images: torch.Tensor, meta: dict, path: Path | None) -> CachedImages:
    n, c = images.shape[:2]
    ok = np.ones(n, dtype=bool)
    errors = []
    for i, msg in meta["errors"]:
        ok[i] = False
        errors.append(msg)
    moments = torch.tensor(meta["moments"], dtype=torch.int64).reshape(n, c, 2) if n else torch.zeros(0, c, 2,
                                                                                                      dtype=torch.int64)
    return CachedImages(images=images, ok=ok, errors=errors, moments=moments, path=path)


def _build(path: Path, shape, decode: DecodeChunk, items: Sequence, workers: int | None) -> dict:
    """Decode into a temporary file beside ``path``, rename it into place, then write its record."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        meta = _fill(fd, tmp, shape, decode, items, workers, path.parent)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        meta.update(version=CACHE_VERSION, shape=list(shape), bytes=path.stat().st_size,
                    header_sha256=hashlib.sha256(_header(shape)).hexdigest())
        atomic_write_text(_meta_path(path), json.dumps(meta))
        return meta
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _build_temporary(shape, decode: DecodeChunk, items: Sequence, workers: int | None) -> CachedImages:
    """Decode into an unlinked temporary file (a read-only cache folder): mapped like a cache file, gone at exit."""
    fd, tmp = tempfile.mkstemp(prefix="vitlab-images-", suffix=".npy")
    try:
        meta = _fill(fd, tmp, shape, decode, items, workers, Path(tmp).parent)
        array = np.load(tmp, mmap_mode="c", allow_pickle=False)
    finally:
        os.close(fd)
        os.unlink(tmp)
    return _result(torch.from_numpy(array), meta, None)


def _fill(fd: int, tmp: str, shape, decode: DecodeChunk, items: Sequence, workers: int | None, where: Path) -> dict:
    """Write the header, reserve the file's full size, and decode every chunk into place; return the record."""
    header = _header(shape)
    total = len(header) + int(np.prod(shape))
    try:
        os.pwrite(fd, header, 0)
        _reserve(fd, total)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(where, shape) from None
        raise
    target = _Target(path=tmp, fd=fd, offset=len(header), image_bytes=int(np.prod(shape[1:])))
    errors: list[tuple[int, str]] = []
    moments = np.zeros((shape[0], shape[1], 2), dtype=np.int64)
    try:
        for start, part_errors, part_moments in _run_chunks(items, decode, target, workers):
            errors += [(start + i, msg) for i, msg in part_errors]
            moments[start:start + len(part_moments)] = part_moments
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(where, shape) from None
        raise
    return {"errors": errors, "moments": moments.reshape(-1).tolist()}


def _reserve(fd: int, total: int) -> None:
    """Give the file its full size now, so that a disk without the room fails before any decoding."""
    try:
        os.posix_fallocate(fd, 0, total)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            raise
        os.ftruncate(fd, total)  # a file system without fallocate: a sparse file, filled as we go


@dataclass
class _Target:
    """Where a chunk's images go: the temporary file (opened again by path in a worker process)."""

    path: str
    fd: int
    offset: int
    image_bytes: int


_OPEN_TARGETS: dict[str, int] = {}  # in a worker process: the target file, opened once


def _write_chunk(decode: DecodeChunk, target: _Target, start: int, chunk: Sequence, inline: bool):
    """Decode the images of ``chunk`` (the items from ``start`` on) and write them into the target; return
    (start, errors, channel moments)."""
    images, errors = decode(chunk)
    if inline:
        fd = target.fd
    else:
        fd = _OPEN_TARGETS.get(target.path)
        if fd is None:
            fd = _OPEN_TARGETS[target.path] = os.open(target.path, os.O_WRONLY)
    data = memoryview(np.ascontiguousarray(images)).cast("B")
    offset, written = target.offset + start * target.image_bytes, 0
    while written < len(data):  # pwrite may write less than asked
        written += os.pwrite(fd, data[written:], offset + written)
    return start, errors, _moments(images)


def _moments(images: np.ndarray) -> np.ndarray:
    """Per image and channel: (sum of the pixel values, sum of their squares), int64 (n, C, 2), exact."""
    out = np.zeros((images.shape[0], images.shape[1], 2), dtype=np.int64)
    for i, image in enumerate(images):  # an image at a time: the temporaries stay small
        flat = image.reshape(image.shape[0], -1)
        out[i, :, 0] = flat.sum(-1, dtype=np.int64)
        wide = flat.astype(np.uint16)  # 255 * 255 fits in 16 bits
        out[i, :, 1] = (wide * wide).sum(-1, dtype=np.int64)
    return out


def pool_context():
    # fork starts a worker in milliseconds and the workers only run PIL and NumPy; spawn elsewhere.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _run_chunks(items: Sequence, decode: DecodeChunk, target: _Target, workers: int | None) -> Iterator:
    """Each chunk's (start, errors, moments), decoded in this process (few images, workers=1) or in a pool
    that keeps at most two chunks per worker in flight (the memory of a build does not grow with ``n``)."""
    n = len(items)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    starts = list(range(0, n, CHUNK))
    if workers <= 1 or n < INLINE_BELOW:
        for s in starts:
            yield _write_chunk(decode, target, s, items[s:s + CHUNK], True)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context()) as pool:
        pending = []
        for s in starts:
            pending.append(pool.submit(_write_chunk, decode, target, s, items[s:s + CHUNK], False))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def cache_files(cache_dir: str | os.PathLike | None = None) -> list[tuple[Path, int]]:
    """The decoded-image cache files (and half-written ones a killed process left) with their sizes in bytes,
    largest first. Each is one split at one size; a changed source gets a new file, the old one stays until
    :func:`clear_cache`."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return []
    found = [(f, f.stat().st_size) for f in root.iterdir()
             if f.is_file() and (f.suffix == ".npy" or f.name.endswith(".npy.tmp") or ".npy." in f.name)]
    return sorted(found, key=lambda item: (-item[1], item[0].name))


def clear_cache(cache_dir: str | os.PathLike | None = None) -> tuple[int, int]:
    """Delete the decoded-image cache files: (files, bytes) removed. The next load decodes again."""
    removed = freed = 0
    for f, size in cache_files(cache_dir):
        for extra in (_meta_path(f), f.with_suffix(".lock")):
            with contextlib.suppress(FileNotFoundError):
                if f.suffix == ".npy":
                    extra.unlink()
        try:
            f.unlink()
        except FileNotFoundError:
            continue
        removed, freed = removed + 1, freed + size
    shards = cache_root(cache_dir).parent / "shards"  # WebDataset shard indexes: small, rebuilt on demand
    for f in shards.glob("*.json") if shards.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    return removed, freed


def file_stamp(paths: Sequence[str], missing_ok: bool = False) -> list:
    """What keys a cache to files: each path (absolute), size and modification time (a file that cannot be
    read: a :class:`DataError`, or with ``missing_ok`` the size -1, for its decoding to report)."""
    out = []
    for f in paths:
        try:
            st = os.stat(f)
        except OSError as e:
            if not missing_ok:
                raise DataError(f"{f}: cannot read the file ({e.strerror}); did it move while loading?") from None
            out.append((os.path.abspath(f), -1, -1))
            continue
        out.append((os.path.abspath(f), st.st_size, st.st_mtime_ns))
    return out
