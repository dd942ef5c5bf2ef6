"""Image folders: ``ROOT/<class>/*.jpg``, with or without ``train/``, ``val/`` (``valid/``), ``test/`` split folders.

Images are decoded in worker processes to uint8 at one size and cached on disk (keyed by the file list, file
sizes, mtimes, the target size and channels), so a second epoch or the next run never decodes again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitlab.data.images import IMAGE_EXTENSIONS, decode_image, is_image_file, list_image_files, native_channels
from vitlab.data.loader import ArrayDataset
from vitlab._files import atomic_writer
from vitlab.errors import DataError

log = logging.getLogger(__name__)

SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
CACHE_VERSION = 2  # bump when decoding changes: old caches then miss
_CHUNK = 256  # files per task sent to a worker process
_INLINE_BELOW = 512  # fewer files than this decode in this process: starting workers costs more


def default_cache_dir() -> Path:
    """``$VITLAB_CACHE`` if set, else ``~/.cache/vitlab``."""
    env = os.environ.get("VITLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitlab"


def find_split_folders(root: Path) -> dict[str, Path]:
    """``{"train": ROOT/Train, "test": ROOT/test, ...}`` for the split folders present (any capitalisation)."""
    found: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        for split, names in SPLIT_FOLDER_NAMES.items():
            if child.name.lower() in names:
                if split in found:
                    raise DataError(f"{root}: two folders for the {split} split ({found[split].name}, "
                                    f"{child.name}); keep one")
                found[split] = child
    return found


def list_class_folder(folder: Path) -> tuple[list[str], list[str]]:
    """(class names, image paths per class in order) of ``folder/<class>/**/*.ext``, checked.

    Raises :class:`DataError` for an empty folder or a class folder without images.
    """
    if not folder.exists():
        raise DataError(f"{folder}: folder not found")
    if not folder.is_dir():
        raise DataError(f"{folder}: is a file; folder: expects a folder laid out as ROOT/<class>/*.jpg")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p for p in folder.iterdir() if p.is_file() and is_image_file(p)]
        hint = (f"it has {len(loose)} images but no class folders; move them into one folder per class"
                if loose else "it has no class folders")
        raise DataError(f"{folder}: empty image folder: {hint} (expected {folder}/<class>/*.jpg)")
    classes, per_class = [], []
    for d in class_dirs:
        files, ignored = list_image_files(d)
        if ignored:
            log.warning("%s: ignored %d files without an image extension", d, len(ignored))
        if not files:
            raise DataError(f"{d}: class folder has no images (looked for {', '.join(IMAGE_EXTENSIONS[:6])}, ...); "
                            f"add images or remove the folder")
        classes.append(d.name)
        per_class.append(files)
    return classes, per_class


@dataclass
class FolderListing:
    """The files of one split folder: paths and their class indices (into the shared class list)."""

    folder: Path
    files: list[str]
    labels: list[int]


def list_splits(root: Path) -> tuple[list[str], dict[str, FolderListing]]:
    """Classes and per-split listings of ``root`` (split folders, or ``{"all": ...}`` for one class folder)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: is a file; folder: expects a folder laid out as ROOT/<class>/*.jpg")
    split_dirs = find_split_folders(root)
    if split_dirs and "train" not in split_dirs:
        names = ", ".join(p.name for p in split_dirs.values())
        raise DataError(f"{root}: has {names} but no train/ folder; add {root}/train/<class>/*.jpg")
    if not split_dirs:
        split_dirs = {"all": root}
    listed = {split: list_class_folder(d) for split, d in split_dirs.items()}
    main = "train" if "train" in listed else "all"
    classes = listed[main][0]
    if len(classes) < 2:
        raise DataError(f"{split_dirs[main]}: only one class folder ({classes[0]}/); a classifier needs at least "
                        f"two class folders, {split_dirs[main]}/<class>/*.jpg for each class")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, (names, per_class) in listed.items():
        unknown = [n for n in names if n not in index]
        if unknown:
            raise DataError(f"{split_dirs[split]}: class folder(s) {', '.join(unknown)} are not in "
                            f"{split_dirs[main]}; every class needs training images")
        files, labels = [], []
        for name, paths in zip(names, per_class):
            files += paths
            labels += [index[name]] * len(paths)
        out[split] = FolderListing(split_dirs[split], files, labels)
    return classes, out


def _decode_chunk(paths: list[str], image_size: tuple[int, int], channels: int):
    """Worker task: decode ``paths`` -> (uint8 (n, C, H, W), [(i, error message), ...])."""
    h, w = image_size
    out = np.zeros((len(paths), channels, h, w), dtype=np.uint8)
    errors = []
    for i, p in enumerate(paths):
        try:
            out[i] = decode_image(p, image_size, channels)
        except DataError as e:
            errors.append((i, str(e)))
    return out, errors


def _pool_context():
    # fork starts a worker in milliseconds and the workers only run PIL and NumPy; spawn elsewhere.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def decode_files(files: list[str], image_size: tuple[int, int], channels: int,
                 workers: int | None = None) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode ``files`` to one uint8 array (N, C, H, W) with a process pool; returns it and the failures."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    n = len(files)
    images = np.zeros((n, channels, image_size[0], image_size[1]), dtype=np.uint8)
    errors: list[tuple[int, str]] = []
    if workers <= 1 or n < _INLINE_BELOW:
        images, errors = _decode_chunk(files, image_size, channels)
        return images, errors
    starts = list(range(0, n, _CHUNK))
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        futures = [pool.submit(_decode_chunk, files[s:s + _CHUNK], image_size, channels) for s in starts]
        for s, fut in zip(starts, futures):
            part, errs = fut.result()
            images[s:s + len(part)] = part
            errors += [(s + i, msg) for i, msg in errs]
    return images, errors


def cache_files(cache_dir: str | os.PathLike | None = None) -> list[tuple[Path, int]]:
    """The decoded-image cache files (and half-written ones a killed process left) with their sizes in bytes,
    largest first. Each is one image folder at one size; a changed folder gets a new file, the old one stays
    until :func:`clear_cache`."""
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "folders"
    if not root.is_dir():
        return []
    found = [(f, f.stat().st_size) for f in root.iterdir() if f.is_file() and (f.suffix == ".npz" or ".tmp" in f.name)]
    return sorted(found, key=lambda item: (-item[1], item[0].name))


def clear_cache(cache_dir: str | os.PathLike | None = None) -> tuple[int, int]:
    """Delete the decoded-image cache files: (files, bytes) removed. The next load of a folder decodes it again."""
    removed = freed = 0
    for f, size in cache_files(cache_dir):
        try:
            f.unlink()
        except FileNotFoundError:
            continue
        removed, freed = removed + 1, freed + size
    return removed, freed


def _cache_key(files: list[str], image_size: tuple[int, int], channels: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, list(image_size), channels]).encode())
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise DataError(f"{f}: cannot read the file ({e.strerror}); did it move while loading?") from None
        h.update(f"\0{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _read_cache(path: Path, n: int, image_size: tuple[int, int], channels: int):
    try:
        with np.load(path, allow_pickle=False) as z:
            images, ok, errors = z["images"], z["ok"], [str(e) for e in z["errors"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError) as e:
        log.warning("%s: unreadable cache file (%s); decoding again", path, e)
        return None
    if images.shape != (n, channels, *image_size) or ok.shape != (n,):
        log.warning("%s: cache file does not match the folder; decoding again", path)
        return None
    return images, ok, errors


def _write_cache(path: Path, images: np.ndarray, ok: np.ndarray, errors: list[str]) -> None:
    """Write the cache atomically."""
    with atomic_writer(path) as f:
        # uncompressed: loading is a read at disk speed; the images compress poorly anyway
        np.savez(f, images=images, ok=ok, errors=np.array(errors, dtype=np.str_))


def load_listing(listing: FolderListing, classes: list[str], image_size: tuple[int, int], channels: int, *,
                 cache_dir: str | os.PathLike | None = None, skip_bad_files: bool = False,
                 workers: int | None = None) -> tuple[ArrayDataset, list[str]]:
    """Decode (or read from the cache) one split folder -> (dataset, messages about skipped bad files)."""
    files = listing.files
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache_root / "folders" / f"{_cache_key(files, image_size, channels)}.npz"
    cached = _read_cache(cache_file, len(files), image_size, channels)
    if cached is not None:
        images, ok, errors = cached
        log.info("%s: %d images read from the cache %s", listing.folder, len(files), cache_file)
    else:
        log.info("%s: decoding %d images to %dx%d, %d channel(s)", listing.folder, len(files), *image_size, channels)
        images, failures = decode_files(files, image_size, channels, workers)
        ok = np.ones(len(files), dtype=bool)
        for i, _ in failures:
            ok[i] = False
        errors = [msg for _, msg in failures]
        if not failures or skip_bad_files:
            try:
                _write_cache(cache_file, images, ok, errors)
            except OSError as e:  # a read-only home must not stop training
                log.warning("%s: could not write the cache (%s)", cache_file, e)
    if errors and not skip_bad_files:
        more = f" ({len(errors) - 1} more bad files)" if len(errors) > 1 else ""
        raise DataError(f"{errors[0]}{more}; or pass skip_bad_files=True (--skip-bad-files) to leave them out")
    for msg in errors:
        log.warning("skipped %s", msg)
    keep = np.nonzero(ok)[0]
    if len(keep) == 0:
        raise DataError(f"{listing.folder}: none of its {len(files)} images could be read")
    labels = torch.tensor(listing.labels, dtype=torch.int64)
    if len(keep) < len(files):
        images = images[keep]
        labels = labels[torch.from_numpy(keep)]
        files = [files[i] for i in keep]
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(images)), labels, list(classes), list(files)), errors


def native_format(listing: FolderListing, image_size, channels) -> tuple[tuple[int, int], int]:
    """Fill in a missing size/channels from the first readable image of the listing."""
    if image_size is not None and channels is not None:
        return (int(image_size[0]), int(image_size[1])), int(channels)
    for f in listing.files[:50]:
        try:
            if channels is None:
                channels = native_channels(f)
            if image_size is None:
                a = decode_image(f, None, channels)
                image_size = (a.shape[1], a.shape[2])
            break
        except DataError:
            continue
    if image_size is None or channels is None:
        raise DataError(f"{listing.folder}: none of the first images can be read; check the files")
    return (int(image_size[0]), int(image_size[1])), int(channels)
