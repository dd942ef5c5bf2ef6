"""The Hugging Face ``transformers`` layouts of the ViT families vitlab reads and writes: config fields and keys.

A family's weights are a list of :class:`Rule` s, each naming vitlab keys, the Hugging Face keys that hold the
same numbers, and the conversion both ways (q, k, v stacked into vitlab's fused ``qkv``; CLIP's ``(D,)`` class
embedding; SigLIP's ``in_proj_weight`` split into the probe's ``q`` and ``kv``). Reading a folder and writing one
walk the same list in opposite directions, so the two cannot disagree.

Families (``config.json``'s ``model_type``): ``vit``; ``deit`` (distillation token and head); ``dinov2`` and
``dinov2_with_registers`` (layer scale, registers); ``clip`` / ``clip_vision_model`` (the image tower: pre-norm,
no patch bias, QuickGELU, the projection); ``siglip`` / ``siglip_vision_model`` (no class token, attention pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from vitlab.config import ViTConfig
from vitlab.errors import CheckpointError

Convert = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _same(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(tensors)


@dataclass(frozen=True)
class Rule:
    """vitlab keys ``ours`` hold what the Hugging Face keys ``theirs`` hold: ``read`` turns theirs into ours,
    ``write`` ours into theirs (both in the order of the key tuples)."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    read: Convert = _same
    write: Convert = _same


def _pair(ours: str, theirs: str, suffixes: tuple[str, ...] = (".weight", ".bias")) -> list[Rule]:
    return [Rule((ours + s,), (theirs + s,)) for s in suffixes]


def _stacked(ours: str, theirs: list[str]) -> Rule:
    """Separate q, k, v ``(D, ...)`` <-> vitlab's fused ``qkv`` ``(3D, ...)``."""
    return Rule((ours,), tuple(theirs), read=lambda ts: [torch.cat(ts)], write=lambda ts: list(ts[0].chunk(3)))


def _reshaped(ours: str, theirs: str, our_shape: Callable, their_shape: Callable) -> Rule:
    return Rule((ours,), (theirs,), read=lambda ts: [our_shape(ts[0])], write=lambda ts: [their_shape(ts[0])])


def _split_probe_qkv(suffix: str) -> Rule:
    """SigLIP's ``nn.MultiheadAttention`` stacks q, k, v in ``in_proj_*``; vitlab's (timm's) pool has ``q`` and
    ``kv``."""
    def read(ts):
        d = ts[0].shape[0] // 3
        return [ts[0][:d], ts[0][d:]]

    return Rule((f"attn_pool.q.{suffix}", f"attn_pool.kv.{suffix}"), (f"head.attention.in_proj_{suffix}",),
                read=read, write=lambda ts: [torch.cat(ts)])


def _folded_class_position() -> Rule:
    """Hugging Face's DINOv2 with registers gives the class token a position and the registers none; vitlab (as
    timm) adds that position to the class token once and keeps positions for the patches only."""
    def read(ts):
        cls, pos = ts
        return [cls + pos[:, :1], pos[:, 1:]]

    return Rule(("cls_token", "pos_embed"), ("embeddings.cls_token", "embeddings.position_embeddings"),
                read=read, write=lambda ts: [ts[0], torch.cat((torch.zeros_like(ts[0]), ts[1]), dim=1)])


_VIT_BLOCK = dict(norm1="layernorm_before", q="attention.attention.query", k="attention.attention.key",
                  v="attention.attention.value", proj="attention.output.dense", norm2="layernorm_after",
                  fc1="intermediate.dense", fc2="output.dense")
_DINOV2_BLOCK = {**_VIT_BLOCK, "norm1": "norm1", "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
                 "ls1": "layer_scale1.lambda1", "ls2": "layer_scale2.lambda1"}
_CLIP_BLOCK = dict(norm1="layer_norm1", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                   proj="self_attn.out_proj", norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")


def _block_rules(config: ViTConfig, layer: str, names: dict[str, str]) -> list[Rule]:
    rules: list[Rule] = []
    for i in range(config.depth):
        p, b = layer.format(i), f"blocks.{i}."
        qkv = [p + names[n] for n in ("q", "k", "v")]
        rules += _pair(b + "norm1", p + names["norm1"])
        rules.append(_stacked(b + "attn.qkv.weight", [n + ".weight" for n in qkv]))
        if config.qkv_bias:
            rules.append(_stacked(b + "attn.qkv.bias", [n + ".bias" for n in qkv]))
        for ours, theirs in (("attn.proj", "proj"), ("norm2", "norm2"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
            rules += _pair(b + ours, p + names[theirs])
        if "ls1" in names:
            rules += [Rule((b + "ls1.gamma",), (p + names["ls1"],)), Rule((b + "ls2.gamma",), (p + names["ls2"],))]
    return rules


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family: how its folders name things and which keys vitlab does not need."""

    name: str  # as the user knows it, in messages
    wrapper: str  # the prefix of the backbone's keys inside the task models ("vit.", "vision_model.", ...)
    ignored: tuple[str, ...] = ()  # key prefixes (after the wrapper) vitlab does not use: poolers, text towers


FAMILIES = {
    "vit": Family("ViT", "vit.", ("pooler.",)),
    "deit": Family("DeiT", "deit.", ("pooler.",)),
    "dinov2": Family("DINOv2", "dinov2.", ("embeddings.mask_token",)),
    "dinov2_with_registers": Family("DINOv2 with registers", "dinov2_with_registers.", ("embeddings.mask_token",)),
    "clip": Family("CLIP", "vision_model.", ("text_model.", "text_projection.", "logit_scale")),
    "siglip": Family("SigLIP", "vision_model.", ("text_model.", "logit_scale", "logit_bias")),
}
# config.json model_type -> family; a full CLIP or SigLIP model (text tower too) gives its image tower.
MODEL_TYPES = {"vit": "vit", "deit": "deit", "dinov2": "dinov2", "dinov2_with_registers": "dinov2_with_registers",
               "clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
# model types of ViT families vitlab cannot express, and what gives them away
REFUSED_MODEL_TYPES = {
    "beit": "BEiT (relative position bias)", "data2vec-vision": "Data2Vec-vision (BEiT's relative position bias)",
    "eva": "EVA (rotary position embeddings)", "dinov3_vit": "DINOv3 (rotary position embeddings)",
    "vit_mae": "ViT-MAE (random masking, fixed sin-cos positions)", "vit_msn": "ViT-MSN",
    "vit_hybrid": "ViT-hybrid (a ResNet stem)", "swin": "Swin (windowed attention)",
    "swinv2": "Swin V2 (windowed attention)", "siglip2": "SigLIP 2 (NaFlex: variable patch grids)",
    "aimv2": "AIMv2 (SwiGLU MLP)", "hiera": "Hiera (hierarchical stages)", "vitdet": "ViTDet (windowed attention)",
}


def backbone_rules(family: str, config: ViTConfig) -> list[Rule]:
    """The rules of the backbone's keys (inside the family's wrapper)."""
    if family in ("vit", "deit"):
        rules = _pair("cls_token", "embeddings.cls_token", ("",)) + _pair("pos_embed", "embeddings.position_embeddings",
                                                                         ("",))
        if family == "deit":
            rules += _pair("dist_token", "embeddings.distillation_token", ("",))
        rules += _pair("patch_embed.proj", "embeddings.patch_embeddings.projection")
        return rules + _block_rules(config, "encoder.layer.{}.", _VIT_BLOCK) + _pair("norm", "layernorm")
    if family.startswith("dinov2"):
        if config.register_tokens:
            rules = [_folded_class_position()] + _pair("reg_token", "embeddings.register_tokens", ("",))
        else:
            rules = _pair("cls_token", "embeddings.cls_token", ("",)) + _pair("pos_embed",
                                                                             "embeddings.position_embeddings", ("",))
        rules += _pair("patch_embed.proj", "embeddings.patch_embeddings.projection")
        return rules + _block_rules(config, "encoder.layer.{}.", _DINOV2_BLOCK) + _pair("norm", "layernorm")
    pos = _reshaped("pos_embed", "embeddings.position_embedding.weight", lambda t: t[None], lambda t: t[0])
    block = _block_rules(config, "encoder.layers.{}.", _CLIP_BLOCK)
    if family == "clip":
        cls = _reshaped("cls_token", "embeddings.class_embedding", lambda t: t.reshape(1, 1, -1),
                        lambda t: t.reshape(-1))
        return ([cls, pos] + _pair("patch_embed.proj", "embeddings.patch_embedding", (".weight",))
                + _pair("norm_pre", "pre_layrnorm") + block + _pair("norm", "post_layernorm"))
    rules = [pos] + _pair("patch_embed.proj", "embeddings.patch_embedding") + block + _pair("norm", "post_layernorm")
    if config.pool == "map":
        rules += [Rule(("attn_pool.latent",), ("head.probe",)), _split_probe_qkv("weight"), _split_probe_qkv("bias")]
        for ours, theirs in (("proj", "attention.out_proj"), ("norm", "layernorm"), ("mlp.fc1", "mlp.fc1"),
                             ("mlp.fc2", "mlp.fc2")):
            rules += _pair("attn_pool." + ours, "head." + theirs)
    return rules


def head_rules(family: str, config: ViTConfig) -> list[Rule]:
    """The rules of the keys outside the backbone (top level of the folder): classifiers, CLIP's projection."""
    if config.projection_dim:
        return [Rule(("projection.weight",), ("visual_projection.weight",))]
    if config.num_classes == 0:
        return []
    if config.distillation_head:
        return _pair("head", "cls_classifier") + _pair("head_dist", "distillation_classifier")
    return _pair("head", "classifier")


# ---------------------------------------------------------------------------- config.json <-> ViTConfig

ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
_ACTIVATION_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}

# transformers' defaults for the keys a config.json may leave out (from_pretrained fills them in the same way)
_DEFAULTS = {
    "vit": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True),
    "dinov2": dict(image_size=224, patch_size=14, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, layerscale_value=1.0,
                   num_register_tokens=4),
    "clip": dict(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512),
    "siglip": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
}


def _defaults(family: str) -> dict[str, Any]:
    return _DEFAULTS["vit" if family == "deit" else "dinov2" if family.startswith("dinov2") else family]


def config_fields(family: str, hf: dict[str, Any], source: str) -> dict[str, Any]:
    """The :class:`ViTConfig` fields (but classes and labels) a family's ``config.json`` says. A full CLIP or
    SigLIP model's image tower is read from its ``vision_config``."""
    if family in ("clip", "siglip") and isinstance(hf.get("vision_config"), dict):
        hf = hf["vision_config"]
    c = {**_defaults(family), **{k: v for k, v in hf.items() if v is not None}}
    act = c.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act={act!r}; vitlab's MLP computes "
                              f"{', '.join(sorted(ACTIVATIONS))}")
    if c.get("use_swiglu_ffn"):
        raise CheckpointError(f"{source}: use_swiglu_ffn=true (DINOv2 giant's SwiGLU MLP), which vitlab cannot "
                              "express")
    fields = dict(image_size=c["image_size"], patch_size=c["patch_size"], in_channels=c.get("num_channels", 3),
                  hidden_dim=c["hidden_size"], depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                  norm_eps=c["layer_norm_eps"], mlp_activation=ACTIVATIONS[act],
                  dropout=c.get("hidden_dropout_prob", 0.0),
                  attention_dropout=c.get("attention_probs_dropout_prob", c.get("attention_dropout", 0.0)))
    if family.startswith("dinov2"):
        fields.update(mlp_dim=int(c["hidden_size"] * c["mlp_ratio"]), qkv_bias=c["qkv_bias"],
                      layer_scale=float(c["layerscale_value"]))
        if family == "dinov2_with_registers":  # its positions are resized with antialias=True
            fields.update(register_tokens=c["num_register_tokens"], pos_embed_patches_only=True,
                          pos_resize_antialias=True)
        return fields
    fields["mlp_dim"] = c["intermediate_size"]
    if family in ("vit", "deit"):
        fields.update(qkv_bias=c["qkv_bias"], distillation_token=family == "deit")
    elif family == "clip":
        fields.update(patch_embed_bias=False, norm_before_blocks=True)
    else:
        fields.update(class_token=False, pool="map" if c["vision_use_head"] else "mean")
    return fields


def config_json(family: str, config: ViTConfig, architecture: str) -> dict[str, Any]:
    """``config.json`` of a transformers ``architecture`` equal to ``config`` (labels as ``id2label``)."""
    h, w = config.image_size
    ph, pw = config.patch_size
    out: dict[str, Any] = {
        "architectures": [architecture], "model_type": {"clip": "clip_vision_model",
                                                        "siglip": "siglip_vision_model"}.get(family, family),
        "hidden_size": config.hidden_dim, "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads, "hidden_act": _ACTIVATION_NAMES[config.mlp_activation],
        "layer_norm_eps": config.norm_eps, "image_size": h if h == w else [h, w],
        "patch_size": ph if ph == pw else [ph, pw], "num_channels": config.in_channels,
    }
    if family in ("vit", "deit"):
        out.update(intermediate_size=config.mlp_dim, hidden_dropout_prob=config.dropout,
                   attention_probs_dropout_prob=config.attention_dropout, initializer_range=0.02,
                   qkv_bias=config.qkv_bias, encoder_stride=ph)
    elif family.startswith("dinov2"):
        out.update(mlp_ratio=config.mlp_dim // config.hidden_dim, qkv_bias=config.qkv_bias,
                   layerscale_value=config.layer_scale, use_swiglu_ffn=False,
                   hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.attention_dropout)
        if config.register_tokens:
            out["num_register_tokens"] = config.register_tokens
    else:
        out.update(intermediate_size=config.mlp_dim, attention_dropout=config.attention_dropout)
        if family == "clip":
            out["projection_dim"] = config.projection_dim or 512
        else:
            out["vision_use_head"] = config.pool == "map"
    if config.num_classes > 0:
        labels = config.labels or [f"LABEL_{i}" for i in range(config.num_classes)]
        out["id2label"] = {str(i): name for i, name in enumerate(labels)}
        out["label2id"] = {name: i for i, name in enumerate(labels)}
    return out
