"""Hugging Face ``transformers`` folders <-> vitlab: ViT, DeiT, DINOv2 (with registers), CLIP and SigLIP.

Which keys hold what is in :mod:`vitlab.interop.hf_layouts`, one list of rules per family that reading and
writing share. Hugging Face keeps separate ``query``/``key``/``value`` projections; vitlab fuses them into one
``qkv`` (as timm does), so converting concatenates them along the output dimension.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from vitlab._files import load_safetensors, read_json, save_safetensors, write_json
from vitlab.config import ViTConfig, check_num_heads
from vitlab.errors import CheckpointError, ConfigError
from vitlab.interop._common import build_and_load, make_config, patch_weight, read_state_dict
from vitlab.interop.hf_layouts import (FAMILIES, MODEL_TYPES, REFUSED_MODEL_TYPES, Rule, backbone_rules,
                                       config_fields, config_json, head_rules)

if TYPE_CHECKING:
    from vitlab.models import VisionTransformer

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_PREPROCESSOR = "preprocessor_config.json"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"


def vit_config_from_hf(hf_config: Any, **overrides: Any) -> ViTConfig:
    """A :class:`ViTConfig` equal to a ``transformers.ViTConfig`` (object or its ``to_dict()``). A key the
    dict leaves out takes ``transformers.ViTConfig``'s default (ViT-B/16), as ``from_pretrained`` does."""
    c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    id2label = c.get("id2label") or {}
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else None
    if labels and all(lbl == f"LABEL_{i}" for i, lbl in enumerate(labels)):
        labels = None
    num_classes = len(id2label) if id2label else c.get("num_labels", 2)
    fields = config_fields("vit", c, "Hugging Face config")
    return ViTConfig(**{**fields, "num_classes": num_classes, "labels": labels, **overrides})


# transformers 5 names the modules differently in memory (``layers.N.attention.q_proj``) from the files
# ``save_pretrained`` writes (``encoder.layer.N.attention.attention.query``); a ``torch.save(model.state_dict())``
# has the in-memory names, so both are read, as the file names.
_V5_NAMES = [(re.compile(rf"^(vit\.|deit\.)?layers\.(\d+)\.{a}\."), rf"\1encoder.layer.\2.{b}.") for a, b in (
    (r"attention\.q_proj", "attention.attention.query"), (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"), (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"), (r"mlp\.fc2", "output.dense"), ("layernorm_before", "layernorm_before"),
    ("layernorm_after", "layernorm_after"))] + [  # DINOv2 keeps encoder.layer.N and mlp.fc1 in memory
    (re.compile(rf"^((?:dinov2\.|dinov2_with_registers\.)?encoder\.layer\.\d+\.attention\.){a}\."), rf"\1{b}.")
    for a, b in (("q_proj", "attention.query"), ("k_proj", "attention.key"), ("v_proj", "attention.value"),
                 ("o_proj", "output.dense"))]


def _file_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, replacement in _V5_NAMES:
            key, n = pattern.subn(replacement, key)
            if n:
                break
        out[key] = value
    return out


def _read_rules(rules: list[Rule], state: dict[str, torch.Tensor], prefix: str, source: str,
                used: set[str]) -> dict[str, torch.Tensor]:
    """vitlab's tensors from ``state`` by ``rules`` (Hugging Face keys under ``prefix``); a missing key is named
    as the file names it; the keys read are added to ``used``."""
    out = {}
    for rule in rules:
        names = [prefix + k for k in rule.theirs]
        for name in names:
            if name not in state:
                raise CheckpointError(f"{source}: missing key {name!r}")
        try:
            tensors = rule.read([state[n] for n in names])
        except (RuntimeError, ValueError, IndexError) as e:
            shapes = ", ".join(f"{n} {tuple(state[n].shape)}" for n in names)
            raise CheckpointError(f"{source}: keys of unexpected shapes ({shapes}): {e}") from None
        out.update(zip(rule.ours, tensors))
        used.update(names)
    return out


def _write_rules(rules: list[Rule], state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for rule in rules:
        tensors = rule.write([state[k] for k in rule.ours])
        out.update({prefix + k: t.detach().clone().contiguous() for k, t in zip(rule.theirs, tensors)})
    return out


def convert_hf_state_dict(state: dict[str, torch.Tensor], config: ViTConfig, family: str = "vit",
                          source: str = "Hugging Face checkpoint") -> dict[str, torch.Tensor]:
    """Map a Hugging Face state dict of ``family`` (``ViTModel`` / ``ViTForImageClassification`` by default;
    any of :data:`~vitlab.interop.hf_layouts.MODEL_TYPES`' families) to vitlab's names, for ``config``.

    Accepts the key layout of files on the Hub and the one of ``transformers>=5`` models in memory. Keys vitlab
    does not use (poolers, the mask token, a text tower) are left out; a missing key raises a
    :class:`CheckpointError` naming it. Unexpected keys are not checked here (:func:`load_hf_folder` does).
    """
    return _to_vitlab(_file_names(state), config, family, source)[0]


def _to_vitlab(state: dict[str, torch.Tensor], config: ViTConfig, family: str,
               source: str) -> tuple[dict[str, torch.Tensor], set[str], str]:
    """vitlab's weights from a state dict with the files' names, the keys read, and the backbone's prefix
    (the family's wrapper, as in a task model's folder, or none)."""
    wrapper = FAMILIES[family].wrapper
    prefix = wrapper if any(k.startswith(wrapper) for k in state) else ""
    used: set[str] = set()
    out = _read_rules(backbone_rules(family, config), state, prefix, source, used)
    out.update(_read_rules(head_rules(family, config), state, "", source, used))
    out["patch_embed.proj.weight"] = patch_weight(out["patch_embed.proj.weight"], config)
    return out, used, prefix


# ---------------------------------------------------------------------------- save_pretrained folders

def _model_type(path: Path) -> str | None:
    try:
        data = json.loads((path / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def is_hf_folder(path: str | Path) -> bool:
    """True for a folder whose ``config.json`` names a model type vitlab reads (a transformers
    ``save_pretrained`` folder of ViT, DeiT, DINOv2, CLIP or SigLIP)."""
    return _model_type(Path(path)) in MODEL_TYPES


def hf_refusal(path: str | Path) -> str | None:
    """The one-line refusal for a Hugging Face folder of a ViT family vitlab cannot express, or None."""
    model_type = _model_type(Path(path))
    if model_type in REFUSED_MODEL_TYPES:
        return (f"{path}: a Hugging Face {REFUSED_MODEL_TYPES[model_type]} folder (config.json model_type "
                f"{model_type!r}), which vitlab cannot express")
    return None


def _read_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
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


# What the image classifiers of these families read, which vitlab's head (one pooled vector) does not.
_CLASSIFIERS = {
    "dinov2": "Dinov2ForImageClassification, whose classifier reads the class token and the mean patch token side "
              "by side",
    "clip": "CLIPForImageClassification, whose classifier reads the mean of the un-normalised patch tokens",
    "siglip": "SiglipForImageClassification, whose classifier reads the mean of the tokens, not its attention pool",
}


def _classes(state: dict[str, torch.Tensor], hf: dict[str, Any], family: str, source: str) -> dict[str, Any]:
    """``num_classes``, ``labels``, DeiT's ``distillation_head`` and CLIP's ``projection_dim`` from the heads."""
    reads = _CLASSIFIERS.get(family.replace("_with_registers", ""))
    if reads and "classifier.weight" in state:
        raise CheckpointError(f"{source}: a Hugging Face {reads}, which vitlab's head does not; load the "
                              "backbone's folder (its *Model) and fine-tune a new head")
    distilled = "cls_classifier.weight" in state
    classifier = state.get("cls_classifier.weight" if distilled else "classifier.weight")
    num_classes = int(classifier.shape[0]) if classifier is not None else 0
    id2label = hf.get("id2label") or {}
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if len(labels) != num_classes or all(name == f"LABEL_{i}" for i, name in enumerate(labels)):
        labels = None  # transformers writes LABEL_i when the classes had no names
    projection = state.get("visual_projection.weight")
    return dict(num_classes=num_classes, labels=labels, distillation_head=distilled,
                projection_dim=int(projection.shape[0]) if projection is not None else None)


def load_hf_folder(directory: str | Path, **overrides: Any) -> "VisionTransformer":
    """Load a transformers ``save_pretrained`` folder of a ViT family vitlab expresses.

    ``ViTModel`` / ``ViTForImageClassification``; ``DeiTModel`` / ``DeiTForImageClassification`` /
    ``DeiTForImageClassificationWithTeacher`` (the distillation token; its head when there is one);
    ``Dinov2Model`` and ``Dinov2WithRegistersModel``; ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` /
    ``CLIPModel`` (the image tower and its projection); ``SiglipVisionModel`` / ``SiglipModel`` (the image tower
    and its attention-pool head). Reads ``config.json`` and ``model.safetensors`` (or a sharded index, or
    ``pytorch_model.bin`` with ``weights_only=True``). A model without a classifier gives a model without a
    head; ``id2label`` becomes the class names. ``overrides`` set other :class:`ViTConfig` fields.
    """
    directory = Path(directory)
    hf = read_json(directory / HF_CONFIG)
    family = MODEL_TYPES.get(hf.get("model_type"))
    if family is None:
        raise CheckpointError(hf_refusal(directory) or f"{directory / HF_CONFIG}: model_type "
                              f"{hf.get('model_type')!r} is not one vitlab reads ({', '.join(MODEL_TYPES)})")
    state, source = _read_hf_weights(directory)
    state = _file_names(state)
    fields = {**config_fields(family, hf, str(directory / HF_CONFIG)), **_classes(state, hf, family, source)}
    check_num_heads(overrides, fields["num_heads"], str(directory / HF_CONFIG), "num_attention_heads")
    config = make_config(fields, overrides, source)
    weights, used, prefix = _to_vitlab(state, config, family, source)
    ignored = tuple(prefix + p for p in FAMILIES[family].ignored) + FAMILIES[family].ignored
    for key, value in state.items():
        if key not in used and not key.startswith(ignored):
            raise CheckpointError(f"{source}: unexpected key {key!r} of shape {tuple(value.shape)}")
    return build_and_load(config, weights, source)


# ---------------------------------------------------------------------------- export

def export_family(config: ViTConfig) -> str:
    """The Hugging Face family a model is exported as: DeiT with a distillation token, CLIP's tower with a
    pre-norm, SigLIP's with an attention pool, DINOv2 (with registers) for a layer-scale backbone without a
    head (Hugging Face's DINOv2 classifier reads two tokens); else ViT."""
    if config.distillation_token:
        return "deit"
    if config.norm_before_blocks:
        return "clip"
    if config.pool == "map":
        return "siglip"
    if config.layer_scale is not None and config.num_classes == 0:
        return "dinov2_with_registers" if config.register_tokens else "dinov2"
    return "vit"


def _unsupported(family: str, config: ViTConfig) -> str | None:
    """Why the Hugging Face model :func:`export_family` picked cannot express ``config``, or None."""
    c, name = config, FAMILIES[family].name
    vit_like, dinov2 = family in ("vit", "deit"), family.startswith("dinov2")
    reasons = [
        (c.patch_embed in ("conv_stem", "shifted"), f"patch_embed={c.patch_embed!r} (Hugging Face's ViTs have a "
                                                   "patchify convolution only)"),
        (c.locality_attention, "locality_attention (Hugging Face's ViTs have neither SL-ViT's temperatures nor "
                               "its mask)"),
        (c.pool != ("map" if family == "siglip" else "cls"),
         f"pool={c.pool!r} (Hugging Face's {name} " + ("pools with its attention head)" if family == "siglip"
                                                      else "reads the class token only)")),
        (c.class_token == (family == "siglip"), f"class_token={c.class_token} (Hugging Face's {name} has "
                                                + ("none)" if family == "siglip" else "one)")),
        (c.pos_embed != "learned", f"pos_embed={c.pos_embed!r} (Hugging Face's ViTs have learned positions "
                                   "only)"),
        (not c.final_norm, "final_norm=False (Hugging Face's ViTs always have the final layernorm)"),
        (c.norm_after_pool, "norm_after_pool=True (timm's fc_norm)"),
        ((c.layer_scale is not None) != dinov2,
         "layer_scale (Hugging Face's ViT and DeiT have none; its DINOv2 takes a layer-scale backbone without a "
         "head: reset_classifier(0) first)" if vit_like else f"layer_scale={c.layer_scale} (Hugging Face's "
         f"{name} has " + ("layer scale)" if dinov2 else "none)")),
        (c.representation_dim is not None, "representation_dim (Hugging Face's ViTs have no pre-logits layer)"),
        (vit_like and c.num_classes == 0, "num_classes=0 (export needs a classifier; call reset_classifier "
                                          "first)"),
        (not vit_like and c.num_classes > 0,
         f"a classifier (Hugging Face's {name} classifiers read other tokens than vitlab's head; export the "
         "backbone, reset_classifier(0), or export to ONNX)"),
        ((c.register_tokens > 0) != (family == "dinov2_with_registers"),
         f"register_tokens={c.register_tokens} (only Hugging Face's DINOv2 with registers has them)"),
        (c.pos_embed_patches_only != (family == "dinov2_with_registers"),
         f"pos_embed_patches_only={c.pos_embed_patches_only} (Hugging Face's {name} gives the class token a "
         + ("position and the registers none)" if c.register_tokens else "position: DeiT III's layout differs)")),
        (c.patch_embed_bias != (family != "clip"), f"patch_embed_bias={c.patch_embed_bias} (Hugging Face's {name} "
                                                    "has the other)"),
        (c.projection_dim is not None and family != "clip", "projection_dim (only CLIP's tower has a projection)"),
        (dinov2 and c.mlp_dim % c.hidden_dim != 0, f"mlp_dim={c.mlp_dim} (Hugging Face's DINOv2 config holds a "
                                                  "whole-number mlp_ratio: mlp_dim must be a multiple of hidden_dim)"),
        (not vit_like and c.image_size[0] != c.image_size[1],
         f"image_size={c.image_size} (Hugging Face's {name} takes square images)"),
    ]
    return next((why for bad, why in reasons if bad), None)


def _architecture(family: str, config: ViTConfig) -> tuple[str, str]:
    """The transformers class a folder of ``family`` is written as, and the prefix of its backbone's keys."""
    if family == "vit":
        return "ViTForImageClassification", "vit."
    if family == "deit":
        return ("DeiTForImageClassificationWithTeacher" if config.distillation_head
                else "DeiTForImageClassification"), "deit."
    if family == "clip":
        return ("CLIPVisionModelWithProjection", "vision_model.") if config.projection_dim else ("CLIPVisionModel", "")
    return {"siglip": "SiglipVisionModel", "dinov2": "Dinov2Model",
            "dinov2_with_registers": "Dinov2WithRegistersModel"}[family], ""


def to_hf_config_dict(config: ViTConfig) -> dict[str, Any]:
    """``config.json`` contents of the transformers model :func:`export_hf` writes for ``config``."""
    family = export_family(config)
    return config_json(family, config, _architecture(family, config)[0])


def to_hf_state_dict(model: "VisionTransformer") -> dict[str, torch.Tensor]:
    """The model's weights under the names of the transformers model :func:`export_hf` writes (the reverse of
    :func:`convert_hf_state_dict`)."""
    c = model.config
    family = export_family(c)
    why = _unsupported(family, c)
    if why:
        raise ConfigError(f"cannot export to a Hugging Face {FAMILIES[family].name} folder: {why}; export to ONNX "
                          "or save_pretrained instead")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sd["patch_embed.proj.weight"] = patch_weight(sd["patch_embed.proj.weight"], c, "conv")
    prefix = _architecture(family, c)[1]
    out = {**_write_rules(backbone_rules(family, c), sd, prefix), **_write_rules(head_rules(family, c), sd, "")}
    if family.startswith("dinov2"):  # masked-image pretraining's token: unused in a forward pass, zero as at init
        out[prefix + "embeddings.mask_token"] = torch.zeros(1, c.hidden_dim)
    return out


def export_hf(model: "VisionTransformer", directory: str | Path, *, temperature: float = 1.0,
              normalization: tuple[Sequence[float], Sequence[float]] | None = None) -> Path:
    """Write a folder that transformers loads with equal outputs: ``ViTForImageClassification``; DeiT's
    ``DeiTForImageClassificationWithTeacher`` (or ``DeiTForImageClassification`` once the distillation head
    is gone); and, without a head, ``Dinov2Model`` / ``Dinov2WithRegistersModel``, ``CLIPVisionModel`` /
    ``CLIPVisionModelWithProjection``, ``SiglipVisionModel``.

    Raises :class:`ConfigError` naming what Hugging Face cannot express (mean pooling, sin-cos or no
    positions, no class token, timm's fc_norm, a pre-logits layer, DeiT III's patch-only positions, a DINOv2,
    CLIP or SigLIP classifier, ...). An RGB model whose input ``normalization`` (mean, std) is given (a
    :class:`~vitlab.loaded.LoadedModel`'s preprocessing, as ``vitlab export`` passes it) also gets a
    ``preprocessor_config.json``, so ``ViTImageProcessor`` prepares images as vitlab does (rescale to [0, 1],
    normalise; bilinear resize to the model's size). A fitted ``temperature`` other than 1 is recorded in
    config.json as ``logit_temperature``; transformers keeps the field but does not divide the logits by it.
    """
    directory = Path(directory)
    state = to_hf_state_dict(model)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / HF_SAFETENSORS, state, metadata={"format": "pt"})
    config = to_hf_config_dict(model.config)
    write_json(directory / HF_CONFIG, config if temperature == 1.0 else {**config, "logit_temperature": temperature})
    if normalization is not None and model.config.in_channels == 3:
        h, w = model.config.image_size
        write_json(directory / HF_PREPROCESSOR, {
            "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(normalization[0]), "image_std": list(normalization[1])})
    return directory
