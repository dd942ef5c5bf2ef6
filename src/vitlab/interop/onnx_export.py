"""ONNX export with a dynamic batch dimension."""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from vitlab.errors import ConfigError
from vitlab.models import VisionTransformer


class _LogitsOnly(nn.Module):
    """``forward(pixel_values) -> logits / temperature``: the traced exporter passes inputs positionally, while
    ``VisionTransformer.forward`` takes its switches as keywords."""

    def __init__(self, model: VisionTransformer, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self.model(pixel_values)
        return logits if self.temperature == 1.0 else logits / self.temperature


def export_onnx(model: VisionTransformer, path: str | Path, *, opset: int = 17, temperature: float = 1.0) -> Path:
    """Write ``model`` as an ONNX graph ``pixel_values (B, C, H, W) float32 -> logits (B, K)``, B dynamic; the
    logits divided by a fitted ``temperature`` (so their softmax is the calibrated probabilities).

    Uses PyTorch's TorchScript-based exporter (``dynamo=False``), which needs only the ``onnx`` package; the
    file is written atomically. The model is exported in eval mode on the CPU in float32; the image size is
    fixed to ``model.config.image_size``.
    """
    from vitlab._files import atomic_write_bytes

    if importlib.util.find_spec("onnx") is None:  # torch's exporter imports it deep inside: say so plainly first
        raise ConfigError("ONNX export needs the onnx package: pip install onnx onnxruntime")
    c = model.config
    was_training = model.training
    ref = next(model.parameters())
    device, dtype = ref.device, ref.dtype
    wrapped = _LogitsOnly(model, temperature).eval().float().cpu()
    example = torch.zeros(2, c.in_channels, *c.image_size)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # The legacy exporter warns that it is legacy and that a shape comparison is traced as a constant
            # (it is: the image size is fixed in the graph).
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=["pixel_values"], output_names=["logits"],
                              dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        model.to(device=device, dtype=dtype).train(was_training)  # as the caller had it
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
