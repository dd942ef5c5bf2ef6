"""Multi-head attention pooling ("MAP"): a learned probe attends over the tokens, then a residual MLP.

The pooling head of SigLIP (big_vision's ``MAPHead``) and of timm's ``global_pool='map'``
(``AttentionPoolLatent``), with timm's parameter names: ``latent`` (the probe), ``q``, ``kv``, ``proj``,
``norm``, ``mlp``. Hugging Face's ``SiglipMultiheadAttentionPoolingHead`` holds the same weights with q, k and v
stacked in one ``in_proj_weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.models.attention import attend
from vitlab.models.block import Mlp


class AttentionPool(nn.Module):
    """``(B, N, D) -> (B, D)``; with ``return_attention=True`` also the probe's ``(B, H, 1, N)`` probabilities."""

    impl = "auto"  # the attention kernel, as Attention.impl

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int, norm_eps: float = 1e-6, activation: str = "gelu"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim=dim, hidden_dim=mlp_dim, activation=activation)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, D = x.shape
        q = self.q(self.latent).reshape(1, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (1, H, 1, D/H)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x, probs = attend(q.expand(B, -1, -1, -1), k, v, scale=self.head_dim**-0.5, impl=self.impl,
                          return_attention=return_attention)  # (B, H, 1, D/H)
        x = self.proj(x.transpose(1, 2).reshape(B, 1, D))  # (B, H, 1, D/H) -> (B, 1, D)
        x = (x + self.mlp(self.norm(x)))[:, 0]  # -> (B, D)
        return (x, probs) if return_attention else x
