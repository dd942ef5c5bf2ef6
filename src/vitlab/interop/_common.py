"""Helpers the converters share: reading a weight file safely, inferring a config, strict loading."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from vitlab.config import ViTConfig, config_from_dict
from vitlab.errors import CheckpointError, ConfigError
from vitlab.models import VisionTransformer, patch_weight

# Heads are not stored in a timm or torchvision state dict (the qkv weight has the same shape for any head
# count), so they come from the standard sizes: ViT-Ti, S, B, L and H (64-wide heads, 80 for H); DeiT III
# Medium (512 -> 8); SigLIP So400m (1152 -> 16); the giant CLIP towers (1408, 1664 -> 16). Checked against every
# ViT of timm 1.0.31: the models vitlab can express have these counts, except vit_base_patch16_gap_224 (768 wide,
# 16 heads). 1536 is left out on purpose: SigLIP 2's giant has 16 heads, DINOv2's giant 24.
STANDARD_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1408: 16, 1664: 16}

# Containers that training scripts wrap a state dict in (DeiT: "model", Lightning: "state_dict").
_WRAPPERS = ("state_dict", "model", "model_state", "module", "state_dict_ema", "model_ema")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from a ``.safetensors`` or ``.pth/.pt/.bin`` file.

    Pickled files are read with ``torch.load(weights_only=True)`` only, so a file cannot run code. A dict that
    wraps the weights under a key such as ``model`` or ``state_dict`` is unwrapped, and a DDP ``module.``
    prefix is removed.
    """
    from vitlab._files import load_safetensors

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        state: Any = load_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle and zip errors have many types; all mean the same to the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: cannot read it as a PyTorch weights file with weights_only=True "
                                  f"({first}); save a plain state dict or a .safetensors file") from None
    for _ in range(2):
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors (found {type(state).__name__}); "
                              "pass the model's weights file")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def num_heads_for(hidden_dim: int, source: str, override: int | None) -> int:
    """The override, else the standard head count of that hidden size (:data:`STANDARD_HEADS`)."""
    if override is not None:
        return int(override)
    if hidden_dim not in STANDARD_HEADS:
        # Guessing would be wrong more often than right: the usual rule (64-wide heads) gives no head at all
        # below 64, and a model of an unusual width was often trained with an unusual head count too.
        rule = hidden_dim // 64
        guess = (f"the usual rule, 64-wide heads, would give {rule}, which may well be wrong" if rule
                 else "the usual rule, 64-wide heads, gives 0 heads")
        raise CheckpointError(f"{source}: hidden size {hidden_dim} is not a standard ViT size and the file does not "
                              f"store the number of attention heads ({guess}); pass num_heads=N (CLI: --num-heads "
                              "N), the head count the model was trained with")
    return STANDARD_HEADS[hidden_dim]


def image_size_from_tokens(num_tokens: int, num_prefix: int, patch_size: tuple[int, int], source: str,
                           key: str) -> tuple[int, int]:
    """The image size whose patch grid holds ``num_tokens - num_prefix`` positions: a square image (with
    square patches: a square grid), else a square grid; otherwise the user must say."""
    n = num_tokens - num_prefix
    ph, pw = patch_size
    side = math.isqrt(max(n * ph * pw, 0))  # square image: (side/ph) * (side/pw) = n
    if n > 0 and side * side == n * ph * pw and side % ph == 0 and side % pw == 0:
        return (side, side)
    grid = math.isqrt(max(n, 0))
    if n > 0 and grid * grid == n:
        return (grid * ph, grid * pw)
    raise CheckpointError(f"{source}: {key} holds {n} patch positions, which fit no square image or grid; pass "
                          "image_size=(H, W) to say the image size the model was trained at")


def need(state: dict[str, Any], key: str, source: str) -> Any:
    """``state[key]``, or a :class:`CheckpointError` naming the missing key."""
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r}; this is not a checkpoint of the expected layout")
    return state[key]


def count_blocks(keys, prefix: str, source: str) -> int:
    """How many consecutive ``{prefix}{i}...`` blocks, from 0, the keys hold."""
    ids = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".")[0].split("/")[0]
            if head.isdigit():
                ids.add(int(head))
    if not ids:
        raise CheckpointError(f"{source}: no encoder blocks found (no key starts with {prefix!r})")
    depth = max(ids) + 1
    missing = sorted(set(range(depth)) - ids)
    if missing:
        raise CheckpointError(f"{source}: encoder block {prefix}{missing[0]} is missing")
    return depth


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Separate q, k, v projections ``(D, ...)`` -> vitlab's fused ``qkv`` ``(3D, ...)`` (weights or biases)."""
    return torch.cat([q, k, v])


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vitlab's fused ``qkv`` ``(3D, ...)`` -> q, k, v ``(D, ...)`` (the reverse of :func:`merge_qkv`)."""
    q, k, v = qkv.chunk(3)
    return q, k, v


def make_config(fields: dict[str, Any], overrides: dict[str, Any], source: str) -> ViTConfig:
    """The config inferred from a file, with the user's overrides on top (validated, errors name ``source``)."""
    return config_from_dict(ViTConfig, {**fields, **overrides}, source=source)


def build_and_load(config: ViTConfig, state: dict[str, torch.Tensor], source: str) -> VisionTransformer:
    """Build a model of ``config`` holding the (already renamed) ``state``, strictly, in eval mode."""
    return VisionTransformer.from_state_dict(config, state, source=source).eval()
