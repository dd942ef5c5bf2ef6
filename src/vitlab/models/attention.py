"""Multi-head self-attention with one fused qkv projection.

The fused path calls ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU). The explicit
path computes ``softmax(q k^T / sqrt(d)) v`` itself and returns the probabilities, for attention maps.

With ``locality=True`` it is SL-ViT's locality self-attention (Lee et al. 2021, "Vision Transformer for
Small-Size Datasets"): a learned temperature per head in place of ``1/sqrt(d)`` (initialised to it), and no
token attends to itself (the diagonal of the scores is masked), which sharpens the attention of a ViT trained
from scratch on small images.

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
                 proj_dropout: float = 0.0, locality: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.locality = locality
        # SL-ViT's learned temperature, one per head (a 1-D parameter: no weight decay)
        self.temperature = nn.Parameter(torch.full((num_heads,), self.scale)) if locality else None
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attention_dropout
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, D/H)
        dropout = self.attn_drop if self.training else 0.0
        scale = self.scale if self.temperature is None else self.temperature.view(-1, 1, 1)
        x, probs = attend(q, k, v, scale=scale, impl=self.impl, dropout=dropout, return_attention=return_attention,
                          mask_self=self.locality)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, H, N, D/H) -> (B, N, D)
        x = self.proj_drop(self.proj(x))
        return (x, probs) if return_attention else x


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | torch.Tensor, impl: str = "auto",
           dropout: float = 0.0, return_attention: bool = False,
           mask_self: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(q k^T * scale) v`` for ``(B, H, Nq, d)`` queries and ``(B, H, Nk, d)`` keys and values ->
    ``(B, H, Nq, d)``, with the ``(B, H, Nq, Nk)`` probabilities when ``return_attention`` (else None).

    ``scale`` is a number or a tensor that broadcasts against ``(H, 1, 1)`` (a temperature per head);
    ``mask_self`` (self-attention, ``Nq == Nk``) leaves out the diagonal, each token's score with itself.
    ``dropout`` applies to the probabilities (pass 0 in eval mode); ``impl`` picks the kernel as
    :func:`use_sdpa` says, unless the probabilities are wanted (then the explicit path).
    """
    if isinstance(scale, torch.Tensor):
        q, scale = q * scale.to(q.dtype), 1.0  # the temperature, before the kernel (SDPA takes a number)
    if return_attention:
        probs = _masked(((q * scale) @ k.transpose(-2, -1)), mask_self).softmax(dim=-1)  # (B, H, Nq, Nk)
        return F.dropout(probs, dropout, dropout > 0) @ v, probs
    if use_sdpa(impl, q, q.shape[-1]):
        keep = ~_diagonal(q.shape[-2], q.device) if mask_self else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout, scale=scale), None
    # Same maths in q's dtype. Under CPU autocast q is already bf16; autocast would run the softmax in
    # fp32 and cast (B, H, N, N) twice, which costs more than both matmuls at small head sizes. The
    # softmax kernel accumulates in fp32 either way; only its output is rounded, as p @ v would be.
    with torch.autocast("cpu", enabled=False):
        scores = _masked((q * scale) @ k.transpose(-2, -1), mask_self)  # (B, H, Nq, Nk)
        return F.dropout(scores.softmax(dim=-1), dropout, dropout > 0) @ v, None


def _masked(scores: torch.Tensor, mask_self: bool) -> torch.Tensor:
    """``scores`` with the diagonal at the dtype's lowest value (a probability of 0) when ``mask_self``."""
    if not mask_self:
        return scores
    return scores.masked_fill(_diagonal(scores.shape[-1], scores.device), torch.finfo(scores.dtype).min)


def _diagonal(n: int, device: torch.device) -> torch.Tensor:
    """``(n, n)`` bool, True on the diagonal (from aranges: ONNX Runtime has no bool EyeLike for torch.eye)."""
    i = torch.arange(n, device=device)
    return i[:, None] == i[None, :]
