"""Finding a trained model's folder: a ``save_pretrained`` folder, or a run folder's ``best/`` / ``last/``.

Below ``train`` (which writes run folders) so that ``interop`` and ``explain`` read them the same way without
importing the training package. ``preprocess.json`` beside the weights records the input normalisation.
"""

from __future__ import annotations

from pathlib import Path

from vitlab._files import read_json
from vitlab.errors import CheckpointError
from vitlab.models.vit import CONFIG_NAME, WEIGHTS_NAME

PREPROCESS_NAME = "preprocess.json"


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder -> its ``best/`` (else ``last/``) checkpoint; a ``save_pretrained`` folder -> itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found; pass a run folder (with best/ or last/) or a checkpoint "
                              "folder (with config.json and model.safetensors)")
    if path.is_dir():
        if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
            return path
        # Read-only: a reader must not tidy a run that may still be training. A swap cut between its two
        # renames leaves only ``.best.old``; it is a complete checkpoint.
        for name in ("best", ".best.old", "last", ".last.old"):
            if (path / name / WEIGHTS_NAME).is_file():
                return path / name
    raise CheckpointError(f"{path}: neither a run folder (best/ or last/ inside) nor a checkpoint folder "
                          f"({CONFIG_NAME} + {WEIGHTS_NAME}); was the run stopped before its first epoch ended?")


def load_preprocess(path: str | Path) -> dict | None:
    """The ``{"mean", "std", "image_size", "channels"}`` a checkpoint was trained with, or None if unknown."""
    file = resolve_checkpoint(path) / PREPROCESS_NAME
    return read_json(file) if file.is_file() else None
