"""Tiny datasets and configs shared by the training tests (random images with a learnable signal)."""

from __future__ import annotations

import dataclasses
import os

import torch

from vitlab.config import TrainConfig
from vitlab.data import ArrayDataset
from vitlab.errors import DataError

TINY_MODEL = {"depth": 1, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 32}


def tiny_splits(n_train: int = 64, n_test: int = 24, classes: int = 4, channels: int = 1, size: int = 8, seed=0):
    """DatasetSplits of uint8 images whose mean brightness depends on the class (so a model can learn)."""
    from vitlab.data import ArrayDataset, DatasetSplits

    g = torch.Generator().manual_seed(seed)
    names = [f"c{i}" for i in range(classes)]

    def make(n):
        labels = torch.arange(n) % classes
        base = (labels.float() * (200 / classes))[:, None, None, None]
        noise = torch.randint(0, 50, (n, channels, size, size), generator=g).float()
        return ArrayDataset(images=(base + noise).clamp(0, 255).to(torch.uint8), labels=labels.long(),
                            classes=names, files=None)

    return DatasetSplits(train=make(n_train), test=make(n_test), val=None, classes=names, mean=(0.5,) * channels,
                         std=(0.25,) * channels, name="tiny", spec="tiny")


def tiny_config(tmp_path, name: str = "run", **changes) -> TrainConfig:
    base = dict(model="vit-digits-p2", data="tiny", model_overrides=dict(TINY_MODEL), epochs=2, batch_size=16,
                lr=3e-3, warmup_epochs=1, eval_batch_size=16, device="cpu", plots=False, precision="fp32",
                out=str(tmp_path / name))
    base.update(changes)
    return TrainConfig(**base)


def tiny_folder(root, **kwargs):
    """:func:`tiny_splits` written as an image-folder dataset (``root/train/c0/0.png``, ``root/test/...``), loaded
    back with the data spec ``folder:root``: the same images, with the folder's own mean/std (``.spec`` names it)."""
    from PIL import Image

    from vitlab.data import load_data

    splits = tiny_splits(**kwargs)
    for part, dataset in (("train", splits.train), ("test", splits.test)):
        for i, (image, label) in enumerate(zip(dataset.images, dataset.labels)):
            folder = root / part / dataset.classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = image.permute(1, 2, 0).numpy()
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(folder / f"{i}.png")
    spec = f"folder:{root}"
    return load_data(spec, image_size=tuple(splits.train.images.shape[-2:]), channels=splits.train.images.shape[1])


def splits_failing_on_rank_1(**kwargs):
    """:func:`tiny_splits` whose training set cannot be read in the process of rank 1 (a DataError), so rank 0
    is left waiting for it inside DistributedDataParallel's first broadcast."""
    splits = tiny_splits(**kwargs)
    train = splits.train
    return dataclasses.replace(splits, train=FailsOnRank1(train.storage, train.labels, train.classes, train.files))


class FailsOnRank1(ArrayDataset):
    def __len__(self) -> int:
        if os.environ.get("RANK") == "1":
            raise DataError("rank 1 cannot read its shard of the training set")
        return super().__len__()
