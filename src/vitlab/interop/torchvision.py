"""torchvision ``vit_b_16``-style state dicts <-> vitlab.

torchvision uses ``nn.MultiheadAttention``, whose ``in_proj_weight`` stacks q, k and v like vitlab's fused
``qkv``; the MLP is an ``nn.Sequential`` (``mlp.0`` and ``mlp.3``, or ``mlp.linear_1/2`` in files saved before
torchvision 0.13); the head lives in ``heads.head`` with an optional ``heads.pre_logits`` (Linear + tanh).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vitlab.config import ViTConfig
from vitlab.errors import CheckpointError, ConfigError
from vitlab.interop._common import (build_and_load, count_blocks, image_size_from_tokens, make_config, need,
                                    num_heads_for, patch_weight, read_state_dict)
from vitlab.models import VisionTransformer

_LAYER = "encoder.layers.encoder_layer_"

# vitlab block key -> torchvision encoder-layer key (first choice, then the pre-0.13 name)
_BLOCK = {
    "norm1": ("ln_1",),
    "attn.qkv.weight": ("self_attention.in_proj_weight",),
    "attn.qkv.bias": ("self_attention.in_proj_bias",),
    "attn.proj": ("self_attention.out_proj",),
    "norm2": ("ln_2",),
    "mlp.fc1": ("mlp.0", "mlp.linear_1"),
    "mlp.fc2": ("mlp.3", "mlp.linear_2"),
}
_TOP = {"cls_token": "class_token", "patch_embed.proj": "conv_proj", "pos_embed": "encoder.pos_embedding",
        "norm": "encoder.ln", "pre_logits.0": "heads.pre_logits", "head": "heads.head"}


def is_torchvision_state_dict(state: dict[str, Any]) -> bool:
    """True when the keys look like torchvision's ``VisionTransformer``."""
    return "conv_proj.weight" in state and any(k.startswith(_LAYER) for k in state)


def torchvision_config_fields(state: dict[str, torch.Tensor], source: str,
                              num_heads: int | None = None) -> dict[str, Any]:
    """The :class:`ViTConfig` fields a torchvision state dict implies (heads: override or standard table)."""
    proj = need(state, "conv_proj.weight", source)
    if proj.ndim != 4:
        raise CheckpointError(f"{source}: key 'conv_proj.weight' has shape {tuple(proj.shape)}, expected "
                              "(D, C, ph, pw); convolutional-stem variants are not supported")
    hidden, channels, ph, pw = proj.shape
    fc1 = state.get(f"{_LAYER}0.mlp.0.weight", state.get(f"{_LAYER}0.mlp.linear_1.weight"))
    if fc1 is None:
        raise CheckpointError(f"{source}: missing key '{_LAYER}0.mlp.0.weight'")
    pos = need(state, "encoder.pos_embedding", source)
    return dict(
        image_size=image_size_from_tokens(pos.shape[1], 1, (ph, pw), source, "encoder.pos_embedding"),
        patch_size=(ph, pw), in_channels=channels, hidden_dim=hidden,
        depth=count_blocks(state, _LAYER, source), num_heads=num_heads_for(hidden, source, num_heads),
        mlp_dim=fc1.shape[0], class_token=True, pool="cls", pos_embed="learned", qkv_bias=True, norm_eps=1e-6,
        representation_dim=state["heads.pre_logits.weight"].shape[0] if "heads.pre_logits.weight" in state else None,
        num_classes=state["heads.head.weight"].shape[0] if "heads.head.weight" in state else 0,
    )


def convert_torchvision_state_dict(state: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Rename torchvision keys to vitlab's. A key that fits no rule is kept, so strict loading names it."""
    out, used = {}, set()

    def put(dst: str, src: str) -> bool:
        if src in state:
            out[dst] = state[src]
            used.add(src)
            return True
        return False

    for dst, src in _TOP.items():
        for suffix in ("", ".weight", ".bias"):
            put(dst + suffix, src + suffix)
    for i in range(config.depth):
        for dst, srcs in _BLOCK.items():
            for suffix in (("",) if dst.endswith(("weight", "bias")) else (".weight", ".bias")):
                any(put(f"blocks.{i}.{dst}{suffix}", f"{_LAYER}{i}.{src}{suffix}") for src in srcs)
    if "patch_embed.proj.weight" in out:
        out["patch_embed.proj.weight"] = patch_weight(out["patch_embed.proj.weight"], config)
    out.update({k: v for k, v in state.items() if k not in used})
    return out


def to_torchvision_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The model's weights under torchvision's ``vit_b_16`` names and shapes (the reverse of loading)."""
    c = model.config
    if not (c.class_token and c.pool == "cls" and c.pos_embed == "learned" and c.final_norm and c.qkv_bias
            and c.layer_scale is None and c.patch_embed in ("conv", "linear") and not c.norm_after_pool
            and not c.locality_attention):
        raise ConfigError("torchvision's VisionTransformer only has class-token pooling, learned positions, "
                          "a final norm, qkv bias, no layer scale, plain attention and a patchify (not conv_stem or "
                          "shifted) embedding")
    sd = model.state_dict()
    out = {}
    for dst, src in _TOP.items():
        for suffix in ("", ".weight", ".bias"):
            if dst + suffix in sd:
                out[src + suffix] = sd[dst + suffix]
    for i in range(c.depth):
        for dst, srcs in _BLOCK.items():
            for suffix in (("",) if dst.endswith(("weight", "bias")) else (".weight", ".bias")):
                out[f"{_LAYER}{i}.{srcs[0]}{suffix}"] = sd[f"blocks.{i}.{dst}{suffix}"]
    out["conv_proj.weight"] = patch_weight(out["conv_proj.weight"], c, "conv")  # a linear one is the same conv
    return {k: v.detach().clone() for k, v in out.items()}


def load_torchvision(path: str | Path, *, num_heads: int | None = None, **overrides: Any) -> VisionTransformer:
    """Load a torchvision ``vit_b_16``-style state dict (``.pth`` or ``.safetensors``) into a vitlab model.

    Inferred from the weights: hidden size and patch (``conv_proj``), depth, image size (the
    ``encoder.pos_embedding`` grid), classes (``heads.head``) and a ``heads.pre_logits`` layer. The number of
    heads is not stored: ``num_heads`` gives it, else the standard table by hidden size (768->12, 1024->16,
    1280->16, 384->6, 192->3).
    """
    return torchvision_model(read_state_dict(path), str(path), num_heads=num_heads, **overrides)


def torchvision_model(state: dict[str, torch.Tensor], source: str, *, num_heads: int | None = None,
                      **overrides: Any) -> VisionTransformer:
    """:func:`load_torchvision` of a state dict already read (``source`` names its file in errors)."""
    config = make_config(torchvision_config_fields(state, source, num_heads), overrides, source)
    return build_and_load(config, convert_torchvision_state_dict(state, config), source)
