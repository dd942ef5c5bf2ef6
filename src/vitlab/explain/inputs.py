"""Finding and reading the image files a user points at, for prediction and attention figures.

Images are decoded as the datasets decode them (:func:`vitlab.data.decode_image`) at the model's size and
channels; :class:`~vitlab.data.Preprocess` (from :func:`vitlab.load`) then normalises them as training did.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch

from vitlab.data import Preprocess, decode_image, list_image_files

log = logging.getLogger(__name__)


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand ``paths``: a file is kept as given (whatever its type), a folder gives its image files
    (by extension, recursively, sorted, hidden ones skipped), found as a folder dataset finds them
    (:func:`vitlab.data.list_image_files`, which follows symlinked folders). A missing path is kept: reading
    it fails with a :class:`DataError` naming it, as for a corrupt file."""
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
    size = tuple(image_size) if image_size is not None else preprocess.image_size
    return torch.from_numpy(decode_image(path, size, preprocess.channels).copy())  # (a read-only array)


def true_label_from_folder(path: Path, labels: Sequence[str]) -> str | None:
    """The class named by the file's parent folder (``Test/apple/1.jpg`` -> ``apple``), if it is one of
    ``labels``; image-folder datasets are laid out that way."""
    name = path.parent.name
    return name if name in labels else None


__all__ = ["list_images", "read_image", "true_label_from_folder"]
