"""Load a trained model for inference with the preprocessing it was trained with; find and read image files.

Shared by prediction, attention figures and reports, so all three see an image exactly as training did:
decoded by :func:`vitlab.data.decode_image` at the model's size and channels, normalised with the
training run's per-channel mean and std.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from vitlab.errors import CheckpointError
from vitlab.models import VisionTransformer

log = logging.getLogger(__name__)

PREPROCESS_NAME = "preprocess.json"


@dataclass
class Preprocess:
    """How an image becomes the model's input: size ``(H, W)``, channels, per-channel mean and std ([0, 1] scale)."""

    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` at the model's size -> float, normalised (same maths as training's eval path)."""
        from vitlab.data import EvalTransform

        return EvalTransform(mean=self.mean, std=self.std, image_size=self.image_size)(images)


@dataclass
class LoadedModel:
    """A model in eval mode, its preprocessing, class names and the checkpoint folder it came from."""

    model: VisionTransformer
    preprocess: Preprocess
    labels: list[str]
    path: Path


def _resolve_checkpoint(path: str | Path) -> Path:
    # Placeholder until vitlab.train.checkpoint.resolve_checkpoint is merged (same contract).
    path = Path(path)
    for candidate in (path / "best", path / "last", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"{path}: neither a run folder (with best/ or last/) nor a checkpoint folder with "
                          "config.json; pass a run folder or a folder written by save_pretrained")


def _load_model(path: Path, map_location: str = "cpu") -> VisionTransformer:
    # Placeholder until vitlab.train.checkpoint.load_model is merged.
    return VisionTransformer.from_pretrained(path, map_location=map_location)


def _as_stats(value, n: int, source: str) -> tuple[float, ...]:
    try:
        stats = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: mean/std must be numbers, got {value!r}") from None
    if len(stats) == 1:
        stats = stats * n
    if len(stats) != n:
        raise CheckpointError(f"{source}: mean/std has {len(stats)} values but the model has {n} channels")
    return stats


def read_normalisation(checkpoint_dir: str | Path) -> tuple[object, object, str] | None:
    """The (mean, std, source file) that training normalised with, or None when no file records it.

    Looked up in ``preprocess.json`` in the checkpoint folder, then the run's ``config.yaml`` (the folder
    above a ``best/``/``last/`` checkpoint): top-level ``mean``/``std`` or under ``data``, and a Hugging Face
    ``preprocessor_config.json`` (``image_mean``/``image_std``).
    """
    checkpoint_dir = Path(checkpoint_dir)
    pre = checkpoint_dir / PREPROCESS_NAME
    if pre.is_file():
        from vitlab._files import read_json

        data = read_json(pre)
        if "mean" in data and "std" in data:
            return data["mean"], data["std"], str(pre)
    for cfg_path in (checkpoint_dir / "config.yaml", checkpoint_dir.parent / "config.yaml"):
        if cfg_path.is_file():
            from vitlab.config import load_yaml

            cfg = load_yaml(cfg_path)
            for section in (cfg, cfg.get("data") if isinstance(cfg.get("data"), dict) else None):
                if section and section.get("mean") is not None and section.get("std") is not None:
                    return section["mean"], section["std"], str(cfg_path)
    hf = checkpoint_dir / "preprocessor_config.json"
    if hf.is_file():
        data = json.loads(hf.read_text(encoding="utf-8"))
        if "image_mean" in data and "image_std" in data:
            return data["image_mean"], data["image_std"], str(hf)
    return None


def load_for_inference(run_or_checkpoint: str | Path, *, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, device: str = "cpu") -> LoadedModel:
    """Load a run folder (its ``best/``, else ``last/``) or a checkpoint folder for prediction.

    ``mean``/``std`` override what the checkpoint recorded; when neither is known, 0.5 per channel is used
    with a warning (predictions may then be off).
    """
    path = _resolve_checkpoint(run_or_checkpoint)
    model = _load_model(path, map_location=device).eval()
    c = model.config
    if mean is None or std is None:
        found = read_normalisation(path)
        if found is None:
            log.warning("%s: no mean/std recorded (preprocess.json or the run's config.yaml); normalising with "
                        "0.5 per channel, pass mean/std if training used others", path)
            found = (0.5, 0.5, "default")
        mean = mean if mean is not None else found[0]
        std = std if std is not None else found[1]
        source = found[2]
    else:
        source = "arguments"
    preprocess = Preprocess(image_size=tuple(c.image_size), channels=c.in_channels,
                            mean=_as_stats(mean, c.in_channels, source), std=_as_stats(std, c.in_channels, source))
    labels = list(c.labels) if c.labels else [f"class_{i}" for i in range(c.num_classes)]
    return LoadedModel(model=model, preprocess=preprocess, labels=labels, path=path)


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand ``paths``: a file is kept as given (whatever its type), a folder gives its image files
    (by extension, recursively, sorted, hidden ones skipped). A missing path is kept: reading it fails with
    a :class:`DataError` naming it, as for a corrupt file."""
    from vitlab.data.images import is_image_file

    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                log.warning("%s: no image files in this folder", p)
            out.extend(found)
        else:
            out.append(p)  # a missing file is reported when it is read, like a corrupt one
    return out


def read_image(path: Path, preprocess: Preprocess, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """One image file as uint8 ``(C, H, W)`` at ``image_size`` (default: the model's), in the model's
    channels; raises :class:`DataError` naming a corrupt or non-image file."""
    from vitlab.data import decode_image

    size = tuple(image_size) if image_size is not None else preprocess.image_size
    return torch.from_numpy(decode_image(path, size, preprocess.channels))


def true_label_from_folder(path: Path, labels: Sequence[str]) -> str | None:
    """The class named by the file's parent folder (``Test/apple/1.jpg`` -> ``apple``), if it is one of
    ``labels``; image-folder datasets are laid out that way."""
    name = path.parent.name
    return name if name in labels else None


__all__ = ["Preprocess", "LoadedModel", "load_for_inference", "read_normalisation", "list_images", "read_image",
           "true_label_from_folder"]
