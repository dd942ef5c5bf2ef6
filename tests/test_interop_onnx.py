"""ONNX export: onnxruntime runs the file at several batch sizes and matches PyTorch to 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomise

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from vitlab import ViTConfig, VisionTransformer  # noqa: E402
from vitlab.interop import export_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ViTConfig(image_size=32, patch_size=8, hidden_dim=32, depth=2, num_heads=4, mlp_dim=64, num_classes=7)


@pytest.mark.parametrize("change", [
    dict(),
    dict(pool="mean", class_token=False, pos_embed="sincos", patch_embed="linear", layer_scale=0.5,
         representation_dim=12, in_channels=1, image_size=(24, 40)),
    dict(pool="mean", norm_after_pool=True),
    dict(patch_embed="conv_stem"),
    dict(locality_attention=True, register_tokens=1, patch_embed="shifted"),
], ids=["paper", "mean-sincos-linear-1ch", "fc_norm", "conv-stem", "sl-vit"])
def test_onnx_matches_pytorch_with_a_dynamic_batch(tmp_path, change):
    model = randomise(VisionTransformer(BASE.replace(**change)))
    path = export_onnx(model, tmp_path / "vit.onnx")
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    c = model.config
    g = torch.Generator().manual_seed(1)
    for batch in (1, 5):
        x = torch.randn(batch, c.in_channels, *c.image_size, generator=g)
        (out,) = session.run(["logits"], {"pixel_values": x.numpy()})
        with torch.no_grad():
            ref = model(x).numpy()
        assert out.shape == (batch, 7)
        assert np.abs(out - ref).max() <= 1e-4


def test_export_restores_training_mode_and_dtype(tmp_path):
    model = VisionTransformer(BASE).train().to(torch.bfloat16)
    export_onnx(model, tmp_path / "vit.onnx")
    assert model.training and next(model.parameters()).dtype == torch.bfloat16
