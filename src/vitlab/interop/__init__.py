"""Pretrained ViTs in every common format -> vitlab, and vitlab -> ONNX / Hugging Face.

``load_pretrained(path)`` reads, from local files only:

- a vitlab ``save_pretrained`` folder, or a run folder (its ``best/``, else ``last/``);
- a Hugging Face folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) of ViT, DeiT
  (distilled too), DINOv2 (with registers too), CLIP's or SigLIP's image tower;
- a timm ``vision_transformer`` state dict (``.safetensors``, ``.pth``, ``.pt``, ``.bin``), including the
  ``fc_norm`` / global-average-pool variants, DeiT (distilled), DeiT III, registers, DINOv2, CLIP and SigLIP;
- a torchvision ``vit_b_16``-style state dict (``.pth``);
- a google-research ``.npz`` checkpoint (``ViT-B_16.npz`` and friends, with or without ``opt/target/``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open

from vitlab._files import load_safetensors, read_json
from vitlab.data.transforms import IMAGENET_MEAN_STD, INCEPTION_MEAN_STD, Preprocess
from vitlab.errors import CheckpointError, ConfigError
from vitlab.interop._common import build_and_load, check_num_heads, make_config, patch_weight, read_state_dict
from vitlab.interop.hf import HF_PREPROCESSOR, export_hf, hf_refusal, is_hf_folder, load_hf_folder
from vitlab.interop.hf_layouts import MODEL_TYPES
from vitlab.interop.jax_npz import is_jax_npz, load_jax_npz, read_npz_keys
from vitlab.interop.onnx_export import export_onnx
from vitlab.interop.timm import export_timm, is_timm_state_dict, load_timm, timm_model, unsupported_family
from vitlab.interop.torchvision import is_torchvision_state_dict, load_torchvision, torchvision_model
from vitlab.models import VisionTransformer, class_probabilities
from vitlab.runs import CONFIG_JSON, WEIGHTS, read_preprocess, read_temperature, resolve_checkpoint, write_preprocess

log = logging.getLogger(__name__)

FORMATS = ("vitlab", "hf", "timm", "torchvision", "jax")
_STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def _vitlab_folder(path: Path) -> Path | None:
    """The save_pretrained folder ``path`` names, found as training finds it (itself, or a run folder's
    ``best/``, ``.best.old``, ``last/``, ``.last.old``), or None when that is not a vitlab checkpoint. A corrupt
    ``config.json`` is named, not taken for another format."""
    try:
        folder = resolve_checkpoint(path)
    except CheckpointError:
        return None
    data = read_json(folder / CONFIG_JSON)
    # A Hugging Face folder also holds config.json + model.safetensors; vitlab's config names hidden_dim.
    return folder if isinstance(data, dict) and "hidden_dim" in data else None


def _detect(path: Path) -> tuple[str, dict[str, torch.Tensor] | None]:
    """:func:`detect_format`, plus the state dict when telling the format meant reading the whole file (a
    pickled ``.pth/.pt/.bin/.ckpt``), so that the loader need not read it again; else None."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (not found); pass a run folder, a checkpoint folder "
                              "or a weights file")
    if path.is_dir():
        if _vitlab_folder(path):
            return "vitlab", None
        if is_hf_folder(path):
            return "hf", None
        raise CheckpointError(hf_refusal(path) or f"{path}: a folder, but neither a vitlab save_pretrained/run "
                              "folder nor a Hugging Face folder vitlab reads (config.json with model_type "
                              f"{', '.join(MODEL_TYPES)}); pass the weights file itself")
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


def load_pretrained(path: str | Path, *, format: str | None = None, num_heads: int | None = None,
                    **overrides: Any) -> VisionTransformer:
    """Load any supported checkpoint (see the module docstring) as a vitlab model in eval mode.

    The model's ``pretrained_normalization`` attribute is the ``(mean, std)`` its inputs were normalised with
    when the checkpoint says so (a vitlab folder's ``preprocess.json``, a Hugging Face folder's
    ``preprocessor_config.json``; torchvision: ImageNet's mean/std; JAX: 0.5/0.5), else None (a timm state
    dict does not say: timm's AugReg ViTs use 0.5/0.5, DeiT ImageNet's). Fine-tuning normalises with it.

    ``format`` skips detection (one of :data:`FORMATS`). The architecture is read from the file; where the
    format does not store the number of heads (timm, torchvision), ``num_heads`` gives it, else the standard
    table by hidden size is used (:data:`vitlab.interop._common.STANDARD_HEADS`); where it does (vitlab, Hugging
    Face, JAX), a different ``num_heads`` raises :class:`~vitlab.errors.ConfigError`. ``overrides`` set other
    :class:`~vitlab.config.ViTConfig` fields (e.g. ``dropout=0.1``, ``drop_path=0.1``, ``pool="mean"``).
    A file whose keys or shapes do not fit raises :class:`CheckpointError` naming the file and the key.
    """
    return _read(Path(path), format, num_heads, overrides)[0]


def _read(path: Path, format: str | None, num_heads: int | None,
          overrides: dict[str, Any]) -> tuple[VisionTransformer, str, Path]:
    """(model with ``pretrained_normalization`` set, format, the checkpoint folder or file it was read from)."""
    fmt, state = (format, None) if format else _detect(path)
    source = resolve_checkpoint(path) if fmt == "vitlab" else path
    model = _load(source, fmt, state, num_heads, dict(overrides))
    model.pretrained_normalization = _normalization(source, fmt, model.config.in_channels)
    return model, fmt, source


def _normalization(path: Path, fmt: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) the checkpoint at ``path`` was trained with, where it or its format says; else None."""
    found = None
    if fmt == "torchvision":
        found = IMAGENET_MEAN_STD
    elif fmt == "jax":
        found = INCEPTION_MEAN_STD
    elif fmt == "hf" and (path / HF_PREPROCESSOR).is_file():
        cfg = read_json(path / HF_PREPROCESSOR)
        if cfg.get("do_normalize", True) and cfg.get("image_mean") is not None and cfg.get("image_std") is not None:
            found = (cfg["image_mean"], cfg["image_std"])
    elif fmt == "vitlab":
        pre = read_preprocess(path)
        if pre and pre.get("mean") is not None and pre.get("std") is not None:
            found = (pre["mean"], pre["std"])
    if found is None:
        return None
    mean, std = (_per_channel(stats, channels) for stats in found)
    return (mean, std) if mean is not None and std is not None else None


def _per_channel(value: Any, channels: int) -> tuple[float, ...] | None:
    """One float per channel from one number (a Hugging Face config may give one for every channel) or a
    sequence of ``channels`` numbers; None for anything else."""
    try:
        stats = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    except (TypeError, ValueError):
        return None
    stats = stats * channels if len(stats) == 1 else stats
    return stats if len(stats) == channels else None


def _load(path: Path, fmt: str, state, num_heads: int | None, overrides: dict[str, Any]) -> VisionTransformer:
    if fmt not in FORMATS:
        raise CheckpointError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    source = str(path)
    if fmt == "timm":
        if state is None:
            return load_timm(path, num_heads=num_heads, **overrides)
        return timm_model(state, source, num_heads=num_heads, **overrides)
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
    folder = _vitlab_folder(path)
    if folder is None:
        raise CheckpointError(f"{path}: not a vitlab save_pretrained folder (config.json + model.safetensors)")
    # VisionTransformer.from_pretrained's reading, with overrides (e.g. patch_embed='linear' on a conv model)
    data = read_json(folder / CONFIG_JSON)
    data.pop("architecture", None)
    if "num_heads" in data:
        check_num_heads(overrides, data["num_heads"], str(folder / CONFIG_JSON), "num_heads")
    config = make_config(data, overrides, str(folder / CONFIG_JSON))
    weights = load_safetensors(folder / WEIGHTS)
    if "patch_embed.proj.weight" in weights:  # patch_embed='linear' on a conv model, or the reverse
        weights["patch_embed.proj.weight"] = patch_weight(weights["patch_embed.proj.weight"], config)
    return build_and_load(config, weights, str(folder / WEIGHTS))


@dataclass
class LoadedModel:
    """A model ready to use: in eval mode on its device, with the preprocessing its inputs need, its class names,
    and where it came from (``path``: the checkpoint folder, e.g. a run's ``best/``, or the file given).
    ``model.pretrained_normalization`` is the (mean, std) the checkpoint says it was trained with, or None.
    ``temperature``: what the logits are divided by before the softmax (fitted by ``vitlab calibrate``; 1 when
    none was), so that the probabilities mean what they say; it never changes which class is on top."""

    model: VisionTransformer
    preprocess: Preprocess
    labels: list[str]
    path: Path
    format: str
    temperature: float = 1.0

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, K)`` of preprocessed ``inputs``: softmax(logits / temperature)."""
        return class_probabilities(self.model(inputs), self.temperature)


def load(path: str | Path, *, format: str | None = None, num_heads: int | None = None, device: str = "cpu",
         mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **overrides: Any) -> LoadedModel:
    """The one way to load a trained model or a pretrained checkpoint, with its preprocessing.

    ``path``: a run folder (its ``best/``, else ``last/``), a ``save_pretrained`` folder, or any file or folder
    :func:`load_pretrained` reads (Hugging Face, timm, torchvision, JAX ``.npz``); ``format``, ``num_heads`` and
    ``overrides`` are passed on to it. The inputs are normalised as the checkpoint says (its ``preprocess.json``,
    a Hugging Face ``preprocessor_config.json``, or the format's convention); ``mean``/``std`` override that, and
    where nothing says, 0.5 per channel is used with a warning. A vitlab checkpoint's fitted temperature (its
    ``preprocess.json``) is ``temperature``; other formats carry none (1). ``vitlab.load`` is this function.
    """
    model, fmt, source = _read(Path(path), format, num_heads, overrides)
    c, normalization = model.config, model.pretrained_normalization
    if (mean is None or std is None) and normalization is None:
        log.warning("%s: the checkpoint does not say how its inputs were normalised; using 0.5 per channel "
                    "(pass mean/std if it was trained with others)", path)
    known = normalization or ((0.5,) * c.in_channels, (0.5,) * c.in_channels)
    given = {"mean": known[0] if mean is None else mean, "std": known[1] if std is None else std}
    stats = {name: _per_channel(value, c.in_channels) for name, value in given.items()}
    for name, value in stats.items():
        if value is None:
            raise ConfigError(f"{name}={given[name]!r} must be one number or {c.in_channels} (one per channel)")
    preprocess = Preprocess(image_size=tuple(c.image_size), channels=c.in_channels, **stats)
    labels = list(c.labels) if c.labels else [f"class_{i}" for i in range(c.num_classes)]
    return LoadedModel(model=model.to(device).eval(), preprocess=preprocess, labels=labels, path=source, format=fmt,
                       temperature=_temperature(source, fmt))


def _temperature(source: Path, fmt: str) -> float:
    """The fitted temperature of a vitlab checkpoint (1 when none was fitted); other formats carry none."""
    return read_temperature(source) if fmt == "vitlab" else 1.0


def convert(src: str | Path | VisionTransformer, dst: str | Path, *, format: str | None = None,
            num_heads: int | None = None, **overrides: Any) -> Path:
    """Write ``src`` (any checkpoint :func:`load_pretrained` reads, or a model it loaded) to ``dst`` as a vitlab
    ``save_pretrained`` folder, with its ``preprocess.json`` when the checkpoint says how it normalised."""
    model = src if isinstance(src, VisionTransformer) else load_pretrained(src, format=format, num_heads=num_heads,
                                                                            **overrides)
    out = model.save_pretrained(dst)
    if getattr(model, "pretrained_normalization", None) is not None:  # so fine-tuning it normalises the same
        mean, std = model.pretrained_normalization
        write_preprocess(out, mean=mean, std=std, image_size=model.config.image_size,
                         channels=model.config.in_channels)
    return out


EXPORT_FORMATS = {"onnx": export_onnx, "hf": export_hf, "timm": export_timm}


def export(model_or_path: VisionTransformer | LoadedModel | str | Path, out: str | Path, *,
           format: str = "onnx") -> Path:
    """Export a model (a loaded one, or any checkpoint :func:`load` reads) as ``onnx`` (a file), ``hf`` (a
    transformers folder) or ``timm`` (a ``vision_transformer`` state dict, ``.safetensors``).

    A fitted temperature (``LoadedModel.temperature`` != 1) goes with it where the format can carry it: the ONNX
    graph divides its logits by it; a Hugging Face folder's config.json records it as ``logit_temperature``, which
    transformers does not apply (a warning says so); a timm state dict cannot hold it (a warning says so)."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if isinstance(model_or_path, (str, Path)):
        model, fmt, source = _read(Path(model_or_path), None, None, {})
        temperature = _temperature(source, fmt)
    elif isinstance(model_or_path, LoadedModel):
        model, temperature = model_or_path.model, model_or_path.temperature
    else:
        model, temperature = model_or_path, 1.0
    if temperature == 1.0:
        return EXPORT_FORMATS[format](model, out)
    if format == "onnx":
        return export_onnx(model, out, temperature=temperature)
    path = export_hf(model, out, temperature=temperature) if format == "hf" else export_timm(model, out)
    log.warning("the model's fitted temperature %.4f is not applied by a %s export: divide its logits by it "
                "before the softmax%s", temperature, format,
                " (config.json records it as 'logit_temperature')" if format == "hf" else "")
    return path


__all__ = ["FORMATS", "detect_format", "load", "LoadedModel", "load_pretrained", "convert", "export", "export_onnx",
           "export_hf", "export_timm", "load_hf_folder", "load_timm", "load_torchvision", "load_jax_npz"]
