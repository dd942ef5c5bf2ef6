"""Position embeddings: learned, or fixed 2-D sin-cos; resizing a learned grid to a new image size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_2d(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of a ``(gh, gw)`` patch grid: ``(gh*gw, dim)``, row-major.

    Channels are ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` with ``dim/4`` frequencies each, as in
    lucidrains' simple ViT and MoCo v3. A ``dim`` that is not a multiple of 4 takes ``ceil(dim/4)``
    frequencies and drops the last channels, so the tiny models of the from-scratch notebooks (hidden 9) work too.
    """
    gh, gw = grid_size
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                          indexing="ij")
    n_freq = math.ceil(dim / 4)
    omega = 1.0 / temperature ** (torch.arange(n_freq, dtype=torch.float64) / max(n_freq - 1, 1))
    x = x.flatten()[:, None] * omega[None, :]
    y = y.flatten()[:, None] * omega[None, :]
    pe = torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1)[:, :dim]
    return pe.float()


def resize_grid_embedding(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                          num_prefix_tokens: int, antialias: bool = False) -> torch.Tensor:
    """Resize a learned ``(1, prefix + gh*gw, D)`` position embedding to a new patch grid.

    The patch part is interpolated bicubically on its 2-D grid; the prefix (class token) embeddings are kept
    as they are. Hugging Face's ViT, DeiT, DINOv2, CLIP and SigLIP use plain bicubic; timm (and Hugging Face's
    DINOv2 with registers) ``antialias=True``, which PyTorch computes with another cubic kernel (a = -0.5,
    not -0.75), so the two differ even when enlarging the grid.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos.dtype)
    return torch.cat((prefix, grid), dim=1)
