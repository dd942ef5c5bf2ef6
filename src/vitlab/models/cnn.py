"""airbench94's convolutional network (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024):
the teacher of DeiT-style distillation (``TrainConfig.teacher``; trained by :mod:`vitlab.training.teacher`).

A 2x2 convolution whitened on the training images' patches and frozen (2 filters per patch dimension: 24 for
RGB), GELU, then three groups of [3x3 convolution, 2x2 max-pool, BatchNorm, GELU, 3x3 convolution, BatchNorm,
GELU] of widths 64, 256 and 256, a global max-pool, a linear head without bias and a scale of 1/9. The
BatchNorms learn their biases only (eps 1e-12); the 3x3 kernels start as PyTorch's default with a Dirac identity
on the first ``in_channels`` filters. The layers are an ``nn.Sequential`` in airbench's order, so its state
dict keys are airbench's. airbench's ``MaxPool2d(3)`` at the end is a global max-pool here, the same at 32 px,
so other sizes (from 16 px) work too.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.models.patch_embed import whiten_conv_

AIRBENCH_WIDTHS = (64, 256, 256)
AIRBENCH_SCALE = 1 / 9
MIN_IMAGE_SIZE = 16  # 2x2 valid convolution, then three 2x2 max-pools: 16 -> 15 -> 7 -> 3 -> 1


class _Conv(nn.Conv2d):
    """airbench's convolution: no bias by default, 'same' padding, Dirac-initialised first filters."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: str | int = "same",
                 bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, padding=padding, bias=bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        torch.nn.init.dirac_(w[:w.size(1)])


class _BatchNorm(nn.BatchNorm2d):
    """airbench's BatchNorm: eps 1e-12, the scale fixed at 1 (not trained), the bias trained."""

    def __init__(self, num_features: int):
        super().__init__(num_features, eps=1e-12)
        self.weight.requires_grad = False


class ConvGroup(nn.Module):
    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv1 = _Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(channels_out)
        self.conv2 = _Conv(channels_out, channels_out)
        self.norm2 = _BatchNorm(channels_out)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class _Scale(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class AirbenchNet(nn.Sequential):
    """airbench94's network for ``num_classes`` classes on ``in_channels``-channel images ``(B, C, H, W)``
    (H, W >= 16): ``(B, C, H, W) -> logits (B, num_classes)``. Call :meth:`whiten_` on training images before
    training (airbench sets the first layer from CIFAR-10's patch covariance and never trains its weights)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths: tuple[int, int, int] = AIRBENCH_WIDTHS):
        whiten_width = 2 * in_channels * 2 * 2
        super().__init__(
            _Conv(in_channels, whiten_width, kernel_size=2, padding=0, bias=True),
            nn.GELU(),
            ConvGroup(whiten_width, widths[0]),
            ConvGroup(widths[0], widths[1]),
            ConvGroup(widths[1], widths[2]),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[2], num_classes, bias=False),
            _Scale(AIRBENCH_SCALE),
        )
        self[0].weight.requires_grad = False
        # oneDNN's convolutions in channels_last: a bf16 forward of 128 CIFAR images 108 -> 30 ms on the 2-core
        # Intel Xeon with AVX512-BF16/AMX (2 threads, a micro-benchmark of 2026-12-07)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))

    def whiten_(self, images: torch.Tensor, transform=None) -> tuple[int, int]:
        """The first convolution's filters from ``images``' 2x2 patches (:func:`whiten_conv_`, airbench's eps
        5e-4); returns (filters set, filters)."""
        return whiten_conv_(self[0], images, eps=5e-4, transform=transform)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


__all__ = ["AirbenchNet", "AIRBENCH_WIDTHS", "MIN_IMAGE_SIZE"]
