"""Attention maps from the attention probabilities a ViT returns: rollout and the last layer's raw attention.

Pure tensor functions over the ``attentions`` tuple of ``VisionTransformer(x, return_attentions=True)``
(one ``(B, H, N, N)`` tensor per block, ``N = num_prefix_tokens + gh * gw``; the prefix tokens are the class,
distillation and register tokens). Every map they return is a distribution over the patches: non-negative,
summing to one over the ``gh x gw`` grid (uniform when the read-out row puts no weight on any patch, e.g. a class
token that only ever attends to itself). Prefix tokens never appear in a map: a register's column is dropped
like the class token's, so a model with registers gives the same patch grid.

The read-out follows the model's pooling: the class token's row, the mean of the patch rows, or, for an
attention pool (``pool="map"``, SigLIP), its probe's attention over the patch tokens (the model's
``pool_attention``), which weighs the patch rows.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from vitlab.errors import ConfigError

HEAD_FUSIONS = ("mean", "max", "min")
POOLS = ("cls", "mean", "map")


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """One layer's ``(B, H, N, N)`` probabilities -> ``(B, N, N)`` by the mean, max or min over heads."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ConfigError(f"head_fusion={head_fusion!r} is not one of {', '.join(HEAD_FUSIONS)}")


def _discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` of each image's ``(N, N)`` weights (ties broken by position)."""
    if ratio <= 0.0:
        return fused
    b, n, _ = fused.shape
    k = int(n * n * ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, n * n).clone()
    lowest = flat.topk(k, dim=-1, largest=False).indices
    flat.scatter_(-1, lowest, 0.0)
    return flat.reshape(b, n, n)


def _grid(num_patches: int, grid_size: Sequence[int] | None) -> tuple[int, int]:
    if grid_size is not None:
        gh, gw = int(grid_size[0]), int(grid_size[1])
        if gh * gw != num_patches:
            raise ConfigError(f"grid_size={tuple(grid_size)} has {gh * gw} patches but the attention has "
                              f"{num_patches} patch tokens; pass the model's config.grid_size")
        return gh, gw
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ConfigError(f"{num_patches} patch tokens do not form a square grid; pass grid_size=(gh, gw)")
    return side, side


def _check(attentions: Sequence[torch.Tensor], pool: str, num_prefix_tokens: int,
           pool_attention: torch.Tensor | None) -> None:
    if len(attentions) == 0:
        raise ConfigError("attentions is empty: call the model with return_attentions=True")
    if pool not in POOLS:
        raise ConfigError(f"pool={pool!r} is not one of {', '.join(POOLS)}")
    if pool == "cls" and num_prefix_tokens < 1:
        raise ConfigError("pool='cls' needs a class token (num_prefix_tokens >= 1); use pool='mean'")
    n_patches = attentions[0].shape[-1] - num_prefix_tokens
    if pool == "map" and (pool_attention is None or pool_attention.ndim != 4
                          or pool_attention.shape[-1] != n_patches):
        raise ConfigError(f"pool='map' needs pool_attention (B, H, 1, {n_patches}), the attention pool's "
                          "probabilities: the model's output with return_attentions=True has them")
    for i, a in enumerate(attentions):
        if a.ndim != 4 or a.shape[-1] != a.shape[-2] or a.shape != attentions[0].shape:
            raise ConfigError(f"attentions[{i}] has shape {tuple(a.shape)}; expected (B, H, N, N) like "
                              f"attentions[0] {tuple(attentions[0].shape)}")


def _read_out(matrix: torch.Tensor, pool: str, num_prefix_tokens: int, grid_size: Sequence[int] | None,
              probe: torch.Tensor | None = None) -> torch.Tensor:
    """``(..., N, N)`` token-to-token weights -> ``(..., gh, gw)`` map normalised over the patches. ``probe``:
    the attention pool's ``(..., gh*gw)`` weights over the patch rows (``pool="map"``)."""
    p = num_prefix_tokens
    if pool == "cls":
        row = matrix[..., 0, p:]  # the class token's row, patch columns: (..., gh*gw)
    elif pool == "mean":
        row = matrix[..., p:, p:].mean(dim=-2)  # mean-pooled output: average of the patch rows
    else:
        row = (probe.unsqueeze(-2) @ matrix[..., p:, p:]).squeeze(-2)  # the probe's mix of the patch rows
    return _to_grid(row, grid_size)


def _to_grid(row: torch.Tensor, grid_size: Sequence[int] | None) -> torch.Tensor:
    """``(..., gh*gw)`` weights on the patches -> ``(..., gh, gw)``, summing to one."""
    total = row.sum(dim=-1, keepdim=True)
    # A class token that never reads a patch (identity attention) says nothing about where: map uniformly.
    row = torch.where(total > 1e-12, row / total.clamp_min(1e-12), torch.full_like(row, 1.0 / row.shape[-1]))
    gh, gw = _grid(row.shape[-1], grid_size)
    return row.reshape(*row.shape[:-1], gh, gw)


def rollout_matrix(attentions: Sequence[torch.Tensor], head_fusion: str = "mean",
                   discard_ratio: float = 0.0) -> torch.Tensor:
    """The rolled-out token-to-token attention ``(B, N, N)``: ``A_L @ ... @ A_1``.

    Each layer's ``A_l`` is its head-fused attention with the lowest ``discard_ratio`` of the weights set to
    zero, plus the identity (the residual path), rows renormalised to sum to one (Abnar & Zuidema, 2020).
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ConfigError(f"discard_ratio={discard_ratio!r} must be in [0, 1)")
    result = None
    for attention in attentions:
        fused = _discard_lowest(fuse_heads(attention.float(), head_fusion), discard_ratio)  # (B, N, N)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        a = fused + eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    if result is None:
        raise ConfigError("rollout_matrix needs the attention probabilities of at least one block, got none")
    return result


def attention_rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                      pool: str = "cls", num_prefix_tokens: int = 1, grid_size: Sequence[int] | None = None,
                      pool_attention: torch.Tensor | None = None) -> torch.Tensor:
    """Attention rollout maps ``(B, gh, gw)``, each summing to one over the patches.

    ``attentions``: the model's per-block ``(B, H, N, N)`` probabilities, first block first. ``pool="cls"``
    reads the class token's row of the rolled-out matrix, ``pool="mean"`` (mean-pooled models without a
    class token) the mean over the patch rows, ``pool="map"`` the patch rows weighted by the attention pool's
    ``pool_attention`` ``(B, H, 1, gh*gw)``, heads fused as the blocks' are. ``num_prefix_tokens``: class,
    distillation and register tokens. ``grid_size`` defaults to a square grid.
    """
    _check(attentions, pool, num_prefix_tokens, pool_attention)
    probe = fuse_heads(pool_attention.float(), head_fusion)[:, 0] if pool == "map" else None  # (B, gh*gw)
    return _read_out(rollout_matrix(attentions, head_fusion, discard_ratio), pool, num_prefix_tokens, grid_size,
                     probe)


def last_layer_attention(attentions: Sequence[torch.Tensor], pool: str = "cls", num_prefix_tokens: int = 1,
                         grid_size: Sequence[int] | None = None,
                         pool_attention: torch.Tensor | None = None) -> torch.Tensor:
    """The last attention the read-out goes through, per head: ``(B, H, gh, gw)``, each summing to one.

    The last block's class-token row (``pool="cls"``) or mean over the patch rows (``pool="mean"``); for an
    attention pool (``pool="map"``), its probe's attention over the patches. No residual and no fusion, so
    each head can be looked at on its own.
    """
    _check(attentions, pool, num_prefix_tokens, pool_attention)
    if pool == "map":
        return _to_grid(pool_attention[:, :, 0].float(), grid_size)
    return _read_out(attentions[-1].float(), pool, num_prefix_tokens, grid_size)


__all__ = ["attention_rollout", "last_layer_attention", "rollout_matrix", "fuse_heads", "HEAD_FUSIONS"]
