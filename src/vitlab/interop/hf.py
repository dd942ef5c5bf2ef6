"""Hugging Face ``transformers`` ViT <-> vitlab: config and state-dict mapping.

Hugging Face keeps separate ``query``/``key``/``value`` projections; vitlab fuses them into one ``qkv``
(as timm does), so converting concatenates them along the output dimension.
"""

from __future__ import annotations

from typing import Any

import torch

from vitlab.config import ViTConfig
from vitlab.errors import CheckpointError


def vit_config_from_hf(hf_config: Any, **overrides: Any) -> ViTConfig:
    """A :class:`ViTConfig` equal to a ``transformers.ViTConfig`` (object or its ``to_dict()``)."""
    c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    act = c.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"Hugging Face config hidden_act={act!r}: vitlab's MLP uses exact GELU ('gelu')")
    id2label = c.get("id2label") or {}
    num_labels = len(id2label) if id2label else c.get("num_labels", 2)
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else None
    if labels and all(lbl == f"LABEL_{i}" for i, lbl in enumerate(labels)):
        labels = None
    cfg = dict(image_size=c.get("image_size", 224), patch_size=c.get("patch_size", 16),
               in_channels=c.get("num_channels", 3), num_classes=num_labels, hidden_dim=c["hidden_size"],
               depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
               norm_eps=c.get("layer_norm_eps", 1e-12), qkv_bias=c.get("qkv_bias", True),
               dropout=c.get("hidden_dropout_prob", 0.0), attention_dropout=c.get("attention_probs_dropout_prob", 0.0),
               labels=labels)
    cfg.update(overrides)
    return ViTConfig(**cfg)


# transformers 5 renamed the modules of its ViT in memory (files on the Hub keep the classic names).
_V5_TO_CLASSIC = [
    ("attention.q_proj.", "attention.attention.query."),
    ("attention.k_proj.", "attention.attention.key."),
    ("attention.v_proj.", "attention.attention.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
]


def _classic_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers-5 keys (``layers.N.attention.q_proj``) to the classic on-disk layout
    (``encoder.layer.N.attention.attention.query``); classic keys pass through unchanged."""
    out = {}
    for key, value in sd.items():
        if key.startswith("layers."):
            _, idx, rest = key.split(".", 2)
            for new, old in _V5_TO_CLASSIC:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            key = f"encoder.layer.{idx}.{rest}"
        out[key] = value
    return out


def convert_hf_state_dict(state: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Map a ``ViTModel`` / ``ViTForImageClassification`` state dict to vitlab's names.

    Accepts the classic key layout of files on the Hub and the one of ``transformers>=5`` models in memory.
    The pooler of ``ViTModel`` (not part of the classification model) is dropped. A missing key raises a
    :class:`CheckpointError` naming it.
    """
    sd = _classic_names({k[len("vit."):] if k.startswith("vit.") else k: v for k, v in state.items()})

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"Hugging Face checkpoint: missing key {key!r}")
        return sd[key]

    out = {
        "cls_token": take("embeddings.cls_token"),
        "pos_embed": take("embeddings.position_embeddings"),
        "patch_embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take("layernorm.weight"),
        "norm.bias": take("layernorm.bias"),
    }
    if config.patch_embed == "linear":
        out["patch_embed.proj.weight"] = out["patch_embed.proj.weight"].reshape(config.hidden_dim, -1)
    for i in range(config.depth):
        p = f"encoder.layer.{i}."
        a = p + "attention.attention."
        out[f"blocks.{i}.norm1.weight"] = take(p + "layernorm_before.weight")
        out[f"blocks.{i}.norm1.bias"] = take(p + "layernorm_before.bias")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([take(a + n + ".weight") for n in ("query", "key", "value")])
        if config.qkv_bias:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(a + n + ".bias") for n in ("query", "key", "value")])
        out[f"blocks.{i}.attn.proj.weight"] = take(p + "attention.output.dense.weight")
        out[f"blocks.{i}.attn.proj.bias"] = take(p + "attention.output.dense.bias")
        out[f"blocks.{i}.norm2.weight"] = take(p + "layernorm_after.weight")
        out[f"blocks.{i}.norm2.bias"] = take(p + "layernorm_after.bias")
        out[f"blocks.{i}.mlp.fc1.weight"] = take(p + "intermediate.dense.weight")
        out[f"blocks.{i}.mlp.fc1.bias"] = take(p + "intermediate.dense.bias")
        out[f"blocks.{i}.mlp.fc2.weight"] = take(p + "output.dense.weight")
        out[f"blocks.{i}.mlp.fc2.bias"] = take(p + "output.dense.bias")
    if config.num_classes > 0 and "classifier.weight" in sd:
        out["head.weight"] = sd["classifier.weight"]
        out["head.bias"] = sd["classifier.bias"]
    return out
