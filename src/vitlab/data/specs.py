"""``load_data(spec)``: one data spec string (``digits``, ``cifar10:DIR``, ``mnist:DIR``, ``folder:DIR``, ...)
-> :class:`~vitlab.data.loader.DatasetSplits` at the model's size and channels."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from vitlab.config import pair
from vitlab.data.cache import cache_key, cached_images
from vitlab.data.loader import ArrayDataset, DatasetSplits, LoadRequest, stratified_split
from vitlab.data.transforms import resize_uint8
from vitlab.errors import DataError

log = logging.getLogger(__name__)

# Channel statistics of the training sets at their native channels, on the [0, 1] scale.
KNOWN_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "kmnist": ((0.1918,), (0.3483,)),
}


@dataclass(frozen=True)
class DataKind:
    """One entry of :data:`DATA_KINDS`: whether the spec takes a path, what it reads, and its reader
    ``read(path, kind, request) -> (splits {"train", "test"?, "val"?}, dataset name, skipped-file messages)``."""

    needs_path: bool
    description: str
    read: Callable[[Path | None, str, LoadRequest], tuple[dict, str, list[str]]]
    extra: str | None = None  # the optional dependency it needs: pip install "vitlab[EXTRA]"


def _read_digits(path, kind, request):
    from vitlab.data.sources.builtin import load_digits

    return _adapt_all(load_digits(), "digits", request), "digits", []


def _read_cifar(path, kind, request):
    from vitlab.data.sources.cifar import load_cifar

    return _adapt_all(load_cifar(path, kind), kind, request), kind, []


def _read_idx(path, kind, request):
    from vitlab.data.sources.idx import load_idx

    return _adapt_all(load_idx(path, kind), kind, request), (kind if kind != "idx" else (path.name or "idx")), []


def _read_folder(path, kind, request):
    from vitlab.data.sources.folder import load_folder

    splits, skipped = load_folder(path, request)
    return splits, path.name or str(path), skipped


def _read_hf(path, kind, request):
    from vitlab.data.sources.hf import load_hf

    splits, name, skipped = load_hf(path, request)
    return splits, name, skipped


def _read_wds(path, kind, request):
    from vitlab.data.sources.wds import load_wds

    return load_wds(path, request)


# kind -> how it is named, read and dispatched: the one list of data kinds (the CLI's help is made from it)
DATA_KINDS: dict[str, DataKind] = {
    "digits": DataKind(False, "built-in UCI handwritten digits, 8x8 grayscale, 10 classes", _read_digits),
    "cifar10": DataKind(True, "CIFAR-10, official python format (folder or .tar.gz)", _read_cifar),
    "cifar100": DataKind(True, "CIFAR-100, official python format (folder or .tar.gz)", _read_cifar),
    "mnist": DataKind(True, "MNIST IDX files", _read_idx),
    "fashion-mnist": DataKind(True, "Fashion-MNIST IDX files", _read_idx),
    "kmnist": DataKind(True, "Kuzushiji-MNIST IDX files", _read_idx),
    "idx": DataKind(True, "any MNIST-style IDX files", _read_idx),
    "folder": DataKind(True, "ROOT/<class>/*.jpg, optionally under train/, val/, test/", _read_folder),
    "hf": DataKind(True, "a Hugging Face dataset saved with save_to_disk (PATH[?image=COL&label=COL])", _read_hf,
                   extra="hf"),
    "wds": DataKind(True, "WebDataset tar shards: a folder `vitlab data pack` wrote, or a pattern "
                          "DIR/train-{000000..000099}.tar", _read_wds, extra="wds"),
}


def data_kinds_help() -> str:
    """The kinds as a data spec is written: ``digits | cifar10:DIR | ...``."""
    return " | ".join(f"{k}:{'PATH' if k in ('hf', 'wds') else 'DIR'}" if v.needs_path else k
                      for k, v in DATA_KINDS.items())


def parse_data_spec(spec: str) -> tuple[str, Path | None]:
    """``"cifar10:~/data"`` -> ``("cifar10", Path("/home/me/data"))``; ``"digits"`` -> ``("digits", None)``.

    Raises :class:`DataError` for an unknown kind or a missing path.
    """
    text = str(spec).strip()
    kind, sep, path = text.partition(":")
    kind = kind.strip().lower().replace("_", "-")
    if kind in ("fashionmnist", "fmnist"):
        kind = "fashion-mnist"
    if kind not in DATA_KINDS:
        if not sep and Path(text).expanduser().is_dir():
            raise DataError(f"data spec {spec!r} has no kind; for a folder of class folders use folder:{text}")
        raise DataError(f"data spec {spec!r}: unknown kind {kind!r}; use one of {data_kinds_help()}")
    needs_path = DATA_KINDS[kind].needs_path
    if needs_path and not path.strip():
        raise DataError(f"data spec {spec!r} needs a path: {kind}:DIR")
    if not needs_path and path.strip():
        raise DataError(f"data spec {spec!r}: {kind} takes no path; write just {kind}")
    return kind, (Path(path.strip()).expanduser() if needs_path else None)


def _adapt_chunk(rows: Sequence[int], images: torch.Tensor, image_size, channels) -> tuple[np.ndarray, list]:
    """Cache task: native images ``rows`` resized and converted RGB<->L (inline: the tensor is in memory)."""
    part = images[rows.start:rows.stop]
    if channels != part.shape[1]:
        if channels == 1:  # ITU-R 601-2 luma, as PIL's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            part = (part.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            part = part.expand(-1, 3, -1, -1)
    return resize_uint8(part, image_size).contiguous().numpy(), []


def _adapt(ds: ArrayDataset, image_size: tuple[int, int] | None, channels: int | None, what: str,
           cache_dir) -> ArrayDataset:
    """A dataset read at its native size, resized / converted RGB<->L into the image cache (a resize to 224 px
    can be many times the memory of the native images), memory-mapped; unchanged when nothing is asked."""
    native_c, native_size = ds.channels, ds.image_size
    c = native_c if channels is None else channels
    size = native_size if image_size is None else tuple(image_size)
    if (c, size) == (native_c, native_size):
        return ds
    if c not in (1, 3) or (c == 3 and native_c not in (1, 3)):
        raise DataError(f"channels={channels} is not supported; use 1 or 3")
    images = ds.images
    h = hashlib.sha256(np.ascontiguousarray(images.numpy()))  # the pixels key the cache: any change is a new file
    h.update(np.ascontiguousarray(ds.labels.numpy()))
    key = cache_key("resized", h.hexdigest(), list(size), c)
    decode = partial(_adapt_chunk, images=images, image_size=size, channels=c)
    cached = cached_images(key, (len(ds), c, *size), decode, range(len(ds)), cache_dir=cache_dir, workers=1,
                           what=what)
    return ArrayDataset(cached.images, ds.labels, ds.classes, ds.files, moments=cached.moments,
                        cache_file=str(cached.path) if cached.path is not None else None)


def _adapt_all(raw: dict[str, ArrayDataset], name: str, request: LoadRequest) -> dict[str, ArrayDataset]:
    return {split: _adapt(ds, request.image_size, request.channels, f"{name} {split}", request.cache_dir)
            for split, ds in raw.items()}


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
    """Load the dataset named by ``spec`` as uint8 splits.

    ``image_size``/``channels`` None keep the native size and channels; otherwise images are resized
    (antialiased) and converted RGB<->L. A folder without a test/val folder is split by a seeded,
    stratified ``val_fraction``. Folders and Hugging Face datasets are decoded once by ``workers`` processes into
    the image cache in ``cache_dir`` (default ``$VITLAB_CACHE`` or ``~/.cache/vitlab``) and memory-mapped from it,
    as is any resized dataset; WebDataset shards are streamed. Bad input raises :class:`DataError`.
    """
    kind, path = parse_data_spec(spec)
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    request = LoadRequest(image_size=_size_pair(image_size), channels=channels, val_fraction=val_fraction,
                          seed=seed, cache_dir=cache_dir, skip_bad_files=skip_bad_files, workers=workers)
    splits, name, skipped = DATA_KINDS[kind].read(path, kind, request)
    train = splits["train"]
    test = splits.get("test")
    val = splits.get("val")
    if test is None:
        test = val
    known = KNOWN_MEAN_STD.get(kind)
    if known is not None and len(known[0]) == train.channels:
        mean, std = known
    else:
        mean, std = train.mean_std()
    return DatasetSplits(train=train, test=test, val=val, classes=list(train.classes), mean=tuple(mean),
                         std=tuple(std), name=name, spec=str(spec), skipped_files=skipped)


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
    """Load ``spec`` and describe it: images per split, classes (with counts), image size and channels, and where
    each split's pixels are read from (memory, a cache file and its size, or shards)."""
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
        "sources": {k: v.source_info() for k, v in splits.items() if v is not None},
    }
