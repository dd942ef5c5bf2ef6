"""THE training step: what ``fit()`` runs for every batch and ``vitlab bench --mode train`` times.

One optimizer step over ``accum_steps`` micro-batches of uint8 images: augment and normalise on the device
(soft targets: label smoothing, Mixup/CutMix), resize to the step's size (progressive resizing), forward under
autocast, soft-target cross-entropy (with a CNN teacher, DeiT's distillation loss), backward (the GradScaler
scales fp16 losses on a GPU), gradient clipping, the optimizer step, the learning-rate schedule step and the EMA
update. Nothing in it waits for the device (no
``.item()``, no data-dependent Python branch), so a GPU runs ahead of the host, and the whole step can be handed
to ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitlab._device import autocast, sum_dtype
from vitlab.config import TrainConfig
from vitlab.data import TrainTransform
from vitlab.data.transforms import Mixing
from vitlab.training.optim import WarmupDecay, build_optimizer
from vitlab.training.resize import Resizing, resizing_for


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against soft targets ``(B, K)`` (label smoothing, Mixup/CutMix), computed in fp32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or ``.logits`` (vitlab's ViTOutput, Hugging Face)."""
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for the parameters; buffers (BatchNorm statistics of a conv
    stem) are copied, so the EMA model normalises with the trained model's statistics."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    copy_buffers(ema, model)


@torch.no_grad()
def copy_buffers(twin: nn.Module, model: nn.Module) -> None:
    """The model's buffers (BatchNorm statistics) into ``twin``, a copy of it (the EMA)."""
    for twin_buffer, buffer in zip(twin.buffers(), model.buffers()):
        twin_buffer.copy_(buffer)


DISTILL_ALPHA = 0.5  # DeiT's hard distillation: the distillation head's share of the loss


@dataclass
class Distillation:
    """DeiT's hard distillation (Touvron et al. 2021): the student's distillation head learns the class the
    ``teacher`` (in eval mode, no gradients) gives each training input, its class head the run's soft targets;
    the loss is ``(1 - alpha) * CE(class head, targets) + alpha * CE(distillation head, teacher's class)``."""

    teacher: nn.Module
    alpha: float = DISTILL_ALPHA

    def loss(self, heads: tuple[torch.Tensor, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
             device: torch.device, precision: str) -> torch.Tensor:
        with torch.no_grad(), autocast(device, precision):
            teacher_class = logits_of(self.teacher(inputs)).argmax(-1)
        cls_logits, dist_logits = heads
        return ((1 - self.alpha) * soft_cross_entropy(cls_logits, targets)
                + self.alpha * F.cross_entropy(dist_logits.float(), teacher_class))


LOOKAHEAD_EVERY = 5  # airbench94's Lookahead: an update every 5 optimizer steps ...
LOOKAHEAD_DECAY = 0.95 ** 5  # ... with a decay that ramps as progress**3 to this at the end of the schedule


def lookahead_decay(step: int, total_steps: int) -> float | None:
    """airbench's Lookahead schedule: the decay of the update after optimizer step ``step`` of a schedule of
    ``total_steps`` (0.95^5 (step / total_steps)^3 every 5 steps), or None where there is no update. The end of
    the run adds one of decay 1 (:meth:`TrainStep.finish`), as airbench does after its loop."""
    if step % LOOKAHEAD_EVERY:
        return None
    return LOOKAHEAD_DECAY * (step / total_steps) ** 3


@torch.no_grad()
def lookahead_update(slow: nn.Module, model: nn.Module, decay: float) -> None:
    """``slow = decay * slow + (1 - decay) * model``, then ``model = slow``, over all floating-point state
    (parameters and BatchNorm statistics, as airbench's LookaheadState; not the integer batch counts)."""
    pairs = [(s, m) for s, m in zip(slow.state_dict().values(), model.state_dict().values()) if m.is_floating_point()]
    slow_state, model_state = [s for s, _ in pairs], [m for _, m in pairs]
    torch._foreach_lerp_(slow_state, model_state, 1.0 - decay)
    torch._foreach_copy_(model_state, slow_state)


class TrainStep:
    """One training step; call it with the step's micro-batches and the augmentation generator.

    ``forward`` is what the inputs go through (``model`` itself, its DistributedDataParallel wrapper, or a
    compiled module); ``no_sync`` is DDP's context that skips the gradient all-reduce on all micro-batches but
    the last. ``resizing`` gives each step's image size (progressive resizing; it follows the scheduler's step
    and total). ``distillation``: DeiT's teacher loss (the model's forward then gives both heads). The state a
    checkpoint must hold is here: ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``ema``, ``slow``
    (Lookahead's slow weights); the teacher is fixed and saved once (:mod:`vitlab.training.teacher`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: WarmupDecay, *,
                 transform: TrainTransform, device: torch.device, precision: str, clip_grad: float | None = None,
                 ema: nn.Module | None = None, ema_decay: float | None = None, forward: Callable | None = None,
                 no_sync: Callable | None = None, slow: nn.Module | None = None, resizing: Resizing | None = None,
                 distillation: Distillation | None = None):
        self.model, self.optimizer, self.scheduler, self.transform = model, optimizer, scheduler, transform
        self.device, self.precision, self.clip_grad = device, precision, clip_grad
        self.ema, self.ema_decay, self.slow, self.resizing = ema, ema_decay, slow, resizing
        self.distillation = distillation
        self.forward = model if forward is None else forward  # (a compiled module has no truth value)
        self.no_sync = no_sync
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 only (a GPU)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Train on ``micro_batches`` (uint8 images ``(B, C, H, W)`` and int labels ``(B,)`` on the device) as one
        optimizer step; return the sum of the images' losses, a float64 tensor on the device."""
        loss_sum = torch.zeros((), dtype=sum_dtype(self.device), device=self.device)
        size = None if self.resizing is None else \
            self.resizing.size_at(self.scheduler.step_count, self.scheduler.total_steps)
        for i, (images, labels) in enumerate(micro_batches):
            inputs, targets = self.transform(images, labels, generator)  # -> float (B, C, H, W), soft (B, K)
            kwargs = {} if self.distillation is None else {"both_heads": True}
            if size is not None and size != tuple(inputs.shape[-2:]):
                inputs, kwargs = self.resizing.resize(inputs, size), {**kwargs, "interpolate_pos_encoding": True}
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or self.no_sync is None else self.no_sync():
                with autocast(self.device, self.precision):
                    out = self.forward(inputs, **kwargs)
                if self.distillation is None:
                    loss = soft_cross_entropy(logits_of(out), targets)
                else:
                    loss = self.distillation.loss(out, inputs, targets, self.device, self.precision)
                self.scaler.scale(loss / len(micro_batches)).backward()
            loss_sum += loss.detach().to(loss_sum.dtype) * labels.shape[0]
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self._optimizer_step()
        if self.ema is not None:
            ema_update(self.ema, self.model, self.ema_decay)
        return loss_sum

    def finish(self) -> None:
        """The run ends here (its schedule's last step, or where the time limit stopped it): with Lookahead the
        model takes the slow weights (an update of decay 1), and the EMA the BatchNorm statistics that came with
        them (it normalises with the model's)."""
        if self.slow is not None:
            lookahead_update(self.slow, self.model, 1.0)
            if self.ema is not None:
                copy_buffers(self.ema, self.model)

    @torch.compiler.disable
    def _optimizer_step(self) -> None:
        # Run as it is under torch.compile: the fused AdamW kernel is already one kernel, and the schedule's
        # learning rate is a new Python number every step, which a compiled graph would be rebuilt for.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.slow is not None:
            decay = lookahead_decay(self.scheduler.step_count, self.scheduler.total_steps)
            if decay is not None:
                lookahead_update(self.slow, self.model, decay)


def train_transform(config: TrainConfig, *, mean, std, image_size, num_classes: int) -> TrainTransform:
    """The run's on-device augmentation and normalisation, from ``config``'s augmentation fields."""
    return TrainTransform(
        mean=tuple(mean), std=tuple(std), image_size=tuple(image_size), num_classes=num_classes,
        crop_padding=config.crop_padding, hflip=config.hflip,
        random_resized_crop=tuple(config.random_resized_crop) if config.random_resized_crop else None,
        auto_augment=config.auto_augment, random_erasing=config.random_erasing,
        mixing=Mixing(config.mixup_alpha, config.cutmix_alpha, config.mix_prob), label_smoothing=config.label_smoothing)


def schedule_steps(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, warmup steps) of a schedule that ends after ``total_steps``: the warmup lasts
    ``warmup_epochs``, or less when a time limit shortens the run, keeping its share of ``config.epochs``."""
    warmup = min(round(config.warmup_epochs * steps_per_epoch),
                 round(config.warmup_epochs / config.epochs * total_steps))
    return total_steps, warmup


def make_train_step(model: nn.Module, config: TrainConfig, *, device: torch.device, precision: str,
                    steps_per_epoch: int, num_classes: int, image_size, mean, std,
                    forward: Callable | None = None, no_sync: Callable | None = None) -> TrainStep:
    """The :class:`TrainStep` that ``config`` describes, for ``model`` on ``device``: AdamW parameter groups
    (weight decay, layer decay, betas), warmup + decay (``config.lr_decay``) over ``config.epochs``, gradient
    clipping, EMA and Lookahead (copies of the model, made now), progressive resizing, and the augmentation of
    the run on images normalised with ``mean``/``std``."""
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas,
                                layer_decay=config.layer_decay)
    total, warmup = schedule_steps(config, config.epochs * steps_per_epoch, steps_per_epoch)
    scheduler = WarmupDecay(optimizer, lr=config.lr, min_lr=config.min_lr, total_steps=total, warmup_steps=warmup,
                            decay=config.lr_decay)
    ema = None
    if config.ema_decay is not None:
        ema = copy.deepcopy(model).eval()
        ema.requires_grad_(False)
    slow = copy.deepcopy(model).requires_grad_(False) if config.lookahead else None
    transform = train_transform(config, mean=mean, std=std, image_size=image_size, num_classes=num_classes)
    return TrainStep(model, optimizer, scheduler, transform=transform, device=device, precision=precision,
                     clip_grad=config.clip_grad, ema=ema, ema_decay=config.ema_decay, forward=forward,
                     no_sync=no_sync, slow=slow, resizing=resizing_for(config.progressive_resize, model))


__all__ = ["TrainStep", "Distillation", "make_train_step", "train_transform", "schedule_steps", "soft_cross_entropy",
           "ema_update", "lookahead_decay", "lookahead_update", "logits_of"]
