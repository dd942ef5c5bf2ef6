"""``vitlab convert`` / ``export`` / ``finetune`` from the command line: thin wrappers, errors in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitlab import ViTConfig, VisionTransformer
from vitlab.cli import main
from vitlab.interop.jax_npz import to_jax_arrays

CFG = ViTConfig(image_size=32, patch_size=8, hidden_dim=24, depth=2, num_heads=3, mlp_dim=48, num_classes=4)


def test_convert_then_export_onnx(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    model = VisionTransformer(CFG).eval()
    np.savez(tmp_path / "ViT-S.npz", **to_jax_arrays(model, prefix="opt/target/"))
    assert main(["convert", str(tmp_path / "ViT-S.npz"), "--out", str(tmp_path / "conv")]) == 0
    out = capsys.readouterr().out
    assert "(jax) ->" in out and "2 layers, hidden 24, 3 heads, patch 8, image 32, 4 classes" in out
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(VisionTransformer.from_pretrained(tmp_path / "conv")(x), model(x), atol=1e-6,
                                   rtol=0)
    assert main(["export", str(tmp_path / "conv"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(session.run(None, {"pixel_values": x.numpy()})[0] - model(x).numpy()).max() <= 1e-4


def test_convert_with_overrides_and_heads(tmp_path):
    from safetensors.torch import save_file

    from vitlab.interop.timm import to_timm_state_dict

    save_file(to_timm_state_dict(VisionTransformer(CFG)), tmp_path / "t.safetensors")
    assert main(["convert", str(tmp_path / "t.safetensors"), "--num-heads", "3", "--set", "drop_path=0.1",
                 "--out", str(tmp_path / "conv")]) == 0
    cfg = VisionTransformer.from_pretrained(tmp_path / "conv").config
    assert (cfg.num_heads, cfg.drop_path) == (3, 0.1)


def test_errors_are_one_line(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", something=np.zeros(2))
    assert main(["convert", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitlab: error: ") and "bad.npz" in err and err.count("\n") == 1
    VisionTransformer(CFG.replace(pool="mean")).save_pretrained(tmp_path / "mean")
    assert main(["export", str(tmp_path / "mean"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "cannot export to a Hugging Face ViT folder: pool='mean'" in capsys.readouterr().err
