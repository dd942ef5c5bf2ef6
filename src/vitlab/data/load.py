"""``load_data(spec)``: one data spec string (``digits``, ``cifar10:DIR``, ``mnist:DIR``, ``folder:DIR``, ...)
-> :class:`~vitlab.data.loader.DatasetSplits` at the model's size and channels."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from vitlab.config import pair
from vitlab.data.loader import ArrayDataset, DatasetSplits, channel_mean_std, stratified_split
from vitlab.data.transforms import resize_uint8
from vitlab.errors import DataError

log = logging.getLogger(__name__)

# kind -> (needs a path, what it reads)
DATA_KINDS = {
    "digits": (False, "built-in UCI handwritten digits, 8x8 grayscale, 10 classes"),
    "cifar10": (True, "CIFAR-10, official python format (folder or .tar.gz)"),
    "cifar100": (True, "CIFAR-100, official python format (folder or .tar.gz)"),
    "mnist": (True, "MNIST IDX files"),
    "fashion-mnist": (True, "Fashion-MNIST IDX files"),
    "kmnist": (True, "Kuzushiji-MNIST IDX files"),
    "idx": (True, "any MNIST-style IDX files"),
    "folder": (True, "ROOT/<class>/*.jpg, optionally under train/, val/, test/"),
}
# Channel statistics of the training sets at their native channels, on the [0, 1] scale.
KNOWN_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "kmnist": ((0.1918,), (0.3483,)),
}


def parse_data_spec(spec: str) -> tuple[str, Path | None]:
    """``"cifar10:~/data"`` -> ``("cifar10", Path("/home/me/data"))``; ``"digits"`` -> ``("digits", None)``.

    Raises :class:`DataError` for an unknown kind or a missing path.
    """
    kinds = ", ".join(f"{k}:DIR" if need else k for k, (need, _) in DATA_KINDS.items())
    text = str(spec).strip()
    kind, sep, path = text.partition(":")
    kind = kind.strip().lower().replace("_", "-")
    if kind in ("fashionmnist", "fmnist"):
        kind = "fashion-mnist"
    if kind not in DATA_KINDS:
        if not sep and Path(text).expanduser().is_dir():
            raise DataError(f"data spec {spec!r} has no kind; for a folder of class folders use folder:{text}")
        raise DataError(f"data spec {spec!r}: unknown kind {kind!r}; use one of {kinds}")
    needs_path = DATA_KINDS[kind][0]
    if needs_path and not path.strip():
        raise DataError(f"data spec {spec!r} needs a path: {kind}:DIR")
    if not needs_path and path.strip():
        raise DataError(f"data spec {spec!r}: {kind} takes no path; write just {kind}")
    return kind, (Path(path.strip()).expanduser() if needs_path else None)


def _adapt(ds: ArrayDataset, image_size: tuple[int, int] | None, channels: int | None) -> ArrayDataset:
    """Resize / convert RGB<->L an in-memory dataset (for sources stored at their native size)."""
    images = ds.images
    if channels is not None and channels != images.shape[1]:
        if channels == 1:
            # ITU-R 601-2 luma, as PIL's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            parts = [(p.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
                     for p in images.split(4096)]
            images = torch.cat(parts) if parts else images[:, :1]
        elif channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1).contiguous()
        else:
            raise DataError(f"channels={channels} is not supported; use 1 or 3")
    if image_size is not None and tuple(image_size) != tuple(images.shape[2:]):
        images = torch.cat([resize_uint8(p, image_size) for p in images.split(4096)])
    if images is ds.images:
        return ds
    return ArrayDataset(images, ds.labels, ds.classes, ds.files)


def _size_pair(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    h, w = pair(image_size, "image_size")
    if h < 1 or w < 1:
        raise DataError(f"image_size={image_size!r} must be positive")
    return (h, w)


def load_data(spec: str, *, image_size: tuple[int, int] | int | None = None, channels: int | None = None,
              val_fraction: float = 0.1, seed: int = 0, cache_dir: str | None = None,
              skip_bad_files: bool = False, workers: int | None = None) -> DatasetSplits:
    """Load the dataset named by ``spec`` into memory as uint8 splits.

    ``image_size``/``channels`` None keep the native size and channels; otherwise images are resized
    (antialiased) and converted RGB<->L. A folder without a test/val folder is split by a seeded,
    stratified ``val_fraction``. Folder images are decoded by ``workers`` processes and cached in
    ``cache_dir`` (default ``$VITLAB_CACHE`` or ``~/.cache/vitlab``). Bad input raises :class:`DataError`.
    """
    kind, path = parse_data_spec(spec)
    size = _size_pair(image_size)
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    skipped: list[str] = []
    if kind == "folder":
        splits, skipped = _load_folder(path, size, channels, val_fraction, seed, cache_dir, skip_bad_files, workers)
        name = path.name or str(path)
    else:
        if kind == "digits":
            from vitlab.data.sources.builtin import load_digits

            raw = load_digits()
            name = "digits"
        elif kind in ("cifar10", "cifar100"):
            from vitlab.data.sources.cifar import load_cifar

            raw = load_cifar(path, kind)
            name = kind
        else:
            from vitlab.data.sources.idx import load_idx

            raw = load_idx(path, kind)
            name = kind if kind != "idx" else (path.name or "idx")
        splits = {k: _adapt(v, size, channels) for k, v in raw.items()}
    train = splits["train"]
    test = splits.get("test")
    val = splits.get("val")
    if test is None:
        test = val
    known = KNOWN_MEAN_STD.get(kind)
    if known is not None and len(known[0]) == train.channels:
        mean, std = known
    else:
        mean, std = channel_mean_std(train.images)
    return DatasetSplits(train=train, test=test, val=val, classes=list(train.classes), mean=tuple(mean),
                         std=tuple(std), name=name, spec=str(spec), skipped_files=skipped)


def _load_folder(root, size, channels, val_fraction, seed, cache_dir, skip_bad_files, workers):
    from vitlab.data.sources.folder import list_splits, load_listing, native_format

    classes, listings = list_splits(root)
    main = listings.get("train") or listings["all"]
    size, channels = native_format(main, size, channels)
    loaded, skipped = {}, []
    for split, listing in listings.items():
        ds, errors = load_listing(listing, classes, size, channels, cache_dir=cache_dir,
                                  skip_bad_files=skip_bad_files, workers=workers)
        loaded[split] = ds
        skipped += errors
    if "all" in loaded:
        full = loaded.pop("all")
        train_idx, val_idx = stratified_split(full.labels, val_fraction, seed)
        loaded["train"], loaded["val"] = full.subset(train_idx), full.subset(val_idx)
    elif "val" not in loaded and "test" not in loaded:
        full = loaded["train"]
        train_idx, val_idx = stratified_split(full.labels, val_fraction, seed)
        loaded["train"], loaded["val"] = full.subset(train_idx), full.subset(val_idx)
    return loaded, skipped


def has_own_val(splits: DatasetSplits) -> bool:
    """Whether ``splits`` has a validation split of its own, apart from the test split (a ``val/`` folder
    beside ``test/``): images the model neither trained on nor is tested on."""
    return splits.val is not None and splits.val is not splits.test


def with_val_split(splits: DatasetSplits, val_fraction: float, seed: int) -> DatasetSplits:
    """``splits`` with a validation split apart from the test split: its own ``val/`` folder where it has one
    (:func:`has_own_val`), else ``val_fraction`` of every class of the training split, held out as
    :func:`stratified_split` holds out a folder's test images (seeded); the training split keeps the rest."""
    if has_own_val(splits):
        return splits
    keep, held = stratified_split(splits.train.labels, val_fraction, seed)
    return replace(splits, train=splits.train.subset(keep), val=splits.train.subset(held))


def dataset_info(spec: str, **load_kwargs) -> dict:
    """Load ``spec`` and describe it: images per split, classes (with counts), image size and channels."""
    data = load_data(spec, **load_kwargs)
    splits = {"train": data.train, "val": data.val}
    if data.test is not data.val:
        splits["test"] = data.test
    return {
        "spec": data.spec,
        "name": data.name,
        "splits": {k: len(v) for k, v in splits.items() if v is not None},
        "classes": list(data.classes),
        "class_counts": {k: v.class_counts() for k, v in splits.items() if v is not None},
        "image_size": list(data.image_size),
        "channels": data.channels,
        "mean": list(data.mean),
        "std": list(data.std),
        "skipped_files": list(data.skipped_files),
    }
