"""Named presets: each is a :class:`ViTConfig` (data, not a class) with a line saying what it reproduces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitlab.config import ViTConfig, config_from_dict, to_dict
from vitlab.errors import ConfigError
from vitlab.models.vit import VisionTransformer


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict[str, Any]


def _paper(hidden: int, depth: int, heads: int, mlp: int, patch: int) -> dict[str, Any]:
    return dict(image_size=224, patch_size=patch, num_classes=1000, hidden_dim=hidden, depth=depth,
                num_heads=heads, mlp_dim=mlp)


_DEIT_DISTILLED = dict(distillation_token=True, distillation_head=True)
_DEIT3 = dict(pos_embed_patches_only=True, layer_scale=1e-6)
_DINOV2 = dict(image_size=518, num_classes=0, layer_scale=1e-5)
_REG4 = dict(register_tokens=4, pos_embed_patches_only=True)
_CLIP = dict(num_classes=0, norm_before_blocks=True, patch_embed_bias=False, mlp_activation="quick_gelu",
             norm_eps=1e-5)
_SIGLIP = dict(num_classes=0, class_token=False, pool="map", mlp_activation="gelu_tanh")

# The pretrained families practitioners fine-tune today, shaped as their published checkpoints (classes, image
# size, layer-scale init), so that `vitlab models` says what each is; their parameter counts are timm's.
_FAMILY_PRESETS = [
    Preset("deit-ti16-distilled", "DeiT-Ti/16 distilled (Touvron et al. 2021): distillation token and head, logits "
           "the mean of both heads; 224 px, 1000 classes", {**_paper(192, 12, 3, 768, 16), **_DEIT_DISTILLED}),
    Preset("deit-s16-distilled", "DeiT-S/16 distilled: distillation token and head; 224 px, 1000 classes",
           {**_paper(384, 12, 6, 1536, 16), **_DEIT_DISTILLED}),
    Preset("deit-b16-distilled", "DeiT-B/16 distilled: distillation token and head; 224 px, 1000 classes",
           {**_paper(768, 12, 12, 3072, 16), **_DEIT_DISTILLED}),
    Preset("deit3-s16", "DeiT III S/16 (Touvron et al. 2022): positions for the patches only, layer scale; 224 px, "
           "1000 classes", {**_paper(384, 12, 6, 1536, 16), **_DEIT3}),
    Preset("deit3-b16", "DeiT III B/16: positions for the patches only, layer scale; 224 px, 1000 classes",
           {**_paper(768, 12, 12, 3072, 16), **_DEIT3}),
    Preset("dinov2-s14", "DINOv2 ViT-S/14 (Oquab et al. 2023): layer scale, 37x37 position grid (518 px), "
           "no head (features)", {**_paper(384, 12, 6, 1536, 14), **_DINOV2}),
    Preset("dinov2-b14", "DINOv2 ViT-B/14: layer scale, 518 px, no head", {**_paper(768, 12, 12, 3072, 14), **_DINOV2}),
    Preset("dinov2-l14", "DINOv2 ViT-L/14: layer scale, 518 px, no head",
           {**_paper(1024, 24, 16, 4096, 14), **_DINOV2}),
    Preset("dinov2-s14-reg4", "DINOv2 ViT-S/14 with 4 registers (Darcet et al. 2024): positions for the patches "
           "only, 518 px, no head", {**_paper(384, 12, 6, 1536, 14), **_DINOV2, **_REG4}),
    Preset("dinov2-b14-reg4", "DINOv2 ViT-B/14 with 4 registers, 518 px, no head",
           {**_paper(768, 12, 12, 3072, 14), **_DINOV2, **_REG4}),
    Preset("dinov2-l14-reg4", "DINOv2 ViT-L/14 with 4 registers, 518 px, no head",
           {**_paper(1024, 24, 16, 4096, 14), **_DINOV2, **_REG4}),
    Preset("clip-b32", "OpenAI CLIP ViT-B/32 image tower (Radford et al. 2021): pre-norm, no patch bias, QuickGELU, "
           "projection to the 512-d image-text space; 224 px, outputs the image embedding",
           {**_paper(768, 12, 12, 3072, 32), **_CLIP, "projection_dim": 512}),
    Preset("clip-b16", "OpenAI CLIP ViT-B/16 image tower: pre-norm, QuickGELU, 512-d projection; 224 px",
           {**_paper(768, 12, 12, 3072, 16), **_CLIP, "projection_dim": 512}),
    Preset("clip-l14", "OpenAI CLIP ViT-L/14 image tower: pre-norm, QuickGELU, 768-d projection; 224 px",
           {**_paper(1024, 24, 16, 4096, 14), **_CLIP, "projection_dim": 768}),
    Preset("siglip-b16", "SigLIP ViT-B/16 image tower (Zhai et al. 2023): no class token, attention-pool head, "
           "tanh GELU; 224 px, outputs the pooled embedding", {**_paper(768, 12, 12, 3072, 16), **_SIGLIP}),
    Preset("siglip-so400m14", "SigLIP So400m/14 image tower (Alabdulmohsin et al. 2023): 1152 wide, 27 blocks, "
           "16 heads, MLP 4304, attention pool; 224 px", {**_paper(1152, 27, 16, 4304, 14), **_SIGLIP}),
]


_PRESETS = [
    # The paper (Dosovitskiy et al. 2021, Table 1), ImageNet heads at 224 px.
    Preset("vit-b16", "ViT-Base/16 of the paper (Table 1), 224 px, 1000 classes", _paper(768, 12, 12, 3072, 16)),
    Preset("vit-b32", "ViT-Base/32 of the paper (Table 1), 224 px, 1000 classes", _paper(768, 12, 12, 3072, 32)),
    Preset("vit-l16", "ViT-Large/16 of the paper (Table 1), 224 px, 1000 classes", _paper(1024, 24, 16, 4096, 16)),
    Preset("vit-l32", "ViT-Large/32 of the paper (Table 1), 224 px, 1000 classes", _paper(1024, 24, 16, 4096, 32)),
    Preset("vit-h14", "ViT-Huge/14 of the paper (Table 1), 224 px, 1000 classes", _paper(1280, 32, 16, 5120, 14)),
    # DeiT (Touvron et al. 2021) sizes, the usual small ViTs.
    Preset("vit-ti16", "ViT-Ti/16 of DeiT (192 hidden, 3 heads), 224 px, 1000 classes", _paper(192, 12, 3, 768, 16)),
    Preset("vit-s16", "ViT-S/16 of DeiT (384 hidden, 6 heads), 224 px, 1000 classes", _paper(384, 12, 6, 1536, 16)),
    # The models of the from-scratch tutorials and notebooks vitlab replaces.
    Preset("vit-tiny-4h-p16", "the 12-layer 'ViT-Tiny' of the from-scratch tutorials: 192 hidden, MLP 768, 4 heads "
           "(DeiT's has 3), patch 16 at 224 px", _paper(192, 12, 4, 768, 16)),
    Preset("vit-small-6h-p16", "the 'ViT-Small' of the from-scratch tutorials: 12 layers, 384 hidden, MLP 1536, "
           "6 heads, patch 16 at 224 px (same shape as DeiT's ViT-S/16)", _paper(384, 12, 6, 1536, 16)),
    Preset("vit-small-12h-p16", "the 'ViT-Small' of the from-scratch tutorials with 12 heads: 12 layers, 384 "
           "hidden, MLP 1536, patch 16 at 224 px", _paper(384, 12, 12, 1536, 16)),
    Preset("vit-cifar-tiny-p4", "the CIFAR-10 ViT of Tin Nguyen's 'Vision Transformer from Scratch' "
           "(tintn/vision-transformer-from-scratch): 32 px, patch 4, 4 layers, 48 hidden, 4 heads, MLP 192, "
           "10 classes",
           dict(image_size=32, patch_size=4, num_classes=10, hidden_dim=48, depth=4, num_heads=4, mlp_dim=192)),
    Preset("vit-cifar-showcase-p8", "the CIFAR-10 showcase ViT of a from-scratch notebook: 32 px, patch 8, "
           "2 blocks, 256 hidden, 2 heads, MLP 256, mean pooling, no class token, no final norm, 10 classes",
           dict(image_size=32, patch_size=8, num_classes=10, hidden_dim=256, depth=2, num_heads=2, mlp_dim=256,
                class_token=False, pool="mean", final_norm=False)),
    Preset("vit-mnist-notebook-p16", "the MNIST ViT of a from-scratch notebook: 32 px (MNIST resized), 1 channel, "
           "patch 16, 3 layers, 9 hidden, 3 heads, MLP 36, fixed sin-cos positions, 10 classes",
           dict(image_size=32, patch_size=16, in_channels=1, num_classes=10, hidden_dim=9, depth=3, num_heads=3,
                mlp_dim=36, pos_embed="sincos")),
    # vitlab's own small models for its recipes.
    Preset("vit-digits-p2", "vitlab default: a small ViT for the built-in 8x8 digits (patch 2, 6 layers, "
           "128 hidden, 4 heads)",
           dict(image_size=8, patch_size=2, in_channels=1, num_classes=10, hidden_dim=128, depth=6, num_heads=4,
                mlp_dim=256)),
    Preset("vit-mnist-p7", "a pure-ViT MNIST model: 28 px, 1 channel, patch 7 (4x4 grid), 6 layers, 128 hidden, "
           "4 heads, MLP 256",
           dict(image_size=28, patch_size=7, in_channels=1, num_classes=10, hidden_dim=128, depth=6, num_heads=4,
                mlp_dim=256)),
    Preset("vit-mnist-c4", "vitlab's MNIST model: 28 px, 1 channel, convolutional stem (3x3 stride-2 convs 64, 96 "
           "+ BatchNorm + ReLU, then 1x1; 7x7 grid), 4 layers, 96 hidden, 4 heads, MLP 192",
           dict(image_size=28, patch_size=4, in_channels=1, num_classes=10, hidden_dim=96, depth=4, num_heads=4,
                mlp_dim=192, patch_embed="conv_stem")),
    Preset("vit-mnist-hybrid", "vitlab's MNIST model: vit-mnist-c4's stem plus two stride-1 3x3 convs (96 "
           "channels, BatchNorm + ReLU) at the 7x7 token grid, then 3 layers, 96 hidden, 4 heads, MLP 192 "
           "(recipe mnist)",
           dict(image_size=28, patch_size=4, in_channels=1, num_classes=10, hidden_dim=96, depth=3, num_heads=4,
                mlp_dim=192, patch_embed="conv_stem", stem_extra_convs=2)),
    Preset("vit-cifar-p4", "a pure-ViT CPU CIFAR-10 model: 32 px, patch 4, 6 layers, 128 hidden, 4 heads, MLP 256",
           dict(image_size=32, patch_size=4, num_classes=10, hidden_dim=128, depth=6, num_heads=4, mlp_dim=256)),
    Preset("vit-cifar-c4", "vit-cifar-p4 with the convolutional stem of Xiao et al. 2021 (3x3 stride-2 convs "
           "64, 128 + BatchNorm + ReLU, then 1x1) in place of the 4x4 patchify",
           dict(image_size=32, patch_size=4, num_classes=10, hidden_dim=128, depth=6, num_heads=4, mlp_dim=256,
                patch_embed="conv_stem")),
    Preset("vit-cifar-hybrid", "vitlab's CPU CIFAR-10 model: vit-cifar-c4's stem plus two stride-1 3x3 convs "
           "(128 channels, BatchNorm + ReLU) at the 8x8 token grid, then 4 layers, 128 hidden, 4 heads, MLP 256 "
           "(recipe cifar10-cpu)",
           dict(image_size=32, patch_size=4, num_classes=10, hidden_dim=128, depth=4, num_heads=4, mlp_dim=256,
                patch_embed="conv_stem", stem_extra_convs=2)),
    Preset("vit-cifar-lite-p4", "vitlab's GPU CIFAR-10 model: 32 px, patch 4, 9 layers, 384 hidden, 6 heads, "
           "MLP 1152 (recipe cifar10-gpu)",
           dict(image_size=32, patch_size=4, num_classes=10, hidden_dim=384, depth=9, num_heads=6, mlp_dim=1152)),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS + _FAMILY_PRESETS}


def list_models() -> list[str]:
    """The preset names, in the order of the table (paper, DeiT, the tutorials', vitlab's own, the pretrained
    families)."""
    return list(PRESETS)


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The :class:`ViTConfig` of preset ``name`` with ``overrides`` applied (e.g. ``num_classes=10``)."""
    key = name.lower().replace("_", "-").replace("/", "")
    if key not in PRESETS:
        import difflib

        close = difflib.get_close_matches(key, PRESETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown model {name!r}: {hint}`vitlab models` lists the presets")
    data = dict(PRESETS[key].config)
    if "num_classes" in overrides and "labels" not in overrides:
        data.pop("labels", None)
    return config_from_dict(ViTConfig, {**data, **overrides}, source=f"model {key}")


def create_model(name: str | ViTConfig, **overrides: Any) -> VisionTransformer:
    """Build a freshly initialised :class:`VisionTransformer` from a preset name (or a config)."""
    if isinstance(name, ViTConfig):
        config = config_from_dict(ViTConfig, {**to_dict(name), **overrides}) if overrides else name
    else:
        config = get_config(name, **overrides)
    return VisionTransformer(config)

