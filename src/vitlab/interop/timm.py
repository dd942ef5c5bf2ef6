"""timm ``vision_transformer`` state dicts <-> vitlab.

vitlab's parameter names are timm's (``dist_token``, ``reg_token``, ``norm_pre``, ``attn_pool``, ``head_dist``
included), so the mapping is short: timm's ``fc_norm`` (the final norm applied to the mean-pooled vector, with
``norm`` an Identity) becomes vitlab's ``norm`` with ``norm_after_pool=True``, and the old in21k representation
layer ``pre_logits.fc`` becomes ``pre_logits.0``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vitlab._files import read_json
from vitlab.config import ViTConfig, pair
from vitlab.errors import CheckpointError, ConfigError
from vitlab.interop._common import (build_and_load, count_blocks, image_size_from_tokens, make_config, need,
                                    num_heads_for, patch_weight, read_state_dict)
from vitlab.models import VisionTransformer

log = logging.getLogger(__name__)


def is_timm_state_dict(state: dict[str, Any]) -> bool:
    """True when the keys look like timm's ``VisionTransformer``."""
    return "patch_embed.proj.weight" in state and any(k.startswith("blocks.0.attn.qkv.") for k in state)


# Key prefixes that give away a model family vitlab cannot express in a timm-style file, with what the key is.
# The first match names it.
_FAMILIES = [
    ("blocks.0.attn.relative_position_bias_table", "BEiT", "relative position bias"),
    ("rel_pos_bias.relative_position_bias_table", "BEiT", "shared relative position bias"),
    ("blocks.0.attn.rel_pos", "relative-position ViT (SAM, timm's vit_relpos)", "relative position embeddings"),
    ("blocks.0.attn.proj_l.", "CaiT", "talking-heads attention"),
    ("blocks.0.attn.q_bias", "EVA / BEiT", "separate q and v biases of EVA's rotary-embedding and BEiT's "
                                           "relative-position attention"),
    ("blocks.0.attn.q_proj.", "EVA", "separate q, k, v projections of EVA's rotary-embedding attention"),
    ("blocks.0.gamma_1", "EVA-style (DINOv3, ViT-RoPE)", "layer scale of blocks with rotary position embeddings"),
    ("blocks.0.mlp.fc1_g.", "EVA-02 / AIMv2", "SwiGLU MLP"),
    ("blocks.0.mlp.w12.", "DINOv2 giant", "SwiGLU MLP"),
    ("blocks.0.attn.q_norm.", "qk-norm ViT", "a norm on queries and keys"),
    ("blocks.0.attn.norm.", "scaled-norm ViT", "a norm inside the attention (scale_attn_norm)"),
    ("blocks.0.mlp.norm.", "scaled-norm ViT", "a norm inside the MLP (scale_mlp_norm)"),
    ("patch_embed.norm.", "patch-norm (Swin, PVT, ...)", "a norm inside the patch embedding"),
    ("attn_pool.q_norm.", "attention pool with qk-norm", "a norm on the probe's queries and keys"),
    ("attn_pool.pos_embed", "attention pool with positions", "positions inside the attention pool"),
]


def unsupported_family(keys, source: str) -> str | None:
    """The one-line refusal for a timm-style file of a family vitlab cannot express, or None."""
    for prefix, family, what in _FAMILIES:
        key = next((k for k in keys if k.startswith(prefix)), None)
        if key is not None:
            article = "an" if family[0] in "AEIOU" else "a"
            return f"{source}: {article} {family} checkpoint (key {key!r}: {what}), which vitlab cannot express"
    return None


def _refuse_shapes(state: dict[str, torch.Tensor], source: str) -> None:
    """Families that only the shapes give away: a packed SwiGLU MLP, a probe of several latents."""
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.ndim == fc2.ndim == 2 and fc1.shape[0] == 2 * fc2.shape[1]:
        raise CheckpointError(f"{source}: a SwiGLU-MLP checkpoint such as DINOv2 giant's (key "
                              f"'blocks.0.mlp.fc1.weight' has {fc1.shape[0]} rows, twice the {fc2.shape[1]} that "
                              "fc2 reads: gate and value packed), which vitlab cannot express")
    latent = state.get("attn_pool.latent")
    if latent is not None and (latent.ndim != 3 or latent.shape[1] != 1):
        raise CheckpointError(f"{source}: key 'attn_pool.latent' has shape {tuple(latent.shape)}; vitlab's attention "
                              "pool has one probe, (1, 1, D)")


def _positions(state: dict[str, torch.Tensor], prefix: int, patch: tuple[int, int], source: str,
               image_size: Any) -> tuple[tuple[int, int], bool, int]:
    """The image size the ``pos_embed`` grid implies, whether it covers the patches only (timm's
    ``no_embed_class``) and how many prefix tokens it has positions for: first one per prefix token (timm's
    default), then none, then the class token's only (the other tokens then do not fit the file: strict loading
    names them). ``image_size`` (the user's override) settles it instead when given."""
    n = state["pos_embed"].shape[1]
    if image_size is not None:
        size = pair(image_size, "image_size")
        patches = (size[0] // patch[0]) * (size[1] // patch[1])
        if n in (patches, patches + prefix):
            return size, n == patches and prefix > 0, prefix
        raise CheckpointError(f"{source}: pos_embed holds {n} positions but image_size={size} gives {patches} "
                              f"patches ({prefix} tokens before them); pass the image size the model was trained at")
    attempts = [(prefix, False), (0, prefix > 0)] if prefix else [(0, False)]
    if prefix > 1 and "cls_token" in state:
        attempts.append((1, False))
    first_error = None
    for tokens, patches_only in attempts:
        try:
            return image_size_from_tokens(n, tokens, patch, source, "pos_embed"), patches_only, tokens or prefix
        except CheckpointError as e:
            first_error = first_error or e  # the count with every prefix token: the layout most files have
    raise first_error


def timm_config_fields(state: dict[str, torch.Tensor], source: str, num_heads: int | None = None,
                       image_size: Any = None) -> dict[str, Any]:
    """The :class:`ViTConfig` fields a timm state dict implies (heads: ``num_heads`` or the standard table;
    ``image_size``: the user's, when the position grid cannot say)."""
    why = unsupported_family(state, source)
    if why:
        raise CheckpointError(why)
    _refuse_shapes(state, source)
    proj = need(state, "patch_embed.proj.weight", source)  # (D, C, ph, pw)
    if proj.ndim != 4:
        raise CheckpointError(f"{source}: key 'patch_embed.proj.weight' has shape {tuple(proj.shape)}, expected "
                              "(D, C, ph, pw)")
    hidden, channels, ph, pw = proj.shape
    class_token, distilled = "cls_token" in state, "dist_token" in state
    registers = state["reg_token"].shape[1] if "reg_token" in state else 0
    fc_norm = "fc_norm.weight" in state
    attn_pool = "attn_pool.latent" in state
    fields: dict[str, Any] = dict(
        patch_size=(ph, pw), in_channels=channels, hidden_dim=hidden,
        depth=count_blocks(state, "blocks.", source),
        num_heads=num_heads_for(hidden, source, num_heads),
        mlp_dim=need(state, "blocks.0.mlp.fc1.weight", source).shape[0],
        patch_embed_bias="patch_embed.proj.bias" in state,
        class_token=class_token, distillation_token=distilled, register_tokens=registers,
        pos_embed="learned" if "pos_embed" in state else "none",
        pos_resize_antialias=True,  # timm resizes position grids with antialias=True
        norm_before_blocks="norm_pre.weight" in state,
        pool="map" if attn_pool else "cls" if class_token and not fc_norm else "mean",
        # timm's distilled model always has both heads (no classes: it averages the two tokens)
        distillation_head=distilled and ("head_dist.weight" in state or "head.weight" not in state),
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in state else None,  # the loaded gammas replace this value
        final_norm=fc_norm or "norm.weight" in state,
        norm_after_pool=fc_norm,
        representation_dim=state["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in state else None,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        norm_eps=1e-5 if "norm_pre.weight" in state else 1e-6,  # timm's CLIP towers use PyTorch's LayerNorm eps
    )
    if "pos_embed" in state:
        prefix = int(class_token) + int(distilled) + registers
        fields["image_size"], fields["pos_embed_patches_only"], fitted = _positions(state, prefix, (ph, pw), source,
                                                                                    image_size)
        if fitted < prefix:  # only the class token has a position: the file's other tokens are not the model's
            fields.update(distillation_token=False, distillation_head=False, register_tokens=0)
    else:
        fields["image_size"] = image_size if image_size is not None else (ph * 14, pw * 14)  # any size works
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


def timm_unsupported(config: ViTConfig) -> str | None:
    """Why timm's ``VisionTransformer`` (or DeiT's ``VisionTransformerDistilled``) cannot hold ``config``."""
    reasons = [
        (config.pos_embed == "sincos", "pos_embed='sincos'"),
        (config.patch_embed in ("conv_stem", "shifted"), f"patch_embed={config.patch_embed!r}"),
        (config.locality_attention, "locality_attention (SL-ViT's; timm's attention has neither its temperatures "
                                    "nor its mask)"),
        (config.distillation_token and not config.distillation_head,
         "a distillation token without its head (timm's distilled DeiT always averages two heads)"),
        (config.distillation_token and config.register_tokens > 0, "a distillation token beside register tokens"),
        (config.projection_dim is not None and config.num_classes > 0, "projection_dim with a head after it"),
    ]
    return next((why for bad, why in reasons if bad), None)


def to_timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The model's weights under timm's ``vision_transformer`` names and shapes (the reverse of loading).

    CLIP's projection without a head becomes timm's ``head`` with a zero bias, as timm holds OpenAI's CLIP.
    Nothing in a timm file says the MLP activation or how positions are resized: see ``load_timm``.
    """
    c = model.config
    why = timm_unsupported(c)
    if why:
        raise ConfigError(f"{why} has no timm vision_transformer equivalent; export to ONNX instead")
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("norm.") and c.norm_after_pool:
            key = "fc_norm." + key[len("norm."):]
        elif key.startswith("pre_logits.0."):
            key = "pre_logits.fc." + key[len("pre_logits.0."):]
        elif key == "projection.weight":
            key = "head.weight"
            out["head.bias"] = value.new_zeros(value.shape[0])
        elif key == "patch_embed.proj.weight":
            value = patch_weight(value, c, "conv")
        out[key] = value.detach().clone()
    return out


def export_timm(model: VisionTransformer, path: str | Path) -> Path:
    """Write the model's weights as a timm ``vision_transformer`` state dict (``.safetensors``), atomically; a
    timm user loads it with ``timm.create_model(name, pretrained=False)`` and ``load_state_dict``, and vitlab
    with :func:`vitlab.load` (pass ``num_heads`` for a non-standard width: timm files do not store it)."""
    from vitlab._files import save_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: a timm export is a .safetensors file; give --out a name ending in .safetensors")
    save_safetensors(path, to_timm_state_dict(model), metadata={"format": "pt"})
    return path


# The timm ViTs whose MLP is not exact GELU, by architecture name (the weights cannot tell: the activation has no
# parameters). Every other timm vision_transformer vitlab reads uses nn.GELU. Generated from timm 1.0.x by
# benchmarks/timm_activations.py (timm's own models on the meta device, their blocks[0].mlp.act), which
# prints this table; rerun it when timm adds a family.
TIMM_ACTIVATIONS = {
    **dict.fromkeys(["vit_base_patch16_clip_quickgelu_224", "vit_base_patch32_clip_quickgelu_224",
                     "vit_gigantic_patch14_clip_quickgelu_224", "vit_huge_patch14_clip_quickgelu_224",
                     "vit_huge_patch14_clip_quickgelu_378", "vit_large_patch14_clip_quickgelu_224",
                     "vit_large_patch14_clip_quickgelu_336"], "quick_gelu"),
    **dict.fromkeys(["vit_base_patch32_siglip_256", "vit_base_patch32_siglip_gap_256",
                     "vit_giantopt_patch16_siglip_256", "vit_giantopt_patch16_siglip_384",
                     "vit_giantopt_patch16_siglip_gap_256", "vit_giantopt_patch16_siglip_gap_384",
                     "vit_large_patch16_siglip_512", "vit_large_patch16_siglip_gap_512",
                     "vit_so400m_patch16_siglip_256", "vit_so400m_patch16_siglip_384", "vit_so400m_patch16_siglip_512",
                     "vit_so400m_patch16_siglip_gap_256", "vit_so400m_patch16_siglip_gap_384",
                     "vit_so400m_patch16_siglip_gap_512"], "gelu_tanh"),
}
TIMM_CONFIG, TIMM_SAFETENSORS, TIMM_BIN = "config.json", "model.safetensors", "pytorch_model.bin"  # timm's hub folder


def timm_activation(name: str) -> str | None:
    """The MLP activation of timm architecture ``name`` when it is not GELU (``quick_gelu``, ``gelu_tanh``), read
    from :data:`TIMM_ACTIVATIONS`; a file named after it counts (``vit_base_patch16_clip_quickgelu_224.openai
    .safetensors``: the longest known name the file name starts with). None: GELU, or a name not known."""
    matches = [arch for arch in TIMM_ACTIVATIONS if name == arch or name.startswith(arch + ".")]
    return TIMM_ACTIVATIONS[max(matches, key=len)] if matches else None


def _timm_hub_config(path: Path) -> dict | None:
    """The ``config.json`` of a timm hub folder (what ``timm.models.push_to_hf_hub`` / ``save_for_hf`` write and
    ``hf_hub:timm/...`` downloads: ``architecture`` + ``pretrained_cfg``), or None."""
    file = path / TIMM_CONFIG
    if not file.is_file():
        return None
    data = read_json(file)
    named = isinstance(data, dict) and isinstance(data.get("architecture"), str)
    return data if named and ("pretrained_cfg" in data or "num_features" in data) and "model_type" not in data \
        else None


def is_timm_folder(path: str | Path) -> bool:
    """True for a timm hub folder of a ViT (its ``config.json`` names a ``vit_*`` / ``deit*`` / ``*siglip*`` ...
    architecture, with ``model.safetensors`` or ``pytorch_model.bin`` beside it)."""
    path = Path(path)
    return (path.is_dir() and _timm_hub_config(path) is not None
            and ((path / TIMM_SAFETENSORS).is_file() or (path / TIMM_BIN).is_file()))


def timm_folder_normalization(path: str | Path) -> tuple[Any, Any] | None:
    """The (mean, std) a timm hub folder's ``pretrained_cfg`` gives, or None."""
    cfg = (_timm_hub_config(Path(path)) or {}).get("pretrained_cfg") or {}
    return (cfg["mean"], cfg["std"]) if cfg.get("mean") is not None and cfg.get("std") is not None else None


def load_timm(path: str | Path, *, num_heads: int | None = None, **overrides: Any) -> VisionTransformer:
    """Load a timm ``vision_transformer`` state dict (``.safetensors`` or ``.pth``), or a timm hub folder (its
    ``config.json`` names the architecture, its weights beside it), into a vitlab model.

    The architecture is inferred from the weights: hidden size and patch from ``patch_embed.proj`` (no bias:
    CLIP), depth from the blocks, image size from the ``pos_embed`` grid (with or without positions for the
    tokens before the patches: DeiT III, DINOv2 with registers), the distillation token and head (DeiT),
    register tokens, CLIP's ``norm_pre``, the attention pool (``attn_pool``: SigLIP), layer scale, classes from
    ``head`` (none: no head), mean pooling when ``fc_norm`` is present or there is no class token. timm files
    do not store the number of heads: ``num_heads`` gives it, else the standard table by hidden size is used
    (:data:`~vitlab.interop._common.STANDARD_HEADS`). Nor do they store the MLP's activation: the architecture's
    (:func:`timm_activation`: QuickGELU for OpenAI's CLIP, tanh GELU for some SigLIPs) when a hub folder names
    it or the file is named after it, else GELU (``mlp_activation=`` says otherwise).
    ``overrides`` set any other :class:`ViTConfig` field (e.g. ``pool="mean"`` for a ``global_pool='avg'``
    model without ``fc_norm``, whose weights cannot tell). A family vitlab cannot express (BEiT, EVA, SwiGLU,
    qk-norm, ...) is refused with the key that shows it.
    """
    path = Path(path)
    if path.is_dir():
        hub = _timm_hub_config(path)
        if hub is None:
            raise CheckpointError(f"{path}: not a timm hub folder ({TIMM_CONFIG} with 'architecture' and "
                                  "'pretrained_cfg')")
        weights = path / TIMM_SAFETENSORS if (path / TIMM_SAFETENSORS).is_file() else path / TIMM_BIN
        if num_heads is None:  # a model built with arguments records them (a hub download of a preset does not)
            num_heads = (hub.get("model_args") or {}).get("num_heads")
        return timm_model(read_state_dict(weights), str(weights), num_heads=num_heads, architecture=hub["architecture"],
                          **overrides)
    return timm_model(read_state_dict(path), str(path), num_heads=num_heads, architecture=path.name, **overrides)


def timm_model(state: dict[str, torch.Tensor], source: str, *, num_heads: int | None = None,
               architecture: str | None = None, **overrides: Any) -> VisionTransformer:
    """:func:`load_timm` of a state dict already read (``source`` names its file in errors; ``architecture``:
    the timm model name, or a file name, that may say the MLP's activation)."""
    fields = timm_config_fields(state, source, num_heads, image_size=overrides.get("image_size"))
    activation = timm_activation(architecture) if architecture else None
    if activation is not None:
        fields["mlp_activation"] = activation
    elif (fields["norm_before_blocks"] or "attn_pool.latent" in state) and "mlp_activation" not in overrides:
        log.warning("%s: a CLIP or SigLIP image tower; a timm state dict does not say the MLP's activation and its "
                    "name is not one of timm's: GELU is used (OpenCLIP's CLIP, most SigLIPs); OpenAI's CLIP "
                    "(timm's *_quickgelu models) needs mlp_activation='quick_gelu', some SigLIPs 'gelu_tanh'",
                    source)
    config = make_config(fields, overrides, source)
    return build_and_load(config, convert_timm_state_dict(state, config), source)
