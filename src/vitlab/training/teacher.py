"""The CNN teacher of DeiT-style distillation (``TrainConfig.teacher``), trained inside the run before the ViT.

The teacher is airbench94's network (:class:`~vitlab.models.cnn.AirbenchNet`) trained with airbench's
recipe as its ``clean_airbench.py`` states it (93.95% on CIFAR-10 in 10 epochs; no Lookahead, no
progressive freezing): the first layer whitened on the first 5000 training images and frozen, SGD with Nesterov
momentum 0.85, batch 1000, learning rate 10 and weight decay 0.015 per 1024 images (decoupled from the
momentum), 64x the rate for the BatchNorm biases, label smoothing 0.2, the summed loss, 20% of the steps
warming up from 0.2 of the peak and the rest a straight line to 0, random flips and 2-pixel translations.
The run's precision and normalisation are the ViT's; the teacher's epochs (``TrainConfig.teacher_epochs``)
count against the run's time limit.

The trained teacher is saved in the run folder (``teacher/``: model.safetensors and teacher.json with its
epochs, seconds and test top-1), so a resumed run distils from the same teacher without training it again.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vitlab._device import autocast
from vitlab.checkpoints import read_teacher, write_teacher
from vitlab.data import TrainTransform
from vitlab.errors import ConfigError
from vitlab.evaluation import evaluate_model
from vitlab.models.cnn import MIN_IMAGE_SIZE, AirbenchNet
from vitlab.models.patch_embed import WHITEN_IMAGES
from vitlab.training.step import soft_cross_entropy

log = logging.getLogger("vitlab.train")

BATCH_SIZE = 1000
LR, MOMENTUM, WEIGHT_DECAY, BIAS_SCALER = 10.0, 0.85, 0.015, 64.0  # per 1024 images, decoupled
LABEL_SMOOTHING, TRANSLATE, WARMUP = 0.2, 2, 0.2


def teacher_lr_factor(step: int, total_steps: int) -> float:
    """clean_airbench's ``get_lr``: 0.2 -> 1 over the first 20% of the steps, then a straight line to 0."""
    warmup = int(total_steps * WARMUP)
    if step < warmup:
        frac = step / warmup
        return 0.2 * (1 - frac) + frac
    return 1 - (step - warmup) / (total_steps - warmup)


def teacher_optimizer(model: nn.Module, batch_size: int) -> torch.optim.SGD:
    """airbench's SGD: the decoupled rate and decay turned into PyTorch's, 64x the rate for BatchNorm biases."""
    kilostep_scale = 1024 * (1 + 1 / (1 - MOMENTUM))
    lr = LR / kilostep_scale
    wd = WEIGHT_DECAY * batch_size / kilostep_scale
    lr_biases = lr * BIAS_SCALER
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    norm_biases = [p for k, p in named if "norm" in k]
    others = [p for k, p in named if "norm" not in k]
    return torch.optim.SGD([dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
                            dict(params=others, lr=lr, weight_decay=wd / lr)], momentum=MOMENTUM, nesterov=True)


def make_teacher(name: str, *, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> AirbenchNet:
    """A fresh teacher network ``name`` (``"airbench94"``) for the data's channels and classes."""
    if min(image_size) < MIN_IMAGE_SIZE:
        raise ConfigError(f"TrainConfig.teacher={name!r} needs images of at least {MIN_IMAGE_SIZE} px (its three "
                          f"max-pools), not {tuple(image_size)}: raise image_size or drop the teacher")
    return AirbenchNet(in_channels=in_channels, num_classes=num_classes)


def train_teacher(model: AirbenchNet, train, *, epochs: float, mean, std, image_size, num_classes: int,
                  device: torch.device, precision: str, seed: int, rank: int = 0, world_size: int = 1,
                  forward: Callable | None = None) -> int:
    """Train ``model`` (on ``device``, its first layer already whitened) on ``train`` (an ArrayDataset) for
    ``epochs`` epochs of airbench's recipe; this rank's share of each batch of 1000 when ``world_size`` > 1
    (``forward``: the DistributedDataParallel wrapper); a training set of fewer images takes them all as one
    batch (the rates are per 1024 images). Returns the optimizer steps taken."""
    per_rank = min(BATCH_SIZE, len(train)) // world_size
    if per_rank < 1:
        raise ConfigError(f"TrainConfig.teacher: {len(train)} training images cannot be shared by {world_size} "
                          "processes")
    loader = train.loader(batch_size=per_rank, shuffle=True, seed=seed, drop_last=True, device=device,
                          rank=rank, world_size=world_size)
    steps_per_epoch = len(loader)
    total = max(1, round(epochs * steps_per_epoch))
    transform = TrainTransform(mean=mean, std=std, image_size=image_size, num_classes=num_classes,
                               crop_padding=TRANSLATE, hflip=True, label_smoothing=LABEL_SMOOTHING)
    optimizer = teacher_optimizer(model, per_rank * world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: teacher_lr_factor(step, total))
    generator = torch.Generator(device=device)
    forward = model if forward is None else forward
    model.train()
    step = 0
    for epoch in range(math.ceil(total / steps_per_epoch)):
        loader.set_epoch(epoch)
        generator.manual_seed(seed * 1000 + epoch * 10 + rank)
        for images, labels in loader:
            inputs, targets = transform(images, labels, generator)
            with autocast(device, precision):
                logits = forward(inputs)
            # airbench sums the loss over the batch (its learning rate is per 1024 images); DDP averages ranks
            loss = soft_cross_entropy(logits, targets) * len(targets) * world_size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == total:
                break
    if world_size > 1:  # DDP sends rank 0's BatchNorm statistics before each forward: after the last, once more
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    model.eval()
    model.requires_grad_(False)
    return step


def teacher_for_run(config, run: Path, data, *, preprocess, device: torch.device, precision: str, resuming: bool,
                    rank: int = 0, world_size: int = 1) -> tuple[AirbenchNet, float]:
    """The run's teacher (``config.teacher``, a TrainConfig's): a resumed run's own from ``run/teacher``, else a
    new one trained now on ``data.train`` (the same on every rank: seeded, whitened on the same images, gradients
    averaged) and scored on ``data.test``, saved by rank 0. Returns (teacher in eval mode, seconds it trained)."""
    image_size, channels = tuple(preprocess.image_size), preprocess.channels
    make = lambda: make_teacher(config.teacher, in_channels=channels, num_classes=len(data.classes),  # noqa: E731
                                image_size=image_size).to(device)
    if resuming:
        teacher = make()
        if load_teacher(run, teacher, name=config.teacher, epochs=config.teacher_epochs, device=device):
            return teacher, 0.0
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    teacher = make()
    done, _ = teacher.whiten_(data.train.head(WHITEN_IMAGES), transform=preprocess)
    forward = None
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(teacher, device_ids=[device.index] if device.type == "cuda" else None)
    steps = train_teacher(teacher, data.train, epochs=config.teacher_epochs, mean=preprocess.mean,
                          std=preprocess.std, image_size=image_size, num_classes=len(data.classes), device=device,
                          precision=precision, seed=config.seed, rank=rank, world_size=world_size, forward=forward)
    scored = evaluate_model(teacher, data.test, mean=preprocess.mean, std=preprocess.std, image_size=image_size,
                            batch_size=config.eval_batch_size, device=device, precision=precision,
                            classes=list(data.classes))
    seconds = time.perf_counter() - start
    info = dict(model=config.teacher, epochs=config.teacher_epochs, steps=steps, seconds=round(seconds, 1),
                top1=scored["top1"], parameters=teacher.num_parameters(), whitened_filters=done)
    if rank == 0:
        write_teacher(run, teacher.state_dict(), info)
        log.info("teacher %s: %d steps (%g epochs) in %.1f s, top-1 %.2f%% on the test split; the ViT's "
                 "distillation head learns its classes", config.teacher, steps, config.teacher_epochs, seconds,
                 100 * scored["top1"])
        limit = config.time_limit_minutes
        if limit is not None and seconds > 30 * limit:
            log.warning("teacher %s took %.1f of the time limit's %g minutes: lower teacher_epochs",
                        config.teacher, seconds / 60, limit)
    return teacher, seconds


def load_teacher(run: str | Path, model: AirbenchNet, *, name: str, epochs: float,
                 device: torch.device) -> dict | None:
    """The teacher a run saved, into ``model`` (its info dict), or None when the run has none of this name and
    epochs (a run stopped while its teacher trained: the teacher trains again)."""
    found = read_teacher(run, device=device)
    if found is None or found[1].get("model") != name or found[1].get("epochs") != epochs:
        return None
    model.load_state_dict(found[0])
    model.eval().requires_grad_(False)
    return found[1]


__all__ = ["make_teacher", "train_teacher", "teacher_for_run", "load_teacher", "teacher_lr_factor",
           "teacher_optimizer"]
