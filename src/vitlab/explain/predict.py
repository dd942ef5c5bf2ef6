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

from vitlab.data.sources.folder import cached_files, decode_files
from vitlab.errors import ConfigError
from vitlab.explain.inputs import list_images
from vitlab.loaded import LoadedModel

log = logging.getLogger(__name__)

# Files decoded at once: 1024 RGB images at 224 px are 154 MB; decode_files starts worker processes
# from 512 files, so a long list is decoded in parallel.
_DECODE_WINDOW = 1024
CACHE_FROM = 512  # this many files or more are decoded into the image cache (once) and read from its map


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
def predict(loaded: LoadedModel, paths: Sequence[str | Path] | str | Path, top_k: int = 5, batch_size: int = 32,
            *, workers: int | None = None) -> list[Prediction]:
    """Top-``top_k`` predictions for image files and folders, in the order the files are listed.

    ``loaded``: a model :func:`vitlab.load` loaded (``vitlab.predict`` takes any checkpoint path and loads it).
    Folders are searched recursively for images; any image mode or size is converted to what the model was trained on.
    The probabilities are softmax(logits / T) with the checkpoint's fitted temperature T (``vitlab calibrate``;
    1 when none was fitted), so they mean what they say; T never changes the order of the classes.
    Unreadable files give a :class:`Prediction` with ``error`` set (check ``.ok``). Many files are decoded
    by ``workers`` processes (default: up to 8), as for folder datasets; from :data:`CACHE_FROM` files on, into
    the image cache, once, and read back from its memory map (memory does not grow with the number of files).
    """
    if top_k < 1:
        raise ConfigError(f"top_k={top_k} must be at least 1")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = list_images(paths)
    pre = loaded.preprocess
    if len(files) >= CACHE_FROM:  # a folder of many photos: decoded once into the image cache, read from its map
        windows = [(files, *_cached(files, pre, workers))]
    else:  # a few photos: decoded in memory, a window at a time
        windows = ((window, *decode_files([str(f) for f in window], pre.image_size, pre.channels, workers))
                   for window in _batches(files, max(batch_size, _DECODE_WINDOW)))
    results: list[Prediction] = []
    for window, decoded, failures in windows:
        errors = dict(failures)
        ok: list[int] = []
        for i, path in enumerate(window):
            results.append(Prediction(file=str(path), error=errors.get(i)))
            if i in errors:
                log.debug("skipping %s: %s", path, errors[i])
            else:
                ok.append(i)
        window_results = results[len(results) - len(window):]
        for index in _batches(ok, batch_size):
            names = [window_results[i].file for i in index]
            batch = decoded[torch.as_tensor(index)] if torch.is_tensor(decoded) else torch.from_numpy(decoded[index])
            for i, done in zip(index, predict_decoded(loaded, batch, names, top_k)):
                window_results[i].top = done.top
    return results


def _cached(files, pre, workers) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """``files`` decoded at the model's size through the image cache: (the memory-mapped images, the failures)."""
    names = [str(f) for f in files]
    cached = cached_files(names, tuple(pre.image_size), pre.channels, workers=workers, missing_ok=True,
                          what=f"{len(names)} images to predict")
    bad = [int(i) for i in (~torch.from_numpy(cached.ok)).nonzero().flatten()]
    return cached.images, list(zip(bad, cached.errors))


@torch.inference_mode()
def predict_decoded(loaded: LoadedModel, images: torch.Tensor, names: Sequence[str],
                    top_k: int = 5) -> list[Prediction]:
    """Top-``top_k`` predictions for images already decoded at the model's size and channels (uint8
    ``(B, C, H, W)``, as :func:`vitlab.data.decode_image` gives them), named ``names``: the step
    :func:`predict` runs on each batch of files, for callers that decode in memory (the web server)."""
    device = next(loaded.model.parameters()).device
    x = loaded.preprocess(images.to(device))  # uint8 (B, C, H, W) -> float
    return top_predictions(loaded.labels, loaded.probabilities(x), names, top_k)


def top_predictions(labels: Sequence[str], probs: torch.Tensor, names: Sequence[str],
                    top_k: int = 5) -> list[Prediction]:
    """The ``top_k`` (label, probability) of each row of ``probs`` ``(B, K)`` (class probabilities computed
    already, e.g. with an attention map in the same pass), named ``names``."""
    if top_k < 1:
        raise ConfigError(f"top_k={top_k} must be at least 1")
    values, indices = probs.topk(min(top_k, len(labels)), dim=-1)
    return [Prediction(file=name, top=[(labels[j], v) for j, v in zip(idxs, vals)])
            for name, vals, idxs in zip(names, values.tolist(), indices.tolist())]


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


__all__ = ["Prediction", "predict", "predict_decoded", "top_predictions", "format_table"]
