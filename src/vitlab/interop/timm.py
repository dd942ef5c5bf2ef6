"""timm ``vision_transformer`` state dicts <-> vitlab.

vitlab's parameter names are timm's, so the mapping is short: timm's ``fc_norm`` (the final norm applied to
the mean-pooled vector, with ``norm`` an Identity) becomes vitlab's ``norm`` with ``norm_after_pool=True``,
and the old in21k representation layer ``pre_logits.fc`` becomes ``pre_logits.0``.
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


def is_timm_state_dict(state: dict[str, Any]) -> bool:
    """True when the keys look like timm's ``VisionTransformer``."""
    return "patch_embed.proj.weight" in state and any(k.startswith("blocks.0.attn.qkv.") for k in state)


def timm_config_fields(state: dict[str, torch.Tensor], source: str, num_heads: int | None = None) -> dict[str, Any]:
    """The :class:`ViTConfig` fields a timm state dict implies (heads: ``num_heads`` or the standard table)."""
    proj = need(state, "patch_embed.proj.weight", source)  # (D, C, ph, pw)
    if proj.ndim != 4:
        raise CheckpointError(f"{source}: key 'patch_embed.proj.weight' has shape {tuple(proj.shape)}, expected "
                              "(D, C, ph, pw)")
    hidden, channels, ph, pw = proj.shape
    class_token = "cls_token" in state
    fc_norm = "fc_norm.weight" in state
    fields: dict[str, Any] = dict(
        patch_size=(ph, pw), in_channels=channels, hidden_dim=hidden,
        depth=count_blocks(state, "blocks.", source),
        num_heads=num_heads_for(hidden, source, num_heads),
        mlp_dim=need(state, "blocks.0.mlp.fc1.weight", source).shape[0],
        class_token=class_token,
        pos_embed="learned" if "pos_embed" in state else "none",
        pool="cls" if class_token and not fc_norm else "mean",
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in state else None,  # the loaded gammas replace this value
        final_norm=fc_norm or "norm.weight" in state,
        norm_after_pool=fc_norm,
        representation_dim=state["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in state else None,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        norm_eps=1e-6,
    )
    if "pos_embed" in state:
        fields["image_size"] = image_size_from_tokens(state["pos_embed"].shape[1], int(class_token), (ph, pw),
                                                      source, "pos_embed")
    else:
        fields["image_size"] = (ph * 14, pw * 14)  # no positions: any size works; 224 px at patch 16
    return fields


def convert_timm_state_dict(state: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Rename a timm state dict to vitlab's keys (shapes are unchanged, except a linear patch embedding)."""
    out = {}
    for key, value in state.items():
        if key.startswith("fc_norm."):
            key = "norm." + key[len("fc_norm."):]
        elif key.startswith("pre_logits.fc."):
            key = "pre_logits.0." + key[len("pre_logits.fc."):]
        elif key == "patch_embed.proj.weight":
            value = patch_weight(value, config)
        out[key] = value
    return out


def to_timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The model's weights under timm's ``vision_transformer`` names and shapes (the reverse of loading)."""
    c = model.config
    if c.pos_embed == "sincos":
        raise ConfigError("pos_embed='sincos' has no timm vision_transformer equivalent; export to ONNX instead")
    if c.patch_embed == "conv_stem":
        raise ConfigError("patch_embed='conv_stem' has no timm vision_transformer equivalent; export to ONNX "
                          "instead")
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("norm.") and c.norm_after_pool:
            key = "fc_norm." + key[len("norm."):]
        elif key.startswith("pre_logits.0."):
            key = "pre_logits.fc." + key[len("pre_logits.0."):]
        elif key == "patch_embed.proj.weight":
            value = patch_weight(value, c, "conv")
        out[key] = value.detach().clone()
    return out


def load_timm(path: str | Path, *, num_heads: int | None = None, **overrides: Any) -> VisionTransformer:
    """Load a timm ``vision_transformer`` state dict (``.safetensors`` or ``.pth``) into a vitlab model.

    The architecture is inferred from the weights: hidden size and patch from ``patch_embed.proj``, depth from
    the blocks, image size from the ``pos_embed`` grid, classes from ``head`` (none: no head), mean pooling
    when ``fc_norm`` is present or there is no class token. timm files do not store the number of heads:
    ``num_heads`` gives it, else the standard table by hidden size is used (192->3, 384->6, 768->12,
    1024->16, 1280->16). ``overrides`` set any other :class:`ViTConfig` field (e.g. ``pool="mean"`` for a
    ``global_pool='avg'`` model without ``fc_norm``, whose weights cannot tell).
    """
    return timm_model(read_state_dict(path), str(path), num_heads=num_heads, **overrides)


def timm_model(state: dict[str, torch.Tensor], source: str, *, num_heads: int | None = None,
               **overrides: Any) -> VisionTransformer:
    """:func:`load_timm` of a state dict already read (``source`` names its file in errors)."""
    config = make_config(timm_config_fields(state, source, num_heads), overrides, source)
    return build_and_load(config, convert_timm_state_dict(state, config), source)
