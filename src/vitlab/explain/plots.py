"""Figures of attention heatmaps over images (matplotlib, Agg); training curves and confusion matrices are
drawn by :mod:`vitlab.train.plots`.

Figures are built as ``matplotlib.figure.Figure`` objects on an Agg canvas (no pyplot, no global state, no
display needed) and written atomically.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vitlab._files import atomic_write_bytes
from vitlab.errors import ConfigError

FIGURE_FORMATS = ("png", "svg", "pdf", "jpg")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def figure_bytes(fig, fmt: str = "png", dpi: int = 100) -> bytes:
    """Render a figure to bytes (``png``, ``svg``, ``pdf``, ``jpg``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def figure_format(path: str | Path) -> str:
    """The figure format a file name asks for (``png`` when it has no suffix); :class:`ConfigError` if unknown."""
    fmt = Path(path).suffix.lower().lstrip(".") or "png"
    fmt = {"jpeg": "jpg"}.get(fmt, fmt)
    if fmt not in FIGURE_FORMATS:
        raise ConfigError(f"{path}: cannot write a figure as .{fmt}; use one of "
                          + ", ".join(f".{f}" for f in FIGURE_FORMATS))
    return fmt


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` atomically, the format taken from the suffix (default PNG)."""
    path = Path(path)
    atomic_write_bytes(path, figure_bytes(fig, figure_format(path), dpi))
    return path


def to_display(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 ``(C, H, W)`` -> ``(H, W, 3)`` uint8 for display (grey images repeated to RGB)."""
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3].astype(np.uint8)


def heatmap_overlay(image: torch.Tensor | np.ndarray, heat: torch.Tensor | np.ndarray, alpha: float = 0.5,
                    cmap: str = "jet") -> np.ndarray:
    """Blend a heatmap (``(H, W)`` in [0, 1], same size as the image) over a uint8 ``(C, H, W)`` image ->
    ``(H, W, 3)`` uint8."""
    import matplotlib

    rgb = to_display(image).astype(np.float32) / 255.0
    heat = heat.numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap {heat.shape} and image {rgb.shape[:2]} differ in size; upsample the map first")
    colour = matplotlib.colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3]
    out = (1.0 - alpha) * rgb + alpha * colour
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@dataclass
class Panel:
    """One image of an attention figure: the picture (uint8 ``(C, H, W)``), its heat ``(H, W)`` in [0, 1],
    optional per-head heats ``(heads, H, W)``, and a caption; ``correct`` colours it (None: no true label)."""

    image: torch.Tensor | np.ndarray
    heat: torch.Tensor | np.ndarray
    caption: str
    head_heats: torch.Tensor | np.ndarray | None = None
    correct: bool | None = None


def attention_figure(panels: Sequence[Panel], title: str | None = None, alpha: float = 0.5):
    """A figure with, per image, the picture and its map overlaid (and each head's map when given),
    captioned with the prediction. Without heads, image pairs are laid out four (or three) to a row."""
    n = len(panels)
    heads = panels[0].head_heats is not None if panels else False
    num_heads = len(panels[0].head_heats) if heads else 0
    per_row = 1 if heads else (3 if n % 4 and n % 3 == 0 else min(4, max(n, 1)))
    cols = per_row * (2 + num_heads)
    rows = max(1, -(-n // per_row))
    fig = _figure(1.9 * cols, 2.2 * rows + (0.4 if title else 0.0))
    if title:
        fig.suptitle(title)
    for i, panel in enumerate(panels):
        r, c0 = divmod(i, per_row)
        c0 *= 2 + num_heads
        ax = fig.add_subplot(rows, cols, r * cols + c0 + 1)
        ax.imshow(to_display(panel.image), interpolation="bilinear")
        colour = {True: "darkgreen", False: "firebrick", None: "black"}[panel.correct]
        ax.set_title(panel.caption, fontsize=8, color=colour)
        ax = fig.add_subplot(rows, cols, r * cols + c0 + 2)
        ax.imshow(heatmap_overlay(panel.image, panel.heat, alpha), interpolation="bilinear")
        ax.set_title("attention", fontsize=8)
        for h in range(num_heads):
            ax = fig.add_subplot(rows, cols, r * cols + c0 + 3 + h)
            ax.imshow(heatmap_overlay(panel.image, panel.head_heats[h], alpha), interpolation="bilinear")
            ax.set_title(f"last layer, head {h + 1}", fontsize=8)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


__all__ = ["Panel", "attention_figure", "heatmap_overlay", "save_figure", "figure_bytes", "figure_format",
           "to_display"]
