"""Name what is in photos: top-k classes with probabilities for files and folders, in batches.

A corrupt or non-image file becomes a result with an ``error`` (naming the file); the others are still
predicted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from vitlab.errors import ConfigError, DataError
from vitlab.explain.inference import LoadedModel, list_images, load_for_inference, read_image

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One file's result: ``top`` is ``[(label, probability), ...]`` best first; ``error`` is set instead
    when the file could not be read."""

    file: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        """A JSON-friendly dict: ``{"file", "top": [{"label", "probability"}, ...]}`` or ``{"file", "error"}``."""
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        return {"file": self.file, "top": [{"label": lab, "probability": round(p, 6)} for lab, p in self.top]}


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.inference_mode()
def predict(checkpoint: str | Path | LoadedModel, paths: Sequence[str | Path] | str | Path, top_k: int = 5,
            batch_size: int = 32, *, device: str = "cpu") -> list[Prediction]:
    """Top-``top_k`` predictions for image files and folders, in the order the files are listed.

    ``checkpoint``: a run folder, a checkpoint folder, or a :class:`LoadedModel`. Folders are searched
    recursively for images; any image mode or size is converted to what the model was trained on.
    Unreadable files give a :class:`Prediction` with ``error`` set (check ``.ok``).
    """
    if top_k < 1:
        raise ConfigError(f"top_k={top_k} must be at least 1")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_for_inference(checkpoint, device=device)
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = list_images(paths)
    k = min(top_k, len(loaded.labels))
    model_device = next(loaded.model.parameters()).device
    results: list[Prediction] = []
    for chunk in _batches(files, batch_size):
        images, ok = [], []
        for path in chunk:
            try:
                images.append(read_image(path, loaded.preprocess))
            except DataError as e:
                log.debug("skipping %s: %s", path, e)
                results.append(Prediction(file=str(path), error=str(e)))
                continue
            result = Prediction(file=str(path))
            results.append(result)
            ok.append(result)
        if not images:
            continue
        x = loaded.preprocess(torch.stack(images).to(model_device))  # (B, C, H, W) float
        probs = loaded.model(x).float().softmax(dim=-1)
        values, indices = probs.topk(k, dim=-1)
        for result, vals, idxs in zip(ok, values.tolist(), indices.tolist()):
            result.top = [(loaded.labels[i], v) for i, v in zip(idxs, vals)]
    return results


def format_table(results: Sequence[Prediction]) -> str:
    """Predictions as a text table: file, then ``label probability`` pairs best first (errors as ``ERROR``)."""
    if not results:
        return "(no images)"
    width = min(max(len(r.file) for r in results), 70)
    label_width = max((len(lab) for r in results for lab, _ in r.top), default=0)
    lines = [f"{'file':<{width}}  top predictions"]
    for r in results:
        name = r.file if len(r.file) <= width else "..." + r.file[-(width - 3):]
        if r.error is not None:
            lines.append(f"{name:<{width}}  ERROR {r.error.removeprefix(r.file + ': ')}")
        else:
            lines.append(f"{name:<{width}}  " + "  ".join(f"{lab:<{label_width}} {p:6.1%}" for lab, p in r.top))
    return "\n".join(lines)


__all__ = ["Prediction", "predict", "format_table"]
