"""The verbs over a trained model that take a checkpoint path: ``vitlab.predict``, ``vitlab.plot_attention``,
``vitlab.serve`` (the web stack loads only when it is called), and ``vitlab.write_report`` (of a run folder).
Each loads the model once with :func:`vitlab.load` and hands it to :mod:`vitlab.explain` or :mod:`vitlab.server`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import vitlab.server as server
from vitlab._device import resolve_device
from vitlab.api.models import as_loaded
from vitlab.explain.attention import AttentionItem
from vitlab.explain.attention import plot_attention as draw_attention
from vitlab.explain.predict import Prediction, format_table
from vitlab.explain.predict import predict as predict_loaded
from vitlab.explain.report import write_report
from vitlab.loaded import LoadedModel
from vitlab.plots import figure_format


def predict(checkpoint: str | Path | LoadedModel, paths: Sequence[str | Path] | str | Path, top_k: int = 5,
            batch_size: int = 32, *, device: str = "cpu", workers: int | None = None) -> list[Prediction]:
    """Top-``top_k`` classes of image files and folders (:func:`vitlab.explain.predict.predict`), the model being
    a run folder, a checkpoint folder, any file :func:`vitlab.load` reads, or a loaded model."""
    return predict_loaded(as_loaded(checkpoint, device), paths, top_k, batch_size, workers=workers)


def plot_attention(checkpoint: str | Path | LoadedModel, paths: Sequence[str | Path] = (),
                   output: str | Path = "attention.png", **options: Any) -> list[AttentionItem]:
    """One figure of attention maps (:func:`vitlab.explain.attention.plot_attention`) of ``checkpoint``'s model."""
    figure_format(output)  # a bad file name fails before the model is loaded
    return draw_attention(as_loaded(checkpoint), paths, output, **options)


def serve(checkpoint: str | Path | LoadedModel, *, device: str = "cpu", **options: Any):
    """Serve ``checkpoint``'s model (:func:`vitlab.server.serve`: ``host``, ``port``, ``limits``, ``background``,
    ``log_level``). Without the ``serve`` extra this says what to install before anything is loaded."""
    start = server.serve  # the web stack loads here, or a MissingExtraError says what to install
    return start(as_loaded(checkpoint, str(resolve_device(device))), **options)


__all__ = ["predict", "plot_attention", "serve", "write_report", "format_table", "Prediction", "AttentionItem"]
