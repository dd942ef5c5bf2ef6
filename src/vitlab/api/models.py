"""Loading, converting and exporting a model: ``vitlab.load`` (any format), ``vitlab.convert``, ``vitlab.export``.

The one place that joins vitlab's own format (:func:`vitlab.loaded.load_checkpoint`) and the foreign ones
(:mod:`vitlab.interop`); every verb that takes a checkpoint path loads it here, once (:func:`as_loaded`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from vitlab.checkpoints import model_folder, write_preprocess
from vitlab.errors import ConfigError
from vitlab.interop import (EXPORT_FORMATS, FORMATS, Pretrained, detect_format, export_hf, export_onnx, export_timm,
                            load_pretrained, read_pretrained)
from vitlab.interop.hf import HF_CONFIG
from vitlab.loaded import LoadedModel, load_checkpoint, loaded_model
from vitlab.models import VisionTransformer

log = logging.getLogger("vitlab")


def load(path: str | Path, *, format: str | None = None, num_heads: int | None = None, device: str = "cpu",
         mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **overrides: Any) -> LoadedModel:
    """The one way to load a trained model or a pretrained checkpoint, with its preprocessing.

    ``path``: a run folder (its ``best/``, else ``last/``), a ``save_pretrained`` folder, or any file or folder
    :func:`vitlab.interop.read_pretrained` reads (Hugging Face, timm, torchvision, JAX ``.npz``); ``format``,
    ``num_heads`` and ``overrides`` are passed on to it. The inputs are normalised as the checkpoint says (its
    ``preprocess.json``, a Hugging Face ``preprocessor_config.json``, or the format's convention); ``mean``/``std``
    override that, and where nothing says, 0.5 per channel is used with a warning. A vitlab checkpoint's fitted
    temperature (its ``preprocess.json``) is ``temperature``; other formats carry none (1).
    """
    if format in (None, "vitlab") and (format == "vitlab" or model_folder(path) is not None):
        if num_heads is not None:
            overrides["num_heads"] = num_heads
        return load_checkpoint(path, device=device, mean=mean, std=std, **overrides)
    found = read_pretrained(path, format=format, num_heads=num_heads, **overrides)
    return loaded_model(found.model, found.normalization, path=found.source, format=found.format, device=device,
                        mean=mean, std=std)


def as_loaded(checkpoint: str | Path | LoadedModel, device: str = "cpu") -> LoadedModel:
    """``checkpoint`` itself when it is loaded already, else :func:`load` of it on ``device``."""
    return checkpoint if isinstance(checkpoint, LoadedModel) else load(checkpoint, device=device)


def convert(src: str | Path | Pretrained | LoadedModel | VisionTransformer, dst: str | Path, *,
            format: str | None = None, num_heads: int | None = None, **overrides: Any) -> Path:
    """Write ``src`` (any checkpoint :func:`read_pretrained` reads, or what it or :func:`load` returned) to
    ``dst`` as a vitlab ``save_pretrained`` folder, with its ``preprocess.json`` (the input normalisation) when it
    is known: what the checkpoint says, or a LoadedModel's. A bare VisionTransformer is written without one."""
    if isinstance(src, (str, Path)):
        src = read_pretrained(src, format=format, num_heads=num_heads, **overrides)
    if isinstance(src, VisionTransformer):
        return src.save_pretrained(dst)
    if isinstance(src, LoadedModel):
        model, normalization = src.model, (src.preprocess.mean, src.preprocess.std)
    else:
        model, normalization = src.model, src.normalization
    out = model.save_pretrained(dst)
    if normalization is not None:  # so fine-tuning it normalises the same
        write_preprocess(out, mean=normalization[0], std=normalization[1], image_size=model.config.image_size,
                         channels=model.config.in_channels)
    return out


def export(model_or_path: VisionTransformer | LoadedModel | str | Path, out: str | Path, *,
           format: str = "onnx") -> Path:
    """Export a model (a loaded one, or any checkpoint :func:`load` reads) as ``onnx`` (a file), ``hf`` (a
    transformers folder, with a ``preprocessor_config.json`` of the model's normalisation) or ``timm`` (a
    ``vision_transformer`` state dict, ``.safetensors``).

    A fitted temperature (``LoadedModel.temperature`` != 1) goes with it where the format can carry it: the ONNX
    graph divides its logits by it; a Hugging Face folder's config.json records it as ``logit_temperature``, which
    transformers does not apply (a warning says so); a timm state dict cannot hold it (a warning says so)."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    loaded = load(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    if isinstance(loaded, LoadedModel):
        model, temperature = loaded.model, loaded.temperature
        normalization = (loaded.preprocess.mean, loaded.preprocess.std)
    else:
        model, temperature, normalization = loaded, 1.0, None
    if format == "onnx":
        return export_onnx(model, out, temperature=temperature)
    if format == "hf":
        path = export_hf(model, out, temperature=temperature, normalization=normalization)
    else:
        path = export_timm(model, out)
    if temperature != 1.0:
        log.warning("the model's fitted temperature %.4f is not applied by a %s export: divide its logits by it "
                    "before the softmax%s", temperature, format,
                    f" ({HF_CONFIG} records it as 'logit_temperature')" if format == "hf" else "")
    return path


__all__ = ["load", "as_loaded", "convert", "export", "LoadedModel", "FORMATS", "EXPORT_FORMATS", "detect_format",
           "read_pretrained", "load_pretrained", "Pretrained"]
