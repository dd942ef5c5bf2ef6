"""Load a trained model for inference with the preprocessing it was trained with; find and read image files.

Shared by prediction, attention figures and reports, so all three see an image exactly as training did:
decoded by :func:`vitlab.data.decode_image` at the model's size and channels, normalised with the
training run's per-channel mean and std.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from vitlab.errors import CheckpointError
from vitlab.models import VisionTransformer

log = logging.getLogger(__name__)


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

        # One transform for all batches (it keeps its normalisation tensors), rebuilt if a field was changed.
        key = (tuple(self.image_size), tuple(self.mean), tuple(self.std))
        cached = self.__dict__.get("_transform")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_transform"] = (key, EvalTransform(mean=self.mean, std=self.std,
                                                                        image_size=self.image_size))
        return cached[1](images)


@dataclass
class LoadedModel:
    """A model in eval mode, its preprocessing, class names and the checkpoint folder it came from."""

    model: VisionTransformer
    preprocess: Preprocess
    labels: list[str]
    path: Path


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


def load_for_inference(run_or_checkpoint: str | Path, *, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, device: str = "cpu") -> LoadedModel:
    """Load a run folder (its ``best/``, else ``last/``) or a checkpoint folder for prediction.

    The normalisation is the one training recorded in the checkpoint's ``preprocess.json``; ``mean``/``std``
    override it. When neither is known, 0.5 per channel is used with a warning (predictions may be off).
    """
    from vitlab.models.folders import PREPROCESS_NAME, load_preprocess, resolve_checkpoint
    from vitlab.train.checkpoint import load_model

    path = resolve_checkpoint(run_or_checkpoint)
    model = load_model(path, map_location=device).eval()
    c = model.config
    source = "arguments"
    if mean is None or std is None:
        found = load_preprocess(path) or {}
        source = str(path / PREPROCESS_NAME)
        if found.get("mean") is None or found.get("std") is None:
            log.warning("%s: no mean/std recorded in %s; normalising with 0.5 per channel, pass mean/std if "
                        "training used others", path, PREPROCESS_NAME)
            found = {"mean": 0.5, "std": 0.5}
        mean = mean if mean is not None else found["mean"]
        std = std if std is not None else found["std"]
    preprocess = Preprocess(image_size=tuple(c.image_size), channels=c.in_channels,
                            mean=_as_stats(mean, c.in_channels, source), std=_as_stats(std, c.in_channels, source))
    labels = list(c.labels) if c.labels else [f"class_{i}" for i in range(c.num_classes)]
    return LoadedModel(model=model, preprocess=preprocess, labels=labels, path=path)


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand ``paths``: a file is kept as given (whatever its type), a folder gives its image files
    (by extension, recursively, sorted, hidden ones skipped), found as a folder dataset finds them
    (:func:`vitlab.data.list_image_files`, which follows symlinked folders). A missing path is kept: reading
    it fails with a :class:`DataError` naming it, as for a corrupt file."""
    from vitlab.data import list_image_files

    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            images, ignored = list_image_files(p)
            found = sorted(Path(f) for f in images)
            if ignored:
                log.debug("%s: ignored %d files without an image extension", p, len(ignored))
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


__all__ = ["Preprocess", "LoadedModel", "load_for_inference", "list_images", "read_image",
           "true_label_from_folder"]
