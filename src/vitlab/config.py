"""Configuration dataclasses and their validation; YAML/JSON load and save with ``key=value`` overrides.

A preset is data: a :class:`ViTConfig` with a name. Defaults live here and nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from vitlab._device import PRECISIONS
from vitlab.errors import ConfigError

T = TypeVar("T")

PATCH_EMBEDS = ("conv", "linear", "conv_stem", "shifted")
POS_EMBEDS = ("learned", "sincos", "none")
POOLS = ("cls", "mean", "map")
# The MLP's nonlinearity: exact GELU; its tanh approximation (SigLIP, the JAX ViTs); QuickGELU, x * sigmoid(1.702 x)
# (OpenAI's CLIP). Peers name them gelu / gelu_pytorch_tanh / quick_gelu (Hugging Face), nn.GELU / quick_gelu (timm).
MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def conv_stem_channels(hidden_dim: int, patch_size: int) -> list[int]:
    """Output channels of the stride-2 3x3 convolutions of a ``conv_stem`` patch embedding for a patch of
    ``2**k`` pixels: 64, 128, 256, ... as in the ViT-B stem of Xiao et al. (2021), capped at ``hidden_dim``."""
    k = patch_size.bit_length() - 1
    return [min(64 * 2 ** i, hidden_dim) for i in range(k)]


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
    patch_embed: str = "conv"  # "conv" (strided convolution), "linear" (unfold + linear), "conv_stem"
    # (3x3 stride-2 convolutions + BatchNorm + ReLU, then 1x1: Xiao et al. 2021; square power-of-2 patches), or
    # "shifted" (SL-ViT's shifted patch tokenization: the image and 4 copies moved half a patch diagonally, patched
    # together, LayerNorm, linear; Lee et al. 2021)
    stem_extra_convs: int = 0  # conv_stem only: stride-1 3x3 conv + BatchNorm + ReLU layers after the stride-2
    # ones, at the token grid's resolution (a small hybrid ViT, in the spirit of the paper's ResNet hybrids)
    patch_embed_bias: bool = True  # False: the patch projection has no bias (CLIP)
    class_token: bool = True
    distillation_token: bool = False  # DeiT's second learned token, after the class token
    register_tokens: int = 0  # learned tokens after the class (and distillation) token that no output reads
    # ("Vision Transformers Need Registers", DINOv2 with registers); they are in the hidden states, not in maps
    pos_embed: str = "learned"  # "learned", "sincos" (fixed 2-D) or "none"
    pos_embed_patches_only: bool = False  # positions for the patches only, none for the tokens before them
    # (timm's no_embed_class: DeiT III, DINOv2 with registers); False: one per token, class token first
    pos_resize_antialias: bool = False  # resizing the position grid to a new image size: antialiased bicubic
    # (as timm does) instead of plain bicubic (as Hugging Face's ViT, DeiT, DINOv2, CLIP and SigLIP do)
    norm_before_blocks: bool = False  # a LayerNorm on the tokens before the first block (CLIP's ln_pre)
    pool: str = "cls"  # "cls" (class token), "mean" (mean of the patch tokens) or "map" (multi-head attention
    # pooling: a learned probe attends over the patch tokens, then a residual MLP; SigLIP, timm's global_pool='map')
    distillation_head: bool = False  # DeiT: a second head reads the distillation token; the logits are the mean
    # of the two heads' (without classes: the mean of the two tokens)
    mlp_activation: str = "gelu"  # "gelu" (exact), "gelu_tanh" (tanh approximation) or "quick_gelu": see
    # MLP_ACTIVATIONS
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth rate of the last block; linear from 0 over the blocks
    patch_dropout: float = 0.0  # training only: this fraction of each image's patch tokens is left out at random
    # after the positions are added (PatchDropout, Liu et al. 2022; timm's patch_drop_rate): fewer tokens, a
    # cheaper step; the prefix tokens always stay, and evaluation sees every patch
    layer_scale: float | None = None  # initial value of the per-channel residual scales, None = off
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    locality_attention: bool = False  # SL-ViT's locality self-attention (Lee et al. 2021): a learned temperature
    # per head (initialised to 1/sqrt(head_dim)) and no token attending to itself
    final_norm: bool = True
    norm_after_pool: bool = False  # final norm on the pooled vector instead of every token (timm's fc_norm)
    representation_dim: int | None = None  # the paper's pre-logits layer (Linear + tanh), None = off
    projection_dim: int | None = None  # CLIP's projection of the pooled vector into the image-text embedding
    # space (Linear without bias), before the head; None = off
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
        """Tokens before the patches: class, distillation, registers (in that order)."""
        return int(self.class_token) + int(self.distillation_token) + self.register_tokens

    @property
    def num_pos_prefix_tokens(self) -> int:
        """How many of the prefix tokens have a position embedding: all of them, or none."""
        return 0 if self.pos_embed_patches_only else self.num_prefix_tokens

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
        if not isinstance(self.locality_attention, bool):
            raise ConfigError(f"ViTConfig.locality_attention={self.locality_attention!r} must be true or false")
        if self.patch_embed == "conv_stem":
            ph, pw = self.patch_size
            if ph != pw or ph < 2 or ph & (ph - 1):
                raise ConfigError(f"ViTConfig.patch_embed='conv_stem' needs a square power-of-2 patch (2, 4, 8, 16, "
                                  f"...), got patch_size={self.patch_size}: change patch_size or use "
                                  "patch_embed='conv'")
        extra = self.stem_extra_convs
        if not isinstance(extra, int) or isinstance(extra, bool) or extra < 0:
            raise ConfigError(f"ViTConfig.stem_extra_convs={extra!r} must be a non-negative integer")
        if extra and self.patch_embed != "conv_stem":
            raise ConfigError(f"ViTConfig.stem_extra_convs={extra} needs patch_embed='conv_stem' (got "
                              f"{self.patch_embed!r}): set patch_embed='conv_stem' or stem_extra_convs=0")
        if self.pool == "cls" and not self.class_token:
            raise ConfigError("ViTConfig.pool='cls' needs class_token=True: set pool='mean' or class_token=True")
        self._validate_families()
        for name in ("dropout", "attention_dropout", "drop_path", "patch_dropout"):
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

    def _validate_families(self) -> None:
        """The fields of today's pretrained families (DeiT, registers, CLIP, SigLIP) and how they combine."""
        regs = self.register_tokens
        if not isinstance(regs, int) or isinstance(regs, bool) or regs < 0:
            raise ConfigError(f"ViTConfig.register_tokens={regs!r} must be a non-negative integer")
        if self.distillation_token and not self.class_token:
            raise ConfigError("ViTConfig.distillation_token=True needs class_token=True (DeiT puts it after the "
                              "class token)")
        if self.distillation_head:
            if not self.distillation_token:
                raise ConfigError("ViTConfig.distillation_head=True needs distillation_token=True (it reads that "
                                  "token)")
            if self.pool != "cls" or self.norm_after_pool or self.representation_dim or self.projection_dim:
                raise ConfigError("ViTConfig.distillation_head=True needs pool='cls' and no norm_after_pool, "
                                  "representation_dim or projection_dim (DeiT's heads read the two tokens directly)")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ConfigError(f"ViTConfig.mlp_activation={self.mlp_activation!r} is not one of "
                              f"{', '.join(MLP_ACTIVATIONS)}")
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int)
                                                or isinstance(self.projection_dim, bool) or self.projection_dim < 1):
            raise ConfigError(f"ViTConfig.projection_dim={self.projection_dim!r} must be a positive integer or null")
        if self.projection_dim and self.representation_dim:
            raise ConfigError("ViTConfig.projection_dim and representation_dim are both a layer before the head; "
                              "set one of them")

    def replace(self, **changes: Any) -> "ViTConfig":
        """A copy with some fields changed (validated). Changing ``num_classes`` drops stale ``labels``."""
        if "num_classes" in changes and "labels" not in changes and changes["num_classes"] != self.num_classes:
            changes["labels"] = None
        return config_from_dict(ViTConfig, {**to_dict(self), **changes})

    def flops_per_image(self) -> int:
        """Forward multiply-adds x 2 for one image, counted from the architecture.

        Counts the patch projection (or the convolutions of a conv stem), qkv, attention scores and weighted
        sum, output projection, MLP, an attention pool, the projection, pre-logits and head(s); ignores norms,
        activations, softmax and additions (a few percent).
        """
        d, n = self.hidden_dim, self.num_patches + self.num_prefix_tokens
        if self.patch_embed == "conv_stem":
            (h, w), c_in, macs = self.image_size, self.in_channels, 0
            for c_out in conv_stem_channels(d, self.patch_size[0]):
                h, w = (h + 1) // 2, (w + 1) // 2  # 3x3, stride 2, padding 1
                macs += h * w * 9 * c_in * c_out
                c_in = c_out
            macs += self.stem_extra_convs * h * w * 9 * c_in * c_in  # stride-1 3x3 convs
            macs += self.num_patches * c_in * d  # the 1x1 projection
        else:  # conv, linear; shifted sees 5 copies of the image
            patch_in = self.in_channels * self.patch_size[0] * self.patch_size[1]
            macs = self.num_patches * patch_in * d * (5 if self.patch_embed == "shifted" else 1)
        per_block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * self.mlp_dim
        macs += self.depth * per_block
        if self.pool == "map":  # the probe's query, keys and values of the patches, scores and sum, output, MLP
            n_pool = self.num_patches
            macs += d * d + n_pool * d * 2 * d + 2 * n_pool * d + d * d + 2 * d * self.mlp_dim
        head_in = d
        for extra in (self.projection_dim, self.representation_dim):
            if extra:
                macs += head_in * extra
                head_in = extra
        macs += head_in * self.num_classes * (2 if self.distillation_head else 1)
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
    except ConfigError as e:  # a value that cannot work: say which file it came from
        if not source:
            raise
        raise ConfigError(f"{where}{e}") from None


def check_num_heads(overrides: dict[str, Any], stored: int, source: str, field: str) -> None:
    """Refuse a ``num_heads`` override that contradicts the head count a checkpoint stores (``field`` says where).

    The fused qkv weight has the same shape for any head count, so a wrong one would load silently and compute
    something else.
    """
    given = overrides.get("num_heads")
    if given is not None and given != stored:
        raise ConfigError(f"{source}: num_heads={given!r} but the file's {field} is {stored}; leave num_heads unset "
                          f"(the file gives it) or pass {stored}")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers and booleans as YAML 1.2 does: ``1e-3`` is a float (YAML 1.1, which
    PyYAML follows, wants ``1.0e-3`` and reads ``1e-3`` as a string), and only true/false are booleans (YAML 1.1
    also reads yes/no/on/off, so ``--set calibrate=yes`` passed and ``--set name=no`` became False); recipes and
    ``--set`` agree."""


_Yaml12Loader.yaml_implicit_resolvers = {  # the 1.1 bool resolver out, the 1.2 one in (below)
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """Parse YAML text safely (no Python objects), with YAML 1.2 numbers (see :class:`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(text: str) -> tuple[str, Any]:
    """``"lr=3e-4" -> ("lr", 0.0003)``: the value is parsed as YAML, so numbers, booleans, lists and null work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
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
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def dump_yaml(data: dict[str, Any]) -> str:
    """A dict as YAML text, keys in their given order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


NORMALIZATIONS = ("auto", "data", "imagenet", "inception", "clip")
DEVICES = ("auto", "cpu", "cuda", "mps")
LR_DECAYS = ("cosine", "linear")  # after the warmup: vitlab.training.optim.lr_at
TEACHERS = ("airbench94",)  # CNN teachers for distillation: vitlab.training.teacher


@dataclass
class TrainConfig:
    """Everything one training run needs, as flat named values (the CLI's ``--set key=value`` sets any of them).

    ``batch_size`` is the *global* batch: per process and per accumulation step the loader gives
    ``batch_size / (world_size * accum_steps)`` images, so the same config trains the same way on 1 or N
    processes. A recipe YAML file holds a subset of these fields.
    """

    # what to train on what
    model: str = "vit-digits-p2"  # a preset name (`vitlab models`)
    data: str = "digits"  # a data spec: digits, mnist:DIR, cifar10:DIR, folder:DIR, ...
    recipe: str | None = None  # the recipe these values came from (informational)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ViTConfig fields, e.g. {depth: 4}
    image_size: int | list[int] | None = None  # input size; None = the model's
    drop_path: float | None = None  # overrides the model's
    dropout: float | None = None  # overrides the model's
    init: str | None = None  # pretrained weights (any format vitlab.interop.load_pretrained reads)
    linear_probe: bool = False  # train the head only
    # airbench's whitening initialisation of the first convolution (patch_embed conv or conv_stem) from the
    # patches of the first 5000 training images; a fresh run only (not with `init`)
    whiten_stem: bool = False
    layer_decay: float | None = None  # layer-wise lr decay for fine-tuning (e.g. 0.75)
    # schedule and optimiser
    epochs: int = 30
    batch_size: int = 128  # global batch (all processes, all accumulation steps)
    accum_steps: int = 1
    lr: float = 2e-3  # peak learning rate
    min_lr: float = 1e-5  # end of the decay
    warmup_epochs: float = 3.0  # linear warmup from 0, then the decay to min_lr
    lr_decay: str = "cosine"  # "cosine" or "linear" (a straight line down: with the warmup, airbench94's triangle)
    weight_decay: float = 0.05  # AdamW; never on norms, biases, position embeddings, class token
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float | None = 1.0  # max global grad norm; None = off
    label_smoothing: float = 0.1
    ema_decay: float | None = None  # EMA of the weights (e.g. 0.999), evaluated alongside
    # airbench's Lookahead: every 5 steps slow weights move toward the model (by 1 - 0.95^5 t^3 at progress t of
    # the schedule) and the model restarts from them; a run ends on the slow weights
    lookahead: bool = False
    time_limit_minutes: float | None = None  # stop after this much training; the schedule is fitted to it
    stop_after_epoch: int | None = None  # stop cleanly after this epoch (schedule still laid out for `epochs`)
    # input normalisation: "auto" = with `init`, the pretrained weights' mean/std where the checkpoint says
    # (vitlab.interop.load_pretrained), else the training split's per-channel mean/std ("data");
    # "imagenet" = (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225); "inception" = 0.5/0.5; "clip" = OpenAI CLIP's
    normalize: str = "auto"
    # augmentation (the keyword arguments of vitlab.data.TrainTransform)
    crop_padding: int = 0
    hflip: bool = False
    random_resized_crop: list[float] | None = None  # scale range, e.g. [0.35, 1.0]
    auto_augment: str | None = None  # e.g. "rand-m9-n2", "trivial"
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    # DeiT's hard distillation from a CNN teacher trained first, in the same run and time limit: `teacher_epochs`
    # of airbench94's network and recipe (vitlab.training.teacher); the distillation head learns the teacher's
    # class of each training input, the class head the labels (half the loss each). The model needs DeiT's
    # token and head: model_overrides {distillation_token: true, distillation_head: true}
    teacher: str | None = None
    teacher_epochs: float = 10.0
    # progressive resizing [scale, start, end]: train at `scale` of the image size until `start` of the schedule
    # (a fraction of its steps), then at a size growing to the full one by `end` (vitlab.training.resize)
    progressive_resize: list[float] | None = None
    # data loading
    val_fraction: float = 0.1
    workers: int | None = None
    cache_dir: str | None = None
    skip_bad_files: bool = False
    # machinery
    precision: str = "auto"  # auto (bf16 where the device has fast bf16 matmul, else fp32), fp32, bf16, fp16 (GPU)
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    threads: int | None = None  # CPU threads for PyTorch (torch.set_num_threads); None = PyTorch's default
    seed: int = 0
    eval_every: int = 1  # evaluate on the test split every N epochs (and after the last)
    eval_batch_size: int = 512
    tta_hflip: bool = False  # evaluate each test image with its mirror image too (mean of the probabilities)
    # the run's final evaluation (eval.json, `vitlab eval`) also scores those views moved this many pixels
    # diagonally, weighing half (airbench's multi-crop); the per-epoch curve keeps the views above
    tta_shift: int = 0
    plots: bool = True  # write curves.png and confusion_matrix.png at the end
    # hold out val_fraction of the training images (unless the data has a val/ folder of its own) and fit a
    # temperature for the logits on them at the end (temperature scaling; `vitlab calibrate RUN` refits it)
    calibrate: bool = False
    out: str | None = None  # run folder; None = runs/<model>-<data>-<time>
    resume: str | None = None  # a run folder to continue exactly

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that cannot work."""
        self._check_schedule()
        self._check_regularisation()
        self._check_augmentation()
        self._check_run()

    def _bad(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} {why}")

    def _check_schedule(self) -> None:
        """The data, the batch and the optimiser's numbers."""
        bad = self._bad
        for name in ("model", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "must be a non-empty string")
        for name in ("epochs", "batch_size", "accum_steps", "eval_every", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "must be a positive integer")
        if self.batch_size % self.accum_steps:
            raise bad("batch_size", f"must be divisible by accum_steps={self.accum_steps}")
        for name in ("lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing", "random_erasing",
                     "mixup_alpha", "cutmix_alpha", "mix_prob", "val_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or value != value:
                raise bad(name, "must be a number >= 0")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.min_lr > self.lr:
            raise bad("min_lr", f"must be <= lr={self.lr}")
        if self.lr_decay not in LR_DECAYS:
            raise bad("lr_decay", f"must be one of {', '.join(LR_DECAYS)}, not {self.lr_decay!r}")
        for name in ("random_erasing", "mix_prob"):
            if getattr(self, name) > 1:
                raise bad(name, "must be in [0, 1]")
        if not self.label_smoothing < 1:
            raise bad("label_smoothing", "must be in [0, 1)")
        if not self.val_fraction < 1:
            raise bad("val_fraction", "must be in [0, 1)")

    def _check_regularisation(self) -> None:
        """Clipping, EMA, Lookahead, layer decay, the time limit, drop path, dropout, AdamW's betas."""
        bad = self._bad
        if self.clip_grad is not None and not (isinstance(self.clip_grad, (int, float)) and self.clip_grad > 0):
            raise bad("clip_grad", "must be a positive number or null (off)")
        if self.ema_decay is not None and not (isinstance(self.ema_decay, (int, float)) and 0 < self.ema_decay < 1):
            raise bad("ema_decay", "must be in (0, 1) (e.g. 0.999) or null (off)")
        if not isinstance(self.lookahead, bool):
            raise bad("lookahead", "must be true or false")
        if self.layer_decay is not None and not (isinstance(self.layer_decay, (int, float))
                                                 and 0 < self.layer_decay <= 1):
            raise bad("layer_decay", "must be in (0, 1] or null (off)")
        if self.time_limit_minutes is not None and not (isinstance(self.time_limit_minutes, (int, float))
                                                        and self.time_limit_minutes > 0):
            raise bad("time_limit_minutes", "must be a positive number of minutes or null")
        if self.stop_after_epoch is not None and not (isinstance(self.stop_after_epoch, int)
                                                      and 1 <= self.stop_after_epoch):
            raise bad("stop_after_epoch", "must be a positive integer or null")
        for name in ("drop_path", "dropout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise bad(name, "must be a probability in [0, 1) or null (the model's)")
        if not (isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)):
            raise bad("betas", "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        self.betas = [float(b) for b in self.betas]

    def _check_augmentation(self) -> None:
        """The augmentation, the teacher, the stem's whitening and the test-time views."""
        bad = self._bad
        if self.random_resized_crop is not None:
            rrc = self.random_resized_crop
            if not (isinstance(rrc, (list, tuple)) and len(rrc) == 2 and 0 < rrc[0] <= rrc[1] <= 1):
                raise bad("random_resized_crop", "must be a scale range [min, max] with 0 < min <= max <= 1")
            self.random_resized_crop = [float(x) for x in rrc]
        if self.progressive_resize is not None:
            pr = self.progressive_resize
            if not (isinstance(pr, (list, tuple)) and len(pr) == 3
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pr)
                    and 0 < pr[0] < 1 and 0 <= pr[1] <= pr[2] <= 1):
                raise bad("progressive_resize", "must be [scale, start, end] with 0 < scale < 1 and "
                          "0 <= start <= end <= 1 (e.g. [0.75, 0.4, 0.8])")
            self.progressive_resize = [float(x) for x in pr]
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise bad("crop_padding", "must be an integer >= 0")
        if self.teacher is not None and self.teacher not in TEACHERS:
            raise bad("teacher", f"must be one of {', '.join(TEACHERS)} or null (no distillation)")
        if not (isinstance(self.teacher_epochs, (int, float)) and not isinstance(self.teacher_epochs, bool)
                and self.teacher_epochs > 0):
            raise bad("teacher_epochs", "must be a positive number of epochs (e.g. 10, airbench94's)")
        if not isinstance(self.whiten_stem, bool):
            raise bad("whiten_stem", "must be true or false")
        if self.whiten_stem and self.init:
            raise bad("whiten_stem", f"would overwrite the pretrained first convolution of init={self.init!r}: "
                      "leave it false when fine-tuning")
        if not isinstance(self.tta_shift, int) or isinstance(self.tta_shift, bool) or self.tta_shift < 0:
            raise bad("tta_shift", "must be an integer >= 0 (pixels; 0: no moved views)")

    def _check_run(self) -> None:
        """Normalisation, precision, device, the model's overrides, the image size, threads, seed, calibration."""
        bad = self._bad
        if self.normalize not in NORMALIZATIONS:
            raise bad("normalize", f"is not one of {', '.join(NORMALIZATIONS)}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"is not one of {', '.join(PRECISIONS)}")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in DEVICES:
            raise bad("device", f"must be one of {', '.join(DEVICES)} (or cuda:N)")
        if not isinstance(self.model_overrides, dict):
            raise bad("model_overrides", "must be a mapping of ViTConfig fields, e.g. {depth: 4}")
        if self.image_size is not None:
            self.image_size = list(pair(self.image_size, "TrainConfig.image_size"))
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise bad("threads", "must be a positive integer or null (PyTorch's default)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise bad("seed", "must be an integer")
        if not isinstance(self.calibrate, bool):
            raise bad("calibrate", "must be true or false")
        if self.calibrate and not self.val_fraction > 0:
            raise bad("val_fraction", "must be > 0 with calibrate=true: that fraction of the training images is "
                      "held out to fit the temperature on")

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed."""
        return config_from_dict(TrainConfig, {**to_dict(self), **changes})


def load_train_config(recipe: str | Path | None = None, overrides: Sequence[str] = (),
                      **fields_: Any) -> TrainConfig:
    """Build a :class:`TrainConfig`: defaults, then the recipe (a name in ``vitlab/recipes`` or a YAML file,
    e.g. a run's ``config.yaml``), then keyword ``fields_`` that are not None, then ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if recipe is not None:
        path = recipe_path(recipe)
        data = load_yaml(path)
        for key in RECIPE_META_KEYS:
            data.pop(key, None)
        if data.get("recipe") is None:
            data["recipe"] = Path(path).stem if Path(path).parent == RECIPES_DIR else str(path)
    data.update({k: v for k, v in fields_.items() if v is not None})
    data = apply_overrides(data, overrides)
    return config_from_dict(TrainConfig, data, source=str(recipe) if recipe else None)


RECIPES_DIR = Path(__file__).parent / "recipes"
RECIPE_META_KEYS = ("description", "measured")  # documentation in a recipe file, not TrainConfig fields


def recipe_path(recipe: str | Path) -> Path:
    """A recipe name (``mnist``) -> the packaged YAML file; a path -> itself. Unknown names are a ConfigError."""
    text = str(recipe)
    if text.endswith((".yaml", ".yml")) or "/" in text or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"recipe file {path} not found")
        return path
    path = RECIPES_DIR / f"{text}.yaml"
    if not path.is_file():
        import difflib

        names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(text, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown recipe {text!r}: {hint}`vitlab recipes` lists them ({', '.join(names)})")
    return path


__all__ = [
    "ViTConfig", "pair", "to_dict", "config_from_dict", "parse_override", "apply_overrides", "load_yaml",
    "dump_yaml", "TrainConfig", "load_train_config", "recipe_path", "RECIPES_DIR",
]
