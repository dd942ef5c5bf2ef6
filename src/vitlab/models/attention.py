"""Multi-head self-attention with one fused qkv projection.

The fused path calls ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU). The explicit
path computes ``softmax(q k^T / sqrt(d)) v`` itself and returns the probabilities, for attention maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """``(B, N, D) -> (B, N, D)``; with ``return_attention=True`` also ``(B, H, N, N)`` probabilities."""

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool = True, attention_dropout: float = 0.0,
                 proj_dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attention_dropout
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, D/H)
        dropout = self.attn_drop if self.training else 0.0
        probs = None
        if return_attention:
            probs = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            probs = probs.softmax(dim=-1)
            x = F.dropout(probs, dropout, self.training) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, H, N, D/H) -> (B, N, D)
        x = self.proj_drop(self.proj(x))
        return (x, probs) if return_attention else x
