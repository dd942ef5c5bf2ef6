"""The original google-research/vision_transformer ``.npz`` checkpoints (ViT-B_16.npz and friends) <-> vitlab.

Flax stores a Dense kernel as ``(in, out)`` (PyTorch: ``(out, in)``), the patch convolution in HWIO
``(ph, pw, C, D)``, and each attention projection per head: query/key/value kernels ``(D, H, hd)`` with biases
``(H, hd)``, the output kernel ``(H, hd, D)``. Older files put every key under ``opt/target/``. The number of
heads is read from the query kernel, so nothing has to be guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitlab.config import ViTConfig, check_num_heads
from vitlab.errors import CheckpointError, ConfigError
from vitlab.interop._common import (build_and_load, count_blocks, image_size_from_tokens,
                                    make_config, merge_qkv, need, patch_weight, split_qkv)
from vitlab.models import VisionTransformer

_BLOCK = "Transformer/encoderblock_"
_ATTN = "MultiHeadDotProductAttention_1"
_MLP = "MlpBlock_3"
_POS = "Transformer/posembed_input/pos_embedding"
_OLD_PREFIX = "opt/target/"


def read_npz_keys(path: str | Path) -> set[str]:
    """The array names of an ``.npz`` (``opt/target/`` removed) without reading the arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read it as an .npz file ({e}); it is corrupt or not a "
                              "google-research ViT checkpoint") from None
    if names and all(k.startswith(_OLD_PREFIX) for k in names):
        names = [k[len(_OLD_PREFIX):] for k in names]
    return set(names)


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (never unpickled), with an ``opt/target/`` prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read it as an .npz file ({e}); it is corrupt or not a "
                              "google-research ViT checkpoint") from None
    if arrays and all(k.startswith(_OLD_PREFIX) for k in arrays):
        arrays = {k[len(_OLD_PREFIX):]: v for k, v in arrays.items()}
    return arrays


def is_jax_npz(arrays: dict[str, Any]) -> bool:
    return "embedding/kernel" in arrays and any(k.startswith(_BLOCK) for k in arrays)


def jax_config_fields(arrays: dict[str, np.ndarray], source: str) -> dict[str, Any]:
    """The :class:`ViTConfig` fields an npz checkpoint implies, all read from shapes."""
    kernel = need(arrays, "embedding/kernel", source)
    if kernel.ndim != 4:
        raise CheckpointError(f"{source}: key 'embedding/kernel' has shape {kernel.shape}, expected "
                              "(ph, pw, C, D); hybrid (ResNet) ViTs are not supported")
    ph, pw, channels, hidden = kernel.shape
    query = need(arrays, f"{_BLOCK}0/{_ATTN}/query/kernel", source)  # (D, H, hd)
    class_token = "cls" in arrays
    fields: dict[str, Any] = dict(
        patch_size=(ph, pw), in_channels=channels, hidden_dim=hidden,
        depth=count_blocks(arrays, _BLOCK, source), num_heads=query.shape[1],
        mlp_dim=need(arrays, f"{_BLOCK}0/{_MLP}/Dense_0/kernel", source).shape[1],
        class_token=class_token, pool="cls" if class_token else "mean",
        pos_embed="learned" if _POS in arrays else "none",
        qkv_bias=f"{_BLOCK}0/{_ATTN}/query/bias" in arrays,
        final_norm="Transformer/encoder_norm/scale" in arrays, norm_eps=1e-6,
        representation_dim=arrays["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in arrays else None,
        num_classes=arrays["head/kernel"].shape[1] if "head/kernel" in arrays else 0,
    )
    if _POS in arrays:
        fields["image_size"] = image_size_from_tokens(arrays[_POS].shape[1], int(class_token), (ph, pw), source, _POS)
    else:
        fields["image_size"] = (ph * 14, pw * 14)
    return fields


def convert_jax_arrays(arrays: dict[str, np.ndarray], config: ViTConfig,
                       source: str = "npz checkpoint") -> dict[str, torch.Tensor]:
    """Map npz arrays to vitlab's state dict (transposing kernels). Unmapped keys are kept for strict loading
    to name; a missing one is named here, with ``source``."""
    used = set()

    def t(key: str) -> torch.Tensor:
        used.add(key)
        return torch.from_numpy(np.ascontiguousarray(need(arrays, key, source))).float()

    def dense(dst: str, src: str, out: dict) -> None:
        out[dst + ".weight"] = t(src + "/kernel").T  # (in, out) -> (out, in)
        out[dst + ".bias"] = t(src + "/bias")

    def norm(dst: str, src: str, out: dict) -> None:
        out[dst + ".weight"] = t(src + "/scale")
        out[dst + ".bias"] = t(src + "/bias")

    d = config.hidden_dim
    out: dict[str, torch.Tensor] = {}
    out["patch_embed.proj.weight"] = patch_weight(t("embedding/kernel").permute(3, 2, 0, 1), config)  # HWIO -> OIHW
    out["patch_embed.proj.bias"] = t("embedding/bias")
    if config.class_token:
        out["cls_token"] = t("cls")
    if config.pos_embed == "learned":
        out["pos_embed"] = t(_POS)
    for i in range(config.depth):
        b, p = f"{_BLOCK}{i}/", f"blocks.{i}."
        a = b + _ATTN + "/"
        norm(p + "norm1", b + "LayerNorm_0", out)
        # (D, H, hd) -> (D, H*hd) -> (H*hd, D); q, k, v stacked on the output dim like vitlab's fused qkv
        qkv = ("query", "key", "value")
        out[p + "attn.qkv.weight"] = merge_qkv(*(t(a + n + "/kernel").reshape(d, -1).T for n in qkv))
        if config.qkv_bias:
            out[p + "attn.qkv.bias"] = merge_qkv(*(t(a + n + "/bias").reshape(-1) for n in qkv))
        out[p + "attn.proj.weight"] = t(a + "out/kernel").reshape(-1, d).T  # (H, hd, D) -> (D, H*hd)
        out[p + "attn.proj.bias"] = t(a + "out/bias")
        norm(p + "norm2", b + "LayerNorm_2", out)
        dense(p + "mlp.fc1", b + _MLP + "/Dense_0", out)
        dense(p + "mlp.fc2", b + _MLP + "/Dense_1", out)
    if config.final_norm:
        norm("norm", "Transformer/encoder_norm", out)
    if config.representation_dim:
        dense("pre_logits.0", "pre_logits", out)
    if config.num_classes > 0:
        dense("head", "head", out)
    for key in arrays:
        if key not in used:
            out[key] = torch.from_numpy(np.asarray(arrays[key]))
    return out


def to_jax_arrays(model: VisionTransformer, prefix: str = "") -> dict[str, np.ndarray]:
    """The model's weights as google-research npz arrays (the reverse of loading); ``np.savez`` writes them."""
    c = model.config
    if (c.layer_scale is not None or c.norm_after_pool or c.pos_embed == "sincos"
            or c.patch_embed in ("conv_stem", "shifted") or c.locality_attention):
        raise ConfigError("the google-research ViT has no layer scale, fc_norm, sin-cos positions, conv stem, "
                          "shifted patches or locality attention")
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    d, h, hd = c.hidden_dim, c.num_heads, c.head_dim
    out: dict[str, torch.Tensor] = {}

    def dense(dst: str, src: str) -> None:
        out[dst + "/kernel"] = sd[src + ".weight"].T
        out[dst + "/bias"] = sd[src + ".bias"]

    def norm(dst: str, src: str) -> None:
        out[dst + "/scale"] = sd[src + ".weight"]
        out[dst + "/bias"] = sd[src + ".bias"]

    out["embedding/kernel"] = patch_weight(sd["patch_embed.proj.weight"], c, "conv").permute(2, 3, 1, 0)  # OIHW -> HWIO
    out["embedding/bias"] = sd["patch_embed.proj.bias"]
    if c.class_token:
        out["cls"] = sd["cls_token"]
    if c.pos_embed == "learned":
        out[_POS] = sd["pos_embed"]
    for i in range(c.depth):
        b, p = f"{_BLOCK}{i}/", f"blocks.{i}."
        a = b + _ATTN + "/"
        norm(b + "LayerNorm_0", p + "norm1")
        for n, w in zip(("query", "key", "value"), split_qkv(sd[p + "attn.qkv.weight"])):
            out[a + n + "/kernel"] = w.T.reshape(d, h, hd)  # (H*hd, D) -> (D, H, hd)
        if c.qkv_bias:
            for n, bias in zip(("query", "key", "value"), split_qkv(sd[p + "attn.qkv.bias"])):
                out[a + n + "/bias"] = bias.reshape(h, hd)
        out[a + "out/kernel"] = sd[p + "attn.proj.weight"].T.reshape(h, hd, d)
        out[a + "out/bias"] = sd[p + "attn.proj.bias"]
        norm(b + "LayerNorm_2", p + "norm2")
        dense(b + _MLP + "/Dense_0", p + "mlp.fc1")
        dense(b + _MLP + "/Dense_1", p + "mlp.fc2")
    if c.final_norm:
        norm("Transformer/encoder_norm", "norm")
    if c.representation_dim:
        dense("pre_logits", "pre_logits.0")
    if c.num_classes > 0:
        dense("head", "head")
    return {prefix + k: v.contiguous().numpy() for k, v in out.items()}


def load_jax_npz(path: str | Path, **overrides: Any) -> VisionTransformer:
    """Load a google-research ViT ``.npz`` checkpoint (e.g. ``ViT-B_16.npz``, ``imagenet21k/ViT-L_16.npz``).

    Everything is read from the shapes: patch and hidden size from ``embedding/kernel``, heads from the query
    kernel ``(D, H, hd)``, depth, image size from the position grid, classes from ``head`` and the in21k
    ``pre_logits`` layer. ``overrides`` set other :class:`ViTConfig` fields.
    """
    source = str(path)
    arrays = read_npz(path)
    fields = jax_config_fields(arrays, source)
    check_num_heads(overrides, fields["num_heads"], source,
                    f"head count (H of '{_BLOCK}0/{_ATTN}/query/kernel', shape (D, H, hd))")
    config = make_config(fields, overrides, source)
    return build_and_load(config, convert_jax_arrays(arrays, config, source), source)
