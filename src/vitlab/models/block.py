"""The pre-norm encoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, with drop path and layer scale."""

from __future__ import annotations

import torch
from torch import nn

from vitlab.models.attention import Attention


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation_layer(name: str) -> nn.Module:
    """The MLP nonlinearity a :data:`~vitlab.config.MLP_ACTIVATIONS` name stands for."""
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class Mlp(nn.Module):
    """Linear -> activation (GELU by default) -> dropout -> Linear -> dropout."""

    def __init__(self, *, dim: int, hidden_dim: int, dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = activation_layer(activation)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT), initialised small."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample with probability ``p`` during training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """One pre-norm transformer encoder layer."""

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int, qkv_bias: bool = True, dropout: float = 0.0,
                 attention_dropout: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None,
                 norm_eps: float = 1e-6, activation: str = "gelu", locality: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias,
                              attention_dropout=attention_dropout, proj_dropout=dropout, locality=locality)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim=dim, hidden_dim=mlp_dim, dropout=dropout, activation=activation)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        probs = None
        if return_attention:
            y, probs = self.attn(self.norm1(x), return_attention=True)
        else:
            y = self.attn(self.norm1(x))
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return (x, probs) if return_attention else x
