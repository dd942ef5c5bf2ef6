"""Multi-head self-attention with one fused qkv projection.

The fused path calls ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU). The explicit
path computes ``softmax(q k^T / sqrt(d)) v`` itself and returns the probabilities, for attention maps.

Which path a plain forward takes is ``Attention.impl``: "sdpa", "explicit", or "auto" (the default): SDPA on
GPUs, where its fused kernels win, and on CPU in fp32; the explicit path on CPU under bf16 autocast or with
bf16/fp16 inputs, where PyTorch's CPU SDPA kernel is slower than two bf16 matmuls and a softmax
(docs/performance.md has the measurements).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


IMPLS = ("auto", "sdpa", "explicit")


def use_sdpa(impl: str, x: torch.Tensor, head_dim: int) -> bool:
    """Whether the fused SDPA kernel serves this call better than the explicit path (see the module doc)."""
    if impl != "auto":
        return impl == "sdpa"
    if x.device.type != "cpu":
        return True
    return not torch.is_autocast_enabled("cpu") and x.dtype == torch.float32


class Attention(nn.Module):
    """``(B, N, D) -> (B, N, D)``; with ``return_attention=True`` also ``(B, H, N, N)`` probabilities."""

    impl = "auto"  # "auto" | "sdpa" | "explicit": see the module docstring; set per instance to override

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
        x, probs = attend(q, k, v, scale=self.scale, impl=self.impl, dropout=dropout, return_attention=return_attention)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, H, N, D/H) -> (B, N, D)
        x = self.proj_drop(self.proj(x))
        return (x, probs) if return_attention else x


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, impl: str = "auto",
           dropout: float = 0.0, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(q k^T * scale) v`` for ``(B, H, Nq, d)`` queries and ``(B, H, Nk, d)`` keys and values ->
    ``(B, H, Nq, d)``, with the ``(B, H, Nq, Nk)`` probabilities when ``return_attention`` (else None).

    ``dropout`` applies to the probabilities (pass 0 in eval mode); ``impl`` picks the kernel as
    :func:`use_sdpa` says, unless the probabilities are wanted (then the explicit path).
    """
    if return_attention:
        probs = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, Nq, Nk)
        return F.dropout(probs, dropout, dropout > 0) @ v, probs
    if use_sdpa(impl, q, q.shape[-1]):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale), None
    # Same maths in q's dtype. Under CPU autocast q is already bf16; autocast would run the softmax in
    # fp32 and cast (B, H, N, N) twice, which costs more than both matmuls at small head sizes. The
    # softmax kernel accumulates in fp32 either way; only its output is rounded, as p @ v would be.
    with torch.autocast("cpu", enabled=False):
        scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, Nq, Nk)
        return F.dropout(scores.softmax(dim=-1), dropout, dropout > 0) @ v, None
