"""TEMPORARY stand-in for `vitlab.data` (branch `data`, not merged yet), to the interface in COMMON.md.
Installed into sys.modules only when the real package is missing; delete this file once `data` is merged."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import torch


@dataclass
class ArrayDataset:
    images: torch.Tensor
    labels: torch.Tensor
    classes: list
    files: list | None = None

    def __len__(self):
        return int(self.labels.shape[0])


@dataclass
class DatasetSplits:
    train: ArrayDataset
    test: ArrayDataset
    val: ArrayDataset | None
    classes: list
    mean: tuple
    std: tuple
    name: str
    spec: str


class BatchLoader:
    def __init__(self, dataset, *, batch_size, shuffle, seed=0, drop_last, device="cpu", rank=0, world_size=1):
        self.ds, self.bs, self.shuffle, self.seed, self.drop_last = dataset, batch_size, shuffle, seed, drop_last
        self.device, self.rank, self.world, self.epoch = torch.device(device), rank, world_size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _indices(self):
        n = len(self.ds)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        per = -(-n // self.world)
        idx = torch.cat([idx, idx[:per * self.world - n]]) if per * self.world > n else idx
        return idx[self.rank::self.world]

    def __len__(self):
        m = len(self._indices())
        return m // self.bs if self.drop_last else -(-m // self.bs)

    def __iter__(self):
        idx = self._indices()
        for b in range(len(self)):
            j = idx[b * self.bs:(b + 1) * self.bs]
            yield self.ds.images[j].to(self.device), self.ds.labels[j].to(self.device)


class EvalTransform:
    def __init__(self, *, mean, std, image_size):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, images):
        return (images.float() / 255 - self.mean.to(images.device)) / self.std.to(images.device)


class TrainTransform(EvalTransform):
    def __init__(self, *, mean, std, image_size, num_classes, crop_padding=0, hflip=False, random_resized_crop=None,
                 auto_augment=None, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0,
                 label_smoothing=0.0):
        super().__init__(mean=mean, std=std, image_size=image_size)
        self.k, self.hflip, self.ls = num_classes, hflip, label_smoothing

    def __call__(self, images, labels, generator):
        x = super().__call__(images)
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        t = torch.nn.functional.one_hot(labels, self.k).float()
        return x, t * (1 - self.ls) + self.ls / self.k


def load_data(spec, **kwargs):
    raise NotImplementedError("stand-in")


def install() -> None:
    try:
        import vitlab.data  # noqa: F401
        if hasattr(vitlab.data, "BatchLoader"):
            return
    except ImportError:
        pass
    mod = types.ModuleType("vitlab.data")
    for name in ("ArrayDataset", "DatasetSplits", "BatchLoader", "EvalTransform", "TrainTransform", "load_data"):
        setattr(mod, name, globals()[name])
    sys.modules["vitlab.data"] = mod
