"""Progressive resizing (``TrainConfig.progressive_resize``): smaller training images early in the schedule.

FFCV's ImageNet recipes train at a low resolution first and ramp it up late in the run (Fast.ai's DAWNBench
entry before them): a step on fewer pixels costs less, and the early steps learn coarse features that need no
fine detail. ``[scale, start, end]`` trains at ``scale`` times the model's image size until ``start`` of the
schedule (a fraction of its steps), then at a size growing linearly to the model's own by ``end``; each side is
rounded to the nearest multiple of the patch size (FFCV rounds to 32 px; halves up), at least one patch. The size
follows the step and the planned total alone, so a resumed run and every rank of a distributed one train each
step at the same size.

A ViT takes the smaller grid through its position embedding resized to it (``interpolate_pos_encoding``); the
evaluation is at the model's size. A step's cost is counted as its share of the model's pixels (the patch
embedding, the tokens and the MLPs scale with them; attention a little faster, the optimizer not at all), which
is what the time-limit plan prices steps by (``TimeBudget.units``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitlab.errors import ConfigError
from vitlab.models import VisionTransformer


@dataclass(frozen=True)
class Resizing:
    """The sizes of a progressive-resizing schedule for a model of ``image_size`` with patches of ``multiple``."""

    image_size: tuple[int, int]
    multiple: tuple[int, int]
    scale: float
    start: float
    end: float

    def _sides(self, steps: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (height, width) of each step of ``steps`` in a schedule of ``total`` steps (one formula for a step
        and for the plan's sums)."""
        t = steps.to(torch.float64) / max(total, 1)
        if self.end > self.start:
            ramp = ((t - self.start) / (self.end - self.start)).clamp(0.0, 1.0)
        else:
            ramp = (t >= self.start).to(torch.float64)
        factor = self.scale + (1.0 - self.scale) * ramp
        sides = []
        for native, m in zip(self.image_size, self.multiple):
            sides.append((torch.floor(native * factor / m + 0.5) * m).clamp(min=m, max=native).to(torch.int64))
        return sides[0], sides[1]

    def size_at(self, step: int, total: int) -> tuple[int, int]:
        """The training image size of optimizer step ``step`` (0-based) of a schedule of ``total`` steps."""
        h, w = self._sides(torch.tensor([step]), total)
        return int(h), int(w)

    def units(self, first: int, last: int, total: int) -> float:
        """The cost of steps ``first`` to ``last - 1`` of a schedule of ``total`` steps, in steps at the model's
        size (each its share of the model's pixels)."""
        if last <= first:
            return 0.0
        h, w = self._sides(torch.arange(first, last), total)
        return float((h * w).sum()) / (self.image_size[0] * self.image_size[1])

    @staticmethod
    def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Float images ``(B, C, H, W)`` scaled down to ``size`` (bilinear, antialiased as a downscale should be)."""
        return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def resizing_for(schedule: list[float] | None, model) -> Resizing | None:
    """The :class:`Resizing` of ``TrainConfig.progressive_resize`` for ``model`` (a vitlab ViT: its image and
    patch sizes), or None without one."""
    if schedule is None:
        return None
    if not isinstance(model, VisionTransformer):
        raise ConfigError("TrainConfig.progressive_resize needs a vitlab ViT (it resizes the position embedding "
                          f"to each size); {type(model).__name__} is not one: leave progressive_resize out")
    scale, start, end = schedule
    return Resizing(image_size=tuple(model.config.image_size), multiple=tuple(model.config.patch_size),
                    scale=float(scale), start=float(start), end=float(end))


__all__ = ["Resizing", "resizing_for"]
