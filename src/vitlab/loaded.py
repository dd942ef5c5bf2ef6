"""A model ready to use: :class:`LoadedModel` (the network in eval mode, its preprocessing, class names,
temperature, and where it came from), and :func:`load_checkpoint`, which makes one from a vitlab folder.

Above the network and the data (a LoadedModel holds both halves), below everything that uses a trained model:
evaluation, explanation, the server, the notebook. ``vitlab.load`` (:mod:`vitlab.api`) reads the foreign formats
too and makes its LoadedModel with :func:`loaded_model`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from vitlab.checkpoints import model_folder, read_preprocess, read_temperature, resolve_checkpoint, run_of
from vitlab.data.transforms import Preprocess
from vitlab.errors import CheckpointError, ConfigError
from vitlab.models import VisionTransformer, class_probabilities

log = logging.getLogger(__name__)

Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std), one float per channel each


@dataclass
class LoadedModel:
    """A model ready to use: in eval mode on its device, with the preprocessing its inputs need, its class names,
    and where it came from (``path``: the checkpoint folder, e.g. a run's ``best/``, or the file given; ``run``:
    the run folder it belongs to, or None; ``format``: one of ``vitlab.interop.FORMATS``).
    ``temperature``: what the logits are divided by before the softmax (fitted by ``vitlab calibrate``; 1 when
    none was), so that the probabilities mean what they say; it never changes which class is on top."""

    model: VisionTransformer
    preprocess: Preprocess
    labels: list[str]
    path: Path
    format: str
    temperature: float = 1.0
    run: Path | None = None

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, K)`` of preprocessed ``inputs``: softmax(logits / temperature)."""
        return class_probabilities(self.model(inputs), self.temperature)


def per_channel(value: Any, channels: int) -> tuple[float, ...] | None:
    """One float per channel from one number (a Hugging Face config may give one for every channel) or a
    sequence of ``channels`` numbers; None for anything else."""
    try:
        stats = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    except (TypeError, ValueError):
        return None
    stats = stats * channels if len(stats) == 1 else stats
    return stats if len(stats) == channels else None


def loaded_model(model: VisionTransformer, normalization: Normalization | None, *, path: Path, format: str,
                 temperature: float = 1.0, run: Path | None = None, device: str | torch.device = "cpu",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> LoadedModel:
    """``model`` as a :class:`LoadedModel` on ``device``: its inputs normalised with ``normalization`` (what the
    checkpoint says), ``mean``/``std`` overriding it, and 0.5 per channel with a warning where nothing says."""
    c = model.config
    if (mean is None or std is None) and normalization is None:
        log.warning("%s: the checkpoint does not say how its inputs were normalised; using 0.5 per channel "
                    "(pass mean/std if it was trained with others)", path)
    known = normalization or ((0.5,) * c.in_channels, (0.5,) * c.in_channels)
    given = {"mean": known[0] if mean is None else mean, "std": known[1] if std is None else std}
    stats = {name: per_channel(value, c.in_channels) for name, value in given.items()}
    for name, value in stats.items():
        if value is None:
            raise ConfigError(f"{name}={given[name]!r} must be one number or {c.in_channels} (one per channel)")
    preprocess = Preprocess(image_size=tuple(c.image_size), channels=c.in_channels, **stats)
    labels = list(c.labels) if c.labels else [f"class_{i}" for i in range(c.num_classes)]
    return LoadedModel(model=model.to(device).eval(), preprocess=preprocess, labels=labels, path=path, format=format,
                       temperature=temperature, run=run)


def checkpoint_normalization(folder: str | Path, channels: int) -> Normalization | None:
    """The (mean, std) a vitlab checkpoint folder's ``preprocess.json`` records, or None."""
    pre = read_preprocess(folder)
    if not pre or pre.get("mean") is None or pre.get("std") is None:
        return None
    mean, std = per_channel(pre["mean"], channels), per_channel(pre["std"], channels)
    return (mean, std) if mean is not None and std is not None else None


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, **overrides: Any) -> LoadedModel:
    """A vitlab run folder (its ``best/``, else ``last/``) or model folder as a :class:`LoadedModel`, with the
    normalisation and temperature its ``preprocess.json`` records. ``overrides``: ViTConfig fields, as
    :meth:`VisionTransformer.from_pretrained` takes them."""
    folder = model_folder(path)
    if folder is None:
        resolve_checkpoint(path)  # names a missing path, or a run stopped before its first checkpoint
        raise CheckpointError(f"{path}: not a vitlab run folder or model folder; vitlab.load reads the other "
                              "formats (Hugging Face, timm, torchvision, JAX)")
    model = VisionTransformer.from_pretrained(folder, **overrides)
    return loaded_model(model, checkpoint_normalization(folder, model.config.in_channels), path=folder,
                        format="vitlab", temperature=read_temperature(folder), run=run_of(folder), device=device,
                        mean=mean, std=std)


__all__ = ["LoadedModel", "Normalization", "load_checkpoint", "loaded_model", "checkpoint_normalization",
           "per_channel"]
