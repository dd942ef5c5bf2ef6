"""Every figure vitlab draws: a run's curves and confusion matrix, and attention maps laid over images.

Figures are ``matplotlib.figure.Figure`` objects on an Agg canvas (no pyplot, no global state, no display
needed): a ``*_figure`` function builds one, :func:`save_figure` writes it atomically (the format from the file
name) and :func:`figure_bytes` renders it for embedding (the HTML report).
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
from vitlab.runs import CONFUSION, CURVES

FIGURE_FORMATS = ("png", "svg", "pdf", "jpg")
RUN_FIGURE_DPI = 110


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


# ---------------------------------------------------------------- a run: curves and confusion matrix
def curves_figure(history: list[dict], title: str | None = None):
    """Train and test loss per epoch (left) and test top-1 accuracy per epoch (right): the three curves the
    from-scratch tutorials plot."""
    epochs = [row["epoch"] for row in history]
    tested = [row for row in history if row.get("top1") is not None]
    fig = _figure(11, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [row["train_loss"] for row in history], marker="o", ms=3, label="train loss")
    ax_loss.plot([r["epoch"] for r in tested], [r["test_loss"] for r in tested], marker="o", ms=3,
                 label="test loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot([r["epoch"] for r in tested], [100 * r["top1"] for r in tested], marker="o", ms=3,
                label="test top-1")
    if any(r.get("ema_top1") is not None for r in tested):
        ax_acc.plot([r["epoch"] for r in tested], [100 * r["ema_top1"] for r in tested], marker="o", ms=3,
                    label="test top-1 (EMA)")
        ax_acc.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str | None = None):
    """The confusion matrix (rows: true class, columns: predicted) with class names and counts."""
    cm = np.asarray(confusion)
    k = len(classes)
    size = min(max(4.0, 0.5 * k + 2), 20)
    fig = _figure(size + 1, size)
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ticks = range(k)
    slanted = k > 4 and max(len(c) for c in classes) > 2  # long names overlap when horizontal
    ax.set_xticks(ticks, classes, rotation=45 if slanted else 0, ha="right" if slanted else "center")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > threshold else "black")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    return fig


def plot_run_files(run: str | Path, history: list[dict], final_eval: dict | None) -> list[Path]:
    """A run folder's figures: ``curves.png`` and, given the last evaluation, ``confusion_matrix.png``."""
    run = Path(run)
    paths = [save_figure(curves_figure(history, title=run.name), run / CURVES, dpi=RUN_FIGURE_DPI)]
    if final_eval is not None:
        fig = confusion_figure(final_eval["confusion"], final_eval["classes"],
                               title=f"{run.name}: top-1 {100 * final_eval['top1']:.2f}%")
        paths.append(save_figure(fig, run / CONFUSION, dpi=RUN_FIGURE_DPI))
    return paths


# ---------------------------------------------------------------- attention maps over images
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


__all__ = ["curves_figure", "confusion_figure", "plot_run_files", "Panel", "attention_figure", "heatmap_overlay",
           "save_figure", "figure_bytes", "figure_format", "to_display"]
