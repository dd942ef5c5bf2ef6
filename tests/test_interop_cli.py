"""``vitlab convert`` / ``export`` / ``finetune`` from the command line: thin wrappers, errors in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomise

from vitlab import ViTConfig, VisionTransformer
from vitlab.cli import main
from vitlab.interop.jax_npz import to_jax_arrays

pytestmark = pytest.mark.usefixtures("one_thread")



CFG = ViTConfig(image_size=32, patch_size=8, hidden_dim=24, depth=2, num_heads=3, mlp_dim=48, num_classes=4)


def test_convert_then_export_onnx(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    model = randomise(VisionTransformer(CFG))
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


def _photo_folder(root, n_per_class=12, size=20):
    """ROOT/train/<class>/*.png and ROOT/test/<class>/*.png: 'sky' images bright on top, 'sea' bright below."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_per_class), ("test", 4)):
        for label, cls in enumerate(("sea", "sky")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                rows = slice(0, size // 2) if cls == "sky" else slice(size // 2, size)
                img[rows] += 150
                Image.fromarray(img).save(root / split / cls / f"{i}.png")
    return root


def test_finetune_linear_probe_from_a_timm_file(tmp_path, capsys):
    """`vitlab finetune` = train with init: new head for the folder's classes, positions resized to 32 px,
    the frozen encoder written unchanged, the head trained; then export of the run folder to HF."""
    from safetensors.torch import load_file, save_file

    from vitlab.interop.timm import to_timm_state_dict

    pretrained = VisionTransformer(CFG.replace(image_size=48, hidden_dim=192, num_heads=3, mlp_dim=64, depth=1))
    save_file(to_timm_state_dict(pretrained), tmp_path / "vit_tiny_patch8.safetensors")
    data = _photo_folder(tmp_path / "photos")
    rc = main(["finetune", str(tmp_path / "vit_tiny_patch8.safetensors"), "--data", f"folder:{data}",
               "--epochs", "2", "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet",
               "--set", "image_size=32", "--set", "linear_probe=true", "--set", "batch_size=8",
               "--set", "warmup_epochs=0", "--set", "lr=0.05", "--set", "plots=false"])
    assert rc == 0, capsys.readouterr().err
    assert "test accuracy:" in capsys.readouterr().out
    tuned = VisionTransformer.from_pretrained(tmp_path / "run" / "last")
    assert tuned.config.labels == ["sea", "sky"] and tuned.config.image_size == (32, 32)
    before = {k: v for k, v in pretrained.state_dict().items() if not k.startswith(("head.", "pos_embed"))}
    after = load_file(tmp_path / "run" / "last" / "model.safetensors")
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # frozen by the linear probe
    assert after["head.weight"].shape == (2, 192)
    import json

    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["train_loss"] for e in epochs if "train_loss" in e]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert main(["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "tuned.onnx")]) == 0


def test_vitlab_and_run_folders_load_with_overrides(tmp_path):
    from vitlab.interop import detect_format, load_pretrained

    model = VisionTransformer(CFG).eval()
    model.save_pretrained(tmp_path / "run" / "best")
    assert detect_format(tmp_path / "run") == "vitlab"
    loaded = load_pretrained(tmp_path / "run", drop_path=0.2, num_heads=3)
    assert loaded.config.drop_path == 0.2 and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("command", ["export", "predict", "eval"])
def test_a_corrupt_config_json_in_a_run_is_named(tmp_path, capsys, command):
    run = tmp_path / "run"
    VisionTransformer(CFG).save_pretrained(run / "best")
    (run / "config.yaml").write_text("data: digits\n")
    (run / "best" / "config.json").write_text('{"hidden_dim": 24, "depth":')  # cut off mid-write
    args = {"export": ["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
            "predict": ["predict", str(run), str(tmp_path)], "eval": ["eval", str(run), "--data", "digits"]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vitlab: error: {run / 'best' / 'config.json'}: not valid JSON") and "\n" not in err


def test_every_command_loads_any_checkpoint_the_same_way(tmp_path, capsys):
    """`vitlab predict` and `vitlab attention` take a timm file as they take a run: one loading path (vitlab.load)."""
    from PIL import Image
    from safetensors.torch import save_file

    import vitlab
    from vitlab.interop.timm import to_timm_state_dict

    # hidden 192: the standard ViT-Ti size, whose 3 heads a timm file needs no --num-heads for
    model = randomise(VisionTransformer(CFG.replace(hidden_dim=192, depth=1, mlp_dim=96)))
    save_file(to_timm_state_dict(model), tmp_path / "vit.safetensors")
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the model's size: no resize
    Image.fromarray(pixels).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "vit.safetensors"), str(tmp_path / "a.png"), "--json", "--top-k", "2"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    loaded = vitlab.load(tmp_path / "vit.safetensors")
    assert loaded.format == "timm" and loaded.preprocess.mean == (0.5, 0.5, 0.5)  # a timm file does not say: 0.5
    x = loaded.preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert [t["label"] for t in top] == [f"class_{i}" for i in probs.topk(2).indices.tolist()]
    assert [t["probability"] for t in top] == pytest.approx(probs.topk(2).values.tolist(), abs=1e-5)
    assert main(["attention", str(tmp_path / "vit.safetensors"), str(tmp_path / "a.png"), "-o",
                 str(tmp_path / "a-attention.png")]) == 0
    assert (tmp_path / "a-attention.png").read_bytes()[:4] == b"\x89PNG"


def test_export_a_run_as_a_timm_file_and_load_it_back(tmp_path, capsys):
    import vitlab

    model = randomise(VisionTransformer(CFG))
    model.save_pretrained(tmp_path / "run" / "best")
    out = tmp_path / "vit.safetensors"
    assert main(["export", str(tmp_path / "run"), "--format", "timm", "--out", str(out)]) == 0
    assert vitlab.interop.detect_format(out) == "timm"
    back = vitlab.load(out, num_heads=3).model  # hidden 24: not a standard width, so the heads are given
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)
    assert main(["export", str(tmp_path / "run"), "--format", "timm", "--out", str(tmp_path / "vit.pth")]) == 2
    assert "a timm export is a .safetensors file" in capsys.readouterr().err
