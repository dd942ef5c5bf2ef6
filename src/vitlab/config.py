"""Configuration dataclasses and their validation; YAML/JSON load and save with ``key=value`` overrides.

A preset is data: a :class:`ViTConfig` with a name. Defaults live here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence, TypeVar

from vitlab.errors import ConfigError

T = TypeVar("T")

PATCH_EMBEDS = ("conv", "linear")
POS_EMBEDS = ("learned", "sincos", "none")
POOLS = ("cls", "mean")


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``16 -> (16, 16)``; ``(32, 48) -> (32, 48)``; anything else is a :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be an integer or a pair (height, width)")
    if isinstance(value, int):
        return (value, value)
    try:
        h, w = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be an integer or a pair (height, width)") from None
    if not (isinstance(h, int) and isinstance(w, int)) or isinstance(h, bool) or isinstance(w, bool):
        raise ConfigError(f"{name}={value!r} must hold integers")
    return (h, w)


@dataclass
class ViTConfig:
    """Everything that defines a Vision Transformer's architecture (and its class names).

    The defaults are ViT-B/16 at 224 px with 1000 classes, as in the paper.
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    in_channels: int = 3
    num_classes: int = 1000
    hidden_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_embed: str = "conv"  # "conv" (strided convolution) or "linear" (unfold + linear)
    class_token: bool = True
    pos_embed: str = "learned"  # "learned", "sincos" (fixed 2-D) or "none"
    pool: str = "cls"  # "cls" (class token) or "mean" (mean of the patch tokens)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth rate of the last block; linear from 0 over the blocks
    layer_scale: float | None = None  # initial value of the per-channel residual scales, None = off
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    final_norm: bool = True
    norm_after_pool: bool = False  # final norm on the pooled vector instead of every token (timm's fc_norm)
    representation_dim: int | None = None  # the paper's pre-logits layer (Linear + tanh), None = off
    labels: list[str] | None = None  # class names, index = class id

    def __post_init__(self) -> None:
        self.image_size = pair(self.image_size, "image_size")
        self.patch_size = pair(self.patch_size, "patch_size")
        if self.labels is not None:
            self.labels = [str(x) for x in self.labels]
        self.validate()

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along height and width."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that cannot work."""
        for name in ("in_channels", "num_classes", "hidden_dim", "depth", "num_heads", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_classes" else 1):
                raise ConfigError(f"ViTConfig.{name}={value!r} must be a positive integer")
        for i, axis in enumerate(("height", "width")):
            size, patch = self.image_size[i], self.patch_size[i]
            if size < 1 or patch < 1:
                raise ConfigError(f"ViTConfig.image_size={self.image_size} and patch_size={self.patch_size} "
                                  "must be positive")
            if size % patch:
                raise ConfigError(
                    f"ViTConfig.image_size={self.image_size} is not divisible by patch_size={self.patch_size} "
                    f"(image {axis} {size} % patch {patch} = {size % patch}): pick an image size that is a "
                    "multiple of the patch size")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(
                f"ViTConfig.hidden_dim={self.hidden_dim} is not divisible by num_heads={self.num_heads}: "
                f"pick a hidden_dim that is a multiple of num_heads (e.g. {self.num_heads * max(1, round(self.hidden_dim / self.num_heads))})")
        for name, allowed in (("patch_embed", PATCH_EMBEDS), ("pos_embed", POS_EMBEDS), ("pool", POOLS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"ViTConfig.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.norm_after_pool and not self.final_norm:
            raise ConfigError("ViTConfig.norm_after_pool=True needs final_norm=True (it moves that norm)")
        if self.pool == "cls" and not self.class_token:
            raise ConfigError("ViTConfig.pool='cls' needs class_token=True: set pool='mean' or class_token=True")
        for name in ("dropout", "attention_dropout", "drop_path"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"ViTConfig.{name}={value!r} must be a probability in [0, 1)")
        if not self.norm_eps > 0:
            raise ConfigError(f"ViTConfig.norm_eps={self.norm_eps!r} must be > 0")
        if self.layer_scale is not None and not (isinstance(self.layer_scale, (int, float)) and self.layer_scale > 0):
            raise ConfigError(f"ViTConfig.layer_scale={self.layer_scale!r} must be a positive number or null")
        if self.representation_dim is not None and (not isinstance(self.representation_dim, int)
                                                    or self.representation_dim < 1):
            raise ConfigError(f"ViTConfig.representation_dim={self.representation_dim!r} must be a positive "
                              "integer or null")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ConfigError(f"ViTConfig.labels has {len(self.labels)} names but num_classes={self.num_classes}")

    def replace(self, **changes: Any) -> "ViTConfig":
        """A copy with some fields changed (validated). Changing ``num_classes`` drops stale ``labels``."""
        if "num_classes" in changes and "labels" not in changes and changes["num_classes"] != self.num_classes:
            changes["labels"] = None
        return config_from_dict(ViTConfig, {**to_dict(self), **changes})

    def flops_per_image(self) -> int:
        """Forward multiply-adds x 2 for one image, counted from the architecture.

        Counts the patch projection, qkv, attention scores and weighted sum, output projection, MLP,
        pre-logits and head; ignores norms, activations, softmax and additions (a few percent).
        """
        d, n = self.hidden_dim, self.num_patches + self.num_prefix_tokens
        patch_in = self.in_channels * self.patch_size[0] * self.patch_size[1]
        macs = self.num_patches * patch_in * d
        per_block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * self.mlp_dim
        macs += self.depth * per_block
        head_in = d
        if self.representation_dim:
            macs += d * self.representation_dim
            head_in = self.representation_dim
        macs += head_in * self.num_classes
        return 2 * macs


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as a plain dict of JSON/YAML-friendly values (tuples become lists)."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, list):
            value = list(value)
        out[f.name] = value
    return out


def config_from_dict(cls: type[T], data: dict[str, Any], source: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; an unknown key is a :class:`ConfigError` naming it and ``source``."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    where = f"{source}: " if source else ""
    unknown = [k for k in data if k not in known]
    if unknown:
        close = [k for k in known if k.replace("_", "") == unknown[0].replace("_", "").replace("-", "")]
        hint = f" (did you mean {close[0]!r}?)" if close else f"; known fields: {', '.join(sorted(known))}"
        raise ConfigError(f"{where}unknown {cls.__name__} field {unknown[0]!r}{hint}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{where}{cls.__name__}: {e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"lr=3e-4" -> ("lr", 0.0003)``: the value is parsed as YAML, so numbers, booleans, lists and null work."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "3e-4" as a string; a user means a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
            if isinstance(value, float) and math.isnan(value):
                raise ValueError
        except ValueError:
            pass
    return key, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key=value`` overrides applied; dotted keys reach into nested dicts."""
    out = dict(data)
    for text in overrides:
        key, value = parse_override(text)
        target = out
        parts = key.split(".")
        for part in parts[:-1]:
            nested = dict(target.get(part) or {})
            target[part] = nested
            target = nested
        target[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`ConfigError` naming the file when it is missing or malformed."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def dump_yaml(data: dict[str, Any]) -> str:
    """A dict as YAML text, keys in their given order."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


__all__ = [
    "ViTConfig", "pair", "to_dict", "config_from_dict", "parse_override", "apply_overrides", "load_yaml",
    "dump_yaml",
]
