"""What every converter shares: the linear patch embedding in every format, the head count a file stores,
run-folder resolution as training does it, and reading a pickled state dict once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomise
from safetensors.torch import save_file

from vitlab import ConfigError, ViTConfig, VisionTransformer
from vitlab.interop import detect_format, export_hf, load_pretrained, read_pretrained
from vitlab.interop.jax_npz import to_jax_arrays
from vitlab.interop.timm import to_timm_state_dict
from vitlab.interop.torchvision import to_torchvision_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ViTConfig(image_size=32, patch_size=8, hidden_dim=24, depth=2, num_heads=3, mlp_dim=48, num_classes=4)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _write(model: VisionTransformer, fmt: str, tmp_path):
    """``model`` saved in ``fmt``'s own layout; returns the path to load."""
    if fmt == "vitlab":
        return model.save_pretrained(tmp_path / "vitlab")
    if fmt == "hf":
        return export_hf(model, tmp_path / "hf")
    if fmt == "jax":
        np.savez(tmp_path / "vit.npz", **to_jax_arrays(model))
        return tmp_path / "vit.npz"
    if fmt == "timm":
        save_file(to_timm_state_dict(model), tmp_path / "vit.safetensors")
        return tmp_path / "vit.safetensors"
    torch.save(to_torchvision_state_dict(model), tmp_path / "vit.pth")
    return tmp_path / "vit.pth"


@pytest.mark.parametrize("fmt", ["vitlab", "hf", "jax", "timm", "torchvision"])
def test_every_format_loads_into_a_linear_patch_embedding(tmp_path, fmt):
    conv = randomise(VisionTransformer(CFG))
    path = _write(conv, fmt, tmp_path)
    assert detect_format(path) == fmt
    linear = load_pretrained(path, num_heads=3, patch_embed="linear")
    assert linear.config.patch_embed == "linear" and linear.patch_embed.proj.weight.shape == (24, 3 * 8 * 8)
    with torch.no_grad():
        torch.testing.assert_close(linear(X), conv(X), atol=1e-5, rtol=1e-5)


def test_a_linear_vitlab_folder_loads_as_a_conv_model(tmp_path):
    linear = randomise(VisionTransformer(CFG.replace(patch_embed="linear")))
    conv = load_pretrained(linear.save_pretrained(tmp_path / "m"), patch_embed="conv")
    assert conv.patch_embed.proj.weight.shape == (24, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(conv(X), linear(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt, file, field", [
    ("vitlab", "config.json", "num_heads"),
    ("hf", "config.json", "num_attention_heads"),
    ("jax", "vit.npz", "head count"),
])
def test_a_num_heads_the_file_contradicts_is_refused(tmp_path, fmt, file, field):
    model = randomise(VisionTransformer(CFG))
    path = _write(model, fmt, tmp_path)
    with pytest.raises(ConfigError, match=rf"{file}: num_heads=6 but the file's {field}.* is 3; leave num_heads "
                                          r"unset \(the file gives it\) or pass 3"):
        load_pretrained(path, num_heads=6)
    with pytest.raises(ConfigError, match=field):  # as a ViTConfig override too (TrainConfig.model_overrides)
        load_pretrained(path, format=fmt, **{"num_heads": 6, "drop_path": 0.1})
    same = load_pretrained(path, num_heads=3)  # agreeing is fine
    with torch.no_grad():
        torch.testing.assert_close(same(X), model(X), atol=1e-5, rtol=1e-5)


def test_run_folders_resolve_as_training_resolves_them(tmp_path):
    from vitlab.checkpoints import resolve_checkpoint

    best, last = randomise(VisionTransformer(CFG), seed=1), randomise(VisionTransformer(CFG), seed=2)
    run = tmp_path / "run"
    best.save_pretrained(run / ".best.old")  # a swap of best/ killed between its two renames
    last.save_pretrained(run / "last")
    assert resolve_checkpoint(run) == run / ".best.old"
    assert detect_format(run) == "vitlab"
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(run)(X), best(X), atol=0, rtol=0)
    assert (run / ".best.old").is_dir() and not (run / "best").exists()  # read-only: the run is not tidied
    (run / "last").rename(run / ".last.old")
    (run / ".best.old" / "model.safetensors").unlink()
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(run)(X), last(X), atol=0, rtol=0)


def test_a_hf_folder_is_not_taken_for_a_vitlab_folder(tmp_path):
    folder = export_hf(randomise(VisionTransformer(CFG)), tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "vit"
    assert detect_format(folder) == "hf"


def test_a_pickled_state_dict_is_read_once(tmp_path, monkeypatch):
    model = randomise(VisionTransformer(CFG))
    torch.save(to_timm_state_dict(model), tmp_path / "vit.pth")
    calls = []
    real_load = torch.load

    def counting_load(*args, **kwargs):
        calls.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    loaded = load_pretrained(tmp_path / "vit.pth", num_heads=3)
    assert len(calls) == 1
    assert detect_format(tmp_path / "vit.pth") == "timm" and len(calls) == 2  # the public API still reads it
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt, expected", [
    ("torchvision", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),  # torchvision's weights: ImageNet's
    ("jax", ((0.5,) * 3, (0.5,) * 3)),  # google-research scales inputs to [-1, 1]
    ("timm", None),  # a timm state dict does not say
    ("vitlab", None),  # a bare save_pretrained folder has no preprocess.json
    ("hf", None),  # no preprocessor_config.json
])
def test_pretrained_normalization_is_what_the_format_says(tmp_path, fmt, expected):
    path = _write(randomise(VisionTransformer(CFG)), fmt, tmp_path)
    assert read_pretrained(path, num_heads=3).normalization == expected


def test_pretrained_normalization_from_the_folder_files(tmp_path):
    from vitlab.api import convert

    model = randomise(VisionTransformer(CFG))
    hf = export_hf(model, tmp_path / "hf")
    (hf / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.1, 0.2, 0.3], "image_std": 0.25}))  # one number: every channel
    assert read_pretrained(hf).normalization == ((0.1, 0.2, 0.3), (0.25, 0.25, 0.25))
    # `vitlab convert` carries it into the vitlab folder's preprocess.json, where fine-tuning finds it
    folder = convert(hf, tmp_path / "converted")
    assert json.loads((folder / "preprocess.json").read_text())["mean"] == [0.1, 0.2, 0.3]
    assert read_pretrained(folder).normalization == ((0.1, 0.2, 0.3), (0.25, 0.25, 0.25))
    (hf / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False, "image_mean": [0.1] * 3,
                                                             "image_std": [0.2] * 3}))
    assert read_pretrained(hf).normalization is None
