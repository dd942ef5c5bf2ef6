"""Hugging Face folders: loading save_pretrained output (safetensors and .bin, with and without a head) and
exporting a folder transformers loads with equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomise

transformers = pytest.importorskip("transformers")

from vitlab import CheckpointError, ConfigError, ViTConfig, VisionTransformer  # noqa: E402
from vitlab.interop import detect_format, export_hf, load_pretrained, read_pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _hf_config(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8, num_channels=3, layer_norm_eps=1e-12)
    return transformers.ViTConfig(**{**base, **kw})


def _images(n=3, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weights", ["safetensors", "bin", "bin-v5-names"])
def test_classification_folder_loads_with_equal_logits(tmp_path, weights):
    hf = transformers.ViTForImageClassification(_hf_config(id2label={0: "apple", 1: "banana", 2: "cherry"},
                                                           label2id={"apple": 0, "banana": 1, "cherry": 2}))
    randomise(hf)
    hf.eval().save_pretrained(tmp_path)
    if weights != "safetensors":
        # transformers 5 writes safetensors only; older versions wrote the pickled state dict under this name,
        # with the file's key names; a state_dict() saved by hand has transformers 5's in-memory names.
        from safetensors.torch import load_file

        state = hf.state_dict() if weights == "bin-v5-names" else load_file(tmp_path / "model.safetensors")
        assert ("vit.layers.0.attention.q_proj.weight" in state) == (weights == "bin-v5-names")
        (tmp_path / "model.safetensors").unlink()
        torch.save(state, tmp_path / "pytorch_model.bin")
    assert detect_format(tmp_path) == "hf"
    model = load_pretrained(tmp_path)
    assert model.config.labels == ["apple", "banana", "cherry"]
    assert model.config.num_classes == 3 and model.config.num_heads == 4
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(pixel_values=x).logits, atol=1e-5, rtol=0)


def test_vitmodel_without_head_loads_features(tmp_path):
    hf = transformers.ViTModel(_hf_config(), add_pooling_layer=True)  # the pooler is not part of vitlab's model
    randomise(hf, seed=3)
    hf.eval().save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.num_classes == 0 and model.config.labels is None
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=0)
        assert model(x).shape == (3, 32)  # no head: the pooled class token


def test_default_label_names_are_dropped(tmp_path):
    hf = transformers.ViTForImageClassification(_hf_config(num_labels=4))
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.num_classes == 4 and model.config.labels is None


def test_config_keys_left_out_take_transformers_defaults():
    from vitlab.interop.hf import vit_config_from_hf

    # A hand-written config.json may leave out what equals transformers' default; it fills those in.
    sparse = {"model_type": "vit", "image_size": 32, "patch_size": 8, "num_labels": 3}
    assert vit_config_from_hf(sparse) == vit_config_from_hf(transformers.ViTConfig(**sparse))
    assert (vit_config_from_hf(sparse).num_heads, vit_config_from_hf(sparse).mlp_dim) == (12, 3072)


def test_missing_and_mis_shaped_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = transformers.ViTForImageClassification(_hf_config(num_labels=2))
    hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    del state["vit.encoder.layer.1.attention.attention.key.weight"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing key 'vit.encoder.layer.1.attention"
                                              r".attention.key.weight'"):
        load_pretrained(tmp_path)
    state = load_file(weights)
    state["vit.encoder.layer.1.attention.attention.key.weight"] = torch.zeros(32, 32)
    state["vit.encoder.layer.0.intermediate.dense.bias"] = torch.zeros(65)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"'blocks.0.mlp.fc1.bias' has shape \(65,\)"):
        load_pretrained(tmp_path)
    state["vit.encoder.layer.0.intermediate.dense.bias"] = torch.zeros(64)
    state["vit.extra.weight"] = torch.zeros(2)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"unexpected key 'vit.extra.weight'"):
        load_pretrained(tmp_path)


def test_export_round_trip_through_transformers(tmp_path):
    cfg = ViTConfig(image_size=(32, 48), patch_size=8, hidden_dim=32, depth=2, num_heads=4, mlp_dim=64,
                    num_classes=3, labels=["cat", "dog", "eel"], patch_embed="linear")
    model = VisionTransformer(cfg).eval()
    randomise(model, seed=5)
    export_hf(model, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["id2label"] == {"0": "cat", "1": "dog", "2": "eel"}
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), atol=1e-5, rtol=0)
    assert hf.config.id2label == {0: "cat", 1: "dog", 2: "eel"}
    # and back into vitlab
    again = load_pretrained(tmp_path / "hf")
    assert again.config.labels == ["cat", "dog", "eel"]
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, word", [
    (dict(pool="mean"), "pool='mean'"),
    (dict(pos_embed="sincos"), "pos_embed='sincos'"),
    (dict(class_token=False, pool="mean"), "pool='mean'"),
    (dict(layer_scale=0.1), "layer_scale"),
    (dict(final_norm=False), "final_norm=False"),
    (dict(pool="mean", norm_after_pool=True), "pool='mean'"),
    (dict(representation_dim=16), "representation_dim"),
    (dict(patch_embed="conv_stem"), "patch_embed='conv_stem'"),
    (dict(locality_attention=True), "locality_attention"),
])
def test_export_refuses_what_hf_cannot_express(tmp_path, change, word):
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_dim=32, depth=1, num_heads=4, mlp_dim=64, num_classes=3)
    with pytest.raises(ConfigError, match=f"cannot export to a Hugging Face ViT folder: {word}".replace("(", r"\(")):
        export_hf(VisionTransformer(cfg.replace(**change)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_writes_the_normalisation_for_the_image_processor(tmp_path):
    # A trained run's preprocess.json becomes preprocessor_config.json: ViTImageProcessor then turns a photo
    # into the tensor vitlab's evaluation feeds the model, and loading the folder back keeps the normalisation.
    from PIL import Image

    from vitlab.data import EvalTransform
    from vitlab.api import export

    model = randomise(VisionTransformer(ViTConfig(image_size=32, patch_size=8, hidden_dim=32, depth=1, num_heads=4,
                                                  mlp_dim=64, num_classes=3)).eval())
    run = model.save_pretrained(tmp_path / "run")
    (run / "preprocess.json").write_text(json.dumps({"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3],
                                                      "image_size": [32, 32], "channels": 3}))
    out = export(run, tmp_path / "hf", format="hf")
    processor = transformers.ViTImageProcessor.from_pretrained(out)
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    theirs = processor(Image.fromarray(pixels.numpy()), return_tensors="pt")["pixel_values"]
    ours = EvalTransform(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), image_size=32)(pixels.permute(2, 0, 1)[None])
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert read_pretrained(out).normalization == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    assert not (export_hf(model, tmp_path / "bare") / "preprocessor_config.json").exists()  # nothing known
