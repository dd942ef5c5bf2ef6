"""Image folders: ``ROOT/<class>/*.jpg``, with or without ``train/``, ``val/`` (``valid/``), ``test/`` split folders.

Images are decoded in worker processes to uint8 at one size into the image cache (:mod:`vitlab.data.cache`, keyed
by the file list, file sizes, mtimes, the target size and channels) and memory-mapped from it, so a second epoch
or the next run never decodes again, and a folder larger than the memory trains as well as a small one.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vitlab.data.cache import CHUNK, INLINE_BELOW, CachedImages, cache_key, cached_images, file_stamp, pool_context
from vitlab.data.images import IMAGE_EXTENSIONS, decode_image, is_image_file, list_image_files, native_channels
from vitlab.data.loader import ArrayDataset, LoadRequest, hold_out
from vitlab.errors import DataError

log = logging.getLogger(__name__)

SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}


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


def _decode_chunk(paths: Sequence[str], image_size: tuple[int, int], channels: int):
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


def decode_files(files: list[str], image_size: tuple[int, int], channels: int,
                 workers: int | None = None) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode ``files`` into memory, one uint8 array (N, C, H, W), with a process pool; returns it and the
    failures. For a few files at a time (prediction); datasets decode into the cache (:func:`load_listing`)."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    n = len(files)
    if workers <= 1 or n < INLINE_BELOW:
        return _decode_chunk(files, image_size, channels)
    images = np.zeros((n, channels, image_size[0], image_size[1]), dtype=np.uint8)
    errors: list[tuple[int, str]] = []
    starts = list(range(0, n, CHUNK))
    with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context()) as pool:
        futures = [pool.submit(_decode_chunk, files[s:s + CHUNK], image_size, channels) for s in starts]
        for s, fut in zip(starts, futures):
            part, errs = fut.result()
            images[s:s + len(part)] = part
            errors += [(s + i, msg) for i, msg in errs]
    return images, errors


def load_listing(listing: FolderListing, classes: list[str], image_size: tuple[int, int], channels: int, *,
                 cache_dir: str | os.PathLike | None = None, skip_bad_files: bool = False,
                 workers: int | None = None) -> tuple[ArrayDataset, list[str]]:
    """One split folder, decoded once into the image cache and memory-mapped from it -> (dataset, messages about
    skipped bad files). The cache is keyed by the file list, sizes, mtimes, the target size and channels."""
    files = listing.files
    cached = cached_files(files, image_size, channels, cache_dir=cache_dir, workers=workers,
                          what=str(listing.folder))
    return checked_dataset(cached, torch.tensor(listing.labels, dtype=torch.int64), classes, list(files),
                           skip_bad_files=skip_bad_files, what=str(listing.folder))


def cached_files(files: Sequence[str], image_size: tuple[int, int], channels: int, *, cache_dir=None,
                 workers: int | None = None, what: str = "images", missing_ok: bool = False) -> CachedImages:
    """Image files decoded at ``image_size`` and ``channels`` through the image cache (keyed by the paths, sizes,
    mtimes, the size and channels), memory-mapped. ``missing_ok``: a missing file is a decoding failure to
    report (prediction) instead of a :class:`DataError` now."""
    key = cache_key("folder", file_stamp(files, missing_ok=missing_ok), list(image_size), channels)
    decode = partial(_decode_chunk, image_size=tuple(image_size), channels=channels)
    return cached_images(key, (len(files), channels, *image_size), decode, list(files), cache_dir=cache_dir,
                         workers=workers, what=what)


def checked_dataset(cached: CachedImages, labels: torch.Tensor, classes: list[str], files: list[str] | None, *,
                    skip_bad_files: bool, what: str) -> tuple[ArrayDataset, list[str]]:
    """A decoded split as a dataset without its bad images, or the :class:`DataError` of the first of them
    unless ``skip_bad_files``; returns it with the messages about the images left out."""
    errors = cached.errors
    if errors and not skip_bad_files:
        more = f" ({len(errors) - 1} more bad files)" if len(errors) > 1 else ""
        raise DataError(f"{errors[0]}{more}; or pass skip_bad_files=True (--skip-bad-files) to leave them out")
    for msg in errors:
        log.warning("skipped %s", msg)
    keep = np.nonzero(cached.ok)[0]
    if len(keep) == 0:
        raise DataError(f"{what}: none of its {len(cached.ok)} images could be read")
    path = str(cached.path) if cached.path is not None else None
    full = ArrayDataset(cached.images, labels, list(classes), files, moments=cached.moments, cache_file=path)
    return (full if len(keep) == len(cached.ok) else full.subset(torch.from_numpy(keep))), errors


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


def load_folder(root: Path, request: LoadRequest) -> tuple[dict[str, ArrayDataset], list[str]]:
    """An image folder's splits (memory-mapped from the cache), with a validation split held out of a folder
    without one, and the messages about skipped bad files."""
    classes, listings = list_splits(root)
    main = listings.get("train") or listings["all"]
    size, channels = native_format(main, request.image_size, request.channels)
    loaded, skipped = {}, []
    for split, listing in listings.items():
        ds, errors = load_listing(listing, classes, size, channels, cache_dir=request.cache_dir,
                                  skip_bad_files=request.skip_bad_files, workers=request.workers)
        loaded["train" if split == "all" else split] = ds
        skipped += errors
    return hold_out(loaded, request), skipped
