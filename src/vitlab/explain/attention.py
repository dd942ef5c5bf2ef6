"""One figure of attention maps over images: for files and folders, or for images of a dataset split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from vitlab.data import load_data
from vitlab.data.transforms import resize_uint8
from vitlab.errors import ConfigError, DataError
from vitlab.explain.inputs import list_images, read_image, true_label_from_folder
from vitlab.explain.maps import AttentionMaps, compute_attention_maps, upsample_maps
from vitlab.loaded import LoadedModel
from vitlab.plots import Panel, attention_figure, figure_format, save_figure

log = logging.getLogger(__name__)

DISPLAY_MIN_SIDE = 128  # small inputs (32 px) are shown larger, decoded sharper from the file when there is one


def display_size(image_size: tuple[int, int], min_side: int = DISPLAY_MIN_SIDE) -> tuple[int, int]:
    """The model's input size scaled up by a whole factor until its short side is at least ``min_side``."""
    scale = max(1, -(-min_side // min(image_size)))
    return (image_size[0] * scale, image_size[1] * scale)


@dataclass
class AttentionItem:
    """What the figure shows for one image: predicted label and probability, the true label when known,
    or the error that kept a file out of the figure."""

    name: str
    label: str | None = None
    probability: float | None = None
    true_label: str | None = None
    error: str | None = None


def attention_panels(loaded: LoadedModel, images: torch.Tensor, *, true_labels: Sequence[str | None] | None = None,
                     display: torch.Tensor | None = None, method: str = "rollout", heads: bool = False,
                     head_fusion: str = "mean", discard_ratio: float = 0.0, batch_size: int = 32,
                     maps: AttentionMaps | None = None) -> tuple[list[Panel], list[tuple[str, float]]]:
    """Panels for uint8 ``images`` ``(B, C, H, W)`` at the model's size; ``display`` (same images, any
    larger size) is what gets drawn, else ``images`` upsampled. ``maps``: the maps of all of ``images``
    computed already (the server's one pass), else they are computed here. Returns the panels and (label,
    probability)."""
    device = next(loaded.model.parameters()).device
    panels, preds = [], []
    if maps is not None:
        batch_size = max(len(images), 1)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        result = maps if maps is not None else compute_attention_maps(
            loaded.model, loaded.preprocess(chunk.to(device)), method=method, head_fusion=head_fusion,
            discard_ratio=discard_ratio, temperature=loaded.temperature)
        if display is not None:
            shown = display[start:start + batch_size]
        else:
            shown = resize_uint8(chunk.cpu(), display_size(tuple(chunk.shape[-2:])))
        size = tuple(shown.shape[-2:])
        heat = upsample_maps(result.maps.cpu(), size)  # (B, H, W)
        head_heat = upsample_maps(result.head_maps.cpu(), size) if heads else None  # (B, heads, H, W)
        prob, idx = result.probs.cpu().max(dim=-1)
        for j in range(len(chunk)):
            label, p = loaded.labels[int(idx[j])], float(prob[j])
            true = true_labels[start + j] if true_labels is not None else None
            caption = f"{label} {p:.0%}" + (f"\ntrue: {true}" if true is not None else "")
            panels.append(Panel(image=shown[j], heat=heat[j], caption=caption,
                                head_heats=head_heat[j] if heads else None,
                                correct=None if true is None else true == label))
            preds.append((label, p))
    return panels, preds


def plot_attention(loaded: LoadedModel, paths: Sequence[str | Path] = (),
                   output: str | Path = "attention.png", *, dpi: int = 100, **options) -> list[AttentionItem]:
    """Write one figure: each image, its attention map overlaid, the predicted label and probability (see
    :func:`attention_grid` for the images and ``options``); ``dpi`` sets the figure's resolution (lower:
    smaller file)."""
    figure_format(output)  # a bad file name fails before any work
    fig, items = attention_grid(loaded, paths, **options)
    save_figure(fig, output, dpi=dpi)
    return items


def attention_grid(loaded: LoadedModel, paths: Sequence[str | Path] = (), *,
                   method: str = "rollout", heads: bool = False, head_fusion: str = "mean",
                   discard_ratio: float = 0.0, data: str | None = None, num_images: int = 16,
                   max_images: int = 64):
    """The figure of :func:`plot_attention` and what it shows: ``(figure, items)``.

    Images come from ``paths`` (files and folders; a file's parent folder naming a class gives the true
    label) or from the evaluation split of dataset ``data`` (a ``vitlab.data.load_data`` spec; ``num_images``
    spread over the split, with true labels). Unreadable files are left out and returned with ``error``.
    ``method``: ``rollout`` or ``last``; ``heads`` adds the last layer's map of every head.
    """
    items: list[AttentionItem] = []
    if data is not None:
        if paths:
            raise ConfigError("give image paths or a dataset (data=...), not both")
        split = load_data(data, image_size=loaded.preprocess.image_size, channels=loaded.preprocess.channels).test
        n = min(num_images, len(split))
        index = torch.linspace(0, len(split) - 1, n).round().long().unique() if n else torch.zeros(0, dtype=torch.long)
        images = split.take(index)
        true = [split.classes[int(split.labels[i])] for i in index]
        names = [split.files[int(i)] if split.files else f"{data}#{int(i)}" for i in index]
        display = None
    else:
        if not paths:
            raise ConfigError("no images: give image files or folders, or a dataset with data=SPEC")
        files = list_images(paths)
        if len(files) > max_images:
            log.warning("%d images given; the figure shows the first %d", len(files), max_images)
            files = files[:max_images]
        size = display_size(loaded.preprocess.image_size)
        good, shown, names, true = [], [], [], []
        for path in files:
            try:
                good.append(read_image(path, loaded.preprocess))
                shown.append(read_image(path, loaded.preprocess, size))
            except DataError as e:
                items.append(AttentionItem(name=str(path), error=str(e)))
                continue
            names.append(str(path))
            true.append(true_label_from_folder(path, loaded.labels))
        if not good:
            raise DataError("none of the given files could be read as an image: " +
                            "; ".join(i.error or "" for i in items))
        images, display = torch.stack(good), torch.stack(shown)
    panels, preds = attention_panels(loaded, images, true_labels=true, display=display, method=method, heads=heads,
                                     head_fusion=head_fusion, discard_ratio=discard_ratio)
    title = f"{'attention rollout' if method == 'rollout' else 'last-layer attention'} ({head_fusion} over heads)"
    items.extend(AttentionItem(name=name, label=label, probability=p, true_label=t)
                 for name, (label, p), t in zip(names, preds, true))
    return attention_figure(panels, title=title), items


__all__ = ["AttentionItem", "attention_panels", "attention_grid", "display_size", "plot_attention"]
