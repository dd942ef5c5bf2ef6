"""Patchify: cut the image into patches and project each to ``hidden_dim``.

Two seed styles with the same maths: a strided convolution, or unfold + linear. Given the same weights
(the conv kernel reshaped to ``(D, C*ph*pw)``) they give equal outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """``(B, C, H, W) -> (B, N, D)`` with ``N = (H/ph) * (W/pw)`` patches in row-major order."""

    def __init__(self, *, in_channels: int, hidden_dim: int, patch_size: tuple[int, int], style: str = "conv"):
        super().__init__()
        self.patch_size = patch_size
        self.style = style
        if style == "conv":
            self.proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        else:
            self.proj = nn.Linear(in_channels * patch_size[0] * patch_size[1], hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "conv":
            return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        patches = F.unfold(x, kernel_size=self.patch_size, stride=self.patch_size)  # (B, C*ph*pw, N)
        return self.proj(patches.transpose(1, 2))  # (B, N, C*ph*pw) -> (B, N, D)
