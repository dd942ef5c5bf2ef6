"""Attention maps for the very images passed in: run the model once with ``return_attentions=True``,
turn its probabilities into patch-grid maps, and upsample them to the image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitlab.errors import ConfigError
from vitlab.explain.rollout import attention_rollout, fuse_heads, last_layer_attention
from vitlab.models import VisionTransformer, class_probabilities

METHODS = ("rollout", "last")


@dataclass
class AttentionMaps:
    """``probs`` ``(B, num_classes)`` softmax outputs; ``maps`` ``(B, gh, gw)`` the chosen method's map;
    ``head_maps`` ``(B, H, gh, gw)`` the last layer's attention per head. Maps sum to one over the grid."""

    probs: torch.Tensor
    maps: torch.Tensor
    head_maps: torch.Tensor


@torch.inference_mode()
def compute_attention_maps(model: VisionTransformer, images: torch.Tensor, method: str = "rollout",
                           head_fusion: str = "mean", discard_ratio: float = 0.0,
                           temperature: float = 1.0) -> AttentionMaps:
    """Maps for ``images`` (normalised float ``(B, C, H, W)`` at the model's size).

    ``method="rollout"``: attention rollout over all blocks; ``"last"``: the last block's attention,
    heads fused with ``head_fusion``. The read-out row follows the model: class token, the mean over
    the patches for mean-pooled models, the probe's attention for an attention pool (SigLIP). ``probs`` are
    softmax(logits / ``temperature``): a fitted temperature (``LoadedModel.temperature``) calibrates them.
    """
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not one of {', '.join(METHODS)}")
    was_training = model.training
    model.eval()
    try:
        out = model(images, return_attentions=True)
    finally:
        model.train(was_training)
    c = model.config
    # registers and a distillation token are prefix tokens: never in a map, which stays a patch grid
    kwargs = dict(pool=c.pool, num_prefix_tokens=c.num_prefix_tokens, grid_size=c.grid_size,
                  pool_attention=out.pool_attention)
    heads = last_layer_attention(out.attentions, **kwargs)  # (B, H, gh, gw)
    if method == "rollout":
        maps = attention_rollout(out.attentions, head_fusion=head_fusion, discard_ratio=discard_ratio, **kwargs)
    else:
        maps = fuse_heads(heads, head_fusion)
        maps = maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return AttentionMaps(probs=class_probabilities(out.logits, temperature), maps=maps, head_maps=heads)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(..., gh, gw)`` maps -> ``(..., H, W)``, bilinear, each scaled to [0, 1] by its own min and max
    (a constant map becomes all zeros) for display as a heatmap."""
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]  # (M, H, W)
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return x.reshape(*lead, *size)


__all__ = ["AttentionMaps", "compute_attention_maps", "upsample_maps", "METHODS"]
