"""Pretrained ViTs in the other common formats -> vitlab, and vitlab -> ONNX / Hugging Face / timm.

``read_pretrained(path)`` (and ``load_pretrained``, which returns the model alone) reads, from local files only:

- a vitlab model or run folder: handed to :meth:`VisionTransformer.from_pretrained` (vitlab's own format is
  :mod:`vitlab.checkpoints`' business, not this package's);
- a Hugging Face folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) of ViT, DeiT
  (distilled too), DINOv2 (with registers too), CLIP's or SigLIP's image tower;
- a timm ``vision_transformer`` state dict (``.safetensors``, ``.pth``, ``.pt``, ``.bin``), including the
  ``fc_norm`` / global-average-pool variants, DeiT (distilled), DeiT III, registers, DINOv2, CLIP and SigLIP, or
  a timm hub folder (``config.json`` naming the architecture, as ``hf_hub:timm/...`` downloads are);
- a torchvision ``vit_b_16``-style state dict (``.pth``);
- a google-research ``.npz`` checkpoint (``ViT-B_16.npz`` and friends, with or without ``opt/target/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from vitlab._files import read_json
from vitlab.checkpoints import model_folder, resolve_checkpoint
from vitlab.data.transforms import IMAGENET_MEAN_STD, INCEPTION_MEAN_STD
from vitlab.errors import CheckpointError
from vitlab.interop._common import read_state_dict
from vitlab.interop.hf import HF_PREPROCESSOR, export_hf, hf_refusal, is_hf_folder, load_hf_folder
from vitlab.interop.hf_layouts import MODEL_TYPES
from vitlab.interop.jax_npz import is_jax_npz, load_jax_npz, read_npz_keys
from vitlab.interop.onnx_export import export_onnx
from vitlab.interop.timm import (export_timm, is_timm_folder, is_timm_state_dict, load_timm, timm_folder_normalization,
                                 timm_model, unsupported_family)
from vitlab.interop.torchvision import is_torchvision_state_dict, load_torchvision, torchvision_model
from vitlab.loaded import Normalization, checkpoint_normalization, per_channel
from vitlab.models import VisionTransformer

FORMATS = ("vitlab", "hf", "timm", "torchvision", "jax")
_STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def _detect(path: Path) -> tuple[str, dict[str, torch.Tensor] | None]:
    """:func:`detect_format`, plus the state dict when telling the format meant reading the whole file (a
    pickled ``.pth/.pt/.bin/.ckpt``), so that the loader need not read it again; else None."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (not found); pass a run folder, a checkpoint folder "
                              "or a weights file")
    if path.is_dir():
        if model_folder(path):
            return "vitlab", None
        if is_hf_folder(path):
            return "hf", None
        if is_timm_folder(path):
            return "timm", None
        raise CheckpointError(hf_refusal(path) or f"{path}: a folder, but neither a vitlab save_pretrained/run "
                              "folder, a Hugging Face folder vitlab reads (config.json with model_type "
                              f"{', '.join(MODEL_TYPES)}) nor a timm hub folder (config.json with 'architecture'); "
                              "pass the weights file itself")
    if path.suffix == ".npz":
        if is_jax_npz(read_npz_keys(path)):
            return "jax", None
        raise CheckpointError(f"{path}: an .npz without 'embedding/kernel' and 'Transformer/encoderblock_0/...' "
                              "keys, so not a google-research ViT checkpoint")
    if path.suffix not in _STATE_DICT_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; vitlab reads folders, .npz, "
                              f"and state dicts ({', '.join(_STATE_DICT_SUFFIXES)})")
    state: dict[str, torch.Tensor] | None = None
    keys: set[str] | None = None
    if path.suffix == ".safetensors":  # the header names the tensors: no tensor data is read
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
        except (SafetensorError, OSError, ValueError):
            pass  # read_state_dict names the file in its error
    if keys is None:
        state = read_state_dict(path)
        keys = set(state)
    refusal = unsupported_family(keys, str(path)) if "patch_embed.proj.weight" in keys else None
    if refusal:
        raise CheckpointError(refusal)
    if is_timm_state_dict(keys):
        return "timm", state
    if is_torchvision_state_dict(keys):
        return "torchvision", state
    if "vit.embeddings.cls_token" in keys or "embeddings.cls_token" in keys:
        raise CheckpointError(f"{path}: a Hugging Face ViT state dict; pass the folder that holds it and its "
                              "config.json instead")
    first = sorted(keys)[0]
    raise CheckpointError(f"{path}: not a known ViT layout (first key {first!r}); vitlab reads timm "
                          "('patch_embed.proj.weight', 'blocks.N.attn.qkv'), torchvision ('conv_proj', "
                          "'encoder.layers.encoder_layer_N') and Hugging Face folders")


def detect_format(path: str | Path) -> str:
    """Which of :data:`FORMATS` the file or folder at ``path`` holds, from its layout and key names."""
    return _detect(Path(path))[0]


@dataclass
class Pretrained:
    """What :func:`read_pretrained` read: the model (eval mode), the format, the file or folder it came from
    (a run folder's ``best/``, not the run), and ``normalization``: the ``(mean, std)`` its inputs were
    normalised with where the checkpoint or its format says so (a vitlab folder's ``preprocess.json``, a Hugging
    Face folder's ``preprocessor_config.json``; torchvision: ImageNet's; JAX: 0.5/0.5), else None (a timm state
    dict does not say: timm's AugReg ViTs use 0.5/0.5, DeiT ImageNet's)."""

    model: VisionTransformer
    format: str
    source: Path
    normalization: Normalization | None


def read_pretrained(path: str | Path, *, format: str | None = None, num_heads: int | None = None,
                    **overrides: Any) -> Pretrained:
    """Read any supported checkpoint (see the module docstring) as a vitlab model, with what it says of its inputs.

    ``format`` skips detection (one of :data:`FORMATS`). The architecture is read from the file; where the
    format does not store the number of heads (timm, torchvision), ``num_heads`` gives it, else the standard
    table by hidden size is used (:data:`vitlab.interop._common.STANDARD_HEADS`); where it does (vitlab, Hugging
    Face, JAX), a different ``num_heads`` raises :class:`~vitlab.errors.ConfigError`. ``overrides`` set other
    :class:`~vitlab.config.ViTConfig` fields (e.g. ``dropout=0.1``, ``drop_path=0.1``, ``pool="mean"``).
    A file whose keys or shapes do not fit raises :class:`CheckpointError` naming the file and the key.
    """
    path = Path(path)
    fmt, state = (format, None) if format else _detect(path)
    if fmt not in FORMATS:
        raise CheckpointError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    source = (model_folder(path) or resolve_checkpoint(path)) if fmt == "vitlab" else path
    model = _load(source, fmt, state, num_heads, dict(overrides))
    return Pretrained(model, fmt, source, _normalization(source, fmt, model.config.in_channels))


def load_pretrained(path: str | Path, *, format: str | None = None, num_heads: int | None = None,
                    **overrides: Any) -> VisionTransformer:
    """:func:`read_pretrained`'s model alone, in eval mode (for a loop of one's own; fine-tuning takes the
    normalisation too: ``read_pretrained(path).normalization``)."""
    return read_pretrained(path, format=format, num_heads=num_heads, **overrides).model


def _normalization(path: Path, fmt: str, channels: int) -> Normalization | None:
    """The (mean, std) the checkpoint at ``path`` was trained with, where it or its format says; else None."""
    if fmt == "vitlab":
        return checkpoint_normalization(path, channels)
    found = None
    if fmt == "torchvision":
        found = IMAGENET_MEAN_STD
    elif fmt == "jax":
        found = INCEPTION_MEAN_STD
    elif fmt == "timm" and path.is_dir():
        found = timm_folder_normalization(path)
    elif fmt == "hf" and (path / HF_PREPROCESSOR).is_file():
        cfg = read_json(path / HF_PREPROCESSOR)
        if cfg.get("do_normalize", True) and cfg.get("image_mean") is not None and cfg.get("image_std") is not None:
            found = (cfg["image_mean"], cfg["image_std"])
    if found is None:
        return None
    mean, std = (per_channel(stats, channels) for stats in found)
    return (mean, std) if mean is not None and std is not None else None


def _load(path: Path, fmt: str, state, num_heads: int | None, overrides: dict[str, Any]) -> VisionTransformer:
    source = str(path)
    if fmt == "timm":
        if state is None:
            return load_timm(path, num_heads=num_heads, **overrides)
        return timm_model(state, source, num_heads=num_heads, architecture=path.name, **overrides)
    if fmt == "torchvision":
        if state is None:
            return load_torchvision(path, num_heads=num_heads, **overrides)
        return torchvision_model(state, source, num_heads=num_heads, **overrides)
    if num_heads is not None:
        overrides["num_heads"] = num_heads
    if fmt == "jax":
        return load_jax_npz(path, **overrides)
    if fmt == "hf":
        return load_hf_folder(path, **overrides)
    return VisionTransformer.from_pretrained(path, **overrides).eval()


EXPORT_FORMATS = ("onnx", "hf", "timm")

__all__ = ["FORMATS", "EXPORT_FORMATS", "detect_format", "read_pretrained", "Pretrained", "load_pretrained",
           "export_onnx", "export_hf", "export_timm", "load_hf_folder", "load_timm", "load_torchvision",
           "load_jax_npz"]
