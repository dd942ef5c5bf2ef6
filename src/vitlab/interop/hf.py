"""Hugging Face ``transformers`` ViT <-> vitlab: config and state-dict mapping.

Hugging Face keeps separate ``query``/``key``/``value`` projections; vitlab fuses them into one ``qkv``
(as timm does), so converting concatenates them along the output dimension.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitlab.config import ViTConfig, to_dict
from vitlab.errors import CheckpointError, ConfigError
from vitlab.interop._common import check_num_heads, merge_qkv, patch_weight, split_qkv

if TYPE_CHECKING:
    from vitlab.models import VisionTransformer


def vit_config_from_hf(hf_config: Any, **overrides: Any) -> ViTConfig:
    """A :class:`ViTConfig` equal to a ``transformers.ViTConfig`` (object or its ``to_dict()``). A key the
    dict leaves out takes ``transformers.ViTConfig``'s default (ViT-B/16), as ``from_pretrained`` does."""
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
               in_channels=c.get("num_channels", 3), num_classes=num_labels, hidden_dim=c.get("hidden_size", 768),
               depth=c.get("num_hidden_layers", 12), num_heads=c.get("num_attention_heads", 12),
               mlp_dim=c.get("intermediate_size", 3072),
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
    out["patch_embed.proj.weight"] = patch_weight(out["patch_embed.proj.weight"], config)
    for i in range(config.depth):
        p = f"encoder.layer.{i}."
        a = p + "attention.attention."
        out[f"blocks.{i}.norm1.weight"] = take(p + "layernorm_before.weight")
        out[f"blocks.{i}.norm1.bias"] = take(p + "layernorm_before.bias")
        out[f"blocks.{i}.attn.qkv.weight"] = merge_qkv(*(take(a + n + ".weight") for n in ("query", "key", "value")))
        if config.qkv_bias:
            out[f"blocks.{i}.attn.qkv.bias"] = merge_qkv(*(take(a + n + ".bias") for n in ("query", "key", "value")))
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


# ---------------------------------------------------------------------------- save_pretrained folders

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_PREPROCESSOR = "preprocessor_config.json"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"


def is_hf_folder(path: str | Path) -> bool:
    """True for a folder whose ``config.json`` says ``"model_type": "vit"`` (a transformers ``save_pretrained``)."""
    path = Path(path)
    if not (path / HF_CONFIG).is_file():
        return False
    try:
        data = json.loads((path / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "vit"


# transformers 5 names the modules differently in memory (``layers.N.attention.q_proj``) from the files
# ``save_pretrained`` writes (``encoder.layer.N.attention.attention.query``); a ``torch.save(model.state_dict())``
# has the in-memory names, so both are read, as the file names.
_V5_NAMES = [(re.compile(rf"^(vit\.)?layers\.(\d+)\.{a}\."), rf"\1encoder.layer.\2.{b}.") for a, b in (
    (r"attention\.q_proj", "attention.attention.query"), (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"), (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"), (r"mlp\.fc2", "output.dense"), ("layernorm_before", "layernorm_before"),
    ("layernorm_after", "layernorm_after"))]


def _file_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, replacement in _V5_NAMES:
            key, n = pattern.subn(replacement, key)
            if n:
                break
        out[key] = value
    return out


def _read_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    from vitlab._files import load_safetensors, read_json
    from vitlab.interop._common import read_state_dict

    if (directory / HF_SAFETENSORS).is_file():
        return load_safetensors(directory / HF_SAFETENSORS), str(directory / HF_SAFETENSORS)
    if (directory / HF_SAFETENSORS_INDEX).is_file():  # sharded: {"weight_map": {key: shard file}}
        index = read_json(directory / HF_SAFETENSORS_INDEX)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            state.update(load_safetensors(directory / shard))
        return state, str(directory / HF_SAFETENSORS_INDEX)
    if (directory / HF_BIN).is_file():
        return read_state_dict(directory / HF_BIN), str(directory / HF_BIN)
    raise CheckpointError(f"{directory}: no {HF_SAFETENSORS} or {HF_BIN} next to {HF_CONFIG}; copy the weights "
                          "file that save_pretrained wrote into this folder")


def load_hf_folder(directory: str | Path, **overrides: Any) -> "VisionTransformer":
    """Load a transformers ``ViTModel`` / ``ViTForImageClassification`` ``save_pretrained`` folder.

    Reads ``config.json`` and ``model.safetensors`` (or a sharded index, or ``pytorch_model.bin`` with
    ``weights_only=True``). A ``ViTModel`` (no ``classifier``) gives a model without a head; ``id2label``
    becomes the class names. ``overrides`` set other :class:`ViTConfig` fields.
    """
    from vitlab._files import read_json
    from vitlab.interop._common import build_and_load, make_config

    directory = Path(directory)
    hf = read_json(directory / HF_CONFIG)
    state, source = _read_hf_weights(directory)
    state = _file_names(state)
    classifier = state.get("classifier.weight")
    num_classes = int(classifier.shape[0]) if classifier is not None else 0
    id2label = hf.get("id2label") or {}
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if len(labels) != num_classes or all(name == f"LABEL_{i}" for i, name in enumerate(labels)):
        labels = None  # transformers writes LABEL_i when the classes had no names
    cfg = vit_config_from_hf({**hf, "id2label": None, "num_labels": num_classes})
    check_num_heads(overrides, cfg.num_heads, str(directory / HF_CONFIG), "num_attention_heads")
    config = make_config({**to_dict(cfg), "labels": labels}, overrides, source)
    # Compare against the names this config has in Hugging Face's layout, so that an unexpected or missing
    # key is named as it appears in the user's file.
    prefix = "vit." if any(k.startswith("vit.") for k in state) else ""
    expected = {(k if k.startswith("classifier.") else prefix + k) for k in to_hf_state_dict_keys(config)}
    for key in expected:
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r}")
    for key, value in state.items():
        if key not in expected and not key.startswith(prefix + "pooler."):
            raise CheckpointError(f"{source}: unexpected key {key!r} of shape {tuple(value.shape)}")
    return build_and_load(config, convert_hf_state_dict(state, config), source)


def to_hf_state_dict_keys(config: ViTConfig) -> list[str]:
    """The key names (without the ``vit.`` prefix, ``classifier.*`` as is) Hugging Face uses for ``config``."""
    keys = ["embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight",
            "embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias"]
    for i in range(config.depth):
        p = f"encoder.layer.{i}."
        a = p + "attention.attention."
        keys += [p + "layernorm_before.weight", p + "layernorm_before.bias"]
        keys += [a + n + s for n in ("query", "key", "value") for s in ((".weight", ".bias") if config.qkv_bias
                                                                      else (".weight",))]
        keys += [p + n + s for n in ("attention.output.dense", "layernorm_after", "intermediate.dense",
                                     "output.dense") for s in (".weight", ".bias")]
    if config.num_classes > 0:
        keys += ["classifier.weight", "classifier.bias"]
    return keys


def hf_unsupported(config: ViTConfig) -> str | None:
    """Why Hugging Face's ``ViTForImageClassification`` cannot express ``config``, or None when it can."""
    reasons = [
        (config.patch_embed == "conv_stem", "patch_embed='conv_stem' (Hugging Face's ViT has a patchify "
                                            "convolution only)"),
        (config.pool != "cls", f"pool={config.pool!r} (Hugging Face's ViT classifies the class token only)"),
        (not config.class_token, "class_token=False (Hugging Face's ViT always has a class token)"),
        (config.pos_embed != "learned", f"pos_embed={config.pos_embed!r} (Hugging Face's ViT has learned "
                                        "positions only)"),
        (not config.final_norm, "final_norm=False (Hugging Face's ViT always has the final layernorm)"),
        (config.norm_after_pool, "norm_after_pool=True (timm's fc_norm)"),
        (config.layer_scale is not None, "layer_scale (Hugging Face's ViT has no layer scale)"),
        (config.representation_dim is not None, "representation_dim (ViTForImageClassification has no "
                                                "pre-logits layer)"),
        (config.num_classes == 0, "num_classes=0 (export needs a classifier; call reset_classifier first)"),
    ]
    return next((why for bad, why in reasons if bad), None)


def to_hf_config_dict(config: ViTConfig) -> dict[str, Any]:
    """``config.json`` contents of a ``ViTForImageClassification`` equal to ``config``."""
    labels = config.labels or [f"LABEL_{i}" for i in range(config.num_classes)]
    h, w = config.image_size
    ph, pw = config.patch_size
    return {
        "architectures": ["ViTForImageClassification"], "model_type": "vit",
        "hidden_size": config.hidden_dim, "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads, "intermediate_size": config.mlp_dim, "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.attention_dropout,
        "initializer_range": 0.02, "layer_norm_eps": config.norm_eps,
        "image_size": h if h == w else [h, w], "patch_size": ph if ph == pw else [ph, pw],
        "num_channels": config.in_channels, "qkv_bias": config.qkv_bias, "encoder_stride": ph,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def to_hf_state_dict(model: "VisionTransformer") -> dict[str, torch.Tensor]:
    """The model's weights under ``ViTForImageClassification`` names (the reverse of
    :func:`convert_hf_state_dict`)."""
    c = model.config
    why = hf_unsupported(c)
    if why:
        raise ConfigError(f"cannot export to a Hugging Face ViT folder: {why}; export to ONNX or save_pretrained "
                          "instead")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": patch_weight(sd["patch_embed.proj.weight"], c, "conv"),
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"],
    }
    for i in range(c.depth):
        p, b = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        a = p + "attention.attention."
        for n, w in zip(("query", "key", "value"), split_qkv(sd[b + "attn.qkv.weight"])):
            out[a + n + ".weight"] = w
        if c.qkv_bias:
            for n, bias in zip(("query", "key", "value"), split_qkv(sd[b + "attn.qkv.bias"])):
                out[a + n + ".bias"] = bias
        for dst, src in (("layernorm_before", "norm1"), ("attention.output.dense", "attn.proj"),
                         ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                         ("output.dense", "mlp.fc2")):
            out[p + dst + ".weight"] = sd[b + src + ".weight"]
            out[p + dst + ".bias"] = sd[b + src + ".bias"]
    return {k: v.clone() for k, v in out.items()}


def export_hf(model: "VisionTransformer", directory: str | Path) -> Path:
    """Write a folder that ``transformers.ViTForImageClassification.from_pretrained`` loads with equal logits.

    Raises :class:`ConfigError` for what Hugging Face's ViT cannot express (mean pooling, sin-cos or no
    positions, no class token, layer scale, fc_norm, a pre-logits layer, no head). An RGB model that knows its
    input normalisation (``pretrained_normalization``, set by ``load_pretrained`` from a run's
    ``preprocess.json``) also gets a ``preprocessor_config.json``, so ``ViTImageProcessor`` prepares images as
    vitlab does (rescale to [0, 1], normalise; bilinear resize to the model's size).
    """
    from vitlab._files import save_safetensors, write_json

    directory = Path(directory)
    state = to_hf_state_dict(model)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / HF_SAFETENSORS, state, metadata={"format": "pt"})
    write_json(directory / HF_CONFIG, to_hf_config_dict(model.config))
    normalization = getattr(model, "pretrained_normalization", None)
    if normalization is not None and model.config.in_channels == 3:
        h, w = model.config.image_size
        write_json(directory / HF_PREPROCESSOR, {
            "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(normalization[0]), "image_std": list(normalization[1])})
    return directory
