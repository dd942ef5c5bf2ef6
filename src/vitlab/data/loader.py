"""In-memory uint8 datasets, their splits, and batching with distributed sharding.

Every source (CIFAR, IDX, folders, the built-in digits) ends as an :class:`ArrayDataset`: all images in one
uint8 tensor. Batches are cut by index, moved to the device as uint8 (4x fewer bytes than float), and only
there converted and augmented (see :mod:`vitlab.data.transforms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from vitlab.errors import DataError


@dataclass
class ArrayDataset:
    """Images as a uint8 tensor (N, C, H, W) on the CPU, labels int64 (N,), class names, source files."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    files: list[str] | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError(f"labels {tuple(self.labels.shape)} do not match {len(self.images)} images")
        self.labels = self.labels.to(torch.int64)
        if self.files is not None and len(self.files) != len(self.images):
            raise ValueError(f"{len(self.files)} file names for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:  # the default would print the tensors
        c, h, w = self.images.shape[1:]
        return f"ArrayDataset({len(self)} images, {c}x{h}x{w} uint8, {len(self.classes)} classes)"

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return (int(self.images.shape[2]), int(self.images.shape[3]))

    @property
    def channels(self) -> int:
        """C: 1 (grayscale) or 3 (RGB)."""
        return int(self.images.shape[1])

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "ArrayDataset":
        """A new dataset of the images at ``indices`` (same class list)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        files = [self.files[i] for i in idx.tolist()] if self.files is not None else None
        return ArrayDataset(self.images[idx], self.labels[idx], list(self.classes), files)

    def class_counts(self) -> list[int]:
        """Number of images of each class, in class order."""
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


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


def channel_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) on the [0, 1] scale.

    Exact and cheap: one 256-bin histogram per channel, then the moments of the histogram.
    """
    if len(images) == 0:
        raise DataError("cannot compute the mean and std of an empty dataset")
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        p = hist / hist.sum()
        mean = float((p * values).sum())
        var = float((p * (values - mean) ** 2).sum())
        means.append(round(mean / 255.0, 6))
        stds.append(round(max(var ** 0.5 / 255.0, 1e-3), 6))  # a constant channel must not divide by zero
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


class BatchLoader:
    """Batches of (uint8 images (B, C, H, W), int64 labels (B,)) on ``device``, from an :class:`ArrayDataset`.

    The order of an epoch is a function of (seed, epoch) only; with ``world_size > 1`` each rank gets the
    disjoint shard ``order[rank::world_size]`` of the order padded to a multiple of ``world_size`` (the
    semantics of ``torch.utils.data.DistributedSampler``), so a run resumed at an epoch boundary sees
    exactly the same batches. Call :meth:`set_epoch` before each epoch.
    """

    # Small datasets are copied to an accelerator once, so each batch is an index on the device.
    DEVICE_RESIDENT_BYTES = 1 << 30

    def __init__(self, dataset: ArrayDataset, *, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1):
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
        self.epoch = 0
        self._images = dataset.images
        self._labels = dataset.labels
        # Whether the tensors live where the batches go (compared by flag: cuda != cuda:0 as devices).
        self._resident = dataset.images.device.type == self.device.type == "cpu"
        if self.device.type != "cpu":
            if dataset.images.numel() <= self.DEVICE_RESIDENT_BYTES:
                self._images = dataset.images.to(self.device)
                self._labels = dataset.labels.to(self.device)
                self._resident = True

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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        on_device = self._resident
        if on_device and self.device.type != "cpu":
            idx = idx.to(self._images.device)
        for b in range(len(self)):
            batch = idx[b * self.batch_size:(b + 1) * self.batch_size]
            images = self._images.index_select(0, batch)
            labels = self._labels.index_select(0, batch)
            if not on_device:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels
