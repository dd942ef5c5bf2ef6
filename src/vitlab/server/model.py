"""The model a server serves: loaded once, described once (``GET /api/model``), and run on uploaded bytes.

Uploads are decoded in memory by the data layer's decoder, predicted by the one prediction path
(:func:`vitlab.explain.predict.predict_decoded`, what ``vitlab predict`` runs on each batch of files) and,
when asked, their attention drawn by :func:`vitlab.explain.attention.attention_panels` (the maps of
``vitlab attention``). One lock lets one request at a time use the model; decoding and drawing run outside it.
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from vitlab.data import decode_image
from vitlab.errors import ConfigError
from vitlab.explain.attention import attention_panels, display_size
from vitlab.explain.maps import AttentionMaps, compute_attention_maps
from vitlab.explain.predict import predict_decoded, top_predictions
from vitlab.loaded import LoadedModel
from vitlab.plots import Panel, heatmap_overlay
from vitlab.checkpoints import read_run_config, read_state

ATTENTION = ("none", "png", "grid")  # no map; the rollout laid over the image as a PNG data URL; its numbers
OVERLAY_MIN_SIDE = 224  # overlays of small inputs (8 or 32 px) are drawn from the upload decoded this large


@dataclass
class Upload:
    """One uploaded file, in memory: the name the client gave it and its bytes."""

    name: str
    data: bytes


def model_card(loaded: LoadedModel) -> dict[str, Any]:
    """What ``GET /api/model`` says: name, classes, input size and normalisation, size of the network, and, for
    a checkpoint of a vitlab run, the test metrics of the epoch it holds and the data it was trained on."""
    c, pre = loaded.model.config, loaded.preprocess
    run = loaded.run
    run_config = read_run_config(run) if run else {}
    state = read_state(loaded.path) if loaded.format == "vitlab" else None
    scored = [row for row in (state.history if state else []) if row.get("top1") is not None]
    metrics = None
    if scored:  # the last scored epoch of the checkpoint's own history is the epoch it holds
        row = scored[-1]
        metrics = {"epoch": row["epoch"], "test_top1": row["top1"], "test_top5": row.get("top5"),
                   "test_loss": row.get("test_loss"), "data": run_config.get("data")}
    return {"name": run_config.get("model") or loaded.path.name, "run": str(run) if run else None,
            "checkpoint": str(loaded.path), "format": loaded.format, "classes": list(loaded.labels),
            "image_size": list(pre.image_size), "channels": pre.channels, "patch_size": list(c.patch_size),
            "depth": c.depth, "num_heads": c.num_heads, "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "normalization": {"mean": list(pre.mean), "std": list(pre.std)}, "metrics": metrics}


def png_data_url(rgb: np.ndarray) -> str:
    """A uint8 ``(H, W, 3)`` image as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)  # 3x faster than the default 6, 20% larger
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class ServedModel:
    """A :class:`~vitlab.interop.LoadedModel` behind a lock, with the limits its uploads are decoded under."""

    def __init__(self, loaded: LoadedModel, *, max_pixels: int | None = None):
        self.loaded = loaded
        self.max_pixels = max_pixels
        self.card = model_card(loaded)
        self.lock = threading.Lock()  # one request at a time runs the model

    def decode(self, uploads: Sequence[Upload], size: tuple[int, int] | None = None) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` at ``size`` (default: the model's), decoded as ``vitlab predict`` decodes
        files; raises :class:`~vitlab.errors.DataError` naming the upload that is not an image."""
        pre = self.loaded.preprocess
        return torch.from_numpy(np.stack([decode_image(io.BytesIO(u.data), size or pre.image_size, pre.channels,
                                                       name=u.name, max_pixels=self.max_pixels) for u in uploads]))

    def predict(self, uploads: Sequence[Upload], top_k: int = 5, attention: str = "none",
                heads: bool = False) -> list[dict[str, Any]]:
        """One result per upload: ``{"file", "top": [{"label", "probability"}, ...]}`` and, with ``attention``
        ``png`` or ``grid``, ``"attention"``: the rollout (and with ``heads`` the last layer's map of each head)
        as PNG data URLs over the image, or as grids of numbers that sum to one."""
        if attention not in ATTENTION:
            raise ConfigError(f"attention={attention!r} is not one of {', '.join(ATTENTION)}")
        images = self.decode(uploads)
        shown = self.decode(uploads, display_size(self.loaded.preprocess.image_size, OVERLAY_MIN_SIDE)) \
            if attention == "png" else None
        names = [u.name for u in uploads]
        with self.lock:  # only the model's pass runs under it: one forward, with the maps when asked for
            maps = self._maps(images) if attention != "none" else None
            predictions = predict_decoded(self.loaded, images, names, top_k) if maps is None else \
                top_predictions(self.loaded.labels, maps.probs, names, top_k)
        panels = attention_panels(self.loaded, images, display=shown, heads=heads, maps=maps)[0] \
            if attention == "png" else []
        grids = maps if attention == "grid" else None
        results = [{"file": p.file, "top": [{"label": label, "probability": prob} for label, prob in p.top]}
                   for p in predictions]
        for result, panel in zip(results, panels):
            result["attention"] = _overlays(panel)
        for i, result in enumerate(results if grids is not None else []):
            result["attention"] = {"method": "rollout", "grid": _rounded(grids.maps[i])}
            if heads:
                result["attention"]["heads"] = _rounded(grids.head_maps[i])
        return results

    def _maps(self, images: torch.Tensor) -> AttentionMaps:
        device = next(self.loaded.model.parameters()).device
        return compute_attention_maps(self.loaded.model, self.loaded.preprocess(images.to(device)),
                                      temperature=self.loaded.temperature)


def _overlays(panel: Panel) -> dict[str, Any]:
    """The rollout (and each head's map, when drawn) laid over the image, as PNG data URLs."""
    out: dict[str, Any] = {"method": "rollout", "overlay": png_data_url(heatmap_overlay(panel.image, panel.heat))}
    if panel.head_heats is not None:
        out["heads"] = [png_data_url(heatmap_overlay(panel.image, h)) for h in panel.head_heats]
    return out


def _rounded(maps: torch.Tensor) -> list:
    return np.round(maps.double().cpu().numpy(), 6).tolist()


__all__ = ["ATTENTION", "ServedModel", "Upload", "model_card", "png_data_url"]
