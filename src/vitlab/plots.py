"""Every figure vitlab draws: a run's curves, confusion matrix and reliability diagram, and attention maps laid
over images.

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
from vitlab.checkpoints import CONFUSION, CURVES, RELIABILITY

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
    """Train and test loss per epoch (left), test top-1 accuracy per epoch (middle) and, when the run logged
    it, the test expected calibration error per epoch (right): a loss that rises while the accuracy still
    rises shows as an ECE that rises too."""
    epochs = [row["epoch"] for row in history]
    tested = [row for row in history if row.get("top1") is not None]
    calibrated = [row for row in tested if row.get("ece") is not None]
    fig = _figure(16 if calibrated else 11, 4)
    axes = fig.subplots(1, 3 if calibrated else 2)
    ax_loss, ax_acc = axes[0], axes[1]
    ax_loss.plot(epochs, [row["train_loss"] for row in history], marker="o", ms=3, label="train loss")
    ax_loss.plot([r["epoch"] for r in tested], [r["test_loss"] for r in tested], marker="o", ms=3,
                 label="test loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot([r["epoch"] for r in tested], [100 * r["top1"] for r in tested], marker="o", ms=3,
                label="test top-1")
    if any(r.get("ema_top1") is not None for r in tested):
        ax_acc.plot([r["epoch"] for r in tested], [100 * r["ema_top1"] for r in tested], marker="o", ms=3,
                    label="test top-1 (EMA)")
        ax_acc.legend()
    ax_acc.set_ylabel("test accuracy (%)")
    if calibrated:
        axes[2].plot([r["epoch"] for r in calibrated], [100 * r["ece"] for r in calibrated], marker="o", ms=3,
                     color="firebrick", label="test ECE")
        axes[2].set_ylabel("test expected calibration error (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _display_bins(bins: dict) -> tuple[np.ndarray, ...]:
    """(left edges, widths, counts, accuracies, mean confidences) of the bins of a reliability record
    (:class:`vitlab.evaluation.CalibrationBins`); its extra slot of confidences of exactly 1 joins the last bin."""
    edges = np.asarray(bins["edges"], dtype=float)
    count = np.asarray(bins["count"], dtype=float)
    correct = np.asarray(bins["accuracy"], dtype=float) * count
    conf_sum = np.asarray(bins["confidence"], dtype=float) * count
    count, correct, conf_sum = (np.append(a[:-2], a[-2] + a[-1]) for a in (count, correct, conf_sum))
    seen = np.maximum(count, 1)
    return edges[:-1], np.diff(edges), count, correct / seen, conf_sum / seen


def _reliability_panel(ax_acc, ax_count, bins: dict, label: str) -> None:
    left, width, count, accuracy, confidence = _display_bins(bins)
    full = count > 0
    ax_acc.bar(left[full], accuracy[full], width[full], align="edge", color="tab:blue", edgecolor="black",
               linewidth=0.5, label="accuracy")
    for side, colour, meaning in ((confidence > accuracy, "tab:red", "overconfident: gap up to the confidence"),
                                  (confidence < accuracy, "tab:green", "underconfident: gap down to it")):
        shown = full & side
        if shown.any():
            ax_acc.bar(left[shown], np.abs(confidence - accuracy)[shown], width[shown], align="edge",
                       bottom=np.minimum(accuracy, confidence)[shown], color=colour, alpha=0.35, hatch="//",
                       edgecolor=colour, linewidth=0.5, label=meaning)
    ax_acc.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
    ax_acc.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in the bin", title=label)
    ax_acc.legend(loc="upper left", fontsize=8)
    ax_count.bar(left, count, width, align="edge", color="grey", edgecolor="black", linewidth=0.5)
    ax_count.set(xlim=(0, 1), xlabel="confidence (top class probability)", ylabel="test images")
    if count.max() > 20 * max(np.median(count[full]), 1):
        ax_count.set_yscale("log")


def reliability_figure(before: dict, after: dict | None = None, *, temperature: float | None = None,
                       title: str | None = None):
    """A reliability diagram: per confidence bin, the accuracy of its test images as a bar against the diagonal
    (where accuracy equals confidence), the gap to the bin's mean confidence shaded, and how many images fall
    in each bin below. ``before``/``after``: the ``reliability`` of an evaluation (``after``: with the fitted
    ``temperature``), drawn side by side. A bar below the diagonal is a bin where the model is overconfident."""
    panels = [(before, "before temperature scaling" if after is not None else "reliability")]
    if after is not None:
        panels.append((after, f"after: logits / T, T = {temperature:.3f}" if temperature else "after"))
    fig = _figure(5.5 * len(panels), 6.5)
    grid = fig.add_gridspec(2, len(panels), height_ratios=(3, 1))
    for col, (bins, label) in enumerate(panels):
        _reliability_panel(fig.add_subplot(grid[0, col]), fig.add_subplot(grid[1, col]), bins, label)
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


def calibration_figure(calibration: dict, title: str | None = None):
    """The reliability diagrams of the test split before and after a fitted temperature, from a checkpoint's
    ``calibration.json`` (:func:`vitlab.evaluation.fit_calibration`)."""
    t = calibration["temperature"]
    before, after = calibration["test_before"], calibration["test_after"]
    summary = (f"temperature {t:.3f}: test ECE {100 * before['ece']:.2f}% -> {100 * after['ece']:.2f}%, "
               f"NLL {before['nll']:.3f} -> {after['nll']:.3f}")
    return reliability_figure(before["reliability"], after["reliability"], temperature=t,
                              title=f"{title}: {summary}" if title else summary)


def plot_run_files(run: str | Path, history: list[dict], final_eval: dict | None,
                   calibration: dict | None = None) -> list[Path]:
    """A run folder's figures: ``curves.png`` and, given the last evaluation, ``confusion_matrix.png`` and
    ``reliability.png`` (before and after the fitted temperature, given the checkpoint's ``calibration``)."""
    run = Path(run)
    paths = [save_figure(curves_figure(history, title=run.name), run / CURVES, dpi=RUN_FIGURE_DPI)]
    if final_eval is not None:
        fig = confusion_figure(final_eval["confusion"], final_eval["classes"],
                               title=f"{run.name}: top-1 {100 * final_eval['top1']:.2f}%")
        paths.append(save_figure(fig, run / CONFUSION, dpi=RUN_FIGURE_DPI))
    if calibration is not None:
        fig = calibration_figure(calibration, title=run.name)
        paths.append(save_figure(fig, run / RELIABILITY, dpi=RUN_FIGURE_DPI))
    elif final_eval is not None and "reliability" in final_eval:
        fig = reliability_figure(final_eval["reliability"],
                                 title=f"{run.name}: test ECE {100 * final_eval['ece']:.2f}%")
        paths.append(save_figure(fig, run / RELIABILITY, dpi=RUN_FIGURE_DPI))
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


__all__ = ["curves_figure", "confusion_figure", "reliability_figure", "calibration_figure",
           "plot_run_files", "Panel", "attention_figure", "heatmap_overlay",
           "save_figure", "figure_bytes", "figure_format", "to_display"]
