"""uint8 datasets with random access, their splits, and batching with distributed sharding and prefetch.

Every source but WebDataset shards ends as an :class:`ArrayDataset`: all images in one uint8 tensor, in memory
(CIFAR and IDX at their native size, the built-in digits) or memory-mapped from the decoded-image cache
(folders, Hugging Face datasets, anything resized). Batches are gathered by index in a background thread, moved
to the device as uint8 (4x fewer bytes than float), and only there converted and augmented (see
:mod:`vitlab.data.transforms`).
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from vitlab.errors import DataError


class ArrayDataset:
    """Images as uint8 ``(N, C, H, W)`` on the CPU, labels int64 ``(N,)``, class names, source files.

    The pixels live in one tensor, in memory or memory-mapped from the decoded-image cache
    (:mod:`vitlab.data.cache`), and a dataset may be a selection of its rows (``rows``): :meth:`subset` selects
    without copying, so holding out a validation split of a large memory-mapped folder costs nothing.
    ``moments`` (the cache's per-image channel sums, by storage row) let :meth:`mean_std` read no pixels;
    ``cache_file`` names the file the pixels are mapped from.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], files: list[str] | None = None,
                 *, rows: torch.Tensor | None = None, moments: torch.Tensor | None = None,
                 cache_file: str | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        n = len(images) if rows is None else len(rows)
        if labels.ndim != 1 or len(labels) != n:
            raise ValueError(f"labels {tuple(labels.shape)} do not match {n} images")
        if files is not None and len(files) != n:
            raise ValueError(f"{len(files)} file names for {n} images")
        self.storage = images
        self.labels = labels.to(torch.int64)
        self.classes = classes
        self.files = files
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.int64)
        self.moments = moments
        self.cache_file = cache_file

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:  # the default would print the tensors
        c, h, w = self.storage.shape[1:]
        where = ", memory-mapped" if self.cache_file else ""
        return f"ArrayDataset({len(self)} images, {c}x{h}x{w} uint8, {len(self.classes)} classes{where})"

    @property
    def images(self) -> torch.Tensor:
        """All images as one tensor. A selection of rows (:meth:`subset`) is copied out of the storage: for a
        large memory-mapped dataset read batches with :meth:`take` or a :class:`BatchLoader` instead."""
        return self.storage if self.rows is None else self.storage.index_select(0, self.rows)

    @images.setter
    def images(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(self):
            raise ValueError(f"images must be uint8 (N={len(self)}, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        self.storage, self.rows, self.moments, self.cache_file = images, None, None, None

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return (int(self.storage.shape[2]), int(self.storage.shape[3]))

    @property
    def channels(self) -> int:
        """C: 1 (grayscale) or 3 (RGB)."""
        return int(self.storage.shape[1])

    def storage_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The storage rows of this dataset's images at ``indices`` (int64)."""
        return indices if self.rows is None else self.rows[indices]

    def take(self, indices: torch.Tensor | Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """The images at ``indices`` as one uint8 tensor ``(len(indices), C, H, W)`` (into ``out`` if given)."""
        idx = self.storage_rows(torch.as_tensor(indices, dtype=torch.int64))
        return torch.index_select(self.storage, 0, idx, out=out) if out is not None else \
            self.storage.index_select(0, idx)

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` images (all of them when there are fewer)."""
        return self.take(torch.arange(min(n, len(self))))

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "ArrayDataset":
        """The images at ``indices`` as a new dataset over the same storage (same class list; nothing copied)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        files = [self.files[i] for i in idx.tolist()] if self.files is not None else None
        return ArrayDataset(self.storage, self.labels[idx], list(self.classes), files, rows=self.storage_rows(idx),
                            moments=self.moments, cache_file=self.cache_file)

    def part(self, rank: int, world_size: int) -> "ArrayDataset":
        """Every ``world_size``-th image from ``rank`` on (an evaluation's share: each image on one rank)."""
        return self if world_size == 1 else self.subset(torch.arange(rank, len(self), world_size))

    def class_counts(self) -> list[int]:
        """Number of images of each class, in class order."""
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std on the [0, 1] scale (:func:`channel_mean_std`), from the cache's per-image
        sums where it has them (no pixel is read), else from the pixels, a slice at a time."""
        if self.moments is not None:
            sums = self.moments.index_select(0, self.storage_rows(torch.arange(len(self))))
            return _moments_mean_std(sums.sum(0), len(self) * self.image_size[0] * self.image_size[1])
        return channel_mean_std(self.storage if self.rows is None else self)

    def source_info(self) -> dict:
        """Where the pixels are read from: ``{"kind": "memory"}`` or ``{"kind": "memory map", "path", "bytes"}``."""
        if self.cache_file is None:
            return {"kind": "memory", "bytes": int(self.storage.numel())}
        return {"kind": "memory map", "path": self.cache_file, "bytes": os.path.getsize(self.cache_file)}

    def loader(self, **kwargs) -> "BatchLoader":
        """A :class:`BatchLoader` over this dataset (its keyword arguments)."""
        return BatchLoader(self, **kwargs)

    def fingerprint(self) -> str:
        """What identifies this dataset's images across processes: its cache file or its size, and its labels."""
        h = hashlib.sha256(f"{self.cache_file}|{tuple(self.storage.shape)}|{len(self)}".encode())
        h.update(self.labels.numpy().tobytes())
        if self.rows is not None:
            h.update(self.rows.numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class LoadRequest:
    """What a source is asked for: the size and channels (None: native), the held-out fraction of a training set
    without a test split and its seed, the cache, and how bad files and decoding workers are handled."""

    image_size: tuple[int, int] | None = None
    channels: int | None = None
    val_fraction: float = 0.1
    seed: int = 0
    cache_dir: str | None = None
    skip_bad_files: bool = False
    workers: int | None = None


@dataclass
class DatasetSplits:
    """A loaded dataset: ``train``, ``test`` (the split to evaluate on: test, else val), optional ``val``.

    ``mean``/``std`` are per channel on the [0, 1] scale, for normalising; ``spec`` is the data spec string.
    """

    train: ArrayDataset
    test: ArrayDataset
    val: ArrayDataset | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    spec: str
    skipped_files: list[str] = field(default_factory=list)  # bad files left out (skip_bad_files=True)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in (("train", self.train), ("val", self.val), ("test", self.test))
                          if v is not None and not (k == "test" and v is self.val))
        c, (h, w) = self.channels, self.image_size
        return f"DatasetSplits({self.spec!r}: {sizes}; {c}x{h}x{w}; {len(self.classes)} classes)"

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return self.train.image_size

    @property
    def channels(self) -> int:
        """Number of channels of the images."""
        return self.train.channels

    def fingerprint(self) -> str:
        """What identifies these splits' images and labels, to check that every process of a run has the same."""
        parts = [self.spec, *(split.fingerprint() if split is not None else "-"
                              for split in (self.train, self.val, self.test))]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


_MEAN_STD_SLICE = 1 << 26  # pixels counted at once: a memory-mapped dataset is read a slice at a time


def channel_mean_std(images: "torch.Tensor | ArrayDataset") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) on the [0, 1] scale.

    Exact and cheap: one 256-bin histogram per channel, then the moments of the histogram, counted a slice of
    images at a time (a memory-mapped dataset is never read into memory whole).
    """
    if len(images) == 0:
        raise DataError("cannot compute the mean and std of an empty dataset")
    channels = images.channels if isinstance(images, ArrayDataset) else images.shape[1]
    per_image = math.prod(images.image_size) if isinstance(images, ArrayDataset) else math.prod(images.shape[2:])
    step = max(1, _MEAN_STD_SLICE // max(1, per_image))
    hists = torch.zeros(channels, 256, dtype=torch.int64)
    for start in range(0, len(images), step):
        part = images.take(torch.arange(start, min(len(images), start + step))) if isinstance(images, ArrayDataset) \
            else images[start:start + step]
        for c in range(channels):
            hists[c] += torch.bincount(part[:, c].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(channels):
        hist = hists[c].to(torch.float64)
        p = hist / hist.sum()
        mean = float((p * values).sum())
        var = float((p * (values - mean) ** 2).sum())
        means.append(round(mean / 255.0, 6))
        stds.append(round(max(var ** 0.5 / 255.0, 1e-3), 6))  # a constant channel must not divide by zero
    return tuple(means), tuple(stds)


def _moments_mean_std(sums: torch.Tensor, pixels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`channel_mean_std` from exact per-channel (sum, sum of squares) ``(C, 2)`` over ``pixels`` pixels."""
    means, stds = [], []
    for total, squares in sums.tolist():
        mean = total / pixels
        var = max(squares / pixels - mean * mean, 0.0)
        means.append(round(mean / 255.0, 6))
        stds.append(round(max(var ** 0.5 / 255.0, 1e-3), 6))
    return tuple(means), tuple(stds)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (keep, held_out) with about ``fraction`` of every class held out, seeded.

    Every class with at least 2 images keeps at least one and holds out at least one.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"val_fraction={fraction} must be between 0 and 1 (exclusive)")
    g = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        else:
            n_held = 0
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


def hold_out(splits: dict, request: LoadRequest) -> dict:
    """A source's splits with a validation split held out of ``train`` (stratified, seeded) when it has neither a
    test nor a validation split of its own."""
    if "val" in splits or "test" in splits:
        return splits
    keep, held = stratified_split(splits["train"].labels, request.val_fraction, request.seed)
    return {**splits, "train": splits["train"].subset(keep), "val": splits["train"].subset(held)}


class BatchLoader:
    """Batches of (uint8 images (B, C, H, W), int64 labels (B,)) on ``device``, from an :class:`ArrayDataset`.

    The order of an epoch is a function of (seed, epoch) only; with ``world_size > 1`` each rank gets the
    disjoint shard ``order[rank::world_size]`` of the order padded to a multiple of ``world_size`` (the
    semantics of ``torch.utils.data.DistributedSampler``), so a run resumed at an epoch boundary sees
    exactly the same batches. Call :meth:`set_epoch` before each epoch.

    The next ``prefetch`` batches are gathered in a background thread while the caller works on the current one
    (out of a memory map, from the page cache or the disk), into pinned memory when ``device`` is a GPU, and
    copied with ``non_blocking=True``. A dataset small enough (:attr:`DEVICE_RESIDENT_BYTES`) is copied to an
    accelerator once instead, and each batch is an index on the device.
    """

    DEVICE_RESIDENT_BYTES = 1 << 30

    def __init__(self, dataset: ArrayDataset, *, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1, prefetch: int = 2):
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        if len(dataset) == 0:
            raise DataError("the dataset is empty: there is nothing to batch")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.prefetch = max(1, int(prefetch))
        self.epoch = 0
        self._on_device = None  # (images, labels) copied to the accelerator
        if self.device.type != "cpu" and len(dataset) * math.prod(dataset.storage.shape[1:]) \
                <= self.DEVICE_RESIDENT_BYTES:
            self._on_device = (dataset.images.to(self.device), dataset.labels.to(self.device))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Images this rank sees per epoch (before ``drop_last``)."""
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's indices into the dataset for the current epoch, in order (int64, CPU)."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # pad by repeating from the start, as DistributedSampler does
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        return order[self.rank:total:self.world_size]

    def _batch_indices(self) -> list[torch.Tensor]:
        idx = self.indices()
        return [idx[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._on_device is not None:
            images, labels = self._on_device
            for batch in self._batch_indices():
                batch = batch.to(images.device)
                yield images.index_select(0, batch), labels.index_select(0, batch)
            return
        for images, labels in prefetched(self._gather, self._batch_indices(), self.prefetch):
            if self.device.type != "cpu":
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels

    def _gather(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's images and labels on the CPU (in the background thread), pinned for a GPU."""
        pin = self.device.type == "cuda"
        c, h, w = self.dataset.storage.shape[1:]
        images = torch.empty((len(batch), c, h, w), dtype=torch.uint8, pin_memory=pin)
        self.dataset.take(batch, out=images)
        labels = self.dataset.labels.index_select(0, batch)
        return images, labels.pin_memory() if pin else labels



def prefetched(make: Callable, items: Iterable, depth: int = 2) -> Iterator:
    """``make(item)`` for each of ``items``, in order, computed up to ``depth`` items ahead in a background
    thread (PyTorch and NumPy release the GIL while they copy); an exception there is raised here, and a
    consumer that stops early stops the thread."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                out.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put(("ok", make(item))):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(("error", e))

    thread = threading.Thread(target=work, name="vitlab-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = out.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
